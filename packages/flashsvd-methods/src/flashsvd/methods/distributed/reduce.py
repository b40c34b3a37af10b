"""Exact reduction of calibration statistics: SUM for sums and counts, MAX/MIN for extrema.

A :class:`~flashsvd.methods.reproducible.ReproducibleSum` leaf is merged bit-exactly (its bins' MAX, then
its limbs' SUM), so the reduced statistics do not depend on the number of processes.

The walk is generic (dataclasses, dicts, lists, tuples), so it does not depend on the statistics classes:
the ranks first exchange the *structure* of what they hold (tensors replaced by shape/dtype/op), merge it
(union of keys, Python counts reduced there), then all-reduce the tensors in buckets.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from flashsvd.methods.distributed.group import (
    DistributedError,
    _collective,
    _comm_device,
    _gather_objects,
    get_world_size,
    is_distributed,
    shard,
)
from flashsvd.methods.reproducible import ReproducibleSum

T = TypeVar("T")

#: small tensors are flattened into buckets of at most this many bytes per all-reduce call
BUCKET_BYTES = 64 * 2**20

SUM, MAX, MIN, SAME = "sum", "max", "min", "same"
_OPS = (SUM, MAX, MIN, SAME)
#: the op of a ReproducibleSum leaf (not a field declaration)
REPRODUCIBLE = "reproducible"


_COUNT_PREFIXES = ("n_", "num_", "count")
_MEAN_WORDS = ("mean", "avg", "average")


@dataclasses.dataclass(frozen=True)
class _Spec:
    """A tensor leaf: what every rank must agree on, and how it is reduced."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    device_type: str
    op: str


@dataclasses.dataclass(frozen=True)
class _Failed:
    message: str


class _Num:
    """A Python-number leaf and how it reduces (reduced while merging, no tensor traffic)."""

    __slots__ = ("op", "value")

    def __init__(self, op: str, value: float) -> None:
        self.op, self.value = op, value


def _field_op(name: str, metadata: Mapping[str, Any] | None, is_tensor: bool) -> str:
    """How a leaf named ``name`` reduces: field metadata ``{"reduce": op}`` first, then its name.

    Tensors sum unless named like a maximum/minimum; Python numbers sum only when named like a count
    (``n_tokens``), else they must be equal on every rank (``in_features``). A name that looks like a
    mean is refused: averages over shards of different sizes cannot be combined; carry sum + count.
    """
    if metadata and "reduce" in metadata:
        op = metadata["reduce"]
        if op not in _OPS:
            raise DistributedError(f"field {name!r}: unknown reduce={op!r} (one of {', '.join(_OPS)}).")
        return op
    low = name.lower()
    words = set(low.split("_"))
    if words & {"max", "amax", "maximum"}:
        return MAX
    if words & {"min", "amin", "minimum"}:
        return MIN
    if words & set(_MEAN_WORDS):
        raise DistributedError(
            f"statistic {name!r} looks like a mean: means of shards cannot be all-reduced exactly. Store a "
            "sum and a count (and derive the mean), or declare field(metadata={'reduce': 'same'|'sum'|...})."
        )
    if is_tensor or low.startswith(_COUNT_PREFIXES) or low.endswith(("_count", "_sum", "_total")):
        return SUM
    return SAME


