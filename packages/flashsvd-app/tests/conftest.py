"""Shared fixtures: the real data folder, a CLI runner, a tiny random BERT, and compressed MiniLMs.

The expensive artefacts (compressed checkpoints) are session-scoped and shared by several tests, and
they compress only the attention projections (``--rank-attn``) so the whole suite stays within minutes
on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flashsvd.app.cli import app

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "sst2" / "dev.tsv").is_file():
        pytest.skip(f"real data not found at {DATA}")
    return DATA.resolve()


@pytest.fixture(scope="session")
def cli():
    """``cli(*args)`` runs the flashsvd command and returns Click's Result (stdout and stderr kept apart)."""
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str] | None = None):
        return runner.invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)

    return invoke


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide random BERT with the MiniLM tokenizer: fast to compress and benchmark."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from flashsvd.app.defaults import packaged_minilm_path

    folder = tmp_path_factory.mktemp("tiny_bert")
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(packaged_minilm_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def whiten_ckpt(cli, data_dir, tmp_path_factory) -> Path:
    """MiniLM compressed with whiten (attention at rank 8 per head), calibrated on 16 STS-B sentences."""
    out = tmp_path_factory.mktemp("ckpt") / "minilm_whiten"
    res = cli("compress", "--model", "default", "--method", "whiten", "--rank-attn", "8", "--task", "stsb",
              "--data-dir", data_dir, "--calib-samples", "16", "--calib-max-length", "32", "--device", "cpu",
              "--output", out, "--quiet")  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="session")
def fwsvd_ckpt(cli, data_dir, tmp_path_factory) -> Path:
    """MiniLM + an SST-2 classification head, compressed with fwsvd (Fisher from 16 labelled sentences)."""
    out = tmp_path_factory.mktemp("ckpt") / "minilm_fwsvd"
    res = cli("compress", "--model", "default", "--method", "fwsvd", "--rank-attn", "8", "--task", "sst2",
              "--data-dir", data_dir, "--calib-samples", "16", "--calib-batch-size", "8", "--calib-max-length",
              "32", "--device", "cpu", "--output", out, "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["report"]["method"] == "fwsvd"
    return out
