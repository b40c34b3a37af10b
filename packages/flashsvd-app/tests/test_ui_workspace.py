"""The UI's safety rules without a browser: checkpoint names, no hidden --overwrite, leftovers, analytics."""

from __future__ import annotations

import json
import os

import pytest

gradio = pytest.importorskip("gradio")

from flashsvd.app.ui import create_ui, handlers, launch  # noqa: E402
from flashsvd.app.ui.app import workspace  # noqa: E402

DEAD_PID = 4_194_305  # above Linux's largest pid: never a running process


@pytest.mark.parametrize("name", [".", "..", "../elsewhere", "a/b", "///", ".hidden", "-.-"])
def test_checkpoint_names_that_leave_the_folder_are_refused(tmp_path, name):
    ws = workspace(tmp_path)
    with pytest.raises(handlers.UIError, match="not a plain folder name"):
        handlers.compress_args(ws, "default", "svd", 0.5, "", 8, name)


def test_compress_never_passes_overwrite(tmp_path):
    ws = workspace(tmp_path)
    args, out = handlers.compress_args(ws, "default", "svd", 0.5, "", 8, "my model v2")
    assert out == ws.checkpoints / "my-model-v2" and "--overwrite" not in args
    args, out = handlers.compress_args(ws, "default", "svd", 0.5, "", 8, "")
    assert out.parent == ws.checkpoints and "--overwrite" not in args
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with pytest.raises(handlers.UIError, match="already exists"):
        handlers.compress_args(ws, "default", "svd", 0.5, "", 8, "")


def _leftovers(ws) -> tuple:
    models = ws.checkpoints
    good = models / "good"
    good.mkdir(parents=True)
    (good / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "flashsvd", "method": "svd"}})
    )
    dead = models / f".good2.partial-{DEAD_PID}-abc"  # a save killed with SIGKILL: empty config.json
    dead.mkdir()
    (dead / "config.json").write_text("")
    live = models / f".good3.partial-{os.getppid()}-abc"  # a save still running in another process
    live.mkdir()
    (live / "config.json").write_text("")
    run = ws.finetuned / "bert" / "svd" / "x"
    run.mkdir(parents=True)
    (run / f".checkpoint-4.partial-{DEAD_PID}-q").mkdir()
    return good, dead, live, run


def test_listings_ignore_partials_and_survive_a_damaged_config(tmp_path):
    ws = workspace(tmp_path)
    good, _dead, live, _run = _leftovers(ws)
    assert ws.list_checkpoints() == [good]
    broken = ws.checkpoints / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("")
    rows = {row[0]: row for row in handlers.checkpoint_table(ws)}
    assert set(rows) == {str(good), str(broken)}
    assert rows[str(broken)][1] == "unreadable config.json" and rows[str(good)][1] == "svd"
    assert live.is_dir()


def test_the_ui_starts_over_leftovers_and_removes_those_of_dead_processes(tmp_path):
    ws = workspace(tmp_path)
    good, dead, live, run = _leftovers(ws)
    demo = create_ui(tmp_path)
    assert not dead.exists() and not list(run.iterdir())
    assert live.is_dir() and good.is_dir()
    assert demo.analytics_enabled is False and demo.config["analytics_enabled"] is False


def test_launch_names_our_share_flag_and_listens_locally(tmp_path, capsys):
    demo = launch(tmp_path, port=None, block=False)
    try:
        out = capsys.readouterr().out
        assert demo.local_url.startswith("http://127.0.0.1:")
        assert "--share" in out and "share=True" not in out
        assert demo.share_url is None
    finally:
        demo.close()


def test_ui_command_turns_analytics_off_before_gradio(cli, monkeypatch):
    import flashsvd.app.ui as ui

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "restored after the test")
    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED")
    seen = {}
    monkeypatch.setattr(
        ui, "launch", lambda **kw: seen.update(kw, env=os.environ.get("GRADIO_ANALYTICS_ENABLED"))
    )
    assert cli("ui").exit_code == 0
    assert seen["env"] == "False" and seen["host"] == "127.0.0.1" and seen["share"] is False


def test_compare_skips_result_files_that_are_not_ours(tmp_path):
    ws = workspace(tmp_path)
    ws.results.mkdir()
    (ws.results / "latin1.json").write_bytes(b'{"task": "caf\xe9"}')
    (ws.results / "list.json").write_text("[1, 2]")
    (ws.results / "ok.json").write_text('{"task": "stsb"}')
    assert [r["task"] for r in ws.load_results()] == ["stsb"]
