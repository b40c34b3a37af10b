"""Activation-aware SVD (Yuan et al. 2023, "ASVD").

Scaling: input channels with large activations matter more, so the weight is scaled by
``S = diag(s_j^α)`` with ``s_j`` the mean (or max) absolute activation of input feature ``j``
(``α = 0.5`` by default), truncated, and un-scaled: ``Ŵ = trunc_r(W S) S⁻¹``.

Rank allocation (ASVD's sensitivity-based truncation rank search) is model-agnostic and lives in
:func:`flashsvd.methods.ranks.asvd_sensitivity` / :func:`flashsvd.methods.ranks.allocate_by_sensitivity`.
"""

from __future__ import annotations

from typing import Any

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.errors import CalibrationMissingError, FlashSVDMethodError
from flashsvd.methods.linalg import diagonal_transform, factor_heads


def asvd_method(
    weight: torch.Tensor,
    rank: int,
    *,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
    alpha: float = 0.5,
    scale: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Activation-scaled truncation; ``scale`` is ``"mean"`` (abs-mean) or ``"max"`` (abs-max)."""
    if scale not in ("mean", "max"):
        raise FlashSVDMethodError(f"asvd scale must be 'mean' or 'max', got {scale!r}.")
    if not alpha >= 0.0:
        raise FlashSVDMethodError(f"asvd alpha must be ≥ 0, got {alpha}.")
    if stats is None:
        raise CalibrationMissingError(
            "method 'asvd' needs activation statistics: run collect_statistics first."
        )
    if scale == "mean":
        stats.require("abs_sum", "asvd")
        act = stats.abs_mean
    else:
        act = stats.require("abs_max", "asvd")
    if act.shape != (weight.shape[1],):
        raise FlashSVDMethodError(
            f"activation scale has shape {tuple(act.shape)}, weight expects ({weight.shape[1]},)."
        )
    transform = diagonal_transform(act.to(torch.float64).pow(alpha), "ASVD activation scale")
    u, v, _ = factor_heads(weight, rank, transform=transform, n_heads=n_heads)
    return u, v, {"alpha": alpha, "scale": scale}
