"""The process group: joining ``torchrun``'s group, who is rank 0, sharding, and clear failures."""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from flashsvd.methods.errors import FlashSVDMethodError

T = TypeVar("T")

#: default collective timeout (seconds); ``FLASHSVD_DIST_TIMEOUT`` overrides it
DEFAULT_TIMEOUT_S = 1800.0


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
    with _collective(what):
        return broadcast_object(obj, src=0)


# Small Python objects (names, tensor specs, rank allocations) between the ranks of one job.  torch's
# broadcast_object_list / all_gather_object need numpy on some torch builds (CPU wheels ship without
# it); these move the pickled bytes as plain uint8 tensors.  Peers are this job's own processes.


def _to_bytes_tensor(obj: Any) -> torch.Tensor:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(_comm_device())


def _from_bytes_tensor(t: torch.Tensor, n: int) -> Any:
    return pickle.loads(bytes(t[:n].cpu().tolist()))


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (call inside :func:`_collective`)."""
    device = _comm_device()
    payload = _to_bytes_tensor(obj) if get_rank() == src else None
    size = torch.tensor([0 if payload is None else payload.numel()], dtype=torch.long, device=device)
    dist.broadcast(size, src=src)
    n = int(size.item())
    buf = payload if payload is not None else torch.empty(n, dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=src)
    return obj if get_rank() == src else _from_bytes_tensor(buf, n)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (call inside :func:`_collective`)."""
    device = _comm_device()
    payload = _to_bytes_tensor(obj)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([payload.numel()], dtype=torch.long, device=device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    bufs = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(bufs, padded)
    return [_from_bytes_tensor(b, int(s.item())) for b, s in zip(bufs, sizes)]


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


def _gather_objects(obj: Any, what: str) -> list[Any]:
    with _collective(what):
        return all_gather_object(obj)
