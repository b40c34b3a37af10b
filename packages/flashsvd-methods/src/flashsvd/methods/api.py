"""The public entry point :func:`factorize`: validate, dispatch to a method, package a Factorization."""

from __future__ import annotations

from typing import Any

import torch

from flashsvd.methods.calibration import LayerStatistics
from flashsvd.methods.errors import CalibrationMissingError, FlashSVDMethodError, ShapeError
from flashsvd.methods.factorization import Factorization
from flashsvd.methods.linalg import check_finite, rows_per_block
from flashsvd.methods.ranks import check_rank
from flashsvd.methods.registry import get_method


def factorize(
    weight: torch.Tensor,
    rank: int,
    method: str = "svd",
    stats: LayerStatistics | None = None,
    bias: torch.Tensor | None = None,
    n_heads: int | None = None,
    *,
    center: bool = False,
    **options: Any,
) -> Factorization:
    """Factorize an ``nn.Linear``-layout weight ``[out, in]`` into ``u [in, r]``, ``v [r, out]``.

    Args:
        weight: ``[out, in]``; any float dtype (computed in float64, factors returned in its dtype).
        rank: rank (per head when ``n_heads`` is given); ``1 ≤ rank ≤ min(in, out / n_heads)``.
        method: a registered name (``svd``, ``fwsvd``, ``whiten``, ``svdllm``, ``asvd``, ``ars``/``adasvd``).
        stats: the layer's :class:`LayerStatistics` (required by data-aware methods).
        bias: optional ``[out]`` bias, carried into the result.
        n_heads: split the output dim into heads and factor each with ``rank`` (``u [in, H·r]``,
            ``v [H, r, d_head]``).
        center: fit the *centered* inputs (``whiten``/``svdllm``) and fold the mean into the bias,
            ``b' = b + W·μ_ref − Ŵ·μ``: the best affine approximation on the calibration data. The
            result then always has a bias (a layer without one gets it).
        **options: method options (e.g. ``alpha`` for asvd, ``update`` for svdllm, ``damping``).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ShapeError(
            f"weight must be a 2-D tensor [out, in], got {getattr(weight, 'shape', type(weight))}."
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}.")
    out_f, in_f = weight.shape
    if n_heads is not None:
        if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads <= 0 or out_f % n_heads:
            raise ShapeError(f"n_heads={n_heads!r} must be a positive integer dividing out_features={out_f}.")
        check_rank(rank, min(in_f, out_f // n_heads), f"head ({out_f // n_heads}×{in_f})")
    else:
        check_rank(rank, min(in_f, out_f), f"{out_f}×{in_f} matrix")
    if bias is not None and bias.shape != (out_f,):
        raise ShapeError(f"bias must have shape ({out_f},), got {tuple(bias.shape)}.")
    spec = get_method(method)
    if spec.data_aware and stats is None and not _has_override(spec.name, options):
        raise CalibrationMissingError(
            f"method '{spec.name}' is data-aware and needs calibration statistics ({', '.join(spec.requires)}); "
            "collect them with flashsvd.methods.collect_statistics (or collect_fisher for fwsvd) and pass stats=."
        )
    if stats is not None and stats.in_features not in (in_f, -1):
        raise ShapeError(f"statistics are for {stats.in_features} input features, weight has {in_f}.")
    check_finite(weight, "weight")
    w64 = weight.detach().to(torch.float64)
    fit_stats = stats
    if center:
        if spec.name not in CENTERABLE or stats is None:
            raise FlashSVDMethodError(
                f"center=True needs a method that fits calibration outputs ({', '.join(CENTERABLE)}) and its "
                f"statistics; got method '{spec.name}'{' without stats' if stats is None else ''}."
            )
        fit_stats = stats.centered()
    u, v, info = spec.fn(w64, rank, stats=fit_stats, n_heads=n_heads, **options)
    result = Factorization(u, v, bias, rank, spec.name, info=info)
    merged = result.merged_weight().to(torch.float64)
    if center:
        b64 = torch.zeros(out_f, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
        shift = w64 @ stats.reference_mean.to(torch.float64) - merged @ stats.mean.to(torch.float64)
        result.bias = (b64.to(shift.device) + shift).to(weight.dtype if bias is None else bias.dtype)
        result.info = dict(info, centered=True)
    diff = merged.neg_().add_(w64)  # W − Ŵ in the merged matrix's memory: one [out, in] float64 less
    del merged
    result.error = float(diff.norm() / w64.norm().clamp_min(1e-300))
    if stats is not None and stats.has("gram"):
        g = stats.gram.to(torch.float64)
        num = max(_gram_norm2(diff, g), 0.0)
        den = _gram_norm2(w64, g)
        result.data_error = (num / den) ** 0.5 if den > 0 else None
    del diff
    dtype = weight.dtype
    result.u = u.to(dtype)
    result.v = v.to(dtype)
    return result


CENTERABLE = ("whiten", "svdllm")


def _gram_norm2(a: torch.Tensor, gram: torch.Tensor) -> float:
    """``Σ ((A G) ∘ A)`` = ``‖A Xᵀ‖²`` for ``G = XᵀX``, by row blocks: the ``[rows, in]`` product stays
    small (whole, it is one more ``[out, in]`` float64 matrix — 0.34 GiB for a LLaMA-7B ``down_proj``)."""
    step = rows_per_block(a.shape[1])
    total = a.new_zeros((), dtype=torch.float64)
    for lo in range(0, a.shape[0], step):
        rows = a[lo : lo + step]
        total += torch.linalg.vecdot(rows @ gram, rows).sum()
    return float(total)


def _has_override(name: str, options: dict[str, Any]) -> bool:
    """fwsvd accepts an explicit ``fisher=`` vector instead of statistics."""
    return name == "fwsvd" and options.get("fisher") is not None
