"""Data-parallel calibration and factorization over ``torch.distributed`` (``torchrun``, ``accelerate launch``).

Every statistic our methods consume is a *sum over calibration tokens or batches* (Gram ``XᵀX``, column
sums, ``|x|`` sums, Fisher diagonals, squared output gradients, token and batch counts) or a *maximum*
(``abs_max``). So each process can take a shard of the calibration batches, accumulate locally, and one
all-reduce (SUM, or MAX for maxima) gives every process the totals of the union: exact up to the order
of float64 additions. Means are never reduced: they are derived afterwards from ``sum / count``.

Without a process group (a plain ``python`` run, or ``WORLD_SIZE=1``) every function here is the
identity, so the pipeline calls them unconditionally.

The pieces, in the order the pipeline uses them:

* :func:`init_from_env` / :func:`distributed_session`: join the group ``torchrun`` describes (``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), NCCL on GPUs and gloo on CPU, with a
  timeout so that a dead rank makes the others fail with :class:`DistributedError` instead of hanging.
* :func:`shard`: this process's share of the calibration batches (each batch exactly once).
* :func:`all_reduce_statistics`: sum (or max) every statistic of a nested object in place; it walks
  dataclasses, dicts, lists and tuples, so it does not depend on the statistics classes.
* :func:`distributed_statistics`: ``collect(shard(batches))`` then the all-reduce: the one call the
  pipeline makes where it collects statistics (:func:`fail_together` when the local work is spread
  over several passes before one :func:`all_reduce_statistics`).
* :func:`spread`: factorize different matrices on different ranks (balanced by cost) and broadcast
  the results, so every rank ends with every factor, bitwise identical.
* :func:`broadcast_from_main`: rank 0's decision (e.g. a rank allocation) on every rank.
* :func:`is_main_process` / :func:`main_process_first`: only rank 0 writes and shows progress.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from flashsvd.methods.errors import FlashSVDMethodError

T = TypeVar("T")

#: default collective timeout (seconds); ``FLASHSVD_DIST_TIMEOUT`` overrides it
DEFAULT_TIMEOUT_S = 1800.0
#: small tensors are flattened into buckets of at most this many bytes per all-reduce call
BUCKET_BYTES = 64 * 2**20

SUM, MAX, MIN, SAME = "sum", "max", "min", "same"
_OPS = (SUM, MAX, MIN, SAME)


class DistributedError(FlashSVDMethodError):
    """A collective failed (a rank died or timed out) or the ranks disagree about what they reduce."""


# ---- process group ----------------------------------------------------------------------------------


def is_distributed() -> bool:
    """Whether a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes files and shows progress."""
    return get_rank() == 0


def _timeout_s() -> float:
    raw = os.environ.get("FLASHSVD_DIST_TIMEOUT")
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"FLASHSVD_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}.")
    return value


def init_from_env(timeout_s: float | None = None, backend: str | None = None) -> bool:
    """Join the process group described by ``torchrun``'s environment; return whether one is active.

    Does nothing when ``WORLD_SIZE`` is unset or 1, or when a group already exists (e.g. created by
    accelerate). The backend is NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``), else
    gloo. ``timeout_s`` (default ``FLASHSVD_DIST_TIMEOUT`` or 30 min) bounds every collective: a rank that
    died or hangs makes the others raise :class:`DistributedError` after at most that long.
    """
    if dist.is_available() and dist.is_initialized():
        return is_distributed()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed support.")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={world} but {', '.join(missing)} is not set: launch with `torchrun --nproc-per-node N ...` "
            "or `accelerate launch ...`, or unset WORLD_SIZE for a single process."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device_id = None
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_id = torch.device("cuda", local)
    timeout = timedelta(seconds=timeout_s if timeout_s is not None else _timeout_s())
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    return True


@contextlib.contextmanager
def distributed_session(timeout_s: float | None = None) -> Iterator[bool]:
    """:func:`init_from_env` for the duration of a command; destroys the group it created on exit."""
    created = not (dist.is_available() and dist.is_initialized()) and init_from_env(timeout_s)
    try:
        yield is_distributed()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a backend failure (dead peer, timeout) into one clear :class:`DistributedError`."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, OSError) as err:  # DistBackendError, DistNetworkError, gloo/NCCL errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {get_rank()} of {get_world_size()}: {what} failed, another process probably died or "
            f"timed out ({first}). Check the other ranks' logs; raise FLASHSVD_DIST_TIMEOUT for slow steps."
        ) from err


def barrier(what: str = "barrier") -> None:
    if is_distributed():
        with _collective(what):
            dist.barrier()


@contextlib.contextmanager
def main_process_first(what: str = "main_process_first") -> Iterator[None]:
    """Rank 0 runs the body first (e.g. downloads, cache writes), then the other ranks."""
    if not is_main_process():
        barrier(what)
    yield
    if is_main_process():
        barrier(what)


def _comm_device() -> torch.device:
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_main(obj: T, what: str = "broadcast_from_main") -> T:
    """Rank 0's ``obj`` on every rank (any picklable object, e.g. a rank allocation).

    For decisions that must be identical everywhere but might not be bitwise reproducible on every
    rank (anything that ran the model on a GPU, e.g. a sensitivity search).
    """
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    with _collective(what):
        dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- sharding ---------------------------------------------------------------------------------------


def shard(items: Iterable[T], rank: int | None = None, world: int | None = None) -> list[T]:
    """This rank's share of ``items``: ``items[rank::world]`` (deterministic, each item exactly once).

    Strided, so shards differ in size by at most one. Shard by *batch*, never split a batch: Fisher
    statistics are sums over batches of squared batch gradients, which only the whole batch reproduces.
    """
    rank = get_rank() if rank is None else rank
    world = get_world_size() if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise DistributedError(f"shard needs 0 ≤ rank < world, got rank={rank}, world={world}.")
    return list(items)[rank::world]


# ---- reduction plan ---------------------------------------------------------------------------------

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


def _identity(spec: _Spec) -> torch.Tensor:
    device = torch.device("cuda", torch.cuda.current_device()) if spec.device_type == "cuda" else "cpu"
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

    @classmethod
    def reset(cls) -> None:
        cls.reduced_bytes = cls.broadcast_bytes = 0


def _reduce_tensors(leaves: list[tuple[torch.Tensor, str]], what: str) -> None:
    """All-reduce ``leaves`` in place, by dtype and op; ``same`` tensors are checked equal everywhere."""
    groups: dict[tuple[torch.dtype, str], list[torch.Tensor]] = {}
    for t, op in leaves:
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


def _gather_objects(obj: Any, what: str) -> list[Any]:
    out: list[Any] = [None] * get_world_size()
    with _collective(what):
        dist.all_gather_object(out, obj)
    return out


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


# ---- factorizations spread over ranks ---------------------------------------------------------------


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
        box = [mine if r == me else None]
        with _collective(what):
            dist.broadcast_object_list(box, src=r)
        skeletons: dict[str, Any] = box[0]
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
