"""Rank-space KV cache: stores ``pk = x·u_k`` and ``pv = x·u_v`` instead of full-width K and V.

Why: a decoder's cache per token and layer holds ``2·Hkv·d_head`` values densely; with per-head
low-rank factors it only needs ``Hkv·(rk + rv)`` (``2·Hkv·r`` for equal ranks), i.e. ``r/d_head``
of the dense bytes.  K and V are rebuilt on chip by :func:`flashsvd.kernels.lowrank_attention_decode`.

One cache per layer; buffers are preallocated (``[B, max_len, Hkv, r]``) so decoding allocates nothing.
On CUDA an append is one Triton launch (keys, values and positions written at each row's slots) plus
the length update, not the eight small tensor ops of the PyTorch path: a decode step appends in
every layer, and each op costs host time in eager and a kernel in a captured step.
Per-row lengths live on the device (``lengths``, int32 ``[B]``) and appends write at slots computed
from them on the device, so appends and the decode kernel need no host synchronisation and a decode
step over the cache can be captured in a CUDA graph and replayed; ``max_length`` is a host-side
upper bound used to size the kernel launch (a captured step must size it with ``max_len``).
``positions`` (int64 ``[B, max_len]``) holds each cached key's RoPE position.

This is the one rank-space cache: ``flashsvd.models``' Hugging Face cache layer stores into it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashsvd.kernels._launch import launch, next_power_of_2, prepare

__all__ = ["RankSpaceKVCache"]


@triton.jit
def _append_kernel(
    PK_NEW, PV_NEW, POS, PK, PV, POSITIONS, LENS,
    s_kn_b, s_kn_t, s_kn_h, s_kn_r, s_vn_b, s_vn_t, s_vn_h, s_vn_r, s_pos_b, s_pos_t,
    s_k_b, s_k_n, s_k_h, s_k_r, s_v_b, s_v_n, s_v_h, s_v_r, s_p_b, s_p_n,
    T, RK: tl.constexpr, RV: tl.constexpr, HKV: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, HAS_POS: tl.constexpr,
):  # fmt: skip
    """Program ``(b, t)``: token ``t`` of row ``b`` goes to slot ``lengths[b] + t``."""
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)
    t = pid % T
    slot = (tl.load(LENS + b) + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    ok = offs < HKV * RK
    h, r = offs // RK, offs % RK
    x = tl.load(PK_NEW + b * s_kn_b + t * s_kn_t + h * s_kn_h + r * s_kn_r, mask=ok)
    tl.store(PK + b * s_k_b + slot * s_k_n + h * s_k_h + r * s_k_r, x.to(PK.dtype.element_ty), mask=ok)
    offs = tl.arange(0, BLOCK_V)
    ok = offs < HKV * RV
    h, r = offs // RV, offs % RV
    x = tl.load(PV_NEW + b * s_vn_b + t * s_vn_t + h * s_vn_h + r * s_vn_r, mask=ok)
    tl.store(PV + b * s_v_b + slot * s_v_n + h * s_v_h + r * s_v_r, x.to(PV.dtype.element_ty), mask=ok)
    if HAS_POS:
        p = tl.load(POS + b * s_pos_b + t * s_pos_t).to(tl.int64)
    else:
        p = slot
    tl.store(POSITIONS + b * s_p_b + slot * s_p_n, p)


def _use_kernel(t: torch.Tensor) -> bool:
    """The Triton append on CUDA (outside ``torch.compile``, which traces the tensor ops instead)."""
    return t.is_cuda and not torch.compiler.is_compiling()


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
        dev = self.pk.device
        if (
            pk_new.device != dev
            or pv_new.device != dev
            or (positions is not None and positions.device != dev)
        ):
            raise ValueError(f"new keys, values and positions must be on the cache's device {dev}")
        if positions is not None:
            positions = positions.expand(self.batch, T)
        if _use_kernel(pk_new):
            grid, *args, kwargs = self._append_call(pk_new, pv_new, positions)
            launch(_append_kernel, grid, *args, **kwargs)
        else:
            self._append_torch(pk_new, pv_new, positions)
        if valid is None:
            self.advance(T)
        else:
            if valid.shape != (self.batch,):
                raise ValueError(f"valid must have shape [{self.batch}], got {tuple(valid.shape)}")
            self.max_length += T
            self.lengths += valid.to(device=self.lengths.device, dtype=torch.int32)
            self._uniform = False

    def advance(self, T: int) -> None:
        """Count ``T`` tokens written at every row's slots (what :meth:`append` does after its write)."""
        self.max_length += T
        self.lengths += T

    def prepare_append(self, pk_new: torch.Tensor, pv_new: torch.Tensor, positions: torch.Tensor | None):
        """:meth:`append`'s write of tokens laid out like ``pk_new``/``pv_new`` (and ``[B, T]``
        ``positions`` or ``None``) as a :class:`~flashsvd.kernels._launch.Prepared` call taking
        ``(pk_new, pv_new, positions)``; the caller checks capacity and calls :meth:`advance` after it.
        For a launch plan (no checks per call); ``None`` off CUDA or before :meth:`append` launched it."""
        if not _use_kernel(pk_new):
            return None
        if positions is not None:
            positions = positions.expand(self.batch, pk_new.shape[1])
        grid, *args, kwargs = self._append_call(pk_new, pv_new, positions)
        return prepare(_append_kernel, grid, tuple(args), kwargs, live=(pk_new, pv_new, positions))

    def _append_call(self, pk_new, pv_new, positions):
        """``(grid, *args, kwargs)`` of the append launch."""
        B, T, H, rk = pk_new.shape
        rv = pv_new.shape[3]
        pos = positions if positions is not None else self.lengths
        kwargs = dict(RK=rk, RV=rv, HKV=H, BLOCK_K=next_power_of_2(H * rk), BLOCK_V=next_power_of_2(H * rv),
                      HAS_POS=positions is not None)  # fmt: skip
        return (
            (B * T,), pk_new, pv_new, pos, self.pk, self.pv, self.positions, self.lengths,
            *pk_new.stride(), *pv_new.stride(), *(positions.stride() if positions is not None else (0, 0)),
            *self.pk.stride(), *self.pv.stride(), *self.positions.stride(), T, kwargs,
        )  # fmt: skip

    def _append_torch(self, pk_new, pv_new, positions) -> None:
        T = pk_new.shape[1]
        step = torch.arange(T, device=self.pk.device)
        if self._uniform:
            # Slots from the device-side length (not the host counter): a captured step replays right.
            slots = self.lengths[0].long() + step
            self.pk.index_copy_(1, slots, pk_new.to(self.pk.dtype))
            self.pv.index_copy_(1, slots, pv_new.to(self.pv.dtype))
            pos = slots.expand(self.batch, T) if positions is None else positions
            self.positions.index_copy_(1, slots, pos.to(torch.long))
        else:
            slots = self.lengths[:, None].long() + step
            rows = torch.arange(self.batch, device=self.pk.device)[:, None]
            self.pk[rows, slots] = pk_new.to(self.pk.dtype)
            self.pv[rows, slots] = pv_new.to(self.pv.dtype)
            self.positions[rows, slots] = slots if positions is None else positions.to(torch.long)

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
