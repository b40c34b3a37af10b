"""Float64 linear-algebra helpers shared by the methods.

Every method in this package is an instance of one closed form: find the rank-``r`` ``Ŵ`` that
minimizes ``‖L (W − Ŵ) R‖_F`` for an invertible input-side transform ``R`` (whitening factor, an
activation scale, Fisher weights, or the identity) and an optional diagonal output-side scale ``L``.
By Eckart–Young the answer is ``Ŵ = L⁻¹ · trunc_r(L W R) · R⁻¹``; :func:`weighted_lowrank` computes it
and returns the factors in the ``u: [in, r]``, ``v: [r, out]`` layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flashsvd.methods.errors import NonFiniteStatisticsError, ShapeError

STREAM_CHUNK_ELEMENTS = 1 << 23  # float64 temporaries of streamed products: 64 MB


def rows_per_block(n_cols: int) -> int:
    """Rows of a streamed ``[rows, n_cols]`` float64 temporary that keep it within
    :data:`STREAM_CHUNK_ELEMENTS` (at least one)."""
    return max(1, STREAM_CHUNK_ELEMENTS // max(1, n_cols))


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteStatisticsError` if ``tensor`` holds NaN or Inf.

    One float64 sum decides (NaN and ±Inf propagate into it; a finite sum means every element is
    finite), so the check allocates nothing the size of ``tensor`` — ``torch.isfinite`` builds ``|t|``
    and three boolean masks, 1.2 GiB beside a LLaMA-7B ``down_proj`` Gram. Only a non-finite sum (or one
    that overflowed) is counted element by element, in blocks.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return
    flat = tensor.reshape(-1)
    bad = sum(int((~torch.isfinite(part)).sum()) for part in flat.split(STREAM_CHUNK_ELEMENTS))
    if bad:
        raise NonFiniteStatisticsError(
            f"{what} contains {bad} non-finite value(s) (NaN/Inf). Check the calibration inputs "
            "(fp16 overflow? empty batches?) and recollect the statistics in float32/float64."
        )


@dataclass
class InputTransform:
    """An invertible input-side transform ``R`` with its inverse (both ``[in, in]`` or diagonal ``[in]``)."""

    forward: torch.Tensor
    inverse: torch.Tensor
    diagonal: bool
    jitter: float = 0.0
    fallback: str | None = None

    def right(self, w: torch.Tensor) -> torch.Tensor:
        """``W @ R``."""
        return w * self.forward if self.diagonal else w @ self.forward

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """``W @ R⁻¹``."""
        return w * self.inverse if self.diagonal else w @ self.inverse


def diagonal_transform(scale: torch.Tensor, what: str, floor: float = 1e-12) -> InputTransform:
    """``R = diag(scale)``; entries below ``floor · max`` are raised to it so ``R⁻¹`` stays finite."""
    scale = scale.to(torch.float64)
    check_finite(scale, what)
    if bool((scale < 0).any()):
        raise NonFiniteStatisticsError(f"{what} has negative entries; scales must be non-negative.")
    top = float(scale.max()) if scale.numel() else 0.0
    if top <= 0.0:
        raise NonFiniteStatisticsError(
            f"{what} is all zeros: the calibration saw no signal for this layer (no tokens, or all-zero "
            "inputs/gradients). Recollect statistics with real data."
        )
    scale = scale.clamp_min(top * floor)
    return InputTransform(scale, 1.0 / scale, diagonal=True)


def checked_gram(gram: torch.Tensor, damping: float = 0.0) -> tuple[torch.Tensor, float]:
    """``(XᵀX + damping·mean(diag)·I, mean(diag))`` in float64, after the checks every use needs.

    No copy is made when the Gram already is float64 and no damping is asked for (Cholesky and eigh
    read one triangle only). A zero or non-finite Gram raises :class:`NonFiniteStatisticsError`.
    """
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ShapeError(f"Gram matrix must be square [in, in], got {tuple(gram.shape)}.")
    g = gram.to(torch.float64)
    check_finite(g, "Gram matrix XᵀX")
    scale = float(torch.diagonal(g).mean())
    if not scale > 0.0:
        raise NonFiniteStatisticsError(
            "Gram matrix XᵀX has a zero (or negative) trace: the layer saw no calibration tokens or only "
            "zeros. Run calibration on real inputs before using a data-aware method."
        )
    if damping > 0.0:
        g = g.clone()
        g.diagonal().add_(damping * scale)
    return g, scale


def whitening_transform(
    gram: torch.Tensor,
    *,
    damping: float = 0.0,
    max_jitter: float = 1e-2,
) -> InputTransform:
    """A factor ``S`` with ``S Sᵀ ≈ XᵀX`` (lower-triangular Cholesky) and its inverse, in float64.

    ``damping`` adds ``damping · mean(diag)`` to the diagonal first (ridge). If the Cholesky fails
    (singular or indefinite from round-off), an adaptive jitter scaled to the trace is added, growing
    ×10 from ``1e-10`` up to ``max_jitter`` (relative); if even that fails, an eigen-decomposition
    fallback clamps the spectrum at ``1e-10 · λ_max`` and uses ``S = Q Λ^½``. A zero or non-finite
    Gram matrix raises :class:`NonFiniteStatisticsError` instead of returning garbage.
    """
    # Square float64 buffers are the memory peak of a big layer (d_in = 11008: 0.97 GB each), so the
    # Gram is copied only when its diagonal must change, and S⁻¹ is solved in place of the identity.
    g, scale = checked_gram(gram, damping)
    jitter = 0.0
    rel = 1e-10
    while True:
        shifted = g
        if jitter:
            shifted = g.clone()
            shifted.diagonal().add_(jitter)
        chol, info = torch.linalg.cholesky_ex(shifted)
        del shifted
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            inv = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
            torch.linalg.solve_triangular(chol, inv, upper=False, out=inv)
            if bool(torch.isfinite(inv).all()):
                return InputTransform(chol, inv, diagonal=False, jitter=jitter / scale)
            del inv
        del chol
        if rel > max_jitter:
            break
        jitter = rel * scale
        rel *= 10.0
    evals, evecs = torch.linalg.eigh(g)
    floor = 1e-10 * float(evals.max())
    evals = evals.clamp_min(floor)
    root = evals.sqrt()
    forward = evecs * root  # Q Λ^½  (columns scaled)
    inverse = (evecs / root).T  # Λ^-½ Qᵀ
    return InputTransform(forward, inverse, diagonal=False, jitter=floor / scale, fallback="eigh")


def truncated_svd(
    m: torch.Tensor, rank: int, driver: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P_r [rows, r], σ_r [r], Q_r [cols, r], σ_all)`` of the float64 SVD ``M = P Σ Qᵀ``.

    ``driver``: ``"svd"`` (LAPACK / cuSOLVER SVD), ``"gram"`` (eigen-decomposition of the smaller of
    ``M Mᵀ`` and ``MᵀM``, the other side recovered by one product), or ``"auto"``: ``"gram"`` on CUDA,
    where cuSOLVER's float64 SVD of a 4096² matrix takes 1.6 s against 0.11 s for the eigen route
    (``benchmarks/results/factorization_h200.csv``), and ``"svd"`` elsewhere. The Gram route squares
    the condition number: singular values below ~1e-8·σ_max lose their relative accuracy, which moves
    the truncated factors by far less than the truncation error itself.

    Each singular pair's sign is fixed (the largest-magnitude entry of ``P``'s column is positive), so
    the same matrix, or one that differs by round-off (statistics summed in another order by another
    number of processes), gives the same factors rather than sign-flipped ones.
    """
    m = m.to(torch.float64)
    if driver == "auto":
        driver = "gram" if m.is_cuda else "svd"
    if driver == "svd":
        p, s_all, qh = torch.linalg.svd(m, full_matrices=False)
        p, s, q = p[:, :rank], s_all[:rank], qh[:rank].T
    elif driver == "gram":
        rows, cols = m.shape
        wide = rows <= cols
        evals, evecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)  # ascending
        evals, evecs = evals.flip(0), evecs.flip(1)
        s_all = evals.clamp_min(0).sqrt()
        side = evecs[:, :rank]
        other = m.T @ side if wide else m @ side  # = (Q or P) · σ
        s = other.norm(dim=0)  # σ of the kept pairs, from the product (exact for this side)
        other = other / s.clamp_min(torch.finfo(torch.float64).tiny)
        p, q = (side, other) if wide else (other, side)
        order = torch.argsort(s, descending=True)  # the product's norms can reorder near-ties
        p, s, q = p[:, order], s[order], q[:, order]
    else:
        raise ValueError(f"truncated_svd: driver must be 'auto', 'svd' or 'gram', got {driver!r}")
    sign = canonical_signs(p)
    return p * sign, s, q * sign, s_all


