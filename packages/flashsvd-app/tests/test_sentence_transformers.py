"""A compressed sentence-transformers model stays one: same modules, same embeddings as ``flashsvd eval`` scores."""

from __future__ import annotations

import json

import pytest
import torch

TEXTS = ["A man is playing a guitar.", "The cat sleeps.", "Stocks fell sharply on Monday after the report."]


def test_checkpoint_keeps_the_sentence_transformers_files(whiten_ckpt):
    names = {p.name for p in whiten_ckpt.iterdir()}
    assert {
        "modules.json",
        "1_Pooling",
        "config_sentence_transformers.json",
        "sentence_bert_config.json",
    } <= names
    assert not any(
        n.endswith(".bin") or n == "model.safetensors" for n in names
    )  # no dense weights inherited
    assert json.loads((whiten_ckpt / "config.json").read_text())["model_type"] == "flashsvd"


@pytest.mark.parametrize("trust_remote_code", [True, False], ids=["remote-code", "after-import"])
def test_sentence_transformer_embeddings_equal_the_eval_embeddings(whiten_ckpt, trust_remote_code):
    st = pytest.importorskip("sentence_transformers")
    import flashsvd.models as fm
    from flashsvd.app.tasks.runner import embed

    model = st.SentenceTransformer(str(whiten_ckpt), device="cpu", trust_remote_code=trust_remote_code)
    names = [type(m).__name__ for m in model]
    assert names[:2] == ["Transformer", "Pooling"] and "Normalize" in names
    got = model.encode(TEXTS, convert_to_tensor=True).float()

    ours = fm.load(whiten_ckpt)
    from transformers import AutoTokenizer

    want = embed(ours, AutoTokenizer.from_pretrained(whiten_ckpt), TEXTS, 128, "cpu")
    want = torch.nn.functional.normalize(want, dim=-1)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
