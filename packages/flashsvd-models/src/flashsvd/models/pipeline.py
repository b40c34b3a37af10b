"""The one compression pipeline: targets → statistics → rank allocation → factorization → replacement.

Every step is a ``flashsvd.methods`` function; this module only wires them to a Hugging Face model
through its adapter, following a :class:`~flashsvd.models.recipe.Recipe`:

1. **targets**: the adapter's list of matrices (per-head Q/K/V, fused parts, ``Conv1D`` layout).
2. **statistics** (float64, streamed by hooks; padding tokens never enter them): input Gram matrices
   of the dense model, plus gradient statistics (output Fisher, FWSVD) from the recipe's loss.
3. **allocation**: uniform, loss-curve, ASVD sensitivity or ARS ranks under the keep_ratio budget,
   ``keep_dense`` layers left dense, ranks rounded to the recipe's hardware multiple.
4. **factorization** of each matrix by the recipe's method and options, all at once from the dense
   statistics or, with ``sequential``, block by block on cached block inputs
   (:func:`flashsvd.methods.calibrate_blockwise`; llm-compressor's sequential pipeline): one block
   on the accelerator, the rest of the model where it is (CPU), optional resume from a state folder.
5. **replacement** of the matrices by :class:`~flashsvd.models.lowrank.LowRankLinear`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashsvd.methods import (
    FlashSVDMethodError,
    LayerShape,
    LayerStatistics,
    RankAllocation,
    RankPolicy,
    allocate_by_curves,
    allocate_by_sensitivity,
    allocate_ranks,
    ars_select_ranks,
    asvd_sensitivity,
    collect_fisher,
    collect_statistics,
    factorize,
    get_method,
    layer_spectrum,
    loss_curve,
    round_ranks,
    uniform_keep_ratio,
)
from flashsvd.methods.distributed import (
    DistributedError,
    Traffic,
    all_reduce_statistics,
    broadcast_from_main,
    calibrate_blockwise_distributed,
    fail_together,
    is_distributed,
    shard,
    spread,
)
from flashsvd.models.adapters import Target, get_adapter
from flashsvd.models.lowrank import FusedLinear, LowRankLinear, linear_from_dense
from flashsvd.models.recipe import Recipe
from flashsvd.models.runtime import CACHE_KWARGS, get_module, set_module

__all__ = ["PipelineResult", "run_pipeline", "unpad"]


@dataclass
class PipelineResult:
    ranks: dict[str, int | None]
    reasons: dict[str, str]
    errors: dict[str, dict[str, float | None]] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    allocation: dict[str, Any] = field(default_factory=dict)


# ---- small helpers ------------------------------------------------------------------------------------
@contextlib.contextmanager
def named(layer: str) -> Iterator[None]:
    """Re-raise method errors with the layer's name in front (``<path>: Gram matrix ... zero trace``)."""
    try:
        yield
    except FlashSVDMethodError as err:
        raise type(err)(f"layer {layer}: {err}") from err


def shape_of(t: Target, model: nn.Module) -> LayerShape:
    w, _ = t.weight(model)
    return LayerShape(t.name, int(w.shape[1]), int(w.shape[0]), t.n_heads, t.kind)


def stats_for(t: Target, stats: Mapping[str, LayerStatistics] | None) -> LayerStatistics | None:
    """The statistics of ``t``'s source module, output-side entries sliced to a fused part's rows."""
    st = None if stats is None else stats.get(t.source)
    if st is None or t.rows is None:
        return st
    lo, hi = t.rows
    return replace(
        st,
        grad_out_sq=None if st.grad_out_sq is None else st.grad_out_sq[lo:hi],
        fisher_out=None if st.fisher_out is None else st.fisher_out[lo:hi],
    )


