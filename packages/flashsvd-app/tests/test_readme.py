"""The README's "Use" section works as written: its commands in order, then its Python snippet.

Only sizes are added (fewer calibration texts, examples and steps, CPU, the shared data folder), never
anything that changes what a command does, so a README that drifts from the CLI fails here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[3] / "README.md"

pytestmark = pytest.mark.slow

#: per command: options that only make it smaller (never change its meaning)
SMALLER = {
    "compress": ["--calib-samples", "16", "--calib-max-length", "32", "--device", "cpu"],
    "eval": ["--max-eval-samples", "16", "--max-length", "32", "--repeats", "1", "--device", "cpu"],
    "finetune": [
        "--max-train-samples",
        "16",
        "--max-eval-samples",
        "16",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--device",
        "cpu",
    ],
    "info": [],
}


def _use_section() -> str:
    text = README.read_text(encoding="utf-8")
    return text[text.index("## Use") : text.index("\n## ", text.index("## Use") + 1)]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _use_section(), flags=re.S)


def test_the_use_commands_run_in_order(cli, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = [shlex.split(line, comments=True) for line in _blocks("bash")[0].splitlines() if line.strip()]
    assert [c[:2] for c in commands][-1] == ["flashsvd", "ui"]  # started by hand; tested in test_ui_*
    for argv in commands[:-1]:
        assert argv[0] == "flashsvd", argv
        extra = SMALLER[argv[1]] + (["--data-dir", str(data_dir)] if "--task" in argv else [])
        res = cli(*argv[1:], *extra)
        assert res.exit_code == 0, (argv, res.output)
    assert (tmp_path / "results" / "w.json").is_file()


def test_the_python_snippet_runs_and_saves_a_loadable_checkpoint(tmp_path, monkeypatch):
    from flashsvd.app.defaults import packaged_minilm_path

    (code,) = _blocks("python")
    assert 'name = "sentence-transformers/all-MiniLM-L6-v2"' in code
    code = code.replace('"sentence-transformers/all-MiniLM-L6-v2"', repr(str(packaged_minilm_path())))
    monkeypatch.chdir(tmp_path)
    sentences = (
        (README.parent.parent / "shared" / "data" / "sst2" / "train.tsv").read_text().splitlines()[1:33]
    )
    (tmp_path / "notes.txt").write_text("\n".join(s.split("\t")[0] for s in sentences) + "\n")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["report"].method == "svdllm"

    from transformers import AutoTokenizer

    import flashsvd.models

    loaded = flashsvd.models.load(tmp_path / "out")
    assert flashsvd.models.is_compressed(loaded)
    assert AutoTokenizer.from_pretrained(tmp_path / "out").vocab_size == namespace["tokenizer"].vocab_size
