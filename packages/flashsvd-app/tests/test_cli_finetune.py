"""Fine-tune a compressed MiniLM SST-2 classifier for a few steps, then resume it."""

import json


def test_finetune_then_resume(cli, fwsvd_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--checkpoint", fwsvd_ckpt, "--task", "sst2", "--data-dir", data_dir,
            "--max-train-samples", "48", "--max-eval-samples", "32", "--batch-size", "8", "--max-length", "32",
            "--eval-steps", "2", "--learning-rate", "1e-4", "--device", "cpu", "--output-dir", out, "--quiet"]  # fmt: skip
    res = cli(*args, "--max-steps", "2")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "training_state.json").read_text())["latest"] == "checkpoint-2"
    ckpt = out / "checkpoint-2"
    assert {"optimizer.safetensors", "optimizer.json", "trainer_state.json", "flashsvd.safetensors"} <= {
        p.name for p in ckpt.iterdir()
    }
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))
    assert list((out / "runs").iterdir()), "TensorBoard logs"
    assert (out / "best" / "config.json").is_file()

    res = cli(*args, "--max-steps", "4", "--json")  # same command, longer: resumes at step 2
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["steps"] == 4
    assert [h["step"] for h in r["history"]] == [2, 4]
    assert (out / "checkpoint-4").is_dir()
    # the fine-tuned model is still a compressed checkpoint that eval can load
    best = json.loads((out / "best" / "config.json").read_text())
    assert best["quantization_config"]["method"] == "fwsvd"


def test_finetune_refuses_to_clobber_a_run(cli, fwsvd_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = cli("finetune", "-c", fwsvd_ckpt, "--task", "sst2", "--data-dir", data_dir, "--output-dir", out,
              "--max-steps", "1")  # fmt: skip
    assert res.exit_code == 2
    assert "--overwrite" in res.stderr
