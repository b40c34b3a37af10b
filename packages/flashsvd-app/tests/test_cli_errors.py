"""Every bad input gets one actionable line on stderr, a non-zero exit code, and no traceback."""

import json
import shutil

import pytest
import torch

from flashsvd.app import compression
from flashsvd.app.errors import describe


def _clean(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in res.stderr, res.stderr


def test_unknown_model_path(cli, tmp_path):
    _clean(
        cli("compress", "--model", str(tmp_path / "nope"), "--output", tmp_path / "o"), 2, "does not exist"
    )


def test_unknown_model_id_offline(cli, tmp_path):
    res = cli("compress", "--model", "someone/no-such-model", "--output", tmp_path / "o",
              env={"HF_HUB_OFFLINE": "1"})  # fmt: skip
    _clean(res, 2, "unknown model 'someone/no-such-model'", "offline")


def test_folder_without_config(cli, tmp_path):
    _clean(cli("info", tmp_path), 2, "no config.json")


def test_missing_task_data_offline(cli, fwsvd_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ../shared/data from here
    res = cli("eval", "-c", fwsvd_ckpt, "--task", "rte", env={"HF_HUB_OFFLINE": "1"})
    _clean(res, 2, "no data for task rte", "--data-file")
    res = cli("eval", "-c", fwsvd_ckpt, "--task", "sst2", "--data-dir", tmp_path)
    _clean(res, 2, "no dev data for task sst2")


def test_headless_model_on_a_classification_task(cli, data_dir):
    _clean(cli("eval", "--model", "default", "--task", "sst2", "--data-dir", data_dir), 2, "fine-tune first")


def test_rank_too_large(cli, tiny_bert, tmp_path):
    res = cli("compress", "--model", tiny_bert, "--rank-attn", "1000", "--output", tmp_path / "o")
    _clean(res, 2, "rank 1000 exceeds")
    assert not (tmp_path / "o").exists()


def test_two_rank_choices(cli, tiny_bert, tmp_path):
    res = cli(
        "compress", "--model", tiny_bert, "--rank", "4", "--keep-ratio", "0.5", "--output", tmp_path / "o"
    )
    _clean(res, 2, "choose one of")


def test_unknown_method(cli, tiny_bert):
    _clean(cli("compress", "--model", tiny_bert, "--method", "magic"), 2, "unknown method 'magic'", "whiten")


def test_checkpoint_from_a_newer_version(cli, whiten_ckpt, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(whiten_ckpt, newer)
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (newer / "config.json").write_text(json.dumps(config))
    _clean(cli("eval", "-c", newer, "--task", "stsb"), 2, "format 99", "pip install -U")
    assert json.loads(cli("info", newer, "--json").stdout)["loadable"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_requested_but_absent(cli, tiny_bert, tmp_path):
    res = cli("compress", "--model", tiny_bert, "--device", "cuda", "--output", tmp_path / "o")
    _clean(res, 2, "CUDA is not available", "--device cpu")


def test_out_of_memory_suggests_smaller_work(cli, tiny_bert, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(compression, "compress_model", oom)
    res = cli("compress", "--model", tiny_bert, "--output", tmp_path / "o")
    _clean(res, 3, "out of memory", "--batch-size", "--sequential")
    assert describe(RuntimeError("CUDA error: out of memory"))[1] == 3


def test_interrupt_leaves_no_partial_output(cli, tiny_bert, tmp_path, monkeypatch):
    real_save = compression.save_checkpoint

    def save_then_interrupt(model, tokenizer, report, folder):
        real_save(model, tokenizer, report, folder)
        raise KeyboardInterrupt

    monkeypatch.setattr(compression, "save_checkpoint", save_then_interrupt)
    res = cli("compress", "--model", tiny_bert, "--output", tmp_path / "o")
    _clean(res, 130, "interrupted", "nothing was written")
    assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback(cli, tmp_path):
    res = cli("compress", "--model", str(tmp_path / "nope"), "--debug")
    assert res.exit_code == 2 and "Traceback" in res.stderr


def test_ui_launcher_or_message(cli, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("flashsvd.app.ui") is None or importlib.util.find_spec("gradio") is None:
        res = cli("ui")
        assert res.exit_code != 0 and "Traceback" not in res.output
    else:
        called = {}
        import flashsvd.app.ui as ui

        monkeypatch.setattr(ui, "launch", lambda **kw: called.update(kw))
        assert cli("ui", "--port", "7999").exit_code == 0 and called["port"] == 7999


def test_existing_output_is_not_clobbered(cli, tiny_bert, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _clean(cli("compress", "--model", tiny_bert, "--output", out), 2, "did not write")
    # --overwrite replaces only what flashsvd wrote: a folder of someone's files stays as it is
    _clean(cli("compress", "--model", tiny_bert, "--output", out, "--overwrite"), 2, "even with --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert (
        cli(
            "compress", "--model", tiny_bert, "--method", "svd", "--rank", "4", "--output", ours, "--quiet"
        ).exit_code
        == 0
    )
    _clean(cli("compress", "--model", tiny_bert, "--output", ours), 2, "already exists", "--overwrite")
    res = cli(
        "compress",
        "--model",
        tiny_bert,
        "--method",
        "svd",
        "--rank",
        "2",
        "--output",
        ours,
        "--overwrite",
        "--quiet",
    )
    assert res.exit_code == 0, res.output
    assert json.loads((ours / "config.json").read_text())["quantization_config"]["method"] == "svd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "ours"]  # no hidden leftovers
