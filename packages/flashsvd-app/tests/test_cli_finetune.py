"""Fine-tune a compressed MiniLM SST-2 classifier for a few steps, then resume it (transformers' Trainer
underneath, checkpoints in safetensors + JSON)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch


def test_finetune_then_resume(cli, fwsvd_ckpt, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--checkpoint", fwsvd_ckpt, "--task", "sst2", "--data-dir", data_dir,
            "--max-train-samples", "48", "--max-eval-samples", "32", "--batch-size", "8", "--max-length", "32",
            "--eval-steps", "2", "--learning-rate", "1e-4", "--device", "cpu", "--output-dir", out, "--quiet"]  # fmt: skip
    res = cli(*args, "--max-steps", "2")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "training_state.json").read_text())["latest"] == "checkpoint-2"
    ckpt = out / "checkpoint-2"
    assert {"optimizer.safetensors", "optimizer.json", "trainer_state.json", "flashsvd.safetensors", "scheduler.json",
            "rng.safetensors", "rng.json", "training_args.json"} <= {p.name for p in ckpt.iterdir()}  # fmt: skip
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")], "no pickle"
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
    # another number of processes would change the global batch and the batches to skip
    res = cli(
        *_args(fwsvd_ckpt, data_dir, out, "--max-steps", "2", "--learning-rate", "1e-4"),
        env={"WORLD_SIZE": "2"},
    )
    assert res.exit_code == 2, res.output
    assert "processes (torchrun --nproc-per-node) was 1, now 2" in res.stderr
    # a checkpoint of the hand-written loop that came before Trainer has no training_args.json
    (out / "checkpoint-1" / "training_args.json").unlink()
    res = cli(*_args(fwsvd_ckpt, data_dir, out, "--max-steps", "2", "--learning-rate", "1e-4"))
    assert res.exit_code == 2 and "earlier flashsvd" in res.stderr and "--no-resume --overwrite" in res.stderr


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


def _weights(folder):
    from flashsvd.models.checkpoint import read_weights

    return read_weights(folder)


def test_an_interrupted_run_resumes_to_the_result_of_an_uninterrupted_one(
    cli, fwsvd_ckpt, data_dir, tmp_path, monkeypatch
):
    """Killed after its step-2 checkpoint and rerun, a run ends where one that was never stopped ends:
    same data order, dropout, optimizer and schedule state (all restored from safetensors + JSON)."""
    from flashsvd.app.hf_trainer import FlashSVDTrainer

    extra = ("--max-steps", "4", "--eval-steps", "2", "--learning-rate", "1e-3", "--json")
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    res = cli(*_args(fwsvd_ckpt, data_dir, straight, *extra))
    assert res.exit_code == 0, res.output
    expected = json.loads(res.stdout)

    save = FlashSVDTrainer._save_checkpoint

    def save_then_die(self, model, trial):
        save(self, model, trial)
        if self.state.global_step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(FlashSVDTrainer, "_save_checkpoint", save_then_die)
    res = cli(*_args(fwsvd_ckpt, data_dir, broken, *extra))
    assert res.exit_code == 130 and "rerun the same command to resume" in res.stderr
    assert not (broken / "results.json").exists() and not (broken / "checkpoint-4").exists()
    monkeypatch.setattr(FlashSVDTrainer, "_save_checkpoint", save)
    res = cli(*_args(fwsvd_ckpt, data_dir, broken, *extra))
    assert res.exit_code == 0, res.output
    resumed = json.loads(res.stdout)
    assert resumed["steps"] == 4 and [h["step"] for h in resumed["history"]] == [2, 4]
    for key in ("best_metric", "best_step"):
        assert resumed[key] == expected[key], key
    assert [h["accuracy"] for h in resumed["history"]] == [h["accuracy"] for h in expected["history"]]
    runs = (straight, broken)
    a, b = (_weights(d / "checkpoint-4") for d in runs)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    logs = [json.loads((d / "checkpoint-4" / "trainer_state.json").read_text())["log_history"] for d in runs]
    losses = [[(e["step"], e["loss"]) for e in log if "loss" in e] for log in logs]
    assert [s for s, _ in losses[1]] == [1, 2, 3, 4]
    assert [v for _, v in losses[1]] == pytest.approx([v for _, v in losses[0]], rel=1e-5)


@pytest.mark.slow
def test_torchrun_two_processes_train_glue_data_parallel_write_once_and_resume(
    fwsvd_ckpt, data_dir, tmp_path
):
    """``torchrun --nproc-per-node 2 -m flashsvd.app finetune --task sst2`` (gloo on CPU): Trainer splits each
    batch over the two processes, only rank 0 prints and writes; the same command with more steps resumes."""
    out = tmp_path / "ddp_glue"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", FLASHSVD_DIST_TIMEOUT="300")

    def torchrun(steps: str) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "flashsvd.app", "finetune", "-c", str(fwsvd_ckpt), "--task", "sst2", "--data-dir", str(data_dir),
               "--output-dir", str(out), "--max-train-samples", "32", "--max-eval-samples", "16", "--batch-size",
               "4", "--max-length", "32", "--eval-steps", "2", "--max-steps", steps, "--learning-rate", "1e-4",
               "--device", "cpu", "--json"]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)  # one JSON document: rank 1 printed nothing

    r = torchrun("4")
    assert r["steps"] == 4 and r["world_size"] == 2
    assert [h["step"] for h in r["history"]] == [2, 4]
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 4 and state["global_step"] == 4
    rng = json.loads((out / "checkpoint-4" / "rng.json").read_text())
    assert len(rng["processes"]) == 2  # every process's generators, written once
    assert sorted(p.name for p in out.parent.iterdir()) == ["ddp_glue"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no partial folder left behind"

    r = torchrun("6")
    assert r["steps"] == 6 and [h["step"] for h in r["history"]] == [2, 4, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
