"""Rank-space KV cache: stores ``pk = x·u_k`` and ``pv = x·u_v`` instead of full-width K and V.

Why: a decoder's cache per token and layer holds ``2·Hkv·d_head`` values densely; with per-head
low-rank factors it only needs ``Hkv·(rk + rv)`` (``2·Hkv·r`` for equal ranks), i.e. ``r/d_head``
of the dense bytes.  K and V are rebuilt on chip by :func:`flashsvd.kernels.lowrank_attention_decode`.

One cache per layer; buffers are preallocated (``[B, max_len, Hkv, r]``) so decoding allocates nothing.
Per-row lengths live on the device (``lengths``, int32 ``[B]``) and appends write at slots computed
from them on the device, so appends and the decode kernel need no host synchronisation and a decode
step over the cache can be captured in a CUDA graph and replayed; ``max_length`` is a host-side
upper bound used to size the kernel launch (a captured step must size it with ``max_len``).
``positions`` (int64 ``[B, max_len]``) holds each cached key's RoPE position.

This is the one rank-space cache: ``flashsvd.models``' Hugging Face cache layer stores into it.
"""

from __future__ import annotations

import torch

__all__ = ["RankSpaceKVCache"]


class RankSpaceKVCache:
    """Preallocated per-layer cache of rank-space keys/values.

    Args:
        batch, max_len, n_kv_heads: buffer sizes.
        rank_k, rank_v: ranks of the key and value projections (``rank_v`` defaults to ``rank_k``).
        dtype, device: of the buffers (match the model's activations).
    """

    def __init__(
        self,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        rank_k: int,
        rank_v: int | None = None,
        *,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        rank_v = rank_k if rank_v is None else rank_v
        for name, val in (
            ("batch", batch),
            ("max_len", max_len),
            ("n_kv_heads", n_kv_heads),
            ("rank_k", rank_k),
            ("rank_v", rank_v),
        ):
            if not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"cache dtype must be floating point, got {dtype}")
        self.pk = torch.zeros(batch, max_len, n_kv_heads, rank_k, dtype=dtype, device=device)
        self.pv = torch.zeros(batch, max_len, n_kv_heads, rank_v, dtype=dtype, device=device)
        self.positions = torch.zeros(batch, max_len, dtype=torch.long, device=self.pk.device)
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=self.pk.device)
        self.max_length = 0
        self._uniform = True

    @property
    def batch(self) -> int:
        return self.pk.shape[0]

    @property
    def max_len(self) -> int:
        return self.pk.shape[1]

    @property
    def bytes_per_token(self) -> int:
        """Bytes per cached token (one layer): ``Hkv·(rk + rv)·itemsize`` (= ``2·Hkv·r·itemsize``)."""
        return self.pk.shape[2] * (self.pk.shape[3] + self.pv.shape[3]) * self.pk.element_size()

    @property
    def nbytes(self) -> int:
        return self.pk.nbytes + self.pv.nbytes

    def reset(self) -> None:
        self.lengths.zero_()
        self.max_length = 0
        self._uniform = True

    def append(
        self,
        pk_new: torch.Tensor,
        pv_new: torch.Tensor,
        *,
        valid: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> None:
        """Write ``T`` new tokens per row after each row's current length.

        Args:
            pk_new, pv_new: ``[B, T, Hkv, rk]`` / ``[B, T, Hkv, rv]``.
            valid: optional ``[B]`` int, how many of the ``T`` tokens are real for each row (a
                right-padded prompt); the row's length grows by that much instead of ``T``.
            positions: optional ``[B, T]`` RoPE positions of the new keys (default: their slots).
        """
        if tuple(pk_new.shape[:1] + pk_new.shape[2:]) != (self.batch, *self.pk.shape[2:]):
            raise ValueError(f"pk_new must have shape [{self.batch}, T, {self.pk.shape[2]}, {self.pk.shape[3]}], "
                             f"got {tuple(pk_new.shape)}")  # fmt: skip
        if tuple(pv_new.shape) != (self.batch, pk_new.shape[1], *self.pv.shape[2:]):
            raise ValueError(f"pv_new must have shape [{self.batch}, {pk_new.shape[1]}, {self.pv.shape[2]}, "
                             f"{self.pv.shape[3]}], got {tuple(pv_new.shape)}")  # fmt: skip
        T = pk_new.shape[1]
        if self.max_length + T > self.max_len:
            raise ValueError(f"cache overflow: {self.max_length} + {T} tokens > max_len {self.max_len}; "
                             "allocate a larger cache")  # fmt: skip
        step = torch.arange(T, device=self.pk.device)
        if self._uniform:
            # Slots from the device-side length (not the host counter): a captured step replays right.
            slots = self.lengths[0].long() + step
            self.pk.index_copy_(1, slots, pk_new.to(self.pk.dtype))
            self.pv.index_copy_(1, slots, pv_new.to(self.pv.dtype))
            pos = slots.expand(self.batch, T) if positions is None else positions.expand(self.batch, T)
            self.positions.index_copy_(1, slots, pos.to(torch.long))
        else:
            slots = self.lengths[:, None].long() + step
            rows = torch.arange(self.batch, device=self.pk.device)[:, None]
            self.pk[rows, slots] = pk_new.to(self.pk.dtype)
            self.pv[rows, slots] = pv_new.to(self.pv.dtype)
            self.positions[rows, slots] = slots if positions is None else positions.to(torch.long)
        self.max_length += T
        if valid is None:
            self.lengths += T
        else:
            if valid.shape != (self.batch,):
                raise ValueError(f"valid must have shape [{self.batch}], got {tuple(valid.shape)}")
            self.lengths += valid.to(device=self.lengths.device, dtype=torch.int32)
            self._uniform = False

    def grow(self, max_len: int) -> None:
        """Reallocate the buffers to hold ``max_len`` tokens (eager use only: addresses change)."""
        if max_len <= self.max_len:
            return
        for name in ("pk", "pv", "positions"):
            old = getattr(self, name)
            new = old.new_zeros(old.shape[0], max_len, *old.shape[2:])
            new[:, : self.max_length] = old[:, : self.max_length]
            setattr(self, name, new)

    def truncate(self, length: int) -> None:
        """Forget every token after the first ``length`` (all rows: uniform caches only)."""
        if not self._uniform:
            raise ValueError("truncate needs a cache whose rows all have one length")
        length = max(0, min(int(length), self.max_length))
        self.lengths.fill_(length)
        self.max_length = length

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (reorder, repeat) batch rows ``index`` (beam search, ``repeat_interleave``)."""
        index = index.to(self.pk.device)
        for name in ("pk", "pv", "positions", "lengths"):
            setattr(self, name, getattr(self, name).index_select(0, index))
