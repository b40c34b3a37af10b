"""Rank-aware decode attention: a few new query tokens over a long rank-space KV cache.

Flash-decoding layout: the cache length is cut into splits; one program per (split, batch row,
key/value head) streams ``pk``/``pv`` tiles and keeps an online softmax for *all* query rows that
share that key/value head (the GQA group × the new tokens), so every cached tile — and, with RoPE,
every rebuilt K tile — is read/rebuilt once and used by the whole group.  A second small kernel
merges the splits and applies the value factor ``(softmax·pv)·vv + bv``.

The query rows of the group are built on chip at the start of each program (``pq·vq + bq``, rotated;
without RoPE turned into rank space ``Q̃ = q·vkᵀ``, so the scores are ``Q̃·pkᵀ`` and the cache is read
as is).  With RoPE each K tile is rebuilt on chip
(``pk·vk + bk``, a ``tl.dot`` of ``rk·d_head`` MACs per cached token) and rotated at its position.

The ``T`` new tokens must already be in the cache (``cache.append`` first): query ``t`` of row ``b``
sits at slot ``lengths[b] - T + t`` and sees slots ``<=`` that one, which is exactly what prefill's
causal mask gives, so decode equals the last rows of prefill.
"""

from __future__ import annotations

import math

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
from flashsvd.kernels._launch import (
    cdiv,
    launch,
    launch_tuned,
    next_power_of_2,
    prepare,
    prepare_tuned,
    tile_size,
)
from flashsvd.kernels._tl_cast import cast
from flashsvd.kernels._triton_compat import autotune, interpreter_enabled, resolve_backend, upcast_dot
from flashsvd.kernels.attention import LOG2E, _align, _bucket
from flashsvd.kernels.kv_cache import RankSpaceKVCache

__all__ = ["lowrank_attention_decode", "lowrank_attention_decode_reference"]

_SPLIT_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=4),
]
_SPLIT_ALIGN = 128  # split lengths are multiples of the largest BLOCK_N
CHECK_N = tl.constexpr(256)  # key positions checked per step of the offset pre-pass
PROGRAMS_PER_SM = 2  # splits enough for this many programs per SM (H200 sweep: 2 and 4 best)


