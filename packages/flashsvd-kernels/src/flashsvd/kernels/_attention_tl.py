"""Triton device functions shared by the prefill and decode attention kernels.

Why a module: the on-chip steps (a dot that respects fp32 precision and the interpreter's bf16 bug,
the rotate-half RoPE of a tile kept as two halves, the online-softmax update that never produces
NaN for fully masked rows) are identical in both kernels and must not be copy-pasted.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``IEEE`` = exact fp32 (no tf32), ``UPCAST`` = interpreter bf16 fix."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def load_rope(COS, SIN, pos, row_ok, half, s_cos_p, s_cos_d, HALF_P: tl.constexpr):
    """cos/sin at rows ``pos`` (``[R]`` int) as ``[R, HALF_P]`` fp32 tiles.

    Only the first ``d_head/2`` columns are read: HF tables repeat them (``cat(freqs, freqs)``).
    """
    offs = tl.arange(0, HALF_P)
    ok = row_ok[:, None] & (offs < half)[None, :]
    base = pos[:, None].to(tl.int64) * s_cos_p + offs[None, :] * s_cos_d
    c = tl.load(COS + base, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(SIN + base, mask=ok, other=0.0).to(tl.float32)
    return c, s


@triton.jit
def rotate(x1, x2, c, s):
    """HF rotate-half on a tile held as halves: ``(x1·c − x2·s, x2·c + x1·s)``."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def key_factor(VK, BK, hk, s_vk_h, s_vk_r, s_vk_d, s_bk_h, offs_rk, rk, offs_hd, hd_ok, half,
               HAS_BK: tl.constexpr):  # fmt: skip
    """Head ``hk``'s key factor ``vk`` and bias ``bk`` as halves ``(vk1, vk2, bk1, bk2)`` over d_head,
    kept on chip for the whole key loop (without ``HAS_BK`` the bias halves are unused placeholders)."""
    vk_ptr = VK + hk * s_vk_h + offs_rk[:, None] * s_vk_r + offs_hd[None, :] * s_vk_d
    vk_ok = (offs_rk < rk)[:, None] & hd_ok[None, :]
    vk1 = tl.load(vk_ptr, mask=vk_ok, other=0.0)
    vk2 = tl.load(vk_ptr + half * s_vk_d, mask=vk_ok, other=0.0)
    if HAS_BK:
        bk1 = tl.load(BK + hk * s_bk_h + offs_hd, mask=hd_ok, other=0.0).to(tl.float32)
        bk2 = tl.load(BK + hk * s_bk_h + half + offs_hd, mask=hd_ok, other=0.0).to(tl.float32)
    else:
        bk1 = vk1
        bk2 = vk2
    return vk1, vk2, bk1, bk2


@triton.jit
def rotated_keys(pk, vk1, vk2, bk1, bk2, COS, SIN, pos, pos_ok, half, s_cos_p, s_cos_d,
                 HAS_BK: tl.constexpr, HALF_P: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):  # fmt: skip
    """A K tile rebuilt on chip from its rank-space rows (``pk·vk + bk``, as halves) and rotated at
    positions ``pos``: one tensor-core dot per half, shared by every query row that reads the tile."""
    k1 = dot(pk, vk1, IEEE, UPCAST)
    k2 = dot(pk, vk2, IEEE, UPCAST)
    if HAS_BK:
        k1 += bk1[None, :]
        k2 += bk2[None, :]
    c, s = load_rope(COS, SIN, pos, pos_ok, half, s_cos_p, s_cos_d, HALF_P)
    return rotate(k1, k2, c, s)


@triton.jit
def softmax_step(s, keep, m_i, l_i, acc):
    """One online-softmax step over a score tile ``s`` (already in log2 units).

    Masked scores become -inf; a row with no valid key so far keeps ``m = -inf`` and uses 0 as its
    shift so that ``exp2`` sees ``-inf`` (→ 0), never ``-inf - -inf`` (→ NaN).
    Returns ``p`` (unnormalized probabilities), the new ``m``, ``l`` and the rescaled ``acc``.
    """
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc
