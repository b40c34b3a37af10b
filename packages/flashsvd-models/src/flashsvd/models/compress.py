"""``compress``: turn a Hugging Face model into its low-rank form, in place, with a report.

One pipeline (:mod:`flashsvd.models.pipeline`) does the work: targets → statistics → rank allocation →
factorization → replacement, every choice held by a :class:`~flashsvd.models.recipe.Recipe`. Without a
recipe or method, ``compress`` uses the best measured recipe of the model's family
(:func:`~flashsvd.models.recipe.default_recipe`); ``method=`` alone means that method with uniform ranks.
The model keeps its HF class.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashsvd.methods import RankAllocation, RankPolicy, allocate_ranks, get_method
from flashsvd.models.adapters import Target, get_adapter
from flashsvd.models.backend import set_backend
from flashsvd.models.lowrank import FusedLinear, LowRankLinear
from flashsvd.models.pipeline import run_pipeline, shape_of
from flashsvd.models.recipe import RECIPES, Recipe, default_recipe, load_recipe

__all__ = ["CompressionReport", "compress", "count_parameters", "is_compressed", "resolve_recipe"]


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
    #: the recipe that made it (:meth:`Recipe.to_json`) and how the ranks were allocated.
    recipe: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)

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


def _explicit_ranks(targets, model, rank, ranks):
    """Ranks given directly (unified ``rank``, ``"full"`` or a per-module mapping / JSON path)."""
    shapes = [shape_of(t, model) for t in targets]
    if rank == "full":  # every target factorized at its maximal rank (lossless; parity tests)
        kept, total = sum(s.params(s.max_rank) for s in shapes), sum(s.dense_params for s in shapes)
        return RankAllocation({s.name: s.max_rank for s in shapes}, {}, kept, total)
    if isinstance(ranks, Mapping):
        known = {t.name for t in targets}
        unknown = sorted(set(ranks) - known)
        if unknown:
            raise ValueError(
                f"ranks= names unknown module(s) {unknown[:4]}; valid names look like {sorted(known)[:2]}"
            )
    return allocate_ranks(shapes, RankPolicy(rank=rank, ranks=ranks))


def resolve_recipe(
    model: nn.Module,
    recipe: Recipe | Mapping[str, Any] | str | Path | None = None,
    method: str | None = None,
    *,
    sequential: bool | None = None,
    calibrated: bool = True,
    options: Mapping[str, Any] | None = None,
    keep_ratio: float | None = None,
) -> tuple[Recipe, list[str]]:
    """The recipe ``compress`` runs, and notes on how it was chosen.

    ``recipe`` wins; else ``method`` alone means that method with uniform ranks (``ars``: ARS ranks,
    whitened factors); else the default for the family and ``keep_ratio``, or the data-free ``svd`` recipe when there is no
    calibration data (with a warning, since the default is much better). ``sequential`` and method
    ``options`` (``center``, ``output_fisher``, ``update`` and the rest) override the recipe.
    """
    notes: list[str] = []
    if recipe is not None:
        r = load_recipe(recipe)
        if method is not None:
            r = r.with_(method=method)
    elif method is not None:
        name = get_method(method).name
        r = (
            Recipe(name="ars", method="whiten", allocation="ars")
            if name == "ars"
            else Recipe(name=name, method=name, allocation="uniform")
        )
    else:
        r = default_recipe(model, keep_ratio)
        if not calibrated:
            notes.append(
                f"no calibration data: used the data-free 'svd' recipe instead of the {r.name} default "
                f"({r.describe()}); pass calibration= for the better one"
            )
            warnings.warn(notes[-1], stacklevel=3)
            r = RECIPES["svd"]
    opts = dict(options or {})
    changes: dict[str, Any] = {k: opts.pop(k) for k in ("center", "output_fisher", "update") if k in opts}
    if opts:
        changes["options"] = {**r.options, **opts}
    if sequential is not None:
        changes["sequential"] = bool(sequential)
        if sequential and r.output_fisher and "output_fisher" not in changes:
            changes["output_fisher"] = False
            notes.append(
                f"sequential calibration collects no gradient statistics: the {r.name} recipe's output_fisher "
                "is off for this run"
            )
    return (r.with_(**changes) if changes else r), notes


def _sampled_calibration(model: nn.Module, batches: list[Any], rec: Recipe, notes: list[str],
                         log: Callable[[str], None] | None) -> list[Any]:  # fmt: skip
    """The recipe's ``calib_source: model``: one window sampled from ``model`` per calibration row."""
    from flashsvd.models.self_calibration import sampled_windows

    t0 = time.perf_counter()
    try:
        windows, as_given = sampled_windows(model, batches, prompt_tokens=rec.calib_prompt_tokens)
    except ValueError as err:
        raise ValueError(f"recipe {rec.name!r}, calib_source 'model': {err}") from err
    short = f"; {as_given} rows no longer than the prompt kept as given" if as_given else ""
    notes.append(
        f"calibration: {len(windows)} windows ({sum(w.shape[1] for w in windows)} tokens) sampled from the "
        f"model, each continuing the first {rec.calib_prompt_tokens} tokens of one calibration row "
        f"({time.perf_counter() - t0:.0f} s{short})"
    )
    if log is not None:
        log(notes[-1])
    return windows


