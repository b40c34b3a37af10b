"""RankSpaceKVCache: preallocation, appends (uniform and ragged), bytes per token, errors."""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import RankSpaceKVCache, kv_cache
from flashsvd.kernels._triton_compat import interpreter_enabled


def test_append_uniform_and_bytes_per_token():
    c = RankSpaceKVCache(2, 10, 4, 8, dtype=torch.float16)
    assert c.bytes_per_token == 2 * 4 * 8 * 2  # 2·Hkv·r·itemsize
    assert c.nbytes == 2 * 10 * 4 * 8 * 2 * 2
    pk, pv = torch.randn(2, 3, 4, 8).half(), torch.randn(2, 3, 4, 8).half()
    c.append(pk, pv)
    c.append(pk[:, :1], pv[:, :1])
    assert c.lengths.tolist() == [4, 4] and c.max_length == 4
    assert torch.equal(c.pk[:, :3], pk) and torch.equal(c.pv[:, 3], pv[:, 0])


def test_append_ragged_rows_writes_after_each_length():
    c = RankSpaceKVCache(2, 8, 1, 2, 3, dtype=torch.float32)
    c.append(torch.randn(2, 4, 1, 2), torch.randn(2, 4, 1, 3), valid=torch.tensor([4, 2]))
    new_k = torch.randn(2, 1, 1, 2)
    c.append(new_k, torch.randn(2, 1, 1, 3))
    assert c.lengths.tolist() == [5, 3]
    assert torch.equal(c.pk[0, 4], new_k[0, 0]) and torch.equal(c.pk[1, 2], new_k[1, 0])
    c.reset()
    assert c.lengths.tolist() == [0, 0] and c.max_length == 0


def test_cache_errors():
    with pytest.raises(ValueError, match="max_len"):
        RankSpaceKVCache(1, 0, 1, 2)
    c = RankSpaceKVCache(1, 2, 1, 2, dtype=torch.float32)
    with pytest.raises(ValueError, match="pk_new"):
        c.append(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2))
    with pytest.raises(ValueError, match="device"):
        c.append(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2), positions=torch.zeros(1, 1, device="meta"))
    with pytest.raises(ValueError, match="overflow"):
        c.append(torch.randn(1, 3, 1, 2), torch.randn(1, 3, 1, 2))


@pytest.mark.skipif(
    not interpreter_enabled() and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_append_writes_what_the_torch_path_writes(monkeypatch, dtype):
    """Strided new tokens (views of one fused projection), explicit and default positions, a ragged
    prompt then uniform decode steps: the kernel's buffers equal the PyTorch path's, bit for bit."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    B, H, rk, rv = 3, 2, 5, 3
    caches = {}
    for use in (False, True):
        monkeypatch.setattr(kv_cache, "_use_kernel", lambda t, use=use: use)
        c = RankSpaceKVCache(B, 12, H, rk, rv, dtype=dtype, device=dev)
        g = torch.Generator().manual_seed(1)
        fused = torch.randn(B, 4, H * (rk + rv) + 3, generator=g).to(dev)  # float32: cast on write
        pk, pv = (
            fused[..., : H * rk].unflatten(-1, (H, rk)),
            fused[..., H * rk : H * (rk + rv)].unflatten(-1, (H, rv)),
        )
        c.append(pk, pv, valid=torch.tensor([4, 2, 3], device=dev), positions=torch.arange(4, device=dev) + 7)
        for step in range(3):
            step_k = torch.randn(B, 1, H, rk, generator=g).to(dev)
            step_v = torch.randn(B, 1, H, rv, generator=g).to(dev)
            c.append(step_k, step_v, positions=None if step else torch.full((B, 1), 40 + step, device=dev))
        caches[use] = c
    ref, got = caches[False], caches[True]
    assert torch.equal(got.lengths, ref.lengths) and got.lengths.tolist() == [7, 5, 6]
    for name in ("pk", "pv", "positions"):
        assert torch.equal(getattr(got, name), getattr(ref, name)), name
