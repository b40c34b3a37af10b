"""``flashsvd.app.lm_training`` from Python: text reading, packing, and the rank-keeping LoRA merge."""

from __future__ import annotations

import torch


def test_refactor_is_the_best_rank_r_approximation():
    from flashsvd.app.lm_training import _refactor

    torch.manual_seed(0)
    left, right = torch.randn(40, 12, dtype=torch.float64), torch.randn(12, 30, dtype=torch.float64)
    u, v, dropped, total = _refactor(left, right, 8)
    assert u.shape == (40, 8) and v.shape == (8, 30)
    uu, s, vh = torch.linalg.svd(left @ right)
    best = (uu[:, :8] * s[:8]) @ vh[:8]
    torch.testing.assert_close(u @ v, best)
    assert abs(dropped - float((s[8:] ** 2).sum())) < 1e-6 * total


def test_untrained_lora_merges_to_the_same_function():
    from transformers import LlamaConfig, LlamaForCausalLM

    import flashsvd.models as fm
    from flashsvd.app.lm_training import LMTrainConfig, merge_lora, select_trainable

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model, _ = fm.compress(LlamaForCausalLM(config), method="svd", keep_ratio=0.6)
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    wrapped = select_trainable(model, "lora", LMTrainConfig(train_params="lora", lora_r=4))
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)
    merged, err = merge_lora(wrapped)  # B = 0: the adapters add nothing, nothing is dropped
    assert err is not None and err < 1e-6
    assert not any("lora" in n for n, _ in merged.named_parameters()) and not hasattr(merged, "peft_config")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)


def test_pack_cuts_blocks_and_ends_texts(tmp_path):
    from flashsvd.app.lm_training import pack, read_texts

    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[len(w) for w in t.split()] for t in texts]}

    f = tmp_path / "t.jsonl"
    f.write_text('{"text": "a bb ccc"}\n{"text": "dddd"}\n')
    texts = read_texts(f)
    assert texts == ["a bb ccc", "dddd"]
    blocks = pack(Tok(), texts, 3)
    assert len(blocks) == 2 and blocks[0]["input_ids"].tolist() == [1, 2, 3]
    assert blocks[1]["input_ids"].tolist() == [0, 4, 0] and blocks[1]["labels"].tolist() == [0, 4, 0]


def test_a_model_marked_quantized_with_float_weights_trains():
    """A GGUF file loads dequantized but marked ``is_quantized`` (as does a flashsvd checkpoint): Trainer
    would refuse it; train_lm trains it and gives a flashsvd model its flag back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import flashsvd.models as fm
    from flashsvd.app.lm_training import LMTrainConfig, train_lm

    class Tok:
        eos_token_id = 0

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1 + len(w) for w in t.split()] for t in texts]}

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    model, _ = fm.compress(LlamaForCausalLM(config), method="svd", keep_ratio=0.6)
    model.is_quantized = True
    cfg = LMTrainConfig(max_steps=2, batch_size=2, max_length=8, logging_steps=1)
    trained, res = train_lm(model, Tok(), ["a bb ccc dddd"] * 20, cfg, device="cpu")
    assert res.steps == 2 and trained.is_quantized
