"""``compress``: turn a Hugging Face model into its low-rank form, in place, with a report.

Flow (see ``docs/architecture.md``): adapter → targets → (calibration statistics) → rank budget
(``flashsvd.methods.allocate_ranks``) → ``flashsvd.methods.factorize`` per matrix → the matrices are
replaced by :class:`~flashsvd.models.lowrank.LowRankLinear` (fused matrices by
:class:`~flashsvd.models.lowrank.FusedLinear`) → backend switch.  The model keeps its HF class.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from flashsvd.methods import (
    LayerShape,
    RankPolicy,
    allocate_ranks,
    collect_fisher,
    collect_statistics,
    factorize,
    get_method,
)
from flashsvd.methods.distributed import distributed_statistics, spread
from flashsvd.models.adapters import Target, get_adapter
from flashsvd.models.backend import set_backend
from flashsvd.models.lowrank import FusedLinear, LowRankLinear, linear_from_dense
from flashsvd.models.runtime import get_module, set_module

__all__ = ["CompressionReport", "compress", "count_parameters", "is_compressed"]


@dataclass
class CompressionReport:
    """What ``compress`` did, with exact parameter counts (tied weights counted once)."""

    model_type: str
    method: str
    keep_ratio: float | None
    params_before: int
    params_after: int
    target_params_before: int
    target_params_after: int
    ranks: dict[str, int | None]
    errors: dict[str, dict[str, float | None]] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    backend: str = "torch"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept_fraction(self) -> float:
        """Kept fraction of the targeted layers' parameters (the meaning of ``keep_ratio``)."""
        return self.target_params_after / self.target_params_before if self.target_params_before else 1.0

    @property
    def model_kept_fraction(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["kept_fraction"] = self.kept_fraction
        d["model_kept_fraction"] = self.model_kept_fraction
        return d

    def summary(self) -> str:
        return (
            f"{self.model_type}/{self.method}: params {self.params_before:,} → {self.params_after:,} "
            f"({self.model_kept_fraction:.3f}); targeted layers kept {self.kept_fraction:.3f}; "
            f"{sum(r is not None for r in self.ranks.values())} factorized, {len(self.dense)} dense"
        )


def count_parameters(model: nn.Module) -> int:
    """Exact number of distinct parameter elements (tied/shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.data_ptr(), p.shape) if p.device.type != "meta" else id(p)
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def is_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, (LowRankLinear, FusedLinear)) for m in model.modules())


def _max_rank(t: Target, w: torch.Tensor) -> int:
    out, inp = w.shape
    return min(inp, out // t.n_heads) if t.n_heads else min(inp, out)


def _shape(t: Target, model: nn.Module) -> LayerShape:
    w, _ = t.weight(model)
    return LayerShape(t.name, int(w.shape[1]), int(w.shape[0]), t.n_heads, t.kind)


def _resolve_ranks(targets, model, keep_ratio, rank, ranks) -> tuple[dict[str, int | None], dict[str, str]]:
    given = sum(x is not None for x in (keep_ratio, rank, ranks))
    if given != 1:
        raise ValueError(f"compress needs exactly one of keep_ratio=, rank= or ranks= (got {given})")
    shapes = [_shape(t, model) for t in targets]
    if rank == "full":  # every target factorized at its maximal rank (lossless; parity tests)
        return {s.name: s.max_rank for s in shapes}, {}
    if isinstance(ranks, Mapping):
        known = {t.name for t in targets}
        unknown = sorted(set(ranks) - known)
        if unknown:
            raise ValueError(
                f"ranks= names unknown module(s) {unknown[:4]}; valid names look like {sorted(known)[:2]}"
            )
    policy = RankPolicy(keep_ratio=keep_ratio, rank=rank, ranks=ranks)
    alloc = allocate_ranks(shapes, policy)
    return dict(alloc.ranks), dict(alloc.reasons)


def _default_run(model: nn.Module) -> Callable[[Any], Any]:
    def run(batch):
        if isinstance(batch, Mapping):
            return model(
                **{k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            )
        if isinstance(batch, torch.Tensor):
            return model(batch.to(model.device))
        raise TypeError(
            f"calibration batches must be dicts of tensors (tokenizer output) or input-id tensors, got {type(batch).__name__}"
        )

    return run


def _loss_of(model: nn.Module) -> Callable[[Any], torch.Tensor]:
    run = _default_run(model)

    def loss(batch):
        out = run(batch)
        if getattr(out, "loss", None) is None:
            raise ValueError(
                "fwsvd needs a loss: pass calibration batches with labels (e.g. labels=input_ids)"
            )
        return out.loss

    return loss


def _collect(model, targets, calibration, spec, run) -> dict:
    # Distributed integration point 1 of 2: under torchrun each rank collects on its shard of the
    # batches and one all-reduce sums the statistics (the identity without a process group).
    return distributed_statistics(lambda shard: _collect_local(model, targets, shard, spec, run), calibration)


def _collect_local(model, targets, calibration, spec, run) -> dict:
    sources = {t.source: get_module(model, t.source) for t in targets}
    if "fisher_in" in spec.requires:
        was = model.training
        model.eval()
        stats = collect_fisher(sources, _loss_of(model), calibration, weight_grad_of=_weight_grad_of)
        model.train(was)
        return stats
    return collect_statistics(sources, run, calibration)


def _weight_grad_of(module: nn.Module) -> torch.Tensor | None:
    g = module.weight.grad
    if g is not None and type(module).__name__ == "Conv1D":
        return g.T
    return g


def _factor_targets(model, targets, ranks, method, stats, options, errors, progress) -> None:
    """Factorize ``targets`` (reading the dense weights) and install the low-rank modules."""
    by_name = {t.name: t for t in targets if ranks.get(t.name) is not None}
    local: set[str] = set()

    def fit(name: str):
        t = by_name[name]
        w, b = t.weight(model)
        st = stats.get(t.source) if stats else None
        f = factorize(w.detach().float(), int(ranks[name]), method, stats=st, bias=None if b is None else b.detach().float(),
                      n_heads=t.n_heads, **options)  # fmt: skip
        local.add(name)
        if progress is not None:
            progress(name)
        return f.to(dtype=w.dtype)  # the installed dtype: half the memory and broadcast bytes of fp32

    def cost(name: str) -> float:  # an SVD of an [out, in] matrix costs ~ out · in · min(out, in)
        out_f, in_f = by_name[name].weight(model)[0].shape
        return float(out_f * in_f * min(out_f, in_f))

    # Distributed integration point 2 of 2: each matrix is factorized on one rank (balanced by cost)
    # and broadcast, so every rank installs the same factors ({name: fit(name)} without a group).
    factors = spread(list(by_name), fit, cost=cost)
    for name in [n for n in factors if n not in local] if progress is not None else []:
        progress(name)  # factorized on another rank: keeps the bar's total right
    built: dict[str, nn.Module] = {}
    for t in targets:
        if t.name not in factors:
            continue
        w, _ = t.weight(model)
        f = factors[t.name]
        errors[t.name] = {"error": f.error, "data_error": f.data_error}
        lr = LowRankLinear.from_factorization(f, dtype=w.dtype).to(w.device)
        lr.conv1d = t.is_conv1d(model) and t.part is None
        built[t.name] = lr
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        if t.part is None:
            if t.name in built:
                set_module(model, t.name, built[t.name])
        else:
            groups[t.source].append(t)
    for source, parts in groups.items():
        if not any(p.name in built for p in parts):
            continue
        conv = parts[0].is_conv1d(model)
        mods = {}
        for p in sorted(parts, key=lambda p: p.rows[0]):
            if p.name in built:
                mods[p.part] = built[p.name]
            else:
                w, b = p.weight(model)
                mods[p.part] = linear_from_dense(w.detach(), None if b is None else b.detach())
        fused = FusedLinear(mods)
        fused.conv1d = conv
        set_module(model, source, fused)


def compress(
    model: nn.Module,
    method: str = "svd",
    keep_ratio: float | None = None,
    rank: int | str | None = None,
    ranks: Mapping[str, int | None] | str | None = None,
    calibration: Iterable[Any] | None = None,
    backend: str = "torch",
    sequential: bool = False,
    progress: Callable[[str], None] | None = None,
    **method_options: Any,
):
    """Compress ``model`` in place; return ``(model, CompressionReport)``.

    Args:
        model: a Hugging Face model whose ``config.model_type`` has an adapter.
        method: factorization method (``flashsvd.methods.METHODS``: svd, fwsvd, whiten, svdllm, asvd, ars).
        keep_ratio: fraction of the targeted layers' parameters to keep (uniform allocation).
        rank: unified rank (attention Q/K/V ``r``, output/FFN ``6r``), or ``"full"`` (lossless, for tests).
        ranks: explicit ``{module path: rank or None}`` (``None`` = dense) or a ranks JSON path.
        calibration: iterable of batches (tokenizer dicts or input-id tensors), required by data-aware
            methods; ``fwsvd`` needs batches that produce a loss (e.g. with ``labels``).
        backend: ``"torch"`` (plain low-rank matmuls) or ``"flash"`` (fused kernels).
        sequential: calibrate layer by layer on the already-compressed prefix (data-aware methods).
        progress: called with each module path as it is factorized.
    """
    if is_compressed(model):
        raise ValueError("model is already compressed: load the dense model again or merge_to_dense() first")
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    spec = get_method(method)
    targets = adapter.targets(model)
    rank_map, reasons = _resolve_ranks(targets, model, keep_ratio, rank, ranks)
    params_before = count_parameters(model)
    target_before = sum(_shape(t, model).dense_params for t in targets)
    target_after = 0
    for t in targets:
        s = _shape(t, model)
        target_after += s.params(rank_map.get(t.name))
    batches = list(calibration) if calibration is not None else None
    if spec.data_aware and not batches:
        raise ValueError(
            f"method {spec.name!r} is data-aware: pass calibration= (an iterable of tokenized batches)"
        )
    calib = {"batches": len(batches) if batches else 0, "sequential": bool(sequential and batches)}
    if batches:
        calib["tokens"] = int(sum(_n_tokens(b) for b in batches))
    run = _default_run(model)
    errors: dict[str, dict[str, float | None]] = {}
    was_training = model.training
    model.eval()
    try:
        if batches and spec.data_aware and sequential:
            by_layer: dict[int, list[Target]] = defaultdict(list)
            for t in targets:
                by_layer[t.layer].append(t)
            for layer in sorted(by_layer):
                todo = [t for t in by_layer[layer] if rank_map.get(t.name) is not None]
                stats = _collect(model, todo, batches, spec, run) if todo else {}
                _factor_targets(
                    model, by_layer[layer], rank_map, spec.name, stats, method_options, errors, progress
                )
                del stats
        else:
            todo = [t for t in targets if rank_map.get(t.name) is not None]
            stats = (
                _collect(model, todo, batches, spec, run) if (batches and spec.data_aware and todo) else {}
            )
            _factor_targets(model, targets, rank_map, spec.name, stats, method_options, errors, progress)
    finally:
        model.train(was_training)
    dense = {t.name: reasons.get(t.name, "rank None") for t in targets if rank_map.get(t.name) is None}
    report = CompressionReport(
        model_type=model.config.model_type, method=spec.name, keep_ratio=keep_ratio,
        params_before=params_before, params_after=count_parameters(model),
        target_params_before=target_before, target_params_after=target_after,
        ranks=rank_map, errors=errors, dense=dense, calibration=calib, backend=backend,
    )  # fmt: skip
    from flashsvd.models.checkpoint import attach_config

    attach_config(model, report)
    report.notes = set_backend(model, backend)
    report.seconds = time.perf_counter() - t0
    return model, report


def _n_tokens(batch: Any) -> int:
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if ids is None:
            return 0
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(ids.numel())
    return int(batch.numel()) if isinstance(batch, torch.Tensor) else 0