def unpad(batches: Sequence[Any]) -> list[Any]:
    """Regroup tokenized batches so that no padding token reaches a statistic.

    Rows of dict batches with an ``attention_mask`` are cut to their real tokens and regrouped, across
    all batches, with rows of the same length (at most the largest original batch size per group, so
    the statistics pass runs few, full batches); tensors and batches without padding pass unchanged.
    """
    out: list[Any] = []
    by_len: dict[tuple, list[dict[str, torch.Tensor]]] = defaultdict(list)
    size = 1
    for b in batches:
        mask = b.get("attention_mask") if isinstance(b, Mapping) else None
        if mask is None or bool(mask.all()):
            out.append(b)
            continue
        size = max(size, mask.shape[0])
        keys = tuple(k for k, v in b.items() if isinstance(v, torch.Tensor) and v.shape == mask.shape)
        for i in range(mask.shape[0]):
            keep = mask[i].bool()
            n = int(keep.sum())
            if n:
                by_len[(n, keys)].append({k: b[k][i][keep] for k in keys})
    for (_, keys), rows in sorted(by_len.items(), key=lambda kv: kv[0][0]):
        for s in range(0, len(rows), size):
            out.append({k: torch.stack([r[k] for r in rows[s : s + size]]) for k in keys})
    return out


def n_tokens(batch: Any) -> int:
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        if ids is None:
            return 0
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else int(ids.numel())
    return int(batch.numel()) if isinstance(batch, torch.Tensor) else 0


