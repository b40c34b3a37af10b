"""Plain truncated SVD (Eckart–Young optimal in the Frobenius norm), ``√Σ`` split across both factors."""

from __future__ import annotations

from typing import Any

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.linalg import factor_heads


def svd_method(
    weight: torch.Tensor,
    rank: int,
    *,
    stats: LayerStatistics | None = None,
    n_heads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """``W ≈ (P √Σ)(√Σ Qᵀ)``; ``stats`` is ignored (data-free)."""
    u, v, _ = factor_heads(weight, rank, n_heads=n_heads)
    return u, v, {}
