"""RankSpaceKVCache: preallocation, appends (uniform and ragged), bytes per token, errors."""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import RankSpaceKVCache


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
    with pytest.raises(ValueError, match="overflow"):
        c.append(torch.randn(1, 3, 1, 2), torch.randn(1, 3, 1, 2))
