"""Fine-tune a compressed MiniLM SST-2 classifier for a few steps, then resume it."""

import json
import shutil


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


def _args(ckpt, data_dir, out, *extra):
    return ["finetune", "-c", ckpt, "--task", "sst2", "--data-dir", data_dir, "--output-dir", out,
            "--max-train-samples", "16", "--max-eval-samples", "16", "--batch-size", "8", "--max-length", "32",
            "--device", "cpu", "--quiet", *extra]  # fmt: skip


def test_finetune_refuses_to_clobber_a_folder_it_did_not_write(cli, fwsvd_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ((), ("--overwrite",), ("--no-resume", "--overwrite")):
        res = cli(*_args(fwsvd_ckpt, data_dir, out, "--max-steps", "1", *extra))
        assert res.exit_code == 2, res.output
        assert "did not write" in res.stderr
        assert (out / "notes.txt").read_text() == "mine"


def test_resume_with_other_hyper_parameters_is_refused(cli, fwsvd_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    res = cli(*_args(fwsvd_ckpt, data_dir, out, "--max-steps", "1", "--learning-rate", "1e-4"))
    assert res.exit_code == 0, res.output
    before = (out / "checkpoint-1" / "trainer_state.json").read_text()
    res = cli(
        *_args(fwsvd_ckpt, data_dir, out, "--max-steps", "2", "--learning-rate", "2e-4", "--batch-size", "4")
    )
    assert res.exit_code == 2, res.output
    assert (
        "--learning-rate was 0.0001, now 0.0002" in res.stderr and "--batch-size was 8, now 4" in res.stderr
    )
    assert "--no-resume --overwrite" in res.stderr
    assert (out / "checkpoint-1" / "trainer_state.json").read_text() == before
    assert not (out / "checkpoint-2").exists()


def test_run_killed_before_its_first_checkpoint_starts_over_by_itself(cli, fwsvd_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    res = cli(*_args(fwsvd_ckpt, data_dir, out, "--max-steps", "1"))
    assert res.exit_code == 0, res.output
    # what a kill between best/ and checkpoint-1 leaves: a run folder without a complete checkpoint
    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p)
    (out / "training_state.json").unlink()
    (out / ".checkpoint-1.partial-999999999-x").mkdir()  # a dead process's partial save
    res = cli(*_args(fwsvd_ckpt, data_dir, out, "--max-steps", "1"))
    assert res.exit_code == 0, res.output
    assert (out / "checkpoint-1" / "trainer_state.json").is_file() and (
        out / "best" / "config.json"
    ).is_file()
    assert not list(out.glob(".*partial*"))


def test_interrupt_before_the_first_checkpoint_says_so(cli, fwsvd_ckpt, data_dir, tmp_path, monkeypatch):
    from flashsvd.app import training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    res = cli(*_args(fwsvd_ckpt, data_dir, tmp_path / "run", "--max-steps", "1"))
    assert res.exit_code == 130
    assert "before the first checkpoint" in res.stderr and "kept" not in res.stderr


def test_glue_finetune_refuses_to_run_under_torchrun(cli, fwsvd_ckpt, data_dir, tmp_path, monkeypatch):
    """GLUE runs are one process: under torchrun each rank would train everything and write one folder."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "ddp_glue"
    res = cli("finetune", "-c", fwsvd_ckpt, "--task", "sst2", "--data-dir", data_dir, "--output-dir", out)
    assert res.exit_code == 2, res.output
    assert "one process" in res.output and "--task lm" in res.output
    assert not out.exists()
