"""Launch an autotuned Triton kernel with a remembered config, skipping the autotuner's per-call cost.

Why: the attention kernels take ~70 arguments (strides of views are the point of the API), and
``triton.autotune``'s per-call bookkeeping (building its key from every argument) costs tens of
microseconds of host time — as much as a whole encoder attention on the GPU.  The first call for a key
goes through the autotuner (which benchmarks the configs under the real arguments); later calls
launch the underlying JIT function directly with the config it picked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["launch_tuned"]

_BEST: dict[tuple, Any] = {}


def launch_tuned(kernel, key: tuple, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` where ``kernel`` is a ``triton.autotune`` object.

    ``key`` must determine the best config (the autotune key values, dtypes and constexpr flags).
    """
    full_key = (id(kernel), *key)
    cfg = _BEST.get(full_key)
    if cfg is None:
        kernel[grid](*args, **kwargs)
        _BEST[full_key] = kernel.best_config
        return
    kernel.fn[grid(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs())
