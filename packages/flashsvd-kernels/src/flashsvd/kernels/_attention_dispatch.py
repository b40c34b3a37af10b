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

import torch

__all__ = ["launch_tuned"]

_BEST: dict[tuple, Any] = {}
_LAST: dict[int, Any] = {}  # per kernel: the config tuned last (the fallback inside a graph capture)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def launch_tuned(kernel, key: tuple, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` where ``kernel`` is a ``triton.autotune`` object.

    ``key`` must determine the best config (the autotune key values, dtypes and constexpr flags).
    Inside a CUDA-graph capture nothing can be benchmarked (it synchronizes): a key seen for the
    first time there (e.g. HF passes a padding mask only while capturing) takes the kernel's last
    tuned config, or its second config, untuned and uncached.
    """
    full_key = (id(kernel), *key)
    cfg = _BEST.get(full_key)
    if cfg is None:
        if _capturing():
            cfg = _LAST.get(id(kernel)) or kernel.configs[min(1, len(kernel.configs) - 1)]
            kernel.fn[grid(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs())
            return
        kernel[grid](*args, **kwargs)
        _BEST[full_key] = _LAST[id(kernel)] = kernel.best_config
        return
    kernel.fn[grid(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs())
