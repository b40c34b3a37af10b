"""RoPE tables follow transformers' LlamaRotaryEmbedding + rotate_half."""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import apply_rope, rope_cos_sin, rope_table


def test_table_matches_hf_formula():
    d, base = 8, 10000.0
    cos, sin = rope_table(5, d, base)
    inv = 1.0 / base ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(5).float()[:, None] * inv
    assert torch.allclose(cos, torch.cat([ang.cos(), ang.cos()], -1))
    assert torch.allclose(sin, torch.cat([ang.sin(), ang.sin()], -1))
    c2, s2 = rope_cos_sin(torch.tensor([[3, 1]]), d, base)
    assert torch.equal(c2[0, 0], cos[3]) and torch.equal(s2[0, 1], sin[1])


def test_rotation_preserves_norm_and_relative_positions():
    cos, sin = rope_table(20, 16, dtype=torch.float64)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    assert torch.allclose(apply_rope(q, cos[7], sin[7]).norm(), q.norm())
    s1 = apply_rope(q, cos[9], sin[9]) @ apply_rope(k, cos[4], sin[4])
    s2 = apply_rope(q, cos[15], sin[15]) @ apply_rope(k, cos[10], sin[10])
    assert torch.allclose(s1, s2)


def test_matches_transformers_if_available():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=64)
    emb = llama.LlamaRotaryEmbedding(config=cfg)
    x = torch.randn(1, 4, 6, 16)
    pos = torch.arange(6)[None]
    cos_hf, sin_hf = emb(x, pos)
    cos, sin = rope_cos_sin(pos, 16)
    assert torch.allclose(cos, cos_hf, atol=1e-6) and torch.allclose(sin, sin_hf, atol=1e-6)
    q = torch.randn(1, 4, 6, 16)
    ref, _ = llama.apply_rotary_pos_emb(q, q, cos_hf, sin_hf)
    assert torch.allclose(apply_rope(q, cos[:, None], sin[:, None]), ref, atol=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="even"):
        rope_table(4, 7)
    with pytest.raises(TypeError, match="integer"):
        rope_cos_sin(torch.tensor([1.0]), 8)
