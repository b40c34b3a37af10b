"""End to end on the packaged MiniLM and real STS-B: compress (whiten, fwsvd), eval zero-shot, info."""

import json

from safetensors import safe_open


def test_whiten_checkpoint_is_complete(whiten_ckpt):
    names = {p.name for p in whiten_ckpt.iterdir()}
    assert {"config.json", "flashsvd.safetensors", "flashsvd_report.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    report = json.loads((whiten_ckpt / "flashsvd_report.json").read_text())
    assert report["report"]["method"] == "whiten"
    assert report["report"]["calibration"]["batches"] >= 1
    ranks = report["report"]["ranks"]
    assert {r for r in ranks.values() if r is not None} == {8}  # only attention was factorized
    assert report["versions"]["flashsvd-app"] and report["timestamp"]


def test_fwsvd_checkpoint_is_a_classifier(fwsvd_ckpt):
    config = json.loads((fwsvd_ckpt / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["quantization_config"]["method"] == "fwsvd"
    with safe_open(str(fwsvd_ckpt / "flashsvd.safetensors"), "pt") as fh:
        assert any(k.startswith("classifier.") for k in fh.keys())  # noqa: SIM118


def test_eval_stsb_zero_shot_writes_json(cli, whiten_ckpt, data_dir, tmp_path):
    out = tmp_path / "results.json"
    res = cli("eval", "--checkpoint", whiten_ckpt, "--task", "stsb", "--data-dir", data_dir, "--max-eval-samples",
              "48", "--batch-size", "16", "--max-length", "32", "--repeats", "1", "--backend", "torch",
              "--device", "cpu", "--output", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "spearman" in res.stdout
    r = json.loads(out.read_text())
    assert r["mode"] == "zero-shot" and r["n_examples"] == 48
    assert 0.3 < r["metrics"]["spearman"] <= 1.0  # rank-8 attention keeps most of MiniLM's STS quality
    assert r["memory_latency"]["persistent_bytes"] > 0 and r["memory_latency"]["latency_ms"] > 0
    assert set(r["definitions"]) >= {"persistent_bytes", "peak_bytes", "transient_bytes", "latency_ms"}
    assert r["model"]["method"] == "whiten" and r["model"]["params"] < r["model"]["params_before"]
    for key in ("device", "versions", "git_commit", "timestamp"):
        assert key in r


def test_eval_json_mode_prints_only_json(cli, whiten_ckpt, data_dir):
    res = cli("eval", "-c", whiten_ckpt, "--task", "stsb", "--data-file", data_dir / "stsb" / "train.tsv",
              "--split", "train", "--max-eval-samples", "16", "--max-length", "32", "--repeats", "1",
              "--backend", "flash", "--device", "cpu", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["backend"] == "flash" and r["n_examples"] == 16


def test_info_table_and_json(cli, whiten_ckpt):
    res = cli("info", whiten_ckpt)
    assert res.exit_code == 0, res.output
    assert "whiten" in res.stdout and "flashsvd.safetensors" in res.stdout
    res = cli("info", whiten_ckpt, "--json")
    d = json.loads(res.stdout)
    assert d["compressed"] and d["method"] == "whiten" and d["loadable"]
    assert d["stored_parameters"] == d["params_after"]
    assert d["ranks_summary"]["distinct"] == [8]
    assert d["made"]["task"] == "stsb"
