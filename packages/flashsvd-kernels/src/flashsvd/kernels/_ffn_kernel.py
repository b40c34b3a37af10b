"""Triton kernel and launcher behind :func:`flashsvd.kernels.lowrank_ffn` and its gated sibling.

Why one kernel: the plain FFN ``act(P·v1 + b1)·u2·v2 + b2`` and the gated one
``(act(Pg·vg + bg) * (Pu·vu + bu))·u2·v2 + b2`` differ only in how a ``[BLOCK_M, BLOCK_F]`` tile of
the hidden activation ``h`` is produced, so both are one ``@triton.jit`` function parametrized by the
``GATED`` and ``ACT`` constexprs.  The rank-space projections ``P = x·u`` are computed by the caller
with one cuBLAS matmul (they are small: ``[tokens, r]``); everything after that happens here.

Three execution modes (``MODE`` constexpr), chosen by :func:`plan_ffn` from the ranks:

* ``MODE_FUSED`` (``r2`` fits one register accumulator, padded ``r2 <= 256``): one program per row
  tile of ``BLOCK_M`` tokens walks ``d_ff`` in ``BLOCK_F`` tiles, computes each ``h`` tile exactly
  once, accumulates ``acc[BLOCK_M, r2] += h·u2[f, :]`` in registers and finally writes
  ``out = acc·v2 + b2`` tile by tile over ``d_model``.  Nothing of size ``tokens × d_ff`` (nor
  ``tokens × r2``) ever reaches global memory.
* ``MODE_SPLIT_R2`` (``r2`` too wide for registers, moderate ranks): the ``r2`` columns are split in
  chunks of 256, one program per (row tile, chunk).  Each chunk recomputes the ``h`` tiles, so the
  work of ``P·v1`` is done ``n_chunks`` times (bounded: :func:`plan_ffn` only picks this mode while
  the recompute costs less than writing and re-reading ``h`` would).  Programs store their
  ``[BLOCK_M, chunk]`` slice of ``Q = h·u2`` (fp32, ``tokens × r2``, small) and the caller finishes
  with one matmul ``Q·v2 + b2``.
* ``MODE_STORE_H`` (large ranks, e.g. LLaMA-7B at keep 0.5 where ``r ≈ 1500``): recomputing ``h``
  once per 256 columns of ``r2`` would cost more than the dense layer, so the kernel instead writes
  ``h`` for a bounded chunk of tokens (``H_CHUNK_BYTES``) and the caller runs ``h·u2`` and ``·v2``
  with cuBLAS chunk by chunk.  Peak extra memory stays bounded independently of the token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flashsvd.kernels._launch import cdiv, launch_tuned, next_power_of_2, tile_size
from flashsvd.kernels._tl_cast import cast
from flashsvd.kernels._triton_compat import autotune, upcast_dot

__all__ = ["ACTIVATIONS", "FFNPlan", "ffn_forward_triton", "plan_ffn"]

# Activation codes shared with the kernel's ACT constexpr.
ACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "silu": 4}

MODE_FUSED, MODE_SPLIT_R2, MODE_STORE_H = 0, 1, 2

# Widest register accumulator (padded r2 columns) and widest rank block kept on chip in one piece,
# for 2-byte inputs (halved for fp32, whose tiles take twice the shared memory).
MAX_R2_CHUNK = 256
MAX_RANK_BLOCK = 256
RANK_BLOCK_LOOP = 64
# MODE_STORE_H materializes h for at most this many bytes' worth of tokens at a time.
H_CHUNK_BYTES = 64 * 2**20
H_CHUNK_MIN_TOKENS = 256
# Cost model used to pick MODE_SPLIT_R2 vs MODE_STORE_H, in flop-equivalents per element of h:
# writing + re-reading one fp16 h element (4 bytes) at ~3 TB/s costs as much as ~1000 flops at
# ~800 TFLOP/s on an H100.  Measured (BERT-base, 8192 tokens, r = 384): split 0.43 ms / 24 MiB,
# store-h 0.47 ms / 60 MiB, so the threshold stands.
STORE_H_COST_FLOPS = 1000.0


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialized buffer (one place, so tests can poison every buffer the kernel must fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _token_bucket(n: int) -> int:
    """Power-of-two bucket of the token count: the autotune cache key (tile choice depends on it)."""
    return min(next_power_of_2(max(n, 1)), 65536)


@dataclass(frozen=True)
class FFNPlan:
    """How the launcher will run one shape: mode and compile-time block sizes (see module doc)."""

    mode: int
    r2_chunk: int
    n_chunks: int
    block_ka: int
    block_kb: int


def _rank_block(r: int, widest: int) -> int:
    return tile_size(r) if tile_size(r) <= widest else RANK_BLOCK_LOOP


def plan_ffn(ranks_in: tuple[int, ...], r2: int, element_size: int = 2) -> FFNPlan:
    """Pick the execution mode for input ranks ``ranks_in`` (one, or gate and up) and output rank ``r2``.

    fp32 tiles take twice the shared memory of fp16 ones, and the gated kernel holds two P blocks
    and two v tiles per stage, so both halve the widest rank block kept in one piece.
    """
    shrink = 2 if element_size > 2 else 1
    max_chunk = MAX_R2_CHUNK // shrink
    widest = MAX_RANK_BLOCK // shrink // (2 if len(ranks_in) > 1 else 1)
    block_ka = _rank_block(ranks_in[0], widest)
    block_kb = _rank_block(ranks_in[-1], widest)
    r2p = tile_size(r2)
    if r2p <= max_chunk:
        return FFNPlan(MODE_FUSED, r2p, 1, block_ka, block_kb)
    n_chunks = cdiv(r2, max_chunk)
    recompute = (n_chunks - 1) * 2.0 * sum(ranks_in)
    if recompute <= STORE_H_COST_FLOPS:
        return FFNPlan(MODE_SPLIT_R2, max_chunk, n_chunks, block_ka, block_kb)
    return FFNPlan(MODE_STORE_H, 0, 0, block_ka, block_kb)


# (BLOCK_M, BLOCK_F, num_warps, num_stages) candidates.  Modes 0/1 hold a [BLOCK_M, R2_CHUNK] fp32
# accumulator in registers next to the [BLOCK_M, BLOCK_F] pre-activation, so BLOCK_M·(R2_CHUNK +
# BLOCK_F) must stay small; mode 2 is a plain GEMM-with-epilogue and wants big tiles.
#
# Only tiles measured exact on the H200 (triton 3.6) are candidates, because the autotuner keeps the
# fastest config whether or not its numbers are right.  There, with ragged d_ff / d_out / ranks, the
# 4-warp 64×64 tiles and every 128-row tile of modes 0/1 returned relative errors of 0.5–6 or an
# illegal address (fp16 and bf16; DISABLE_MMA_V3=1 made them exact, so it is triton's Hopper wgmma
# lowering, cf. triton-lang/triton#11366), while the tiles below were exact on every probed shape
# (benchmarks/results/ffn_configs_h200.txt).  ``test_every_ffn_config_matches_float64`` re-checks each
# candidate alone on the GPU.
_ACC_TILES = [(64, 64, 8, 2), (64, 32, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]
_STORE_TILES = [(128, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4)]


def _config(bm: int, bf: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_F": bf}, num_warps=warps, num_stages=stages)


def _configs() -> list[triton.Config]:
    """All candidates; the first is what the interpreter uses (small, so CPU tests stay fast)."""
    tiles = [*_ACC_TILES, *_STORE_TILES]
    return [_config(*t) for t in dict.fromkeys(tiles)]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep the candidates that suit the mode (only called on GPU, where there are several)."""
    wanted = _STORE_TILES if kwargs["MODE"] == MODE_STORE_H else _ACC_TILES
    keep = {str(_config(*t)) for t in wanted}
    return [c for c in configs if str(c) in keep] or configs[:1]


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rank_product(
    p_first, p_ptr, stride_p, v_ptr, stride_v, offs_m, mask_m, offs_f, mask_f, R,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, K_LOOP: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``P[offs_m, :R] · v[:R, offs_f]`` in fp32; ``p_first`` is the (hoisted) first rank block of P."""
    offs_k = tl.arange(0, BLOCK_K)
    v = tl.load(
        v_ptr + offs_k[:, None] * stride_v + offs_f[None, :],
        mask=(offs_k < R)[:, None] & mask_f[None, :],
        other=0.0,
    )
    s = _dot(p_first, v, tl.zeros((BLOCK_M, BLOCK_F), tl.float32), UPCAST, PRECISION)
    if K_LOOP:
        for k0 in range(BLOCK_K, R, BLOCK_K):
            ks = k0 + offs_k
            p = tl.load(
                p_ptr + offs_m[:, None] * stride_p + ks[None, :],
                mask=mask_m[:, None] & (ks < R)[None, :],
                other=0.0,
            )
            v = tl.load(
                v_ptr + ks[:, None] * stride_v + offs_f[None, :],
                mask=(ks < R)[:, None] & mask_f[None, :],
                other=0.0,
            )
            s = _dot(p, v, s, UPCAST, PRECISION)
    return s


@triton.jit
def _activation(s, ACT: tl.constexpr):
    if ACT == 1:  # gelu (erf)
        s = 0.5 * s * (1.0 + tl.math.erf(s * 0.7071067811865476))
    elif ACT == 2:  # gelu_tanh: 0.5·s·(1 + tanh(z)) == s·sigmoid(2z)
        s = s * tl.sigmoid(1.5957691216057308 * (s + 0.044715 * s * s * s))
    elif ACT == 3:  # relu
        s = tl.maximum(s, 0.0)
    elif ACT == 4:  # silu
        s = s * tl.sigmoid(s)
    return s


@autotune(
    configs=_configs(),
    key=["D_FF", "R_A", "R_B", "R2", "D_OUT", "T_BUCKET", "MODE", "GATED"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=["n_tokens"])
def _lowrank_ffn_kernel(
    pa_ptr, pb_ptr, va_ptr, vb_ptr, ba_ptr, bb_ptr, u2_ptr, v2_ptr, b2_ptr, out_ptr,
    n_tokens, T_BUCKET, D_FF, R_A, R_B, R2, D_OUT,
    stride_pa, stride_pb, stride_va, stride_vb, stride_u2, stride_v2, stride_out,
    ACT: tl.constexpr, GATED: tl.constexpr, MODE: tl.constexpr,
    HAS_BA: tl.constexpr, HAS_BB: tl.constexpr, HAS_B2: tl.constexpr,
    BLOCK_KA: tl.constexpr, KA_LOOP: tl.constexpr, BLOCK_KB: tl.constexpr, KB_LOOP: tl.constexpr,
    R2_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    """One row tile of tokens (``pid 0``) × one r2 chunk (modes 0/1) or one d_ff tile (mode 2).

    ``out_ptr`` is the FFN output ``[n_tokens, D_OUT]`` (mode 0), the fp32 ``Q = h·u2`` buffer
    ``[n_tokens, R2]`` (mode 1) or the hidden activation ``h`` ``[n_tokens, D_FF]`` (mode 2);
    ``stride_out`` is its row stride.  All factor matrices have unit column stride.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dtype = u2_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < n_tokens

    # First rank block of each P tile: loaded once, reused by every d_ff tile.
    offs_ka = tl.arange(0, BLOCK_KA)
    pa_first = tl.load(
        pa_ptr + offs_m[:, None] * stride_pa + offs_ka[None, :],
        mask=mask_m[:, None] & (offs_ka < R_A)[None, :],
        other=0.0,
    )
    if GATED:
        offs_kb = tl.arange(0, BLOCK_KB)
        pb_first = tl.load(
            pb_ptr + offs_m[:, None] * stride_pb + offs_kb[None, :],
            mask=mask_m[:, None] & (offs_kb < R_B)[None, :],
            other=0.0,
        )

    if MODE == 2:
        f_lo = pid_n * BLOCK_F
        f_hi = f_lo + BLOCK_F
    else:
        f_lo = 0
        f_hi = D_FF
    offs_c = pid_n * R2_CHUNK + tl.arange(0, R2_CHUNK)
    mask_c = offs_c < R2
    acc = tl.zeros((BLOCK_M, R2_CHUNK), tl.float32)

    for f0 in range(f_lo, f_hi, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        mask_f = offs_f < D_FF
        s = _rank_product(
            pa_first, pa_ptr, stride_pa, va_ptr, stride_va, offs_m, mask_m, offs_f, mask_f, R_A,
            BLOCK_M, BLOCK_F, BLOCK_KA, KA_LOOP, UPCAST, PRECISION,
        )  # fmt: skip
        if HAS_BA:
            s += tl.load(ba_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
        h = _activation(s, ACT)
        if GATED:
            g = _rank_product(
                pb_first, pb_ptr, stride_pb, vb_ptr, stride_vb, offs_m, mask_m, offs_f, mask_f, R_B,
                BLOCK_M, BLOCK_F, BLOCK_KB, KB_LOOP, UPCAST, PRECISION,
            )  # fmt: skip
            if HAS_BB:
                g += tl.load(bb_ptr + offs_f, mask=mask_f, other=0.0).to(tl.float32)[None, :]
            h = h * g
        if MODE == 2:
            tl.store(
                out_ptr + offs_m[:, None] * stride_out + offs_f[None, :],
                cast(h, dtype, UPCAST),
                mask=mask_m[:, None] & mask_f[None, :],
            )
        else:
            # Padded d_ff columns give h == 0 (zero-masked v, bias and act(0) == 0), and u2's
            # padded rows are zero too, so no extra masking of h is needed.
            u2 = tl.load(
                u2_ptr + offs_f[:, None] * stride_u2 + offs_c[None, :],
                mask=mask_f[:, None] & mask_c[None, :],
                other=0.0,
            )
            acc = _dot(cast(h, dtype, UPCAST), u2, acc, UPCAST, PRECISION)

    if MODE == 0:
        a = cast(acc, dtype, UPCAST)
        for d0 in range(0, D_OUT, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D_OUT
            v2 = tl.load(
                v2_ptr + offs_c[:, None] * stride_v2 + offs_d[None, :],
                mask=mask_c[:, None] & mask_d[None, :],
                other=0.0,
            )
            o = _dot(a, v2, tl.zeros((BLOCK_M, BLOCK_D), tl.float32), UPCAST, PRECISION)
            if HAS_B2:
                o += tl.load(b2_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
            tl.store(
                out_ptr + offs_m[:, None] * stride_out + offs_d[None, :],
                cast(o, dtype, UPCAST),
                mask=mask_m[:, None] & mask_d[None, :],
            )
    elif MODE == 1:
        tl.store(
            out_ptr + offs_m[:, None] * stride_out + offs_c[None, :],
            acc,
            mask=mask_m[:, None] & mask_c[None, :],
        )


def _launch(mode, plan, pa, pb, va, vb, ba, bb, u2, v2, b2, out, activation, gated):
    n_tokens = pa.shape[0]
    d_ff = va.shape[1]
    d_out = v2.shape[1]
    r2 = u2.shape[1]
    dummy = va  # stands in for absent optional pointers; never read (HAS_* flags are off)

    if mode == MODE_STORE_H:

        def grid(meta):
            return (cdiv(n_tokens, meta["BLOCK_M"]), cdiv(d_ff, meta["BLOCK_F"]))

    else:
        n_chunks = plan.n_chunks

        def grid(meta):
            return (cdiv(n_tokens, meta["BLOCK_M"]), n_chunks)

    flags = dict(
        ACT=ACTIVATIONS[activation], GATED=gated, MODE=mode,
        HAS_BA=ba is not None, HAS_BB=gated and bb is not None, HAS_B2=b2 is not None,
        BLOCK_KA=plan.block_ka, KA_LOOP=va.shape[0] > plan.block_ka,
        BLOCK_KB=plan.block_kb, KB_LOOP=gated and vb.shape[0] > plan.block_kb,
        R2_CHUNK=max(plan.r2_chunk, 16), BLOCK_D=min(64, tile_size(d_out)),
        UPCAST=upcast_dot(u2.dtype), PRECISION="ieee" if u2.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    t_bucket = _token_bucket(n_tokens)
    key = (pa.dtype, u2.dtype, t_bucket, d_ff, va.shape[0], vb.shape[0] if gated else 0, r2, d_out,
           *flags.values())  # fmt: skip
    launch_tuned(
        _lowrank_ffn_kernel, key, grid,
        pa, pb if gated else pa, va, vb if gated else va,
        ba if ba is not None else dummy, bb if bb is not None else dummy,
        u2, v2, b2 if b2 is not None else dummy, out,
        n_tokens, t_bucket, d_ff, va.shape[0],
        vb.shape[0] if gated else 0, r2, d_out,
        pa.stride(0), pb.stride(0) if gated else 0, va.stride(0), vb.stride(0) if gated else 0,
        u2.stride(0), v2.stride(0), out.stride(0),
        **flags,
    )  # fmt: skip


def ffn_forward_triton(p_a, p_b, v_a, v_b, b_a, b_b, u2, v2, b2, activation, gated):
    """Run the kernel on pre-projected, 2-D inputs and return ``out [tokens, d_out]``.

    Shapes (already validated by the caller): ``p_a [T, r_a]`` (row stride free, unit column stride),
    ``v_a [r_a, d_ff]``, ``b_a [d_ff] | None``; for ``gated`` the same for ``p_b``/``v_b``/``b_b``
    (the ``up`` branch, ``activation`` applies to the ``a`` branch only); ``u2 [d_ff, r2]``,
    ``v2 [r2, d_out]``, ``b2 [d_out] | None``.  All tensors share one dtype and device.
    """
    n_tokens = p_a.shape[0]
    d_ff = v_a.shape[1]
    d_out = v2.shape[1]
    ranks_in = (v_a.shape[0], v_b.shape[0]) if gated else (v_a.shape[0],)
    plan = plan_ffn(ranks_in, u2.shape[1], u2.element_size())
    args = (v_a, v_b, b_a, b_b, u2, v2, b2)
    out = _alloc((n_tokens, d_out), u2.dtype, u2.device)
    if n_tokens == 0:
        return out
    if plan.mode == MODE_FUSED:
        _launch(MODE_FUSED, plan, p_a, p_b, *args, out, activation, gated)
    elif plan.mode == MODE_SPLIT_R2:
        q = _alloc((n_tokens, u2.shape[1]), torch.float32, u2.device)
        _launch(MODE_SPLIT_R2, plan, p_a, p_b, *args, q, activation, gated)
        _finish(q.to(u2.dtype), v2, b2, out)
    else:
        elt = u2.element_size()
        chunk = max(H_CHUNK_MIN_TOKENS, (H_CHUNK_BYTES // (d_ff * elt)) // 256 * 256)
        h = _alloc((min(chunk, n_tokens), d_ff), u2.dtype, u2.device)
        for t0 in range(0, n_tokens, chunk):
            t1 = min(t0 + chunk, n_tokens)
            hc = h[: t1 - t0]
            _launch(
                MODE_STORE_H, plan, p_a[t0:t1], p_b[t0:t1] if gated else None, *args, hc, activation, gated
            )
            _finish(hc @ u2, v2, b2, out[t0:t1])
    return out


def _finish(q: torch.Tensor, v2: torch.Tensor, b2: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = q·v2 + b2`` written in place (one cuBLAS call)."""
    if b2 is None:
        torch.mm(q, v2, out=out)
    else:
        torch.addmm(b2, q, v2, out=out)
