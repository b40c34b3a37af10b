"""Timing of repeated calls: CUDA events on a GPU, ``perf_counter`` elsewhere (one place for both).

The FFN policy (which times candidate kernels) and ``flashsvd.models.measure`` (which times whole
models) both need it; events measure device time without a host sync per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["times_ms"]


def times_ms(fn: Callable[[], object], repeats: int, device: torch.device | str) -> list[float]:
    """Milliseconds of each of ``repeats`` calls of ``fn`` (no warm-up: the caller does that)."""
    times: list[float] = []
    if torch.device(device).type != "cuda":
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times
