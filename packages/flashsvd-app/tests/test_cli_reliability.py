"""Issue 13: nothing lost, nothing silently wrong. Each probe that failed became one test here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flashsvd.app import compression, modelio
from flashsvd.app.errors import AppError
from flashsvd.app.outputs import clean_stale_partials
from flashsvd.app.tasks.data import calibration_texts

DEAD_PID = 4_194_305  # above Linux's largest pid: never a running process


def _clean(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output and "unexpected" not in res.output
    for needle in needles:
        assert needle in res.stderr, res.stderr


def _never_compress(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the output should have been refused before compressing")

    monkeypatch.setattr(compression, "compress_model", boom)


# --- outputs: only what we wrote is replaced, checked before the work ------------------------------------


def test_dot_dot_and_a_folder_of_checkpoints_are_not_outputs(cli, tiny_bert, tmp_path, monkeypatch):
    _never_compress(monkeypatch)
    models = tmp_path / "compressed_models"
    (models / "kept").mkdir(parents=True)
    (models / "kept" / "config.json").write_text("{}")
    _clean(
        cli("compress", "--model", tiny_bert, "--output", f"{models}/..", "--overwrite"),
        2,
        "not a folder name",
    )
    # `compressed_models/.` is the folder of checkpoints itself, not a checkpoint
    _clean(
        cli("compress", "--model", tiny_bert, "--output", f"{models}/.", "--overwrite"), 2, "did not write"
    )
    assert (models / "kept" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed_models"]


def test_an_output_that_is_a_file_is_refused_and_kept(cli, tiny_bert, tmp_path, monkeypatch):
    _never_compress(monkeypatch)
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    _clean(cli("compress", "--model", tiny_bert, "--output", target, "--overwrite"), 2, "is not a folder")
    assert target.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # no hidden .notes.txt.old-PID


def test_unwritable_output_is_refused_before_compressing(cli, tiny_bert, tmp_path, monkeypatch):
    _never_compress(monkeypatch)
    (tmp_path / "file").write_text("x")
    _clean(cli("compress", "--model", tiny_bert, "--output", tmp_path / "file" / "ckpt"), 2, "cannot write")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        _clean(cli("compress", "--model", tiny_bert, "--output", ro / "ckpt"), 2, "not writable")


def test_partials_of_dead_processes_are_cleaned_and_live_ones_kept(cli, tiny_bert, tmp_path):
    dead = tmp_path / f".o.partial-{DEAD_PID}-abc"
    dead.mkdir()
    (dead / "config.json").write_text("")  # an interrupted save: empty config.json
    (tmp_path / f".o.old-{DEAD_PID}").mkdir()
    (tmp_path / f".r.json.partial-{DEAD_PID}-x").write_text("{")
    live = tmp_path / f".p.partial-{os.getppid()}-abc"
    live.mkdir()
    old_style, recent = (
        tmp_path / ".q.partial-k2j_x9ab",
        tmp_path / ".s.partial-m3n_y0cd",
    )  # no pid in the name
    old_style.mkdir()
    recent.mkdir()
    os.utime(old_style, (time.time() - 2 * 86400,) * 2)
    res = cli("compress", "--model", tiny_bert, "--rank", "4", "--output", tmp_path / "o", "--quiet")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, recent.name, "o"]
    assert clean_stale_partials(tmp_path) == []


def test_sigterm_during_a_save_leaves_nothing_behind(tiny_bert, tmp_path):
    """The UI's Cancel sends SIGTERM: the command must stop like Ctrl-C and remove its partial folder."""
    script = textwrap.dedent(f"""
        import sys, time
        from flashsvd.app import compression, cli
        real = compression.save_checkpoint
        def slow_save(*args):
            real(*args)
            print("SAVED", flush=True)
            time.sleep(60)
        compression.save_checkpoint = slow_save
        sys.argv = ["flashsvd", "compress", "--model", {str(tiny_bert)!r}, "--rank", "4",
                    "--output", {str(tmp_path / "o")!r}, "--quiet"]
        cli.main()
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "SAVED" in line:
            break
    assert list(tmp_path.glob(".o.partial-*")), "the save should be in progress"
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


# --- calibration text: by header, by --calib-text-column, never numbers ----------------------------------


def test_calib_data_refuses_an_index_column(cli, tiny_bert, data_dir, tmp_path, monkeypatch):
    _never_compress(monkeypatch)
    stsb = data_dir / "stsb" / "train.tsv"  # header-less GLUE layout: column 0 is the row index
    res = cli(
        "compress",
        "--model",
        tiny_bert,
        "--method",
        "whiten",
        "--calib-data",
        stsb,
        "--output",
        tmp_path / "o",
    )
    _clean(res, 2, "does not hold text", "'0', '1', '2'", "--calib-text-column", "7, 8")


def test_calib_text_column_by_index_calibrates_on_sentences(cli, tiny_bert, data_dir, tmp_path):
    stsb = data_dir / "stsb" / "train.tsv"
    res = cli("compress", "--model", tiny_bert, "--method", "whiten", "--rank", "4", "--calib-data", stsb,
              "--calib-text-column", "7", "--calib-samples", "8", "--output", tmp_path / "o", "--device", "cpu")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "8 texts from" in res.stderr and "(column 7)" in res.stderr


def test_calibration_columns_by_header(tmp_path):
    sst2 = tmp_path / "s.tsv"
    sst2.write_text("sentence\tlabel\na fine film\t1\na dull plot\t0\n")
    assert calibration_texts(sst2) == (["a fine film", "a dull plot"], ["sentence"])
    pairs = tmp_path / "p.csv"
    pairs.write_text(
        'idx,sentence1,sentence2,label\n0,"A cat sat, then slept.",A dog ran.,1\n1,Two men talk.,A man talks.,0\n'
    )
    texts, cols = calibration_texts(pairs)
    assert cols == ["sentence1", "sentence2"]
    assert texts == [
        "A cat sat, then slept.",
        "A dog ran.",
        "Two men talk.",
        "A man talks.",
    ]  # pairs together
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"id": 3, "text": "hello there world"}\n{"id": 4, "text": "general kenobi"}\n')
    assert calibration_texts(rows, 1) == (["hello there world"], ["text"])
    assert calibration_texts(pairs, column="sentence2")[0] == ["A dog ran.", "A man talks."]
    with pytest.raises(AppError, match="does not hold text"):
        calibration_texts(sst2, column="label")
    with pytest.raises(AppError, match="not a column"):
        calibration_texts(sst2, column="review")
    with pytest.raises(AppError, match="has 2 columns"):
        calibration_texts(sst2, column="5")


def test_calib_text_column_without_calib_data(cli, tiny_bert, tmp_path, monkeypatch):
    _never_compress(monkeypatch)
    res = cli("compress", "--model", tiny_bert, "--calib-text-column", "text", "--output", tmp_path / "o")
    _clean(res, 2, "--calib-text-column")


# --- errors that name what to fix ------------------------------------------------------------------------


def test_a_file_that_is_not_utf8_is_named(cli, tiny_bert, whiten_ckpt, tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    res = cli("eval", "-c", whiten_ckpt, "--task", "stsb", "--data-file", latin.with_suffix(".tsv"))
    _clean(res, 2, "does not exist")
    shutil.copy(latin, latin.with_suffix(".tsv"))
    _clean(cli("eval", "-c", whiten_ckpt, "--task", "stsb", "--data-file", latin.with_suffix(".tsv")), 2,
           f"{latin.with_suffix('.tsv')} is not UTF-8 text", "iconv")  # fmt: skip
    res = cli(
        "compress",
        "--model",
        tiny_bert,
        "--method",
        "whiten",
        "--calib-data",
        latin,
        "--output",
        tmp_path / "o",
    )
    _clean(res, 2, f"--calib-data {latin} is not UTF-8 text")
    assert not (tmp_path / "o").exists()
    config = tmp_path / "ckpt"
    config.mkdir()
    (config / "config.json").write_bytes(b"{\xff}")
    _clean(cli("info", config), 2, f"{config / 'config.json'} is not UTF-8 text")


def test_info_on_a_truncated_safetensors(cli, whiten_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(whiten_ckpt, broken)
    st = broken / "flashsvd.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    _clean(cli("info", broken), 2, "flashsvd.safetensors", "truncated")
    st.write_bytes(b"\x00\x01")
    _clean(cli("info", broken), 2, "flashsvd.safetensors", "not a readable safetensors file")


def test_checkpoint_errors_are_clear(cli, whiten_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(whiten_ckpt, broken)
    (broken / "flashsvd.safetensors").unlink()
    _clean(cli("eval", "-c", broken, "--task", "stsb"), 2, "flashsvd.safetensors")


def test_a_hub_id_fails_at_once_without_network(cli, tmp_path, monkeypatch):
    """Not offline by the environment, but no Hub reachable: say so before from_pretrained retries."""
    monkeypatch.setattr(modelio, "hub_unreachable", lambda timeout=3.0: "hub.invalid")
    monkeypatch.setattr(modelio, "load", lambda *a, **k: pytest.fail("must not try to download"))
    env = {"HF_HUB_OFFLINE": "", "HF_DATASETS_OFFLINE": "", "TRANSFORMERS_OFFLINE": ""}
    res = cli("compress", "-m", "nope/model", "--output", tmp_path / "o", env=env)
    _clean(res, 2, "unknown model 'nope/model': not a local folder", "(hub.invalid) cannot be reached")


def test_hub_probe_of_an_unreachable_endpoint(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert modelio.hub_unreachable(timeout=2.0) == "127.0.0.1"


@pytest.mark.parametrize("module", ["flashsvd.app", "flashsvd.app.cli"])
def test_python_dash_m_runs_the_command(module, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [sys.executable, "-m", module, "info", tmp_path], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2 and "no config.json" in res.stderr, res
    res = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "Usage: flashsvd" in res.stdout


def test_eval_says_on_screen_when_it_scores_the_train_split(cli, whiten_ckpt, data_dir):
    assert not (data_dir / "stsb" / "dev.tsv").exists()  # this data folder has STS-B train only
    res = cli("eval", "-c", whiten_ckpt, "--task", "stsb", "--data-dir", data_dir, "--max-eval-samples", "16",
              "--max-length", "32", "--repeats", "1", "--backend", "torch", "--device", "cpu", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "the train split is scored" in res.stderr
    r = json.loads(res.stdout)
    assert r["split"] == "train" and "train split" in r["note"]


def test_eval_output_replaces_only_a_flashsvd_result(cli, whiten_ckpt, data_dir, tmp_path, monkeypatch):
    from flashsvd.app import evaluation

    monkeypatch.setattr(evaluation, "evaluate", lambda *a, **k: pytest.fail("refuse before evaluating"))
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    _clean(cli("eval", "-c", whiten_ckpt, "--task", "stsb", "--output", notes), 2, "not a flashsvd result")
    assert notes.read_text() == "mine"
    _clean(cli("eval", "-c", whiten_ckpt, "--task", "stsb", "--output", tmp_path), 2, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_bench_output_dir_is_checked_before_measuring(cli, tiny_bert, tmp_path):
    (tmp_path / "file").write_text("x")
    res = cli("bench", "--model", tiny_bert, "--output-dir", tmp_path / "file" / "bench")
    _clean(res, 2, "cannot write", "is a file")


def test_an_unnamed_decoding_error_still_reads_as_advice():
    from flashsvd.app.errors import describe

    message, code = describe(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert code == 2 and message.startswith("a file is not UTF-8 text") and "--debug" in message


def test_a_hub_id_in_the_local_cache_loads_offline(cli, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setattr(
        modelio, "cached_snapshot", lambda repo_id: tiny_bert if repo_id == "someone/tiny" else None
    )
    monkeypatch.chdir(tmp_path)
    res = cli(
        "compress",
        "-m",
        "someone/tiny",
        "--method",
        "svd",
        "--rank",
        "4",
        "--quiet",
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "compressed_models" / "tiny_svd_r4" / "config.json").is_file()