def compress(
    model: nn.Module,
    method: str | None = None,
    keep_ratio: float | None = None,
    rank: int | str | None = None,
    ranks: Mapping[str, int | None] | str | None = None,
    calibration: Iterable[Any] | None = None,
    backend: str = "torch",
    sequential: bool | None = None,
    progress: Callable[[str], None] | None = None,
    *,
    recipe: Recipe | Mapping[str, Any] | str | Path | None = None,
    device: str | torch.device | None = None,
    state_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    offload: bool | None = None,
    **method_options: Any,
):
    """Compress ``model`` in place; return ``(model, CompressionReport)``.

    Args:
        model: a Hugging Face model whose ``config.model_type`` has an adapter.
        method: factorization method (``flashsvd.methods.METHODS``); alone, it means that method with
            uniform ranks. Leave it and ``recipe`` unset for the family's best measured recipe.
        keep_ratio: fraction of the targeted layers' parameters to keep (allocated by the recipe).
        rank: unified rank (attention Q/K/V ``r``, output/FFN ``6r``), or ``"full"`` (lossless, for tests).
        ranks: explicit ``{module path: rank or None}`` (``None`` = dense) or a ranks JSON path.
        calibration: iterable of batches (tokenizer dicts or input-id tensors), required by data-aware
            recipes; padding tokens are excluded from the statistics.
        backend: ``"torch"`` (plain low-rank matmuls) or ``"flash"`` (fused kernels).
        sequential: override the recipe: calibrate block by block on the compressed prefix.
        progress: called with each module path as it is factorized.
        recipe: a :class:`Recipe`, a mapping, a built-in name (``encoder``, ``decoder``, ``svd``) or a
            JSON/YAML file.
        device: with ``sequential``, the accelerator that each block visits in turn (the model stays put).
        state_dir: with ``sequential``, a folder to checkpoint finished blocks in; running again with
            the same folder resumes after the last finished block.
        log: called with progress lines of the block-by-block pass.
        offload: with ``sequential`` and ``device``, where the cached block inputs live: ``True`` on the
            model's device (CPU; the lowest accelerator peak, one batch at a time crosses), ``False`` on
            ``device`` (no copies per pass), ``None`` (default) on ``device`` when they take at most a
            quarter of its free memory.
        **method_options: method options (``center``, ``output_fisher``, ``update``, ``damping`` ...).
    """
    if is_compressed(model):
        raise ValueError("model is already compressed: load the dense model again or merge_to_dense() first")
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    given = sum(x is not None for x in (keep_ratio, rank, ranks))
    if given != 1:
        raise ValueError(f"compress needs exactly one of keep_ratio=, rank= or ranks= (got {given})")
    batches = list(calibration) if calibration is not None else None
    rec, notes = resolve_recipe(model, recipe, method, sequential=sequential, calibrated=bool(batches),
                                options=method_options, keep_ratio=keep_ratio)  # fmt: skip
    if rec.calib_source == "model" and batches:
        batches = _sampled_calibration(model, batches, rec, notes, log)
    targets: list[Target] = adapter.targets(model)
    explicit = None if keep_ratio is not None else _explicit_ranks(targets, model, rank, ranks)
    params_before = count_parameters(model)
    shapes = [shape_of(t, model) for t in targets]
    result = run_pipeline(model, targets, rec, keep_ratio=keep_ratio, explicit=explicit, calibration=batches,
                          progress=progress, device=device, state_dir=state_dir, log=log, offload=offload)  # fmt: skip
    rank_map = result.ranks
    target_before = sum(s.dense_params for s in shapes)
    target_after = sum(s.params(rank_map.get(s.name)) for s in shapes)
    dense = {t.name: result.reasons.get(t.name, "rank None") for t in targets if rank_map.get(t.name) is None}
    report = CompressionReport(
        model_type=model.config.model_type, method=rec.method, keep_ratio=keep_ratio,
        params_before=params_before, params_after=count_parameters(model),
        target_params_before=target_before, target_params_after=target_after,
        ranks=rank_map, errors=result.errors, dense=dense, calibration=result.calibration, backend=backend,
        recipe=rec.to_json(), allocation=result.allocation,
    )  # fmt: skip
    from flashsvd.models.checkpoint import attach_config

    attach_config(model, report)
    model.config.quantization_config["recipe"] = rec.to_json()
    model.config.quantization_config["allocation"] = dict(result.allocation)
    report.notes = notes + list(set_backend(model, backend))
    report.seconds = time.perf_counter() - t0
    return model, report
