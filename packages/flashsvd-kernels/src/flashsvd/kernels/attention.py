"""Rank-aware attention (prefill / encoder): flash attention over low-rank Q, K, V factors.

Inputs are the rank-space projections ``pq = x·u_q`` (``[B, M, Hq, rq]``), ``pk``, ``pv`` (``[B, N,
Hkv, r]``) and the per-head factors ``vq [Hq, rq, D]``, ``vk [Hkv, rk, D]``, ``vv [Hkv, rv, D]`` with
optional biases ``[H, D]`` (``docs/architecture.md``).  Full-width Q, K, V are never written to memory.

Why it is fast — the algebra the kernel exploits:

* no RoPE: ``Q·Kᵀ = ((pq·vq + bq)·vkᵀ)·pkᵀ`` (+ a per-row constant from ``bk`` that softmax cancels),
  so each query tile is turned into ``Q̃ [BLOCK_M, rk]`` once and every key tile is just ``pk``;
* ``softmax(S)·V = (softmax(S)·pv)·vv + bv``: the value side stays in rank space during the loop and
  is expanded once per query tile in the epilogue;
* with RoPE the rotation depends on the key position, so K tiles are rebuilt on chip
  (``pk·vk + bk``, a ``tl.dot``; the key bias does not cancel any more) and rotated there, while V
  stays absorbed as above.

Semantics: ``key_padding_mask [B, N]`` (True = attend) covers right and left padding; ``causal``
lets query ``m`` see keys ``n <= q_offset + m`` (``q_offset`` defaults to ``N - M``: the queries are
the last ``M`` tokens).  Query rows with no visible key return zeros (bias included).  GQA: query
head ``h`` uses key/value head ``h // (Hq // Hkv)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flashsvd.kernels import _attention_tl as atl
from flashsvd.kernels._attention_checks import (
    check_factors,
    check_mask,
    check_out,
    check_positions,
    check_rope,
)
from flashsvd.kernels._attention_reference import attention_core_reference
from flashsvd.kernels._launch import Prepared, cdiv, launch_tuned, next_power_of_2, prepare_tuned, tile_size
from flashsvd.kernels._tl_cast import cast
from flashsvd.kernels._triton_compat import autotune, resolve_backend, upcast_dot

__all__ = ["lowrank_attention", "lowrank_attention_reference", "prepare_attention"]

LOG2E = 1.4426950408889634


def _align(*ts: torch.Tensor) -> int:
    """Elements per 16 bytes if every head/row/batch offset of ``ts`` keeps 16-byte alignment, else 1.

    Rank-space projections are often views of one fused ``x·u`` (head stride = rank, e.g. 40), which
    Triton cannot prove aligned; this host check lets the kernels promise it with ``tl.multiple_of``.
    """
    vec = 16 // ts[0].element_size()
    for t in ts:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st % vec for st in t.stride()[:-1]):
            return 1
    return vec


def _bucket(n: int) -> int:
    """Length bucket for the autotune key: the next power of two (at most 64 distinct values)."""
    return next_power_of_2(int(n))


_PREFILL_CONFIGS = [
    # First config is what the interpreter runs: keep it small.
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
    # (BLOCK_M=128, BLOCK_N=128, 8 warps, 2 stages) miscompiled on triton 3.6/H100 with RoPE and
    # d_head=80 (wrong results, once an illegal address): do not add it back without a GPU check.
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3),
]


@autotune(
    configs=_PREFILL_CONFIGS,
    key=["M_BUCKET", "N_BUCKET", "RQ_P", "RK_P", "RV_P", "D_P", "ROPE", "CAUSAL", "HAS_MASK"],
)
@triton.jit
def _lowrank_attn_fwd(
    PQ, PK, PV, VQ, VK, VV, BQ, BK, BV, MASK, COS, SIN, QPOS, KPOS, OUT,
    s_pq_b, s_pq_m, s_pq_h, s_pq_r,
    s_pk_b, s_pk_n, s_pk_h, s_pk_r,
    s_pv_b, s_pv_n, s_pv_h, s_pv_r,
    s_vq_h, s_vq_r, s_vq_d,
    s_vk_h, s_vk_r, s_vk_d,
    s_vv_h, s_vv_r, s_vv_d,
    s_bq_h, s_bk_h, s_bv_h,
    s_mask_b, s_mask_n,
    s_cos_p, s_cos_d,
    s_qpos_b, s_qpos_m, s_kpos_b, s_kpos_n,
    s_o_b, s_o_m, s_o_h, s_o_d,
    M, N, HQ, GROUP, q_offset, qk_scale,
    M_BUCKET, N_BUCKET,
    rq: tl.constexpr, rk: tl.constexpr, rv: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
    RQ_P: tl.constexpr, RK_P: tl.constexpr, RV_P: tl.constexpr, D_P: tl.constexpr, HALF_P: tl.constexpr,
    HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_BV: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
    CAUSAL: tl.constexpr, ROPE: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    hk = h // GROUP
    dt = OUT.dtype.element_ty

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_rq = tl.arange(0, RQ_P)
    offs_rk = tl.arange(0, RK_P)
    offs_rv = tl.arange(0, RV_P)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D

    # ALIGN (host-checked) tells the compiler head offsets keep 16-byte alignment -> vector loads.
    pq = tl.load(
        PQ + b.to(tl.int64) * s_pq_b + offs_m[:, None].to(tl.int64) * s_pq_m + tl.multiple_of(h * s_pq_h, ALIGN)
        + offs_rq[None, :] * s_pq_r,
        mask=m_ok[:, None] & (offs_rq < rq)[None, :], other=0.0,
    )  # fmt: skip
    PK_bh = PK + b.to(tl.int64) * s_pk_b + tl.multiple_of(hk * s_pk_h, ALIGN)
    PV_bh = PV + b.to(tl.int64) * s_pv_b + tl.multiple_of(hk * s_pv_h, ALIGN)

    if ROPE:
        # Q tile rebuilt and rotated on chip, kept as two halves (rotate-half needs both).
        half = D // 2
        offs_hd = tl.arange(0, HALF_P)
        hd_ok = offs_hd < half
        vq_ptr = VQ + h * s_vq_h + offs_rq[:, None] * s_vq_r + offs_hd[None, :] * s_vq_d
        vq_ok = (offs_rq < rq)[:, None] & hd_ok[None, :]
        q1 = atl.dot(pq, tl.load(vq_ptr, mask=vq_ok, other=0.0), IEEE, UPCAST)
        q2 = atl.dot(pq, tl.load(vq_ptr + half * s_vq_d, mask=vq_ok, other=0.0), IEEE, UPCAST)
        if HAS_BQ:
            q1 += tl.load(BQ + h * s_bq_h + offs_hd, mask=hd_ok, other=0.0).to(tl.float32)[None, :]
            q2 += tl.load(BQ + h * s_bq_h + half + offs_hd, mask=hd_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_QPOS:
            qpos = tl.load(QPOS + b * s_qpos_b + offs_m * s_qpos_m, mask=m_ok, other=0)
        else:
            qpos = q_offset + offs_m
        qc, qs = atl.load_rope(COS, SIN, qpos, m_ok, half, s_cos_p, s_cos_d, HALF_P)
        q1, q2 = atl.rotate(q1, q2, qc, qs)
        q1 = cast(q1 * qk_scale, dt, UPCAST)
        q2 = cast(q2 * qk_scale, dt, UPCAST)
        vk1, vk2, bk1, bk2 = atl.key_factor(
            VK, BK, hk, s_vk_h, s_vk_r, s_vk_d, s_bk_h, offs_rk, rk, offs_hd, hd_ok, half, HAS_BK
        )
    else:
        # Q̃ = (pq·vq + bq)·vkᵀ: scores against pk directly, in rank space.
        vq_t = tl.load(
            VQ + h * s_vq_h + offs_rq[:, None] * s_vq_r + offs_d[None, :] * s_vq_d,
            mask=(offs_rq < rq)[:, None] & d_ok[None, :], other=0.0,
        )  # fmt: skip
        q = atl.dot(pq, vq_t, IEEE, UPCAST)
        if HAS_BQ:
            q += tl.load(BQ + h * s_bq_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
        vk_t = tl.load(
            VK + hk * s_vk_h + offs_d[:, None] * s_vk_d + offs_rk[None, :] * s_vk_r,
            mask=d_ok[:, None] & (offs_rk < rk)[None, :], other=0.0,
        )  # fmt: skip
        qt = cast(atl.dot(cast(q, dt, UPCAST), vk_t, IEEE, UPCAST) * qk_scale, dt, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, RV_P], tl.float32)

    hi = N
    if CAUSAL:
        hi = tl.minimum(N, q_offset + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        keep_n = n_ok
        if HAS_MASK:
            km = tl.load(MASK + b.to(tl.int64) * s_mask_b + offs_n * s_mask_n, mask=n_ok, other=0)
            keep_n = keep_n & (km != 0)
        pk = tl.load(
            PK_bh + offs_n[:, None].to(tl.int64) * s_pk_n + offs_rk[None, :] * s_pk_r,
            mask=keep_n[:, None] & (offs_rk < rk)[None, :], other=0.0,
        )  # fmt: skip
        if ROPE:
            if HAS_KPOS:
                kpos = tl.load(KPOS + b * s_kpos_b + offs_n * s_kpos_n, mask=n_ok, other=0)
            else:
                kpos = offs_n
            k1, k2 = atl.rotated_keys(pk, vk1, vk2, bk1, bk2, COS, SIN, kpos, n_ok, half, s_cos_p, s_cos_d,
                                      HAS_BK, HALF_P, IEEE, UPCAST)  # fmt: skip
            s = atl.dot(q1, tl.trans(cast(k1, dt, UPCAST)), IEEE, UPCAST)
            s += atl.dot(q2, tl.trans(cast(k2, dt, UPCAST)), IEEE, UPCAST)
        else:
            s = atl.dot(qt, tl.trans(pk), IEEE, UPCAST)
        keep = keep_n[None, :]  # rows past M are never stored: no need to mask them
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= (q_offset + offs_m)[:, None])
        p, m_i, l_i, acc = atl.softmax_step(s, keep, m_i, l_i, acc)
        pv = tl.load(
            PV_bh + offs_n[:, None].to(tl.int64) * s_pv_n + offs_rv[None, :] * s_pv_r,
            mask=keep_n[:, None] & (offs_rv < rv)[None, :], other=0.0,
        )  # fmt: skip
        acc += atl.dot(cast(p, dt, UPCAST), pv, IEEE, UPCAST)

    # Epilogue: (softmax·pv)·vv + bv, once per query tile; rows with no visible key → 0.
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    vv_t = tl.load(
        VV + hk * s_vv_h + offs_rv[:, None] * s_vv_r + offs_d[None, :] * s_vv_d,
        mask=(offs_rv < rv)[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip
    out = atl.dot(cast(o, dt, UPCAST), vv_t, IEEE, UPCAST)
    if HAS_BV:
        out += tl.load(BV + hk * s_bv_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    out = tl.where(has[:, None], out, 0.0)
    tl.store(
        OUT + b.to(tl.int64) * s_o_b + offs_m[:, None].to(tl.int64) * s_o_m + h * s_o_h
        + offs_d[None, :] * s_o_d,
        cast(out, dt, UPCAST), mask=m_ok[:, None] & d_ok[None, :],
    )  # fmt: skip


@dataclass(frozen=True)
class _Opts:
    """Non-differentiable arguments of one call (masks, positions, RoPE tables, scalars)."""

    key_padding_mask: torch.Tensor | None
    causal: bool
    rope: tuple[torch.Tensor, torch.Tensor] | None
    q_pos: torch.Tensor | None  # [B, M]; None = q_offset + arange(M)
    k_pos: torch.Tensor | None  # [B, N]; None = arange(N)
    q_offset: int
    scale: float


def _strides(t: torch.Tensor | None, n: int) -> list[int]:
    return list(t.stride()) if t is not None else [0] * n


def _prefill_call(pq, pk, pv, vq, vk, vv, bq, bk, bv, o: _Opts, out: torch.Tensor):
    """``(autotune key, grid, args, kwargs, mask)`` of the kernel launch (``mask``: the uint8 view
    of the key mask that ``args`` holds, or None)."""
    B, M, Hq, rq = pq.shape
    N, Hkv, rk = pk.shape[1], pk.shape[2], pk.shape[3]
    rv, D = pv.shape[3], vq.shape[2]
    mask = o.key_padding_mask.view(torch.uint8) if o.key_padding_mask is not None else None
    rope = o.rope is not None
    cos, sin = o.rope if rope else (out, out)
    q_pos = o.q_pos if rope else None
    k_pos = o.k_pos if rope else None

    def grid(meta):
        return (cdiv(M, meta["BLOCK_M"]), B * Hq)

    align = _align(pq, pk, pv)
    flags = dict(
        RQ_P=tile_size(rq), RK_P=tile_size(rk), RV_P=tile_size(rv), D_P=tile_size(D), HALF_P=tile_size(D // 2),
        HAS_BQ=bq is not None, HAS_BK=bk is not None, HAS_BV=bv is not None, HAS_MASK=mask is not None,
        HAS_QPOS=q_pos is not None, HAS_KPOS=k_pos is not None, CAUSAL=o.causal, ROPE=rope,
        IEEE=pq.dtype == torch.float32, UPCAST=upcast_dot(pq.dtype),
    )  # fmt: skip
    key = (pq.dtype, _bucket(M), _bucket(N), rq, rk, rv, D, align, *flags.values())
    args = (
        pq, pk, pv, vq, vk, vv,
        bq if bq is not None else out, bk if bk is not None else out, bv if bv is not None else out,
        mask if mask is not None else out, cos, sin,
        q_pos if q_pos is not None else out, k_pos if k_pos is not None else out, out,
        *pq.stride(), *pk.stride(), *pv.stride(), *vq.stride(), *vk.stride(), *vv.stride(),
        bq.stride(0) if bq is not None else 0, bk.stride(0) if bk is not None else 0,
        bv.stride(0) if bv is not None else 0,
        *_strides(mask, 2), *(cos.stride() if rope else (0, 0)), *_strides(q_pos, 2), *_strides(k_pos, 2),
        *out.stride(),
        M, N, Hq, Hq // Hkv, o.q_offset, o.scale * LOG2E,
        _bucket(M), _bucket(N), rq, rk, rv, D, align,
    )  # fmt: skip
    return key, grid, args, flags, mask


def _launch_prefill(pq, pk, pv, vq, vk, vv, bq, bk, bv, o: _Opts, out=None) -> torch.Tensor:
    """Launch the Triton kernel.  Shapes: see the module docstring; returns ``[B, M, Hq, D]``."""
    if pq.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"the Triton backend takes float16/bfloat16/float32, got {pq.dtype}; use backend='torch'"
        )
    if out is None:
        out = torch.empty(*pq.shape[:3], vq.shape[2], dtype=pq.dtype, device=pq.device)
    key, grid, args, flags, _ = _prefill_call(pq, pk, pv, vq, vk, vv, bq, bk, bv, o, out)
    launch_tuned(_lowrank_attn_fwd, key, grid, *args, **flags)
    return out


def prepare_attention(
    pq, pk, pv, vq, vk, vv, bq=None, bk=None, bv=None, *, key_padding_mask=None, causal=False, q_offset=None,
    scale=None, out: torch.Tensor,
) -> Prepared | None:  # fmt: skip
    """The launch :func:`lowrank_attention` makes for these arguments (no RoPE), as a :class:`Prepared`
    call taking ``(pq, pk, pv, key_padding_mask.view(torch.uint8), out)``: the inference hot path of a
    runtime block's launch plan.  Arguments are checked here, once; calls are not.  ``None`` until
    :func:`lowrank_attention` has launched (and tuned) this signature on the GPU, or for float64."""
    dims, opts = _prepare(pq, pk, pv, vq, vk, vv, bq, bk, bv, key_padding_mask, causal, None, None, None,
                          q_offset, scale)  # fmt: skip
    check_out(out, (dims.B, dims.M, dims.Hq, dims.D), pq)
    if out is None or pq.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    key, grid, args, flags, mask = _prefill_call(pq, pk, pv, vq, vk, vv, bq, bk, bv, opts, out)
    return prepare_tuned(_lowrank_attn_fwd, key, grid, args, flags, live=(pq, pk, pv, mask, out))


@torch.library.custom_op("flashsvd::attention_prefill", mutates_args=())
def _prefill_op(
    pq: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, vq: torch.Tensor, vk: torch.Tensor, vv: torch.Tensor,
    bq: torch.Tensor | None, bk: torch.Tensor | None, bv: torch.Tensor | None, mask: torch.Tensor | None,
    cos: torch.Tensor | None, sin: torch.Tensor | None, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None,
    causal: bool, q_offset: int, scale: float,
) -> torch.Tensor:  # fmt: skip
    """The Triton launch as a ``torch.library`` op, so ``torch.compile`` traces through it (opaque)."""
    rope = (cos, sin) if cos is not None else None
    return _launch_prefill(
        pq, pk, pv, vq, vk, vv, bq, bk, bv, _Opts(mask, causal, rope, q_pos, k_pos, q_offset, scale)
    )


@_prefill_op.register_fake
def _(pq, pk, pv, vq, *args, **kwargs):
    return pq.new_empty(*pq.shape[:3], vq.shape[2])


def _launch(pq, pk, pv, vq, vk, vv, bq, bk, bv, o: _Opts, out=None) -> torch.Tensor:
    """Direct launch in eager (no dispatcher cost on the hot path); the registered op under ``torch.compile``."""
    if torch.compiler.is_compiling() and out is None:
        cos, sin = o.rope if o.rope is not None else (None, None)
        return _prefill_op(pq, pk, pv, vq, vk, vv, bq, bk, bv, o.key_padding_mask, cos, sin, o.q_pos, o.k_pos,
                           o.causal, o.q_offset, o.scale)  # fmt: skip
    return _launch_prefill(pq, pk, pv, vq, vk, vv, bq, bk, bv, o, out=out)


def _reference(pq, pk, pv, vq, vk, vv, bq, bk, bv, o: _Opts) -> torch.Tensor:
    B, M = pq.shape[:2]
    N = pk.shape[1]
    q_slot = (o.q_offset + torch.arange(M, device=pq.device))[None, :].expand(B, M)
    q_pos = q_slot if o.q_pos is None else o.q_pos
    k_pos = torch.arange(N, device=pq.device)[None, :].expand(B, N) if o.k_pos is None else o.k_pos
    return attention_core_reference(
        pq, pk, pv, vq, vk, vv, bq, bk, bv,
        q_slot=q_slot, key_valid=o.key_padding_mask, causal=o.causal, rope=o.rope,
        q_pos=q_pos, k_pos=k_pos, scale=o.scale,
    )  # fmt: skip


class _LowRankAttentionFn(torch.autograd.Function):
    """Triton forward; backward recomputes through the PyTorch reference (fp32, or fp64 for fp64)."""

    @staticmethod
    def forward(ctx, opts, pq, pk, pv, vq, vk, vv, bq, bk, bv):
        ctx.opts = opts
        ctx.save_for_backward(pq, pk, pv, vq, vk, vv, bq, bk, bv)
        return _launch_prefill(pq, pk, pv, vq, vk, vv, bq, bk, bv, opts)

    @staticmethod
    def backward(ctx, grad_out):
        return (None, *_recompute_grads(_reference, ctx, grad_out))


def _recompute_grads(ref, ctx, grad_out):
    """Gradients of ``ref`` w.r.t. the saved tensors that need them (others get None)."""
    saved = ctx.saved_tensors
    needs = ctx.needs_input_grad[1:]
    with torch.enable_grad():
        leaves = [
            t.detach().requires_grad_(True) if (t is not None and n) else t for t, n in zip(saved, needs)
        ]
        out = ref(*leaves, ctx.opts)
        wrt = [t for t, n in zip(leaves, needs) if t is not None and n]
        grads = iter(torch.autograd.grad(out, wrt, grad_out)) if wrt else iter(())
    return [next(grads) if (t is not None and n) else None for t, n in zip(saved, needs)]


def _prepare(pq, pk, pv, vq, vk, vv, bq, bk, bv, key_padding_mask, causal, rope, positions,
             key_positions, q_offset, scale):  # fmt: skip
    dims = check_factors(pq, pk, pv, vq, vk, vv, bq, bk, bv)
    dev = pq.device
    check_mask(key_padding_mask, dims.B, dims.N, dev)
    check_rope(rope, dims.D, dev)
    if q_offset is None:
        q_offset = max(dims.N - dims.M, 0)
    if not isinstance(q_offset, int) or q_offset < 0:
        raise ValueError(
            f"q_offset must be a non-negative int (key index of the first query), got {q_offset!r}"
        )
    if causal and q_offset + dims.M > dims.N:
        raise ValueError(
            f"causal attention with q_offset={q_offset} and M={dims.M} queries needs N >= {q_offset + dims.M} keys"
        )
    q_pos = k_pos = None
    if rope is not None:
        q_pos = check_positions(positions, dims.B, dims.M, "positions", dev)
        k_pos = check_positions(key_positions, dims.B, dims.N, "key_positions", dev)
        need = max(q_offset + dims.M, dims.N) if (q_pos is None or k_pos is None) else 0
        if rope[0].shape[0] < need:
            raise ValueError(
                f"rope tables have {rope[0].shape[0]} rows but default positions go up to {need - 1}; "
                "build them with rope_table(max_positions >= that)"
            )
    elif positions is not None or key_positions is not None:
        raise ValueError("positions/key_positions only make sense with rope=(cos, sin)")
    if scale is None:
        scale = 1.0 / math.sqrt(dims.D)
    opts = _Opts(key_padding_mask, bool(causal), tuple(rope) if rope is not None else None, q_pos, k_pos,
                 q_offset, float(scale))  # fmt: skip
    return dims, opts


def lowrank_attention_reference(
    pq, pk, pv, vq, vk, vv, bq=None, bk=None, bv=None, *, key_padding_mask=None, causal=False, rope=None,
    positions=None, key_positions=None, q_offset=None, scale=None,
) -> torch.Tensor:  # fmt: skip
    """PyTorch reference of :func:`lowrank_attention` (same signature, no ``backend``)."""
    _, opts = _prepare(pq, pk, pv, vq, vk, vv, bq, bk, bv, key_padding_mask, causal, rope, positions,
                       key_positions, q_offset, scale)  # fmt: skip
    return _reference(pq, pk, pv, vq, vk, vv, bq, bk, bv, opts)


def lowrank_attention(
    pq, pk, pv, vq, vk, vv, bq=None, bk=None, bv=None, *, key_padding_mask=None, causal=False, rope=None,
    positions=None, key_positions=None, q_offset=None, scale=None, backend="auto", out=None,
) -> torch.Tensor:  # fmt: skip
    """Attention over low-rank factors; returns ``[B, M, Hq, d_head]`` (reshape to ``[B, M, Hq·d_head]``).

    Args:
        pq, pk, pv: rank-space projections ``[B, M, Hq, rq]``, ``[B, N, Hkv, rk]``, ``[B, N, Hkv, rv]``
            (views of ``x·u`` are fine: any strides).
        vq, vk, vv: per-head factors ``[H, r, d_head]``; bq, bk, bv: biases ``[H, d_head]`` or None.
        key_padding_mask: ``[B, N]`` bool, True = attend (right or left padding).
        causal: query ``m`` sees keys ``n <= q_offset + m``.
        rope: ``(cos, sin)`` tables ``[P, d_head]`` (``flashsvd.kernels.rope_table``, HF convention;
            only the first ``d_head/2`` columns are read, HF tables repeat them).
        positions: RoPE positions of the queries ``[M]`` or ``[B, M]`` (default ``q_offset + arange(M)``).
        key_positions: RoPE positions of the keys ``[N]`` or ``[B, N]`` (default ``arange(N)``).
        q_offset: key index of the first query (default ``N - M``).
        scale: softmax scale (default ``1/sqrt(d_head)``).
        backend: ``"auto"`` (Triton on CUDA, reference elsewhere), ``"triton"`` or ``"torch"``.
        out: optional preallocated ``[B, M, Hq, d_head]`` tensor (same dtype/device) to write into.

    Rows with no visible key return zeros.  float64 inputs always use the reference.
    """
    dims, opts = _prepare(pq, pk, pv, vq, vk, vv, bq, bk, bv, key_padding_mask, causal, rope, positions,
                          key_positions, q_offset, scale)  # fmt: skip
    tensors = [pq, pk, pv, vq, vk, vv, bq, bk, bv]
    check_out(out, (dims.B, dims.M, dims.Hq, dims.D), pq)
    chosen = resolve_backend(backend, *[t for t in tensors if t is not None])
    if chosen == "torch" or (backend == "auto" and pq.dtype == torch.float64):
        res = _reference(*tensors, opts)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        res = _LowRankAttentionFn.apply(opts, *tensors)
    else:
        return _launch(*tensors, opts, out=out)
    return res if out is None else out.copy_(res)
