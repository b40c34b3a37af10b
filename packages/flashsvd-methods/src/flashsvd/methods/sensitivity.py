"""Analytic per-layer loss curves for rank allocation, from calibration statistics alone.

For a layer truncated to rank ``r`` by whitening, the output error on the calibration tokens is
``E = (W − Ŵ) X̃ᵀ`` and ``‖E‖² = Σ_{i>r} σ_i²`` (``σ`` the singular values of ``W S``, ``S Sᵀ = XᵀX/n``).
A second-order (diagonal Fisher) model of the task loss in the layer's outputs turns this into loss
units: ``Δloss ≈ ½ Σ_o F_o E[e_o²]`` with ``F_o`` the mean squared loss gradient w.r.t. output ``o``
(``LayerStatistics.grad_out_sq / n_grad_tokens``). Per singular direction ``p_i`` (left singular vector)
this is ``½ σ_i² · p_iᵀ diag(F) p_i``. Without gradients the curve is the plain whitened tail energy.

The curves feed :func:`flashsvd.methods.ranks.allocate_by_curves`, which spends the keep_ratio budget
where the estimated loss drops most per parameter, leaving the most sensitive layers dense if worth it.
"""

from __future__ import annotations

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.errors import CalibrationMissingError
from flashsvd.methods.linalg import check_finite, split_heads, whitening_transform


def loss_curve(
    weight: torch.Tensor,
    stats: LayerStatistics,
    n_heads: int | None = None,
    *,
    use_gradients: bool = True,
    damping: float = 0.0,
) -> torch.Tensor:
    """``curve[r]`` = estimated loss increase at rank ``r`` (``r = 0..max_rank``; per head when ``n_heads``)."""
    if stats is None or not stats.has("gram") or stats.n_tokens == 0:
        raise CalibrationMissingError("loss_curve needs a Gram matrix: run collect_statistics first.")
    cov = stats.gram / stats.n_tokens
    s = whitening_transform(cov, damping=damping)
    w = s.right(weight.to(torch.float64))
    f = None
    if use_gradients:
        if not stats.has("grad_out_sq"):
            raise CalibrationMissingError(
                "loss_curve(use_gradients=True) needs output gradients: collect_fisher(..., output_grads=True)."
            )
        check_finite(stats.grad_out_sq, "output-gradient statistics")
        f = stats.grad_out_sq.to(torch.float64) / max(stats.n_grad_tokens, 1)
    blocks = [w] if n_heads is None else split_heads(w, n_heads)
    d = blocks[0].shape[0]
    total = None
    for h, b in enumerate(blocks):
        p, sig, _ = torch.linalg.svd(b, full_matrices=False)
        e = sig.square()
        if f is not None:
            fh = f if n_heads is None else f[h * d : (h + 1) * d]
            e = 0.5 * e * (p.square() * fh[:, None]).sum(0)
        tail = torch.cat([e.flip(0).cumsum(0).flip(0), e.new_zeros(1)])
        total = tail if total is None else total + tail
    return total
