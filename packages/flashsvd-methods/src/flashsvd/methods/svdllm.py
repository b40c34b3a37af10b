"""SVD-LLM (Wang et al., ICLR 2025): truncation-aware data whitening plus a closed-form factor update.

Whitening: Cholesky ``S`` of ``XᵀX``, SVD of ``W S = U Σ Vᵀ``, truncate, ``Ŵ = U_r Σ_r V_rᵀ S⁻¹``; each
dropped singular value then costs exactly its own size in data-weighted error (truncation-aware).

Update (``update="v"`` or ``"u"`` or ``"uv"``): with one factor fixed, the other is re-solved by least
squares on calibration data, towards the *dense* outputs ``X_ref Wᵀ`` from the layer's actual inputs
``X̃`` (``cross = X̃ᵀ X_ref`` when sequential calibration paired them, else ``XᵀX`` itself)::

    v = (uᵀ G u)⁻¹ uᵀ C Wᵀ          (u fixed)
    u = G⁻¹ C Wᵀ vᵀ (v vᵀ)⁻¹        (v fixed)

With ``C = G`` the ``v`` update is a fixed point of the whitened truncation; it helps when the layer's
inputs drifted from the dense model's (sequential mode) — the setting SVD-LLM's update targets.
"""

from __future__ import annotations

from typing import Any

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.errors import FlashSVDMethodError
from flashsvd.methods.linalg import check_finite, factor_heads, split_heads
from flashsvd.methods.whiten import whitening_of


def _ridge_solve(a: torch.Tensor, b: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve ``(A + ridge·mean(diag A)·I) X = B`` in float64 (A symmetric PSD)."""
    n = a.shape[0]
    lam = ridge * float(torch.diagonal(a).mean().clamp_min(1e-300))
    a = a + lam * torch.eye(n, dtype=a.dtype, device=a.device)
    sol, info = torch.linalg.solve_ex(a, b)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        sol = torch.linalg.lstsq(a, b).solution
    check_finite(sol, "least-squares factor update")
    return sol


def update_factors(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor | None,
    *,
    update: str = "v",
    ridge: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form least-squares update of ``v`` and/or ``u`` (2-D or per-head 3-D ``v``)."""
    g = gram.to(torch.float64)
    c = g if cross is None else cross.to(torch.float64)
    w = weight.to(torch.float64)
    if v.dim() == 2:
        blocks = [(w, u, v)]
    else:
        heads, r, _ = v.shape
        blocks = [(wh, u[:, h * r : (h + 1) * r], v[h]) for h, wh in enumerate(split_heads(w, heads))]
    new_u, new_v = [], []
    for wh, uh, vh in blocks:
        target = c @ wh.T  # [in, out_h] = X̃ᵀ X_ref W_hᵀ
        if "v" in update:
            vh = _ridge_solve(uh.T @ g @ uh, uh.T @ target, ridge)
        if "u" in update:
            rhs = target @ vh.T  # [in, r]
            uh = _ridge_solve(g, rhs, ridge)
            uh = _ridge_solve(vh @ vh.T, uh.T, ridge).T  # u = G⁻¹ C Wᵀ vᵀ (v vᵀ)⁻¹
        new_u.append(uh)
        new_v.append(vh)
    if v.dim() == 2:
        return new_u[0], new_v[0]
    return torch.cat(new_u, 1).contiguous(), torch.stack(new_v, 0).contiguous()


def svdllm_method(
    weight: torch.Tensor,
    rank: int,
    *,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
    update: str | None = None,
    damping: float = 0.0,
    ridge: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Truncation-aware whitening; ``update`` in ``{None, "v", "u", "uv"}`` adds the closed-form update."""
    if update not in (None, "v", "u", "uv"):
        raise FlashSVDMethodError(f"svdllm update must be None, 'v', 'u' or 'uv', got {update!r}.")
    transform = whitening_of(stats, "svdllm", damping)
    u, v, _ = factor_heads(weight, rank, transform=transform, n_heads=n_heads)
    if update is not None:
        u, v = update_factors(weight, u, v, stats.gram, stats.cross, update=update, ridge=ridge)
    return u, v, {"jitter": transform.jitter, "fallback": transform.fallback, "update": update}
