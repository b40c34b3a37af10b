"""Factorizations spread over ranks (balanced by cost) and broadcast, and block-by-block calibration."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from flashsvd.methods.distributed.group import (
    DistributedError,
    _collective,
    _comm_device,
    _gather_objects,
    broadcast_object,
    get_rank,
    get_world_size,
    is_distributed,
)
from flashsvd.methods.distributed.reduce import SAME, Traffic, _Failed, _Spec, all_reduce_statistics


def assign(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank per item: longest-processing-time-first greedy (deterministic, ≤ 4/3 of optimal)."""
    load = [0.0] * world
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(costs[i])
    return owner


def _split_tensors(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with tensors replaced by :class:`_Spec` (appended to ``tensors`` in walk order)."""
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return _Spec(tuple(obj.shape), obj.dtype, obj.device.type, SAME)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(out, f.name, _split_tensors(getattr(obj, f.name), tensors))
        return out
    if isinstance(obj, Mapping):
        return {k: _split_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_split_tensors(v, tensors) for v in obj)
    return obj


def _fill_tensors(skel: Any, tensors: Iterator[torch.Tensor]) -> Any:
    if isinstance(skel, _Spec):
        return next(tensors)
    if dataclasses.is_dataclass(skel) and not isinstance(skel, type):
        for f in dataclasses.fields(skel):
            object.__setattr__(skel, f.name, _fill_tensors(getattr(skel, f.name), tensors))
        return skel
    if isinstance(skel, dict):
        return {k: _fill_tensors(v, tensors) for k, v in skel.items()}
    if isinstance(skel, (list, tuple)):
        return type(skel)(_fill_tensors(v, tensors) for v in skel)
    return skel


def _specs_of(skel: Any) -> Iterator[_Spec]:
    if isinstance(skel, _Spec):
        yield skel
    elif dataclasses.is_dataclass(skel) and not isinstance(skel, type):
        for f in dataclasses.fields(skel):
            yield from _specs_of(getattr(skel, f.name))
    elif isinstance(skel, Mapping):
        for v in skel.values():
            yield from _specs_of(v)
    elif isinstance(skel, (list, tuple)):
        for v in skel:
            yield from _specs_of(v)


def spread(
    names: Sequence[str],
    fn: Callable[[str], Any],
    *,
    cost: Callable[[str], float] | None = None,
    what: str = "factorization",
) -> dict[str, Any]:
    """``{name: fn(name)}`` computed once per name, on the rank that owns it, and broadcast to all.

    Owners are balanced by ``cost(name)`` (e.g. ``in · out · min(in, out)`` for an SVD; default 1 each).
    Results may nest tensors in dataclasses/dicts/lists (a :class:`~flashsvd.methods.Factorization`);
    every rank receives the owner's tensors bit for bit, on the owner's device type. An exception in
    ``fn`` on any rank makes every rank raise :class:`DistributedError` naming the matrix and the rank.
    With one process this is ``{name: fn(name)}``.
    """
    names = list(names)
    if len(set(names)) != len(names):
        raise DistributedError(f"{what}: spread needs distinct names.")
    if not is_distributed():
        return {n: fn(n) for n in names}
    world, me = get_world_size(), get_rank()
    asked = _gather_objects(names, what)
    if any(a != names for a in asked):
        raise DistributedError(
            f"{what}: the ranks asked for different matrices (e.g. rank 0: {asked[0][:3]}…, rank {me}: "
            f"{names[:3]}…). Everything decided before spread (ranks, targets) must be identical on every "
            "rank: compute it from all-reduced statistics deterministically, or use broadcast_from_main."
        )
    owner = assign([1.0 if cost is None else float(cost(n)) for n in names], world)
    mine: dict[str, Any] = {}
    mine_tensors: list[torch.Tensor] = []
    for n, r in zip(names, owner):
        if r != me:
            continue
        try:
            mine[n] = _split_tensors(fn(n), mine_tensors)
        except Exception as err:
            mine[n] = _Failed(f"{type(err).__name__}: {err}")
            break
    results: dict[str, Any] = {}
    device = _comm_device()
    for r in range(world):
        with _collective(what):
            skeletons: dict[str, Any] = broadcast_object(mine if r == me else None, src=r)
        failed = [(n, s) for n, s in skeletons.items() if isinstance(s, _Failed)]
        if failed:
            n, s = failed[0]
            raise DistributedError(f"{what} of {n!r} failed on rank {r}: {s.message}")
        specs = [s for skel in skeletons.values() for s in _specs_of(skel)]
        if r == me:
            received = mine_tensors
        else:
            received = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in specs]
        for i, t in enumerate(received):
            buf = t if t.device == device and t.is_contiguous() else t.to(device).contiguous()
            with _collective(what):
                dist.broadcast(buf, src=r)
            Traffic.broadcast_bytes += buf.numel() * buf.element_size()
            if r != me:
                target = "cuda" if specs[i].device_type == "cuda" and torch.cuda.is_available() else "cpu"
                received[i] = buf if buf.device.type == target else buf.to(target)
            else:  # the owner keeps the same contiguous layout as the receivers (bitwise-equal matmuls later)
                received[i] = t.contiguous()
        it = iter(received)
        for n, skel in skeletons.items():
            results[n] = _fill_tensors(skel, it)
    return {n: results[n] for n in names}


# ---- sequential (block-by-block) calibration ---------------------------------------------------------


def calibrate_blockwise_distributed(
    blocks: Sequence[torch.nn.Module],
    inputs: list[Any],
    run_block: Callable[[torch.nn.Module, Any], Any],
    targets: Callable[[int, torch.nn.Module], Any],
    compress: Callable[[int, dict[str, Any]], Any],
    **options: Any,
) -> list[Any]:
    """:func:`~flashsvd.methods.calibrate_blockwise` over this rank's cached block inputs.

    ``inputs`` are *this rank's* cached inputs of ``blocks[0]`` (capture them for ``shard(batches)``
    only, so no rank holds the whole calibration set). Every rank runs the same block on its inputs;
    before ``compress(i, stats)`` each group's statistics are all-reduced, so ``compress`` sees the
    totals of all shards. Factorize inside ``compress`` with :func:`spread`, so every rank installs the
    same factors and the next block's inputs stay consistent. Every rank needs at least one batch.
    """
    from flashsvd.methods.sequential import calibrate_blockwise

    if is_distributed():
        counts = _gather_objects(len(inputs), "sequential calibration")
        if min(counts) == 0:
            raise DistributedError(
                f"sequential calibration: some ranks have no calibration batch (batches per rank: {counts}); "
                "use at least as many batches as processes."
            )

    def reduced(i: int, stats: dict[str, Any]) -> Any:
        return compress(i, all_reduce_statistics(stats, what=f"statistics of block {i}"))

    return calibrate_blockwise(blocks, inputs, run_block, targets, reduced, **options)