def _skeleton(obj: Any, name: str = "", metadata: Mapping[str, Any] | None = None) -> Any:
    """``obj`` with every tensor replaced by a :class:`_Spec` (cheap to send, same structure)."""
    if isinstance(obj, ReproducibleSum):
        return _Spec(tuple(obj.shape), torch.float64, obj.device.type, REPRODUCIBLE)
    if isinstance(obj, torch.Tensor):
        if obj.dtype == torch.bool or obj.is_complex():
            raise DistributedError(f"statistic {name!r} has dtype {obj.dtype}, which cannot be summed.")
        return _Spec(tuple(obj.shape), obj.dtype, obj.device.type, _field_op(name, metadata, True))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(out, f.name, _skeleton(getattr(obj, f.name), f.name, f.metadata))
        return out
    if isinstance(obj, Mapping):
        return {k: _skeleton(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_skeleton(v, name) for v in obj)
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return _Num(_field_op(name, metadata, False), obj)
    return obj


def _merge(parts: list[Any], where: str) -> Any:
    """Merge the ranks' skeletons: union of keys, tensors checked alike, Python numbers reduced here."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    first = present[0]
    if isinstance(first, _Spec):
        for p in present:
            if not isinstance(p, _Spec) or (p.shape, p.dtype, p.op) != (first.shape, first.dtype, first.op):
                raise DistributedError(f"ranks disagree about statistic {where}: {first} vs {p}.")
        if first.op == SAME and len(present) < len(parts):
            raise DistributedError(f"statistic {where} is declared reduce='same' but some ranks lack it.")
        return first
    if isinstance(first, _Num):
        if any(not isinstance(p, _Num) or p.op != first.op for p in present):
            raise DistributedError(f"ranks hold different kinds of value at {where}.")
        values = [p.value for p in present]
        if first.op == SUM:
            return _Num(SUM, sum(values))
        if first.op == MAX:
            return _Num(MAX, max(values))
        if first.op == MIN:
            return _Num(MIN, min(values))
        if any(v != values[0] for v in values):
            raise DistributedError(
                f"ranks disagree about {where}: {values} (it is not a count, so it must be equal everywhere)."
            )
        return first
    if dataclasses.is_dataclass(first):
        if any(type(p) is not type(first) for p in present):
            raise DistributedError(f"ranks hold different types at {where}.")
        out = copy.copy(first)
        for f in dataclasses.fields(first):
            merged = _merge([getattr(p, f.name) for p in present], f"{where}.{f.name}")
            object.__setattr__(out, f.name, merged)
        return out
    if isinstance(first, dict):
        keys: dict[Any, None] = {}
        for p in present:
            if not isinstance(p, dict):
                raise DistributedError(f"ranks hold different types at {where}.")
            keys.update(dict.fromkeys(p))
        return {k: _merge([p.get(k) for p in present], f"{where}[{k!r}]") for k in keys}
    if isinstance(first, (list, tuple)):
        if any(type(p) is not type(first) or len(p) != len(first) for p in present):
            raise DistributedError(f"ranks hold sequences of different lengths at {where}.")
        return type(first)(_merge([p[i] for p in present], f"{where}[{i}]") for i in range(len(first)))
    if any(p != first for p in present):
        raise DistributedError(f"ranks disagree about {where}: {present}.")
    return first


def _device(spec: _Spec) -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if spec.device_type == "cuda"
        else torch.device("cpu")
    )


def _identity(spec: _Spec) -> torch.Tensor:
    device = _device(spec)
    if spec.op == SUM:
        return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
    lo = spec.op == MAX
    if spec.dtype.is_floating_point:
        fill = float("-inf") if lo else float("inf")
    else:
        info = torch.iinfo(spec.dtype)
        fill = info.min if lo else info.max
    return torch.full(spec.shape, fill, dtype=spec.dtype, device=device)


def _materialize(local: Any, merged: Any, leaves: list[tuple[torch.Tensor, str]]) -> Any:
    """``local`` completed to the merged structure (in place where mutable); tensors go to ``leaves``."""
    if merged is None:
        return local
    if isinstance(merged, _Spec) and merged.op == REPRODUCIBLE:
        t = (
            local
            if isinstance(local, ReproducibleSum)
            else ReproducibleSum.zeros(merged.shape, _device(merged))
        )
        leaves.append((t, merged.op))
        return t
    if isinstance(merged, _Spec):
        t = local if isinstance(local, torch.Tensor) else _identity(merged)
        leaves.append((t, merged.op))
        return t
    if isinstance(merged, _Num):
        return merged.value
    if dataclasses.is_dataclass(merged):
        out = local if local is not None else copy.copy(merged)
        for f in dataclasses.fields(merged):
            src = getattr(local, f.name) if local is not None else None
            value = _materialize(src, getattr(merged, f.name), leaves)
            object.__setattr__(out, f.name, value)
        return out
    if isinstance(merged, dict):
        out = local if isinstance(local, dict) else {}
        for k, v in merged.items():
            out[k] = _materialize(out.get(k), v, leaves)
        return out
    if isinstance(merged, list):
        out = local if isinstance(local, list) else [None] * len(merged)
        for i, v in enumerate(merged):
            out[i] = _materialize(out[i], v, leaves)
        return out
    if isinstance(merged, tuple):
        src = local if isinstance(local, tuple) else (None,) * len(merged)
        return type(merged)(_materialize(s, v, leaves) for s, v in zip(src, merged))
    return merged


_REDUCE_OPS = {SUM: "SUM", MAX: "MAX", MIN: "MIN"}


class Traffic:
    """Bytes this process sent through all-reduce / broadcast (for reports and the cost model)."""

    reduced_bytes = 0
    broadcast_bytes = 0
    reduce_seconds = 0.0  # wall time inside all_reduce_statistics (synchronized on CUDA)

    @classmethod
    def reset(cls) -> None:
        cls.reduced_bytes = cls.broadcast_bytes = 0
        cls.reduce_seconds = 0.0


def _reduce_tensors(leaves: list[tuple[torch.Tensor, str]], what: str) -> None:
    """All-reduce ``leaves`` in place, by dtype and op; ``same`` tensors are checked equal everywhere."""
    _reduce_reproducible([t for t, op in leaves if op == REPRODUCIBLE], what)
    groups: dict[tuple[torch.dtype, str], list[torch.Tensor]] = {}
    for t, op in leaves:
        if op != REPRODUCIBLE:
            groups.setdefault((t.dtype, op), []).append(t)
    for (_, op), tensors in groups.items():
        if op != SAME:
            _all_reduce_bucketed(tensors, op, what)
            continue
        hi, lo = [t.clone() for t in tensors], [t.clone() for t in tensors]
        _all_reduce_bucketed(hi, MAX, what)
        _all_reduce_bucketed(lo, MIN, what)
        if any(not torch.equal(h, m) for h, m in zip(hi, lo)):  # every rank sees the same max/min
            raise DistributedError(f"{what}: a statistic declared reduce='same' differs between ranks.")


def _reduce_reproducible(sums: list[ReproducibleSum], what: str) -> None:
    """Merge order-independent sums exactly: every rank raises its bins to the MAX, then limbs are summed.

    Limbs on equal bins hold integer multiples of the bin's unit, so their SUM is exact in any order.
    """
    if not sums:
        return
    top = [s.bin.clone() for s in sums]
    _all_reduce_bucketed(top, MAX, what)
    for s, b in zip(sums, top):
        s.align_(b)
    _all_reduce_bucketed([s.hi for s in sums] + [s.lo for s in sums], SUM, what)
    counts = [torch.tensor([s.n_terms], dtype=torch.int64) for s in sums]
    _all_reduce_bucketed(counts, SUM, what)
    for s, c in zip(sums, counts):
        s.n_terms = int(c.item())


def _all_reduce_bucketed(tensors: list[torch.Tensor], op: str, what: str) -> None:
    """All-reduce in place: small tensors flattened into buckets of ``BUCKET_BYTES``, large ones alone."""
    device = _comm_device()
    red = getattr(dist.ReduceOp, _REDUCE_OPS[op])
    bucket: list[torch.Tensor] = []
    size = 0
    for t in [*tensors, None]:
        nbytes = 0 if t is None else t.numel() * t.element_size()
        if bucket and (t is None or size + nbytes > BUCKET_BYTES):
            flat = torch.cat([b.reshape(-1).to(device) for b in bucket])
            with _collective(what):
                dist.all_reduce(flat, op=red)
            Traffic.reduced_bytes += flat.numel() * flat.element_size()
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
            bucket, size = [], 0
        if t is None:
            break
        if nbytes > BUCKET_BYTES or not t.is_contiguous():
            buf = t if t.device == device and t.is_contiguous() else t.to(device).contiguous()
            with _collective(what):
                dist.all_reduce(buf, op=red)
            Traffic.reduced_bytes += nbytes
            if buf is not t:
                t.copy_(buf)
        else:
            bucket.append(t)
            size += nbytes


def all_reduce_statistics(obj: T, *, what: str = "all_reduce_statistics") -> T:
    """Sum (maxima: max) every statistic in ``obj`` over all ranks, in place; return the reduced object.

    ``obj`` is any nesting of dataclasses, dicts, lists and tuples whose leaves are tensors (summed;
    fields named ``*max*``/``*min*`` take the max/min), Python numbers (summed when named like a count,
    ``n_tokens``; otherwise they must be equal, like ``in_features``), strings and ``None``. A dataclass
    field can state its reduction with ``field(metadata={"reduce": "sum"|"max"|"min"|"same"})``.

    Ranks may hold different keys (a shard that never reached a layer): the result is the union, with
    missing tensors treated as the reduction's identity. Containers are mutated in place; use the
    returned object (a tuple, or a dict that was ``None`` on this rank, is rebuilt). With one process
    this returns ``obj`` unchanged. If any rank passes a :class:`_Failed` marker every rank raises.
    """
    if not is_distributed():
        return obj
    t0 = _synchronized_time()
    try:
        return _all_reduce_statistics(obj, what)
    finally:
        Traffic.reduce_seconds += _synchronized_time() - t0


def _synchronized_time() -> float:
    if _comm_device().type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _all_reduce_statistics(obj: T, what: str) -> T:
    local = obj if isinstance(obj, _Failed) else _skeleton_or_failure(obj)
    parts = _gather_objects(local, what)
    failed = [(r, p) for r, p in enumerate(parts) if isinstance(p, _Failed)]
    if failed:
        r, p = failed[0]
        raise DistributedError(f"{what}: rank {r} failed: {p.message}")
    merged = _merge(parts, "statistics")
    leaves: list[tuple[torch.Tensor, str]] = []
    result = _materialize(obj, merged, leaves)
    _reduce_tensors(leaves, what)
    return result


def _skeleton_or_failure(obj: Any) -> Any:
    try:
        return _skeleton(obj)
    except DistributedError as err:
        return _Failed(str(err))


def distributed_statistics(
    collect: Callable[[list[Any]], T], batches: Sequence[Any], *, what: str = "calibration statistics"
) -> T:
    """``collect(batches)`` on one process; under a process group ``collect(shard(batches))`` + all-reduce.

    ``collect`` is the pipeline's own statistics pass (e.g. ``lambda b: collect_statistics(mods, run, b)``
    or ``collect_fisher``). A rank whose shard is empty contributes nothing; an exception on any rank
    makes every rank raise (instead of the others waiting in the all-reduce until the timeout).
    """
    if not is_distributed():
        return collect(list(batches))
    batches = list(batches)
    if not batches:
        raise DistributedError(f"{what}: no calibration batches to shard over {get_world_size()} ranks.")
    mine = shard(batches)
    with fail_together(what):
        local: Any = collect(mine) if mine else None
    return all_reduce_statistics(local, what=what)


@contextlib.contextmanager
def fail_together(what: str = "calibration statistics") -> Iterator[None]:
    """Guard the local work that precedes an :func:`all_reduce_statistics` with the same ``what``.

    If the body raises on one rank, that rank still joins the reduction (with a failure marker), so
    every rank raises :class:`DistributedError` at once instead of the others waiting for the timeout.
    """
    try:
        yield
    except Exception as err:
        if not is_distributed():
            raise
        all_reduce_statistics(_Failed(f"{type(err).__name__}: {err}"), what=what)
        raise  # pragma: no cover - all_reduce_statistics raised on every rank
