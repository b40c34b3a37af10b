"""Corrupt or incomplete checkpoint folders fail with a message naming the bad file."""

import json

import pytest
import torch

import flashsvd.models as fm


@pytest.fixture
def saved(tiny, tmp_path):
    model, _ = fm.compress(tiny("gpt2"), keep_ratio=0.5)
    return fm.save_compressed(model, tmp_path / "ck")


def test_atomic_write_leaves_no_temporaries(saved):
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]


def test_missing_weights(saved):
    (saved / "flashsvd.safetensors").unlink()
    with pytest.raises(fm.CheckpointError, match=r"flashsvd\.safetensors is missing"):
        fm.load(saved)


def test_truncated_weights(saved):
    data = (saved / "flashsvd.safetensors").read_bytes()
    (saved / "flashsvd.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(fm.CheckpointError, match=r"flashsvd\.safetensors is corrupt or truncated"):
        fm.load(saved)


def test_missing_and_corrupt_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(fm.CheckpointError, match=r"config\.json is not valid JSON"):
        fm.load(saved)
    (saved / "config.json").unlink()
    with pytest.raises(fm.CheckpointError, match=r"config\.json is missing"):
        fm.load(saved)


def test_ranks_that_do_not_match_weights(saved):
    cfg = json.loads((saved / "config.json").read_text())
    name = next(k for k, v in cfg["quantization_config"]["ranks"].items() if v)
    cfg["quantization_config"]["ranks"][name] += 1
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fm.CheckpointError, match="unexpected shapes"):
        fm.load(saved)


def test_not_a_flashsvd_folder(tiny, tmp_path):
    tiny("bert").save_pretrained(tmp_path / "dense")
    with pytest.raises(fm.CheckpointError, match="quant_method 'flashsvd'"):
        fm.load(tmp_path / "dense")
    with pytest.raises(ValueError, match="compress it"):
        fm.save_compressed(tiny("bert"), tmp_path / "x")
    assert torch.is_tensor(torch.zeros(1))