def _no_tokens(batch: Any) -> bool:
    """A calibration batch whose input ids are empty (a model fails on it deep inside its forward)."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    return isinstance(ids, torch.Tensor) and ids.numel() == 0


def runner(model: nn.Module) -> Callable[[Any], Any]:
    """``run(batch)``: the model's forward on a tokenizer dict or an input-id tensor."""

    def run(batch):
        dev = next(model.parameters()).device
        if isinstance(batch, Mapping):
            return model(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if isinstance(batch, torch.Tensor):
            return model(batch.to(dev))
        raise TypeError(
            "calibration batches must be dicts of tensors (tokenizer output) or input-id tensors, "
            f"got {type(batch).__name__}"
        )

    return run


def _weight_grad_of(module: nn.Module) -> torch.Tensor | None:
    g = module.weight.grad
    if g is not None and type(module).__name__ == "Conv1D":
        return g.T
    return g


# ---- gradient objectives ------------------------------------------------------------------------------
def _has_labels(batches) -> bool:
    return all(isinstance(b, Mapping) and "labels" in b for b in batches)


def gradient_objective(
    model: nn.Module, recipe: Recipe, batches
) -> tuple[str, Callable[[Any], torch.Tensor]]:
    """``(name, loss_of(batch))`` for the recipe's gradient statistics."""
    run = runner(model)
    kind = recipe.gradients
    if kind == "auto":
        if _has_labels(batches) and not type(model).__name__.endswith("Model"):
            kind = "labels"
        elif get_adapter(model).decoder:
            kind = "lm"
        else:
            kind = "simcse"

    if kind == "labels":

        def loss(batch):
            out = run(batch)
            if getattr(out, "loss", None) is None:
                raise ValueError("gradients='labels' needs batches with labels and a model with a task head")
            return out.loss

    elif kind == "lm":

        def loss(batch):
            if isinstance(batch, Mapping):
                labels = batch["input_ids"].clone()
                if "attention_mask" in batch:
                    labels[batch["attention_mask"] == 0] = -100
                return run({**{k: v for k, v in batch.items() if k != "labels"}, "labels": labels}).loss
            return run({"input_ids": batch, "labels": batch}).loss

    elif kind == "simcse":

        def loss(batch):
            """SimCSE (Gao et al. 2021): two dropout views, in-batch InfoNCE at temperature 0.05."""
            z1, z2 = _mean_pool(run, batch), _mean_pool(run, batch)
            sim = nn.functional.cosine_similarity(z1[:, None], z2[None], dim=-1) / 0.05
            return nn.functional.cross_entropy(sim, torch.arange(len(z1), device=sim.device))

    else:
        raise ValueError(f"unknown gradient objective {kind!r}")
    return kind, loss


def _mean_pool(run, batch) -> torch.Tensor:
    """Mask-weighted mean of the last hidden states (of the encoder inside a task model too)."""
    out = run({**batch, "output_hidden_states": True} if isinstance(batch, Mapping) else batch)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        hs = getattr(out, "hidden_states", None)
        if not hs:
            raise ValueError(
                "gradients='simcse' needs a model returning last_hidden_state (a base encoder); "
                "use gradients='labels' with labelled batches or gradients='none'"
            )
        h = hs[-1]
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None:
        return h.mean(1)
    m = mask.to(h.device).unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


def needs_gradients(recipe: Recipe) -> bool:
    return recipe.gradients != "none" and (
        recipe.output_fisher
        or recipe.allocation == "loss_curve"
        or "fisher_in" in get_method(recipe.method).requires
    )


# ---- statistics ---------------------------------------------------------------------------------------
def collect(
    model, targets: Sequence[Target], recipe: Recipe, batches, plain, info
) -> dict[str, LayerStatistics]:
    """Gram (dense model, unpadded batches) and, if the recipe wants them, gradient statistics.

    Under ``torchrun`` each rank runs both passes on its shard (whole batches) and one all-reduce sums
    the statistics (``flashsvd.methods.distributed``; the identity in one process).
    """
    sources = {t.source: get_module(model, t.source) for t in targets}
    stats: dict[str, LayerStatistics] = {}
    with fail_together("calibration statistics"):
        mine = shard(plain)
        if mine and (
            "gram" in get_method(recipe.method).requires or recipe.allocation != "uniform" or recipe.center
        ):
            stats = collect_statistics(sources, runner(model), mine)
        if needs_gradients(recipe):
            kind, loss_of = gradient_objective(model, recipe, batches)
            grad_batches = batches[: recipe.gradient_batches] if recipe.gradient_batches else batches
            was = model.training
            model.train(kind == "simcse")  # SimCSE's two views differ by dropout; the others run in eval mode
            torch.manual_seed(0)
            try:
                collect_fisher(sources, loss_of, shard(grad_batches), output_grads=True,
                               weight_grad_of=_weight_grad_of, stats=stats)  # fmt: skip
            finally:
                model.train(was)
            info["gradients"] = kind
            info["gradient_batches"] = len(grad_batches)
    stats = all_reduce_statistics(stats, what="calibration statistics")
    for st in stats.values():
        st.settle_()  # values only from here on: half the memory of the running sums
    return stats


# ---- allocation ---------------------------------------------------------------------------------------
def dense_names(targets: Sequence[Target], recipe: Recipe) -> set[str]:
    names = {t.name for t in targets}
    out = {t.name for t in targets if t.role in recipe.keep_dense or t.name in recipe.keep_dense}
    unknown = [k for k in recipe.keep_dense if k not in {t.role for t in targets} and k not in names]
    if unknown:
        raise ValueError(
            f"recipe keep_dense names {unknown}, which are neither roles of this model "
            f"({sorted({t.role for t in targets})}) nor module paths"
        )
    return out


def allocate(
    model, targets, recipe: Recipe, keep_ratio: float, stats, batches
) -> tuple[RankAllocation, dict]:
    """Ranks for ``keep_ratio`` by the recipe's allocation, rounded to its multiple."""
    shapes = [shape_of(t, model) for t in targets]
    by_name = {t.name: t for t in targets}
    keep_dense = dense_names(targets, recipe)
    curves = None
    how: dict[str, Any] = {"allocation": recipe.allocation}
    if recipe.allocation in ("loss_curve", "ars") and not stats:
        raise ValueError(f"allocation {recipe.allocation!r} needs calibration statistics: pass calibration=")
    if recipe.allocation == "uniform":
        alloc = _sparing_dense(shapes, keep_ratio, keep_dense, uniform_keep_ratio)
    elif recipe.allocation == "loss_curve":
        curves = {}
        for t in targets:
            st = stats_for(t, stats)
            w, _ = t.weight(model)
            with named(t.name):
                curves[t.name] = loss_curve(w.detach(), st, t.n_heads, use_gradients=st.has("grad_out_sq"))
        how["curves"] = (
            "output-Fisher weighted"
            if any(stats_for(t, stats).has("grad_out_sq") for t in targets)
            else "whitened tail energy"
        )
        alloc = allocate_by_curves(shapes, curves, keep_ratio, keep_dense=keep_dense)
    elif recipe.allocation == "ars":

        def ars(rest, keep):
            spectra = {}
            for t in (by_name[s.name] for s in rest):
                w, _ = t.weight(model)
                with named(t.name):
                    spectra[t.name] = layer_spectrum(w.detach(), stats_for(t, stats), t.n_heads)
            return ars_select_ranks(rest, spectra, keep).allocation

        alloc = _sparing_dense(shapes, keep_ratio, keep_dense, ars)
    else:  # asvd

        def asvd(rest, keep):
            sub = [by_name[s.name] for s in rest]
            return allocate_by_sensitivity(rest, _sensitivity(model, sub, rest, recipe, stats, batches), keep)

        alloc = _sparing_dense(shapes, keep_ratio, keep_dense, asvd)
    if recipe.rank_multiple > 1:
        alloc = round_ranks(shapes, alloc, recipe.rank_multiple, keep_ratio, curves=curves)
        how["rank_multiple"] = recipe.rank_multiple
        how["unrounded"] = list(alloc.unrounded)
    how["kept_params"], how["dense_params"] = alloc.kept_params, alloc.dense_params
    return alloc, how


def _sparing_dense(shapes, keep_ratio: float, keep_dense: set[str], allocate_rest) -> RankAllocation:
    """``allocate_rest(shapes, keep)`` with the ``keep_dense`` layers left dense.

    The dense layers count in full against the budget (``keep_ratio`` keeps its one meaning: the kept
    fraction of every targeted parameter) and the rest of the budget goes to the other layers, by the
    recipe's own allocation.  A budget the dense layers alone exceed is an error, not a silent 1.0.
    """
    if not keep_dense:
        return allocate_rest(list(shapes), keep_ratio)
    rest = [s for s in shapes if s.name not in keep_dense]
    total = sum(s.dense_params for s in shapes)
    fixed = sum(s.dense_params for s in shapes if s.name in keep_dense)
    left = math.floor(keep_ratio * total) - fixed
    if left <= 0:
        raise ValueError(
            f"the {len(keep_dense)} layers kept dense (the recipe's keep_dense) hold {fixed / total:.1%} of the "
            f"targeted parameters, more than keep_ratio={keep_ratio:g} allows: raise keep_ratio or keep fewer "
            "layers dense"
        )
    ranks = {s.name: None for s in shapes}
    if rest:
        sub = allocate_rest(rest, min(1.0, left / sum(s.dense_params for s in rest)))
        ranks.update({s.name: sub.ranks.get(s.name) for s in rest})
    alloc = allocate_ranks(shapes, RankPolicy(ranks=ranks))
    alloc.reasons.update({n: "kept dense on request (keep_dense)" for n in keep_dense})
    return alloc


def _sensitivity(model, targets, shapes, recipe, stats, batches):
    """ASVD's table with a label-free proxy: 1 − cos(output, dense output) on a few calibration batches."""
    run = runner(model)
    probe = batches[:4]

    def output(b):
        out = run(b)
        h = getattr(out, "logits", None)
        return (h if h is not None else out.last_hidden_state).float().flatten(1)

    with torch.no_grad():
        dense = [output(b) for b in probe]
    by_name = {t.name: t for t in targets}

    def evaluate(ranks):
        ((name, r),) = ranks.items()
        t = by_name[name]
        w, _b = t.weight(model)
        saved = w.detach().clone()
        with named(name):
            f = factorize(saved.float(), int(r), recipe.method, stats=stats_for(t, stats), n_heads=t.n_heads,
                          **{k: v for k, v in recipe.method_options().items() if k != "center"})  # fmt: skip
        with torch.no_grad():
            w.copy_(f.merged_weight().to(w.dtype))
            try:
                loss = sum(
                    1 - float(nn.functional.cosine_similarity(output(x), d).mean())
                    for x, d in zip(probe, dense)
                )
            finally:
                w.copy_(saved)
        return loss / len(probe)

    return asvd_sensitivity(shapes, evaluate, ratios=(0.3, 0.6))


# ---- factorization and replacement --------------------------------------------------------------------
def factor_targets(model, targets, ranks, method: str, stats, options, errors, progress=None) -> None:
    """Factorize ``targets`` (reading the dense weights) and install the low-rank modules.

    Under ``torchrun`` each matrix is factorized on one rank (balanced by cost) and broadcast, so every
    rank installs the same factors (``flashsvd.methods.distributed.spread``; a loop in one process).
    """
    by_name = {t.name: t for t in targets if ranks.get(t.name) is not None}
    local: set[str] = set()

    def fit(name: str):
        t = by_name[name]
        w, b = t.weight(model)
        with named(name):
            f = factorize(w.detach().float(), int(ranks[name]), method, stats=stats_for(t, stats),
                          bias=None if b is None else b.detach().float(), n_heads=t.n_heads, **options)  # fmt: skip
        local.add(name)
        if progress is not None:
            progress(name)
        return f.to(dtype=w.dtype)  # the installed dtype: half the memory and broadcast bytes of fp32

    def cost(name: str) -> float:  # an SVD of an [out, in] matrix costs ~ out · in · min(out, in)
        out_f, in_f = by_name[name].weight(model)[0].shape
        return float(out_f * in_f * min(out_f, in_f))

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


# ---- block by block -----------------------------------------------------------------------------------
_GROUP = {"q": 0, "k": 0, "v": 0, "o": 1, "up": 2, "gate": 2, "down": 3}


def block_paths(targets: Sequence[Target]) -> dict[int, str]:
    """Layer index → path of its block: the longest common dotted prefix of the layer's sources."""
    by_layer: dict[int, list[list[str]]] = defaultdict(list)
    for t in targets:
        by_layer[t.layer].append(t.source.split("."))
    out = {}
    for i, paths in by_layer.items():
        common = []
        for parts in zip(*paths):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        out[i] = ".".join(common)
    return out


class _Stop(Exception):
    pass


_CACHE_KWARGS = {*CACHE_KWARGS, "layer_past", "use_cache"}


def capture_inputs(model, first_block: nn.Module, batches, device=None) -> list:
    """The ``(args, kwargs)`` reaching ``first_block`` for each batch (the forward stops there)."""
    cached = []

    def move(x):
        return x.to(device) if device is not None and isinstance(x, torch.Tensor) else x

    def hook(module, args, kwargs):
        kw = {k: (tuple(move(y) for y in v) if isinstance(v, tuple) else move(v)) for k, v in kwargs.items()}
        for k in _CACHE_KWARGS & set(kw):  # a KV cache would grow with every replay of the cached input
            kw[k] = False if k == "use_cache" else None
        cached.append((tuple(move(a.detach()) if isinstance(a, torch.Tensor) else a for a in args), kw))
        raise _Stop

    run = runner(model)
    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                with contextlib.suppress(_Stop):
                    run(b)
    finally:
        h.remove()
    return cached


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, tuple):
        return tuple(_to(y, device) for y in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


def run_block(block: nn.Module, inp):
    """One cached ``(args, kwargs)`` through ``block`` → the next block's ``(args, kwargs)``.

    The inputs stay where they are cached (the CPU for big models): each call moves one batch to the
    block's device and its output back, so the accelerator holds one batch of activations at a time.
    """
    args, kwargs = inp
    home = args[0].device
    dev = next(block.parameters()).device
    out = block(*_to(args, dev), **_to(kwargs, dev))
    hidden = out[0] if isinstance(out, tuple) else out
    return (hidden.to(home), *args[1:]), kwargs


def sequential(model, targets, ranks, recipe: Recipe, batches, errors, progress=None, *, device=None,
               state_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
               keep_ratio: float | None = None, offload: bool | None = None) -> dict:  # fmt: skip
    """Factorize block by block on cached block inputs (see :func:`flashsvd.methods.calibrate_blockwise`)."""
    paths = block_paths(targets)
    layers = sorted(paths)
    blocks = [get_module(model, paths[i]) for i in layers]
    by_layer: dict[int, list[Target]] = defaultdict(list)
    for t in targets:
        by_layer[t.layer].append(t)
    spec = get_method(recipe.method)
    options = recipe.method_options()
    state = _State(state_dir, ranks, recipe, keep_ratio) if state_dir is not None else None
    start = 0
    if state_dir is not None and is_distributed():
        raise DistributedError(
            "resuming block-by-block compression (state_dir) runs in one process only for now: "
            "drop the state folder or launch without torchrun."
        )
    inputs = capture_inputs(model, blocks[0], shard(batches))  # this rank's share of the calibration set
    home = _inputs_home(inputs, device, offload, streams=2 if recipe.paired else 1)
    if home is not None:
        inputs = [_to(x, home) for x in inputs]
    reference = None
    if state is not None and state.done >= 0:
        start = state.restore(model, blocks, layers, paths, by_layer, inputs)
        inputs, reference = state.inputs, state.reference
        if log:
            log(f"resuming after block {layers[start - 1]} from {state_dir}")

    def groups(k: int, block: nn.Module):
        base = paths[layers[k]]
        out: dict[int, dict[str, nn.Module]] = defaultdict(dict)
        for t in by_layer[layers[k]]:
            if ranks.get(t.name) is None:
                continue
            rel = t.source[len(base) + 1 :] if base else t.source
            out[_GROUP.get(t.role, 3)][t.source] = block.get_submodule(rel)
        return [out[g] for g in sorted(out)]

    timing = _BlockTiming(device)

    def compress_group(k: int, st: dict[str, LayerStatistics]):
        todo = [t for t in by_layer[layers[k]] if t.source in st]
        for s in st.values():
            s.settle_()  # after the all-reduce: frees the sums' limbs before the factorization needs room
        with timing.factorization():
            factor_targets(model, todo, ranks, spec.name, st, options, errors, progress)

    def place(block: nn.Module, on: bool) -> None:
        if device is not None:
            block.to(device if on else "cpu")

    def done(k: int, nxt: list, ref: list | None) -> None:
        if state is not None:
            state.save(k, blocks[k], nxt, ref)
        row = timing.finish(layers[k])
        if log:
            log(
                f"block {layers[k]} done in {row['seconds']:.2f} s (factorization {row['factorization_seconds']:.2f} s, "
                f"all-reduce {row['all_reduce_seconds']:.2f} s)"
            )

    calibrate_blockwise_distributed(blocks, inputs, run_block, groups, compress_group, mode="sequential",
                        paired=recipe.paired, start=start, reference_inputs=reference, place=place, done=done,
                        scales=spec.name == "asvd", in_place=True)  # fmt: skip
    return {"sequential": True, "paired": recipe.paired, "resumed_from_block": start if start else None,
            "inputs_on": str(inputs[0][0][0].device), "blocks": timing.rows}  # fmt: skip


def _inputs_home(inputs: list, device, offload: bool | None, streams: int) -> torch.device | None:
    """Where the cached block inputs should live: ``device``, or ``None`` to leave them where captured.

    Resident on the accelerator, a pass over the calibration set moves nothing across PCIe (at
    256 × 2,048 tokens of a 7B model, 4 GB each way, five times per block); offloaded, the accelerator
    holds one batch at a time. ``offload=None`` keeps them resident when all streams (the dense
    reference too, when paired) take at most a quarter of the free memory.
    """
    if device is None or offload is True or not inputs:
        return None
    dev = torch.device(device)
    if offload is None:
        if dev.type != "cuda":
            return None
        need = streams * sum(
            x.numel() * x.element_size()
            for args, kwargs in inputs
            for x in (*args, *kwargs.values())
            if isinstance(x, torch.Tensor)
        )
        free, _ = torch.cuda.mem_get_info(dev)
        if need > free / 4:
            return None
    return dev


class _BlockTiming:
    """Wall seconds per block, split into factorization (with its broadcast) and statistics all-reduce.

    The rest of a block's time is its forward passes, the statistics and the host↔device copies. On
    CUDA every boundary synchronizes (a few times per block) so GPU work is charged to its own stage.
    """

    def __init__(self, device) -> None:
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.rows: list[dict[str, float]] = []
        self._factorization = 0.0
        self._start = self._now()
        self._reduced = Traffic.reduce_seconds

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextlib.contextmanager
    def factorization(self) -> Iterator[None]:
        t0 = self._now()
        try:
            yield
        finally:
            self._factorization += self._now() - t0

    def finish(self, layer: int) -> dict[str, float]:
        now = self._now()
        row = {"block": layer, "seconds": now - self._start, "factorization_seconds": self._factorization,
               "all_reduce_seconds": Traffic.reduce_seconds - self._reduced}  # fmt: skip
        self.rows.append(row)
        self._start, self._factorization, self._reduced = now, 0.0, Traffic.reduce_seconds
        return row


class _State:
    """Resume state of a block-by-block run: finished blocks' weights and the next block's inputs.

    ``progress.json`` (done block, ranks, recipe), ``block_<i>.safetensors`` (the finished block's
    state), ``inputs.safetensors`` (hidden states entering the next block, and the dense model's when
    paired). Every file is written to a temporary name and renamed, so an interrupt leaves the last
    finished block's state intact.
    """

    def __init__(self, folder, ranks, recipe: Recipe, keep_ratio: float | None) -> None:
        self.folder = Path(folder)
        self.keep_ratio = keep_ratio
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ranks, self.recipe = dict(ranks), recipe
        self.done = -1
        meta = self.folder / "progress.json"
        if meta.is_file():
            d = json.loads(meta.read_text())
            if d.get("ranks") != self.ranks or d.get("recipe") != recipe.to_json():
                raise ValueError(
                    f"{self.folder} holds the state of a different run (ranks or recipe differ): "
                    "remove it or choose another state folder"
                )
            self.done = int(d["done"])

    def save(self, k: int, block: nn.Module, nxt: list, ref: list | None) -> None:
        from safetensors.torch import save_file

        tensors = {f"x{j}": a[0][0].detach().contiguous().cpu() for j, a in enumerate(nxt)}
        if ref is not None:
            tensors.update({f"r{j}": a[0][0].detach().contiguous().cpu() for j, a in enumerate(ref)})
        _atomic(self.folder / "inputs.safetensors", lambda p: save_file(tensors, str(p)))
        sd = {n: v.detach().contiguous().cpu() for n, v in block.state_dict().items()}
        _atomic(self.folder / f"block_{k}.safetensors", lambda p: save_file(sd, str(p)))
        meta = {
            "done": k,
            "ranks": self.ranks,
            "recipe": self.recipe.to_json(),
            "keep_ratio": self.keep_ratio,
        }
        _atomic(self.folder / "progress.json", lambda p: p.write_text(json.dumps(meta)))
        self.done = k

    def restore(self, model, blocks, layers, paths, by_layer, inputs) -> int:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from flashsvd.models.checkpoint import biased_targets, rebuild_lowrank

        finished = {t.name: self.ranks.get(t.name) for k in range(self.done + 1) for t in by_layer[layers[k]]}
        files = [str(self.folder / f"block_{k}.safetensors") for k in range(self.done + 1)]
        keys = []
        for k, f in enumerate(files):  # names only: a centered fit may have added biases
            with safe_open(f, "pt") as h:
                names = h.keys()
            keys += [f"{paths[layers[k]]}.{key}" for key in names]
        rebuild_lowrank(model, finished, biased=biased_targets(finished, keys))
        for k, f in enumerate(files):
            blocks[k].load_state_dict(load_file(f))
        saved = load_file(str(self.folder / "inputs.safetensors"))
        dev = inputs[0][0][0].device

        def with_hidden(prefix):
            return [((saved[f"{prefix}{j}"].to(dev), *a[1:]), kw) for j, (a, kw) in enumerate(inputs)]

        self.inputs = with_hidden("x")
        self.reference = with_hidden("r") if "r0" in saved else None
        return self.done + 1


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


# ---- the whole pipeline -------------------------------------------------------------------------------
def run_pipeline(
    model: nn.Module,
    targets: Sequence[Target],
    recipe: Recipe,
    *,
    keep_ratio: float | None,
    explicit: RankAllocation | None,
    calibration: Sequence[Any] | None,
    progress: Callable[[str], None] | None = None,
    device: str | torch.device | None = None,
    state_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    offload: bool | None = None,
) -> PipelineResult:
    """Run every step of ``recipe`` on ``model`` (in place). ``explicit`` ranks skip the allocation."""
    batches = list(calibration) if calibration is not None else []
    plain = unpad(batches)
    info: dict[str, Any] = {"batches": len(batches), "tokens": int(sum(n_tokens(b) for b in plain))}
    spec = get_method(recipe.method)
    if recipe.data_aware and not batches:
        raise ValueError(
            f"recipe {recipe.name!r} ({recipe.describe()}) is data-aware: pass calibration= "
            "(an iterable of tokenized batches), or use the data-free recipe 'svd'"
        )
    empty = [i for i, b in enumerate(batches) if _no_tokens(b)]
    if empty:
        raise ValueError(
            f"calibration batches {empty[:5]}{' ...' if len(empty) > 5 else ''} hold no tokens "
            f"({len(empty)} of {len(batches)}): drop empty texts, or cut fewer windows than the text has tokens"
        )
    was_training = model.training
    model.eval()
    errors: dict[str, dict[str, float | None]] = {}
    try:
        stats = None
        wants_stats = spec.data_aware or (explicit is None and recipe.allocation != "uniform")
        state_has_ranks = state_dir is not None and (Path(state_dir) / "progress.json").is_file()
        if (
            wants_stats
            and not (recipe.sequential and (explicit is not None or recipe.allocation == "uniform"))
            and not state_has_ranks
        ):
            stats = collect(model, targets, recipe, batches, plain, info)
        if explicit is not None:
            alloc, how = explicit, {"allocation": "explicit"}
        elif state_has_ranks:
            d = json.loads((Path(state_dir) / "progress.json").read_text())
            if d.get("keep_ratio") != keep_ratio or d.get("recipe") != recipe.to_json():
                raise ValueError(
                    f"{state_dir} holds the state of a different run (keep_ratio or recipe differ): "
                    "remove it or choose another state folder"
                )
            alloc = allocate_ranks([shape_of(t, model) for t in targets], RankPolicy(ranks=d["ranks"]))
            how = {"allocation": recipe.allocation, "from_state": str(state_dir)}
        else:
            # identical on every rank even when the allocation ran the model (ASVD sensitivity)
            alloc, how = broadcast_from_main(allocate(model, targets, recipe, keep_ratio, stats, plain))
        ranks = dict(alloc.ranks)
        if recipe.sequential and spec.data_aware:
            stats = None  # the sequential pass collects its own, one block at a time
            info.update(sequential(model, targets, ranks, recipe, plain, errors, progress, device=device,
                                   state_dir=state_dir, log=log, keep_ratio=keep_ratio, offload=offload))  # fmt: skip
        else:
            info["sequential"] = False
            factor_targets(model, targets, ranks, spec.name, stats if spec.data_aware else None,
                           recipe.method_options() if spec.data_aware else dict(recipe.options), errors, progress)  # fmt: skip
    finally:
        model.train(was_training)
    return PipelineResult(ranks, dict(alloc.reasons), errors, info, how)
