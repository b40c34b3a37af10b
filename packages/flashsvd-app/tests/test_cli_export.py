"""``flashsvd export``: a shareable compressed folder with a model card, or the same model as dense weights."""

import json

import torch
from transformers import AutoModel, AutoTokenizer

import flashsvd.models as fm


def _embeddings(model, folder):
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(["a short sentence", "another one, longer than the first"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).last_hidden_state


def test_export_compressed_with_model_card(cli, whiten_ckpt, tmp_path):
    metrics = tmp_path / "m.json"
    metrics.write_text(json.dumps({"metrics": {"spearman": 0.8012}, "task": "stsb"}))
    out = tmp_path / "share"
    res = cli("export", whiten_ckpt, "--output", out, "--metrics", metrics)
    assert res.exit_code == 0, res.output
    card = (out / "README.md").read_text()
    assert "whiten" in card and "0.8012" in card and "keep_ratio" in card
    assert {"config.json", "flashsvd.safetensors", "flashsvd_auto.py", "modules.json"} <= {
        p.name for p in out.iterdir()
    }
    torch.testing.assert_close(
        _embeddings(fm.load(out), out), _embeddings(fm.load(whiten_ckpt), whiten_ckpt), atol=0, rtol=0
    )


def test_export_dense_loads_without_flashsvd_classes(cli, whiten_ckpt, tmp_path):
    out = tmp_path / "dense"
    res = cli("export", whiten_ckpt, "--dense", "--output", out)
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and "quantization_config" not in config
    assert "none of the compression" in (out / "README.md").read_text()
    dense = AutoModel.from_pretrained(out)
    assert type(dense).__name__ == "BertModel"
    torch.testing.assert_close(
        _embeddings(dense, out), _embeddings(fm.load(whiten_ckpt), whiten_ckpt), atol=1e-4, rtol=1e-4
    )


def test_export_refuses_an_existing_output(cli, whiten_ckpt, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("export", whiten_ckpt, "--output", out)
    assert res.exit_code == 2 and "did not write" in res.stderr
    assert (out / "keep.txt").read_text() == "mine"