def canonical_signs(p: torch.Tensor) -> torch.Tensor:
    """``±1`` per column of ``p`` making each column's largest-magnitude entry positive (never 0).

    Singular (and eigen) vectors are defined up to sign; fixing it makes factors reproducible across
    drivers and round-off (another order of summing the statistics).
    """
    sign = torch.sign(p.gather(0, p.abs().argmax(dim=0)[None]).squeeze(0))
    return torch.where(sign == 0, torch.ones_like(sign), sign)


def weighted_lowrank(
    w: torch.Tensor,
    rank: int,
    transform: InputTransform | None = None,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``r`` minimizer of ``‖diag(out_scale) (W − Ŵ) R‖_F``, split with ``√Σ`` on both sides.

    Args:
        w: ``[out, in]`` weight (any float dtype; computed in float64).
        rank: target rank.
        transform: input-side ``R`` (identity when ``None``).
        out_scale: positive ``[out]`` row weights (identity when ``None``).

    Returns:
        ``u [in, r]``, ``v [r, out]`` (float64, ``Ŵ = (u v)ᵀ``) and all singular values of the
        weighted matrix (useful for rank allocation).
    """
    m = w.to(torch.float64)
    if transform is not None:
        m = transform.right(m)
    if out_scale is not None:
        m = m * out_scale.to(torch.float64)[:, None]
    p, s, q, s_all = truncated_svd(m, rank)
    root = s.sqrt()
    left = p * root  # [out, r]  -> vᵀ before un-scaling
    right = q * root  # [in, r]  -> rows of uᵀ before un-transforming
    if out_scale is not None:
        left = left / out_scale.to(torch.float64)[:, None]
    u_t = right.T  # [r, in]
    if transform is not None:
        u_t = transform.right_inverse(u_t)
    return u_t.T.contiguous(), left.T.contiguous(), s_all


def projected_lowrank(
    w: torch.Tensor,
    rank: int,
    gram: torch.Tensor,
    out_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`weighted_lowrank` with ``R Rᵀ = gram`` for a wide ``W`` (``out ≤ in``), without ``R``.

    With ``M = L W R``: ``M Mᵀ = L W G Wᵀ L`` (``[out, out]``), its top-``r`` eigenvectors ``P_r`` span
    the best rank-``r`` subspace, and ``Ŵ = L⁻¹ P_r P_rᵀ L W`` (the ``R`` cancels). So a wide matrix never
    needs the Cholesky factor of its ``[in, in]`` Gram or that factor's inverse: for a LLaMA-7B
    ``down_proj`` that skips two 11008² float64 matrices (1.9 GB) and their solves. A singular Gram
    needs no jitter here. Factors are split with ``√σ`` on both sides, as :func:`weighted_lowrank`;
    directions the data never reached (``σ ≈ 0``) get zero factors.
    """
    m = w.to(torch.float64)
    if out_scale is not None:
        m = m * out_scale.to(torch.float64)[:, None]
    gram = gram.to(torch.float64)
    c = m.new_empty(m.shape[0], m.shape[0])
    step = rows_per_block(m.shape[1])  # row blocks: the [rows, in] product stays small
    for lo in range(0, m.shape[0], step):
        c[lo : lo + step] = (m[lo : lo + step] @ gram) @ m.T
    evals, evecs = torch.linalg.eigh(c)  # reads one triangle; ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    s_all = evals.clamp_min(0).sqrt()
    p = evecs[:, :rank]
    p = p * canonical_signs(p)
    s = s_all[:rank]
    alive = s > s_all[0] * 1e-12 if s_all.numel() else s > 0
    root = torch.where(alive, s.sqrt(), torch.ones_like(s))
    u_t = (p.T @ m) / root[:, None] * alive[:, None]  # diag(σ^-½) Pᵀ L W   [r, in]
    left = p * (root * alive)  # P σ^½   [out, r]
    if out_scale is not None:
        left = left / out_scale.to(torch.float64)[:, None]
    return u_t.T.contiguous(), left.T.contiguous(), s_all


def split_heads(w: torch.Tensor, n_heads: int) -> list[torch.Tensor]:
    """Row blocks ``W_h: [d_head, in]`` of an ``[H·d_head, in]`` weight."""
    out = w.shape[0]
    if n_heads <= 0 or out % n_heads != 0:
        raise ShapeError(f"n_heads={n_heads} must be a positive divisor of the output dim {out}.")
    return list(w.reshape(n_heads, out // n_heads, w.shape[1]).unbind(0))


def merge_heads(us: list[torch.Tensor], vs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head ``u_h [in, r]`` and ``v_h [r, d_head]`` → ``u [in, H·r]`` and ``v [H, r, d_head]``."""
    return torch.cat(us, dim=1).contiguous(), torch.stack(vs, dim=0).contiguous()


def factor_heads(
    w: torch.Tensor,
    rank: int,
    transform: InputTransform | None = None,
    out_scale: torch.Tensor | None = None,
    n_heads: int | None = None,
    gram: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`weighted_lowrank` on the whole matrix, or on each head's row block when ``n_heads``.

    The input transform is shared by all heads (it describes the common input); ``out_scale`` is
    sliced per head. With ``gram`` instead of ``transform`` (whitening by ``R Rᵀ = gram``), every
    block must be wide and :func:`projected_lowrank` runs. Returns ``u``, ``v`` (2-D or per-head 3-D)
    and the weighted spectra.
    """

    def one(wh: torch.Tensor, scale_h: torch.Tensor | None):
        if gram is not None:
            return projected_lowrank(wh, rank, gram, scale_h)
        return weighted_lowrank(wh, rank, transform, scale_h)

    if n_heads is None:
        u, v, s = one(w, out_scale)
        return u, v, [s]
    heads = split_heads(w, n_heads)
    d = heads[0].shape[0]
    us, vs, spectra = [], [], []
    for h, wh in enumerate(heads):
        u, v, s = one(wh, None if out_scale is None else out_scale[h * d : (h + 1) * d])
        us.append(u)
        vs.append(v)
        spectra.append(s)
    u, v = merge_heads(us, vs)
    return u, v, spectra
