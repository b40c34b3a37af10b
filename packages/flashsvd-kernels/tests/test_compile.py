"""The kernels are ``torch.library`` ops: ``torch.compile(fullgraph=True)`` traces calls to them.

Runs the Triton kernels through the interpreter on CPU (``TRITON_INTERPRET=1``) or on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import (
    FFNFactors,
    GatedFFNFactors,
    RankSpaceKVCache,
    add_layer_norm,
    lowrank_attention,
    lowrank_attention_decode,
    lowrank_ffn,
    lowrank_gated_ffn,
)
from flashsvd.kernels._triton_compat import interpreter_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _rnd(*shape, scale=0.3):
    return (torch.randn(*shape) * scale).to(DEVICE)


def test_compiled_block_matches_eager_fullgraph():
    torch.manual_seed(0)
    B, L, H, r, D, d, f = 2, 16, 2, 8, 16, 32, 64
    vq, vk, vv = _rnd(H, r, D), _rnd(H, r, D), _rnd(H, r, D)
    u = _rnd(d, 3 * H * r)
    ffn = FFNFactors(_rnd(d, 8), _rnd(8, f), _rnd(f), _rnd(f, 8), _rnd(8, d), _rnd(d))
    mask = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    mask[1, -3:] = False

    w, b = _rnd(d) + 1.0, _rnd(d)

    def block(x):
        pq, pk, pv = (x @ u).view(B, L, 3, H, r).unbind(2)
        a = lowrank_attention(pq, pk, pv, vq, vk, vv, key_padding_mask=mask, backend="triton")
        h = add_layer_norm(a.reshape(B, L, H * D), x, w, b, backend="triton")
        return lowrank_ffn(h, ffn, "gelu", backend="triton")

    x = _rnd(B, L, d, scale=1.0)
    with torch.no_grad():
        ref = block(x)
        got = torch.compile(block, fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_compiled_decode_and_gated_ffn_fullgraph():
    torch.manual_seed(1)
    B, N, H, r, D, d, f = 2, 12, 2, 8, 16, 32, 48
    cache = RankSpaceKVCache(B, 32, H, r, dtype=torch.float32, device=DEVICE)
    cache.append(_rnd(B, N, H, r), _rnd(B, N, H, r))
    vq, vk, vv = _rnd(H, r, D), _rnd(H, r, D), _rnd(H, r, D)
    g = GatedFFNFactors(
        _rnd(d, 8), _rnd(8, f), None, _rnd(d, 8), _rnd(8, f), None, _rnd(f, 8), _rnd(8, d), None
    )

    def step(pq, x):
        a = lowrank_attention_decode(
            pq, (cache.pk, cache.pv), vq, vk, vv, lengths=cache.lengths, backend="triton"
        )
        return a, lowrank_gated_ffn(x, g, "swiglu", backend="triton")

    pq, x = _rnd(B, 1, H, r), _rnd(B, 1, d, scale=1.0)
    with torch.no_grad():
        ref = step(pq, x)
        got = torch.compile(step, fullgraph=True, backend="eager")(pq, x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_ops_are_registered_with_fake_implementations():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        pq = torch.empty(2, 5, 4, 8)
        pk = torch.empty(2, 7, 2, 8)
        vq = torch.empty(4, 8, 16)
        vk = torch.empty(2, 8, 16)
        out = torch.ops.flashsvd.attention_prefill(
            pq, pk, pk, vq, vk, vk, None, None, None, None, None, None, None, None, False, 2, 0.25
        )
        assert out.shape == (2, 5, 4, 16)
        x = torch.empty(9, 32)
        y = torch.ops.flashsvd.lowrank_ffn_fused(
            x, torch.empty(32, 4), torch.empty(4, 64), None, None, None, None, torch.empty(64, 4),
            torch.empty(4, 32), None, "gelu", False,
        )  # fmt: skip
        assert y.shape == (9, 32)
        assert torch.ops.flashsvd.add_norm(x, x, None, None, 1e-5, False).shape == (9, 32)