@triton.jit
def _keys_loop(
    lo, hi, PK_bh, PV_bh, s_pk_n, s_pk_r, s_pv_n, s_pv_r, offs_rk, offs_rv, MASK_b, s_mask_n,
    q1, q2, qt, vk1, vk2, bk1, bk2, COS, SIN, s_cos_p, s_cos_d, half, KPOS_b, s_kpos_n,
    r_ok, q_slot, m_i, l_i, acc, k_off, dt: tl.constexpr,
    rk: tl.constexpr, rv: tl.constexpr, HALF_P: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BK: tl.constexpr,
    ROPE: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Online softmax of the group's query rows over cache slots ``[lo, hi)``.

    With ``ROPE`` a key's position is its loaded position (``GATHER``) or ``slot + k_off``.
    Unused factors (``q1 … bk2`` without RoPE, ``qt`` with it) are placeholders.
    """
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep_n = offs_n < hi
        if HAS_MASK:
            km = tl.load(MASK_b + offs_n * s_mask_n, mask=keep_n, other=0)
            keep_n = keep_n & (km != 0)
        pk = tl.load(
            PK_bh + offs_n[:, None].to(tl.int64) * s_pk_n + offs_rk[None, :] * s_pk_r,
            mask=keep_n[:, None] & (offs_rk < rk)[None, :], other=0.0,
        )  # fmt: skip
        if ROPE:
            # One rebuilt K tile serves every query row of the group.
            if GATHER:
                kpos = tl.load(KPOS_b + offs_n * s_kpos_n, mask=keep_n, other=0)
            else:
                kpos = offs_n + k_off
            k1, k2 = atl.rotated_keys(pk, vk1, vk2, bk1, bk2, COS, SIN, kpos, keep_n, half, s_cos_p, s_cos_d,
                                      HAS_BK, HALF_P, IEEE, UPCAST)  # fmt: skip
            s = atl.dot(q1, tl.trans(cast(k1, dt, UPCAST)), IEEE, UPCAST)
            s += atl.dot(q2, tl.trans(cast(k2, dt, UPCAST)), IEEE, UPCAST)
        else:
            s = atl.dot(qt, tl.trans(pk), IEEE, UPCAST)
        keep = keep_n[None, :] & r_ok[:, None] & (offs_n[None, :] <= q_slot[:, None])
        p, m_i, l_i, acc = atl.softmax_step(s, keep, m_i, l_i, acc)
        pv = tl.load(
            PV_bh + offs_n[:, None].to(tl.int64) * s_pv_n + offs_rv[None, :] * s_pv_r,
            mask=keep_n[:, None] & (offs_rv < rv)[None, :], other=0.0,
        )  # fmt: skip
        acc += atl.dot(cast(p, dt, UPCAST), pv, IEEE, UPCAST)
    return m_i, l_i, acc


@autotune(
    configs=_SPLIT_CONFIGS,
    key=["N_BUCKET", "N_SPLITS", "ROWS_P", "RQ_P", "RK_P", "RV_P", "D_P", "ROPE", "HAS_MASK", "HAS_KPOS"],
)
@triton.jit
def _decode_split_kernel(
    PQ, VQ, BQ, QPOS, PK, PV, VK, BK, MASK, LENS, COS, SIN, KPOS, ACC, MAX, SUM,
    s_pq_b, s_pq_t, s_pq_h, s_pq_r,
    s_vq_h, s_vq_r, s_vq_d, s_bq_h, s_qpos_b, s_qpos_t,
    s_pk_b, s_pk_n, s_pk_h, s_pk_r,
    s_pv_b, s_pv_n, s_pv_h, s_pv_r,
    s_vk_h, s_vk_r, s_vk_d, s_bk_h,
    s_mask_b, s_mask_n, s_cos_p, s_cos_d, s_kpos_b, s_kpos_n,
    HKV, GROUP, T, R, split_len, N_SPLITS, qk_scale,
    N_BUCKET,
    rq: tl.constexpr, rk: tl.constexpr, rv: tl.constexpr, D: tl.constexpr, ALIGN: tl.constexpr,
    ROWS_P: tl.constexpr, RQ_P: tl.constexpr, RK_P: tl.constexpr, RV_P: tl.constexpr, D_P: tl.constexpr,
    HALF_P: tl.constexpr, HAS_BQ: tl.constexpr, HAS_BK: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr, ROPE: tl.constexpr,
    IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    dt = PQ.dtype.element_ty

    length = tl.load(LENS + b)
    offs_r = tl.arange(0, ROWS_P)  # row r = g·T + t: query head hk·GROUP + g, new token t
    r_ok = offs_r < R
    g_r = offs_r // T
    t_r = offs_r % T
    q_slot = length - T + t_r
    offs_rq = tl.arange(0, RQ_P)
    offs_rk = tl.arange(0, RK_P)
    offs_rv = tl.arange(0, RV_P)
    rq_ok = offs_rq < rq
    PQ_rows = PQ + b.to(tl.int64) * s_pq_b + t_r[:, None] * s_pq_t + offs_rq[None, :] * s_pq_r

    # Query rows of the whole GQA group, built on chip: rows of head g come from pq[.., h_g, :]·vq[h_g].
    half = D // 2
    if ROPE:
        offs_hd = tl.arange(0, HALF_P)
        hd_ok = offs_hd < half
        q1 = tl.zeros([ROWS_P, HALF_P], tl.float32)
        q2 = tl.zeros([ROWS_P, HALF_P], tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            sel = r_ok & (g_r == g)
            pg = tl.load(PQ_rows + h * s_pq_h, mask=sel[:, None] & rq_ok[None, :], other=0.0)
            vq_ptr = VQ + h * s_vq_h + offs_rq[:, None] * s_vq_r + offs_hd[None, :] * s_vq_d
            vq_ok = rq_ok[:, None] & hd_ok[None, :]
            q1 += atl.dot(pg, tl.load(vq_ptr, mask=vq_ok, other=0.0), IEEE, UPCAST)
            q2 += atl.dot(pg, tl.load(vq_ptr + half * s_vq_d, mask=vq_ok, other=0.0), IEEE, UPCAST)
            if HAS_BQ:
                b1 = tl.load(BQ + h * s_bq_h + offs_hd, mask=hd_ok, other=0.0).to(tl.float32)
                b2 = tl.load(BQ + h * s_bq_h + half + offs_hd, mask=hd_ok, other=0.0).to(tl.float32)
                q1 += tl.where(sel[:, None], b1[None, :], 0.0)
                q2 += tl.where(sel[:, None], b2[None, :], 0.0)
        if HAS_QPOS:
            qpos = tl.load(QPOS + b.to(tl.int64) * s_qpos_b + t_r * s_qpos_t, mask=r_ok, other=0)
        else:
            qpos = q_slot
        qc, qs = atl.load_rope(COS, SIN, qpos, r_ok, half, s_cos_p, s_cos_d, HALF_P)
        q1, q2 = atl.rotate(q1, q2, qc, qs)
        q1 = cast(q1 * qk_scale, dt, UPCAST)
        q2 = cast(q2 * qk_scale, dt, UPCAST)
        vk1, vk2, bk1, bk2 = atl.key_factor(
            VK, BK, hk, s_vk_h, s_vk_r, s_vk_d, s_bk_h, offs_rk, rk, offs_hd, hd_ok, half, HAS_BK
        )
        qt = q1  # placeholder: the rank-space query is the no-RoPE path's
    else:
        offs_d = tl.arange(0, D_P)
        d_ok = offs_d < D
        q = tl.zeros([ROWS_P, D_P], tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            sel = r_ok & (g_r == g)
            pg = tl.load(PQ_rows + h * s_pq_h, mask=sel[:, None] & rq_ok[None, :], other=0.0)
            vq_t = tl.load(
                VQ + h * s_vq_h + offs_rq[:, None] * s_vq_r + offs_d[None, :] * s_vq_d,
                mask=rq_ok[:, None] & d_ok[None, :], other=0.0,
            )  # fmt: skip
            q += atl.dot(pg, vq_t, IEEE, UPCAST)
            if HAS_BQ:
                bb = tl.load(BQ + h * s_bq_h + offs_d, mask=d_ok, other=0.0).to(tl.float32)
                q += tl.where(sel[:, None], bb[None, :], 0.0)
        vk_t = tl.load(
            VK + hk * s_vk_h + offs_d[:, None] * s_vk_d + offs_rk[None, :] * s_vk_r,
            mask=d_ok[:, None] & (offs_rk < rk)[None, :], other=0.0,
        )  # fmt: skip
        qt = cast(atl.dot(cast(q, dt, UPCAST), vk_t, IEEE, UPCAST) * qk_scale, dt, UPCAST)
        q1, q2, vk1, vk2, bk1, bk2 = qt, qt, qt, qt, qt, qt  # placeholders: read only with RoPE

    m_i = tl.full([ROWS_P], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_P], tl.float32)
    acc = tl.zeros([ROWS_P, RV_P], tl.float32)

    lo = split * split_len
    hi = tl.minimum(lo + split_len, length)
    PK_bh = PK + b.to(tl.int64) * s_pk_b + tl.multiple_of(hk * s_pk_h, ALIGN)
    PV_bh = PV + b.to(tl.int64) * s_pv_b + tl.multiple_of(hk * s_pv_h, ALIGN)
    MASK_b = MASK + b.to(tl.int64) * s_mask_b
    KPOS_b = KPOS + b.to(tl.int64) * s_kpos_b
    loop = (lo, hi, PK_bh, PV_bh, s_pk_n, s_pk_r, s_pv_n, s_pv_r, offs_rk, offs_rv, MASK_b, s_mask_n,
            q1, q2, qt, vk1, vk2, bk1, bk2, COS, SIN, s_cos_p, s_cos_d, half, KPOS_b, s_kpos_n,
            r_ok, q_slot, m_i, l_i, acc)  # fmt: skip
    if ROPE and HAS_KPOS:
        # Key positions usually sit at one offset from their slots (HF's positions under left padding
        # are ``slot - pads``; decoding adds one of each).  Gathering cos/sin through a loaded
        # position in the tile loop halves its speed, so one cheap pass over this split's positions
        # checks ``pos == slot + offset`` (the offset of the first query row) on every valid key,
        # and only a split that breaks it takes the gathering loop.
        k_off = tl.sum(tl.where(offs_r == 0, qpos - q_slot, 0), axis=0)
        n_bad = tl.zeros([], tl.int32)
        for start_c in range(lo, hi, CHECK_N):
            offs_c = start_c + tl.arange(0, CHECK_N)
            ok_c = offs_c < hi
            if HAS_MASK:
                ok_c = ok_c & (tl.load(MASK_b + offs_c * s_mask_n, mask=ok_c, other=0) != 0)
            kp = tl.load(KPOS_b + offs_c * s_kpos_n, mask=ok_c, other=0)
            n_bad += tl.sum((ok_c & (kp != offs_c + k_off)).to(tl.int32), axis=0)
        if n_bad == 0:
            m_i, l_i, acc = _keys_loop(*loop, k_off, dt, rk, rv, HALF_P, HAS_MASK, HAS_BK, ROPE, False,
                                       IEEE, UPCAST, BLOCK_N)  # fmt: skip
        else:
            m_i, l_i, acc = _keys_loop(*loop, k_off, dt, rk, rv, HALF_P, HAS_MASK, HAS_BK, ROPE, True,
                                       IEEE, UPCAST, BLOCK_N)  # fmt: skip
    else:
        m_i, l_i, acc = _keys_loop(*loop, 0, dt, rk, rv, HALF_P, HAS_MASK, HAS_BK, ROPE, False,
                                   IEEE, UPCAST, BLOCK_N)  # fmt: skip

    base = (pid_bh * N_SPLITS + split).to(tl.int64) * ROWS_P
    tl.store(MAX + base + offs_r, m_i)
    tl.store(SUM + base + offs_r, l_i)
    tl.store(ACC + (base + offs_r[:, None]) * RV_P + offs_rv[None, :], acc)


@triton.jit
def _decode_reduce_kernel(
    ACC, MAX, SUM, VV, BV, OUT,
    s_vv_h, s_vv_r, s_vv_d, s_bv_h,
    s_o_b, s_o_t, s_o_h, s_o_d,
    HKV, GROUP, T, R, N_SPLITS,
    rv: tl.constexpr, D: tl.constexpr, ROWS_P: tl.constexpr, RV_P: tl.constexpr, D_P: tl.constexpr,
    HAS_BV: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Merge the per-split softmax states, then ``out = (acc/l)·vv + bv`` (zeros where ``l == 0``)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    dt = OUT.dtype.element_ty
    offs_r = tl.arange(0, ROWS_P)
    offs_rv = tl.arange(0, RV_P)
    offs_d = tl.arange(0, D_P)
    d_ok = offs_d < D

    m_i = tl.full([ROWS_P], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS_P], tl.float32)
    acc = tl.zeros([ROWS_P, RV_P], tl.float32)
    for split in range(0, N_SPLITS):
        base = (pid_bh * N_SPLITS + split).to(tl.int64) * ROWS_P
        m_s = tl.load(MAX + base + offs_r)
        l_s = tl.load(SUM + base + offs_r)
        a_s = tl.load(ACC + (base + offs_r[:, None]) * RV_P + offs_rv[None, :])
        m_new = tl.maximum(m_i, m_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        beta = tl.exp2(m_s - m_use)
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new

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
    g = offs_r // T
    t = offs_r % T
    head = hk * GROUP + g
    tl.store(
        OUT + b.to(tl.int64) * s_o_b + t[:, None] * s_o_t + head[:, None] * s_o_h + offs_d[None, :] * s_o_d,
        cast(out, dt, UPCAST), mask=(offs_r < R)[:, None] & d_ok[None, :],
    )  # fmt: skip


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda" or interpreter_enabled():
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


# Smallest query-row tile (the M of the score and value dots; one new token of multi-head attention
# is 1 row), below _launch.MIN_TILE: H200, LLaMA-7B shapes, RoPE, 4K cache (2026-12-01), 16 rows run
# B=16 in 271 us against 293 (key positions) and B=1 in 39 against 45 us, and every split config alone
# matches float64 on the ragged decode cases in fp16 and bf16 (test_every_decode_config_matches_float64,
# the sweep that found triton 3.6's 16-wide miscompiles in the prefill and FFN kernels).
MIN_ROWS = 16


def _rows_tile(rows: int) -> int:
    return max(MIN_ROWS, next_power_of_2(rows))


def _decode_split(B: int, Hkv: int, n_hint: int, Nmax: int, dev: torch.device) -> tuple[int, int, int]:
    """``(n_hint, n_splits, split_len)``: how a launch for ``n_hint`` cached tokens cuts the cache."""
    n_hint = max(1, min(n_hint, Nmax))
    want = max(1, (PROGRAMS_PER_SM * _num_sms(dev)) // (B * Hkv))
    n_splits = max(1, min(want, cdiv(n_hint, 256)))
    split_len = cdiv(cdiv(n_hint, n_splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return n_hint, cdiv(n_hint, split_len), split_len


def _decode_call(pq, pk, pv, vq, vk, vv, bq, bk, bv, *, lengths, n_hint, mask, rope, q_pos, k_pos, scale,
                 out):  # fmt: skip
    """``((autotune key, grid, args, flags), (grid, args, kwargs))`` of the split and reduce launches;
    the float32 per-split softmax states (accumulator, max, sum) are allocated here, in the args."""
    B, T, Hq, rq = pq.shape
    Nmax, Hkv, rk = pk.shape[1], pk.shape[2], pk.shape[3]
    rv, D = pv.shape[3], vq.shape[2]
    G = Hq // Hkv
    R = G * T
    ROWS_P, RV_P = _rows_tile(R), tile_size(rv)
    n_hint, n_splits, split_len = _decode_split(B, Hkv, n_hint, Nmax, pq.device)
    n_state = B * Hkv * n_splits * ROWS_P
    scratch = torch.empty(n_state * (RV_P + 2), dtype=torch.float32, device=pq.device)
    acc, mx, sm = (
        scratch[: n_state * RV_P],
        scratch[n_state * RV_P : n_state * (RV_P + 1)],
        scratch[-n_state:],
    )
    mask_u8 = mask.view(torch.uint8) if mask is not None else None
    use_rope = rope is not None
    cos, sin = rope if use_rope else (out, out)
    dummy = out
    IEEE, UPCAST = pq.dtype == torch.float32, upcast_dot(pq.dtype)
    align = _align(pk, pv)
    flags = dict(
        ROWS_P=ROWS_P, RQ_P=tile_size(rq), RK_P=tile_size(rk), RV_P=RV_P, D_P=tile_size(D), HALF_P=tile_size(D // 2),
        HAS_BQ=bq is not None, HAS_BK=bk is not None, HAS_MASK=mask is not None,
        HAS_QPOS=q_pos is not None, HAS_KPOS=k_pos is not None, ROPE=use_rope, IEEE=IEEE, UPCAST=UPCAST,
    )  # fmt: skip
    key = (pq.dtype, _bucket(n_hint), n_splits, rq, rk, rv, D, align, *flags.values())
    split_args = (
        pq, vq, bq if bq is not None else dummy, q_pos if q_pos is not None else dummy,
        pk, pv, vk, bk if bk is not None else dummy, mask_u8 if mask_u8 is not None else dummy, lengths,
        cos, sin, k_pos if k_pos is not None else dummy, acc, mx, sm,
        *pq.stride(), *vq.stride(), bq.stride(0) if bq is not None else 0,
        *(q_pos.stride() if q_pos is not None else (0, 0)),
        *pk.stride(), *pv.stride(), *vk.stride(), bk.stride(0) if bk is not None else 0,
        *(mask_u8.stride() if mask_u8 is not None else (0, 0)), *(cos.stride() if use_rope else (0, 0)),
        *(k_pos.stride() if k_pos is not None else (0, 0)),
        Hkv, G, T, R, split_len, n_splits, scale * LOG2E,
        _bucket(n_hint), rq, rk, rv, D, align,
    )  # fmt: skip
    reduce_args = (
        acc, mx, sm, vv, bv if bv is not None else dummy, out,
        *vv.stride(), bv.stride(0) if bv is not None else 0, *out.stride(),
        Hkv, G, T, R, n_splits, rv, D,
    )  # fmt: skip
    reduce_kwargs = dict(ROWS_P=ROWS_P, RV_P=RV_P, D_P=tile_size(D), HAS_BV=bv is not None, IEEE=IEEE,
                         UPCAST=UPCAST, num_warps=4)  # fmt: skip
    split = (key, lambda meta: (n_splits, B * Hkv), split_args, flags)
    return split, ((B * Hkv,), reduce_args, reduce_kwargs)


def _launch_decode(pq, pk, pv, vq, vk, vv, bq, bk, bv, *, lengths, n_hint, mask, rope, q_pos, k_pos, scale,
                   out=None):  # fmt: skip
    """Shapes: ``pq [B, T, Hq, rq]``, cache ``pk [B, Nmax, Hkv, rk]`` … ; returns ``[B, T, Hq, D]``.

    Two launches and one scratch allocation: no other device work (the decode step is latency-bound
    at small batch, so host-side tensor ops would dominate).
    """
    if pq.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(
            f"the Triton backend takes float16/bfloat16/float32, got {pq.dtype}; use backend='torch'"
        )
    if out is None:
        out = torch.empty(*pq.shape[:3], vq.shape[2], dtype=pq.dtype, device=pq.device)
    (key, grid, args, flags), (r_grid, r_args, r_kwargs) = _decode_call(
        pq, pk, pv, vq, vk, vv, bq, bk, bv, lengths=lengths, n_hint=n_hint, mask=mask, rope=rope, q_pos=q_pos,
        k_pos=k_pos, scale=scale, out=out,
    )  # fmt: skip
    launch_tuned(_decode_split_kernel, key, grid, *args, **flags)
    launch(_decode_reduce_kernel, r_grid, *r_args, **r_kwargs)
    return out


def decode_layout(pk: torch.Tensor, n_hint: int) -> tuple[int, int, int]:
    """What a decode launch over ``pk [B, Nmax, Hkv, r]`` for ``n_hint`` cached tokens depends on
    besides the argument layouts: ``(length bucket, splits, split length)`` (a launch plan's key)."""
    n_hint, n_splits, split_len = _decode_split(pk.shape[0], pk.shape[2], n_hint, pk.shape[1], pk.device)
    return _bucket(n_hint), n_splits, split_len


def prepare_decode(
    pq, pk, pv, vq, vk, vv, bq=None, bk=None, bv=None, *, lengths, n_hint: int, rope, positions, key_positions,
    scale=None, out: torch.Tensor,
):  # fmt: skip
    """The two launches :func:`lowrank_attention_decode` makes over a rank-space cache (whole buffers
    ``pk``/``pv`` ``[B, Nmax, Hkv, r]``, device ``lengths``, ``n_hint`` the host's bound on them), without
    a key mask, as one call ``run(pq, positions, out)``: the inference hot path of a decoder block's
    launch plan.  The scratch states are allocated here, once.  Arguments are checked here; calls are not.
    ``None`` until :func:`lowrank_attention_decode` has launched (and tuned) this signature on the GPU."""
    dims, pk, pv, lengths, _, q_pos, k_pos = _prepare(
        pq, (pk, pv), vq, vk, vv, bq, bk, bv, lengths, None, rope, positions, key_positions
    )
    check_out(out, (dims.B, dims.M, dims.Hq, dims.D), pq)
    if pq.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return None
    scale = 1.0 / math.sqrt(dims.D) if scale is None else float(scale)
    (key, grid, args, flags), (r_grid, r_args, r_kwargs) = _decode_call(
        pq, pk, pv, vq, vk, vv, bq, bk, bv, lengths=lengths, n_hint=n_hint, mask=None, rope=rope, q_pos=q_pos,
        k_pos=k_pos, scale=scale, out=out,
    )  # fmt: skip
    split = prepare_tuned(_decode_split_kernel, key, grid, args, flags, live=(pq, q_pos, out))
    merge = prepare(_decode_reduce_kernel, r_grid, r_args, r_kwargs, live=(out,))
    if split is None or merge is None:
        return None

    def run(pq: torch.Tensor, positions: torch.Tensor | None, out: torch.Tensor) -> None:
        split(pq, positions, out)
        merge(out)

    return run


@torch.library.custom_op("flashsvd::attention_decode", mutates_args=())
def _decode_op(
    pq: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, vq: torch.Tensor, vk: torch.Tensor, vv: torch.Tensor,
    bq: torch.Tensor | None, bk: torch.Tensor | None, bv: torch.Tensor | None, lengths: torch.Tensor,
    n_hint: int, mask: torch.Tensor | None, cos: torch.Tensor | None, sin: torch.Tensor | None,
    q_pos: torch.Tensor | None, k_pos: torch.Tensor | None, scale: float,
) -> torch.Tensor:  # fmt: skip
    """The two decode launches as a ``torch.library`` op (``torch.compile`` traces through it)."""
    rope = (cos, sin) if cos is not None else None
    return _launch_decode(pq, pk, pv, vq, vk, vv, bq, bk, bv, lengths=lengths, n_hint=n_hint, mask=mask,
                          rope=rope, q_pos=q_pos, k_pos=k_pos, scale=scale)  # fmt: skip


@_decode_op.register_fake
def _(pq, pk, pv, vq, *args, **kwargs):
    return pq.new_empty(*pq.shape[:3], vq.shape[2])


def _prepare(pq, cache, vq, vk, vv, bq, bk, bv, lengths, key_padding_mask, rope, positions, key_positions):
    if isinstance(cache, RankSpaceKVCache):
        pk, pv = cache.pk, cache.pv
        if lengths is None:
            lengths = cache.lengths
        n_hint = cache.max_length
    elif isinstance(cache, (tuple, list)) and len(cache) == 2:
        pk, pv = cache
        n_hint = pk.shape[1] if isinstance(pk, torch.Tensor) else 0
    else:
        raise TypeError("cache must be a RankSpaceKVCache or a (pk, pv) pair of [B, N, Hkv, r] tensors")
    dims = check_factors(pq, pk, pv, vq, vk, vv, bq, bk, bv)
    dev = pq.device
    if lengths is None:
        lengths = torch.full((dims.B,), dims.N, dtype=torch.int32, device=dev)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (dims.B,) or lengths.dtype.is_floating_point:
        raise TypeError(
            f"lengths must be an integer tensor [{dims.B}] (valid cache tokens per row, new ones included)"
        )
    if lengths.device != dev:
        raise ValueError(f"lengths is on {lengths.device}; move it to {dev}")
    lengths = lengths.to(torch.int32)
    check_mask(key_padding_mask, dims.B, dims.N, dev)
    check_rope(rope, dims.D, dev)
    q_pos = k_pos = None
    if rope is not None:
        q_pos = check_positions(positions, dims.B, dims.M, "positions", dev)
        k_pos = check_positions(key_positions, dims.B, dims.N, "key_positions", dev)
        need = n_hint if k_pos is None or q_pos is None else 0
        if rope[0].shape[0] < need:
            raise ValueError(
                f"rope tables have {rope[0].shape[0]} rows but cache positions go up to {need - 1}; "
                "build them with rope_table(max_positions >= the cache length)"
            )
    elif positions is not None or key_positions is not None:
        raise ValueError("positions/key_positions only make sense with rope=(cos, sin)")
    return dims, pk, pv, lengths, n_hint, q_pos, k_pos


def _decode_reference(pq, pk, pv, vq, vk, vv, bq, bk, bv, *, lengths, mask, rope, q_pos, k_pos, scale):
    B, T = pq.shape[:2]
    N = pk.shape[1]
    dev = pq.device
    valid = torch.arange(N, device=dev)[None, :] < lengths[:, None]
    if mask is not None:
        valid = valid & mask
    q_slot = lengths[:, None].long() - T + torch.arange(T, device=dev)
    if rope is not None and q_pos is None:
        q_pos = q_slot
    if rope is not None and k_pos is None:
        k_pos = torch.arange(N, device=dev)[None, :].expand(B, N)
    return attention_core_reference(
        pq, pk, pv, vq, vk, vv, bq, bk, bv, q_slot=q_slot, key_valid=valid, causal=True, rope=rope,
        q_pos=q_pos, k_pos=k_pos, scale=scale,
    )  # fmt: skip


def lowrank_attention_decode_reference(
    pq, cache, vq, vk, vv, bq=None, bk=None, bv=None, *, lengths=None, key_padding_mask=None, rope=None,
    positions=None, key_positions=None, scale=None,
) -> torch.Tensor:  # fmt: skip
    """PyTorch reference of :func:`lowrank_attention_decode` (same signature, no ``backend``)."""
    dims, pk, pv, lengths, _, q_pos, k_pos = _prepare(
        pq, cache, vq, vk, vv, bq, bk, bv, lengths, key_padding_mask, rope, positions, key_positions
    )
    scale = 1.0 / math.sqrt(dims.D) if scale is None else float(scale)
    return _decode_reference(pq, pk, pv, vq, vk, vv, bq, bk, bv, lengths=lengths, mask=key_padding_mask,
                             rope=rope, q_pos=q_pos, k_pos=k_pos, scale=scale)  # fmt: skip


def lowrank_attention_decode(
    pq, cache, vq, vk, vv, bq=None, bk=None, bv=None, *, lengths=None, key_padding_mask=None, rope=None,
    positions=None, key_positions=None, scale=None, backend="auto", out=None,
) -> torch.Tensor:  # fmt: skip
    """Attention of ``T`` new tokens (``pq [B, T, Hq, rq]``) over a rank-space cache; ``[B, T, Hq, D]``.

    Args:
        cache: a :class:`RankSpaceKVCache` (new tokens already appended) or a ``(pk, pv)`` pair
            ``[B, N, Hkv, r]``.
        lengths: ``[B]`` valid tokens per row, new ones included (default: the cache's lengths, or N).
        key_padding_mask: ``[B, N]`` bool over cache slots, True = attend (left padding).
        rope: ``(cos, sin)`` tables ``[P, d_head]``; positions ``[T]``/``[B, T]`` of the new tokens
            (default their slots ``lengths - T + t``), key_positions ``[N]``/``[B, N]`` (default slot).
        scale, backend, out: as in :func:`flashsvd.kernels.lowrank_attention`.

    No autograd (decoding is inference); use :func:`lowrank_attention` to train.
    """
    dims, pk, pv, lengths, n_hint, q_pos, k_pos = _prepare(
        pq, cache, vq, vk, vv, bq, bk, bv, lengths, key_padding_mask, rope, positions, key_positions
    )
    scale = 1.0 / math.sqrt(dims.D) if scale is None else float(scale)
    tensors = [pq, pk, pv, vq, vk, vv, bq, bk, bv]
    check_out(out, (dims.B, dims.M, dims.Hq, dims.D), pq)
    chosen = resolve_backend(backend, *[t for t in tensors if t is not None])
    kw = dict(lengths=lengths, mask=key_padding_mask, rope=rope, q_pos=q_pos, k_pos=k_pos, scale=scale)
    if chosen == "torch" or (backend == "auto" and pq.dtype == torch.float64):
        res = _decode_reference(*tensors, **kw)
        return res if out is None else out.copy_(res)
    with torch.no_grad():
        if torch.compiler.is_compiling() and out is None:
            cos, sin = rope if rope is not None else (None, None)
            return _decode_op(*tensors, lengths, n_hint, key_padding_mask, cos, sin, q_pos, k_pos, scale)
        return _launch_decode(*tensors, n_hint=n_hint, out=out, **kw)
