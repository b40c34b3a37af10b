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

from flashsvd.methods.distributed.group import (
    DEFAULT_TIMEOUT_S,
    DistributedError,
    barrier,
    broadcast_from_main,
    distributed_session,
    get_rank,
    get_world_size,
    init_from_env,
    is_distributed,
    is_main_process,
    main_process_first,
    shard,
)
from flashsvd.methods.distributed.reduce import (
    Traffic,
    all_reduce_statistics,
    distributed_statistics,
    fail_together,
)
from flashsvd.methods.distributed.spread import assign, calibrate_blockwise_distributed, spread

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistributedError",
    "Traffic",
    "all_reduce_statistics",
    "assign",
    "barrier",
    "broadcast_from_main",
    "calibrate_blockwise_distributed",
    "distributed_session",
    "distributed_statistics",
    "fail_together",
    "get_rank",
    "get_world_size",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "main_process_first",
    "shard",
    "spread",
]
