"""Data-aware whitening (DRONE, Chen et al., NeurIPS 2021, "Data-aware low-rank compression").

Minimizes the error on the calibration inputs, ``‖(W − Ŵ) Xᵀ‖_F``, instead of ``‖W − Ŵ‖_F``. With
``XᵀX = S Sᵀ`` the objective equals ``‖(W − Ŵ) S‖_F``, so ``Ŵ = trunc_r(W S) S⁻¹`` is optimal.
``S`` comes from :func:`flashsvd.methods.linalg.whitening_transform` (float64 Cholesky, adaptive
jitter scaled to the trace, eigen fallback; non-finite or zero statistics raise).

When the statistics also hold ``cross = X̃ᵀ X_ref`` (sequential calibration: ``X̃`` are the inputs the
layer sees behind already-compressed layers, ``X_ref`` the dense model's), the objective becomes the
dense outputs: ``min ‖X_ref Wᵀ − X̃ Ŵᵀ‖``. This is reduced-rank regression; its solution is the
same closed form applied to ``W_eff = W · crossᵀ · (X̃ᵀX̃)⁻¹`` whitened by ``X̃ᵀX̃``. It corrects, layer
by layer, the error that earlier compressed layers introduced.
"""

from __future__ import annotations

from typing import Any

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.errors import CalibrationMissingError
from flashsvd.methods.linalg import (
    InputTransform,
    check_finite,
    checked_gram,
    factor_heads,
    whitening_transform,
)


def whitening_of(stats: LayerStatistics | None, method: str, damping: float) -> InputTransform:
    if stats is None:
        raise CalibrationMissingError(
            f"method '{method}' is data-aware and needs calibration statistics (a Gram matrix XᵀX): "
            "run flashsvd.methods.collect_statistics(...) and pass stats=."
        )
    return whitening_transform(stats.require("gram", method), damping=damping)


def whiten_method(
    weight: torch.Tensor,
    rank: int,
    *,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
    damping: float = 0.0,
    use_cross: bool = True,
    output_fisher: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """DRONE closed form; targets the dense outputs when paired ``cross`` statistics are present.

    ``output_fisher``: also weight each output by ``√E[(∂L/∂y)²]`` (the ``grad_out_sq`` statistic), i.e.
    minimize ``‖diag(f)(W − Ŵ)Xᵀ‖`` — errors on outputs the loss is sensitive to cost more (the
    two-sided closed form; FWSVD's idea on the output side, whitening on the input side).
    """
    out_scale = output_fisher_scale(stats) if output_fisher else None
    rows = weight.shape[0] // (n_heads or 1)
    paired = use_cross and stats is not None and stats.has("cross")
    if not paired and rows <= weight.shape[1] and stats is not None and stats.has("gram"):
        # wide (every head's block, o_proj, down_proj): the projection route needs no Cholesky
        gram, _ = checked_gram(stats.gram, damping)
        u, v, _ = factor_heads(weight, rank, out_scale=out_scale, n_heads=n_heads, gram=gram)
        info = {"jitter": 0.0, "fallback": None, "target": "inputs", "route": "projection"}
        if output_fisher:
            info["output_fisher"] = True
        return u, v, info
    transform = whitening_of(stats, "whiten", damping)
    w = weight
    target = "inputs"
    if paired:
        # transform.inverse is S⁻¹; W crossᵀ G⁻¹ = W crossᵀ S⁻ᵀ S⁻¹.
        w = (
            (weight.to(torch.float64) @ stats.cross.to(torch.float64).T)
            @ transform.inverse.T
            @ transform.inverse
        )
        check_finite(w, "regression target W·crossᵀ·G⁻¹")
        target = "dense outputs"
    u, v, _ = factor_heads(w, rank, transform=transform, out_scale=out_scale, n_heads=n_heads)
    info = {"jitter": transform.jitter, "fallback": transform.fallback, "target": target}
    if output_fisher:
        info["output_fisher"] = True
    return u, v, info


def output_fisher_scale(stats: LayerStatistics | None, floor: float = 1e-3) -> torch.Tensor:
    """``√(grad_out_sq / mean)`` floored at ``floor`` (relative), so no output gets zero weight."""
    if stats is None:
        raise CalibrationMissingError(
            "output_fisher=True needs calibration statistics with output gradients."
        )
    g = stats.require("grad_out_sq", "whiten(output_fisher=True)").to(torch.float64)
    g = g / g.mean().clamp_min(1e-300)
    return g.clamp_min(floor).sqrt()
