"""Fisher-weighted SVD (Hsu et al., ICLR 2022, "Language model compression with weighted low-rank
factorization").

The paper weights each row of ``W`` in its ``Y = X W`` orientation — i.e. each *input* feature of our
``[out, in]`` weight — by ``√Î_j`` where ``Î_j = Σ_i (∂L/∂W_ij)²`` is the Fisher information summed
over that row, takes the SVD of the weighted matrix and un-weights the factor::

    Ŵ = trunc_r(W · diag(√Î)) · diag(√Î)⁻¹

With uniform Fisher this is exactly plain SVD. ``axis="output"`` weights output features instead
(``diag(√Î_out) · W``), for models whose loss sensitivity lives on the outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.errors import CalibrationMissingError, FlashSVDMethodError
from flashsvd.methods.linalg import check_finite, diagonal_transform, factor_heads


def fwsvd_method(
    weight: torch.Tensor,
    rank: int,
    *,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
    axis: str = "input",
    fisher: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Fisher-weighted truncation; ``fisher`` overrides ``stats.fisher_in`` / ``stats.fisher_out``."""
    if axis not in ("input", "output"):
        raise FlashSVDMethodError(f"fwsvd axis must be 'input' or 'output', got {axis!r}.")
    if fisher is None:
        if stats is None:
            raise CalibrationMissingError(
                "method 'fwsvd' needs Fisher statistics: collect them with collect_fisher(...) or pass fisher=."
            )
        fisher = stats.require("fisher_in" if axis == "input" else "fisher_out", "fwsvd")
    fisher = fisher.to(torch.float64)
    check_finite(fisher, "Fisher information")
    expected = weight.shape[1] if axis == "input" else weight.shape[0]
    if fisher.shape != (expected,):
        raise FlashSVDMethodError(f"Fisher vector has shape {tuple(fisher.shape)}, expected ({expected},).")
    if axis == "input":
        transform = diagonal_transform(fisher.sqrt(), "Fisher weights")
        u, v, _ = factor_heads(weight, rank, transform=transform, n_heads=n_heads)
    else:
        scale = diagonal_transform(fisher.sqrt(), "Fisher weights").forward
        u, v, _ = factor_heads(weight, rank, out_scale=scale, n_heads=n_heads)
    return u, v, {"axis": axis}
