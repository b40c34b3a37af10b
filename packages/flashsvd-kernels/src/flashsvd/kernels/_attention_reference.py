"""Pure-PyTorch math of low-rank attention: the oracle for tests and the CPU path.

One core (:func:`attention_core_reference`) covers prefill and decode: queries sit at key *slots*
``q_slot[b, m]`` (for the causal mask), keys are valid where ``key_valid[b, n]``.  It rebuilds full
Q, K, V from the factors (``Q = P_q·V_q + b_q`` per head), so it is simple rather than lean.

Fully masked query rows (no key to attend to) return zeros, bias included: there is nothing to
average, and a NaN or a bare bias would leak into the residual stream.
"""

from __future__ import annotations

import torch

from flashsvd.kernels.rope import apply_rope

__all__ = ["attention_core_reference"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _project(p: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor:
    out = torch.einsum("blhr,hrd->blhd", p.to(ct), v.to(ct))
    return out if b is None else out + b.to(ct)


def attention_core_reference(
    pq, pk, pv, vq, vk, vv, bq, bk, bv, *, q_slot, key_valid, causal, rope, q_pos, k_pos, scale
) -> torch.Tensor:
    """Return ``[B, M, Hq, d_head]`` in the inputs' dtype.

    ``q_slot``: ``[B, M]`` int, the key index each query occupies (causal: attend keys ``n <= q_slot``);
    ``key_valid``: ``[B, N]`` bool or None; ``rope``: ``(cos, sin)`` tables or None, with ``q_pos``
    ``[B, M]`` and ``k_pos`` ``[B, N]`` positions indexing them.
    """
    dtype = pq.dtype
    ct = _compute_dtype(dtype)
    B, M, Hq, _ = pq.shape
    N, Hkv = pk.shape[1], pk.shape[2]
    G = Hq // Hkv
    q = _project(pq, vq, bq, ct)
    k = _project(pk, vk, bk, ct)
    v = _project(pv, vv, bv, ct)
    if rope is not None:
        # Kernels read only the first d_head/2 columns (HF tables repeat them); so does the reference.
        half = q.shape[-1] // 2
        cos, sin = (torch.cat((t[:, :half], t[:, :half]), dim=-1).to(ct) for t in rope)
        q = apply_rope(q, cos[q_pos.long()][:, :, None, :], sin[q_pos.long()][:, :, None, :])
        k = apply_rope(k, cos[k_pos.long()][:, :, None, :], sin[k_pos.long()][:, :, None, :])
    if G > 1:
        k = k.repeat_interleave(G, dim=2)
        v = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bmhd,bnhd->bhmn", q, k) * scale
    keep = torch.ones(B, 1, M, N, dtype=torch.bool, device=pq.device)
    if key_valid is not None:
        keep = keep & key_valid[:, None, None, :]
    if causal:
        n_idx = torch.arange(N, device=pq.device)
        keep = keep & (n_idx[None, None, None, :] <= q_slot[:, None, :, None])
    s = s.masked_fill(~keep, float("-inf"))
    any_keep = keep.any(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~any_keep, 0.0), dim=-1) * any_keep
    out = torch.einsum("bhmn,bnhd->bmhd", p, v)
    return out.to(dtype)
