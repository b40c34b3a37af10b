"""Memory and latency measurement shared by benchmarks and the app.

Definitions (one meaning each, on CUDA; CPU has no allocator statistics, so memory is reported as
``None`` there and latency uses ``time.perf_counter``):

* **persistent** memory: bytes of the model's parameters and buffers (tied tensors once);
* **resident** memory: ``torch.cuda.memory_allocated()`` just before the measured call (weights,
  caches and inputs that exist anyway);
* **peak** memory: ``torch.cuda.max_memory_allocated()`` during the call (after ``reset_peak_memory_stats``);
* **transient** memory: peak minus resident — what the call itself needs on top (activations,
  workspaces, its output).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from flashsvd.kernels.timing import times_ms

__all__ = ["MemoryStats", "Timing", "measure_latency", "measure_memory", "persistent_bytes"]


def persistent_bytes(model: nn.Module) -> int:
    """Bytes of distinct parameters and buffers (the weights' footprint)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel())
        if key in seen or t.device.type == "meta":
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@dataclass
class MemoryStats:
    persistent_bytes: int
    resident_bytes: int | None
    peak_bytes: int | None
    transient_bytes: int | None
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Timing:
    median_ms: float
    mean_ms: float
    min_ms: float
    repeats: int
    warmup: int
    device: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _device_of(model: nn.Module | None, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None) if model is not None else None
    return p.device if p is not None else torch.device("cpu")


def measure_memory(
    fn: Callable[[], Any], model: nn.Module | None = None, device=None
) -> tuple[Any, MemoryStats]:
    """Run ``fn()`` once and return ``(its result, MemoryStats)``.

    Call it after a warm-up (e.g. :func:`measure_latency`): a first call that compiles or autotunes
    Triton kernels allocates autotuning's benchmark buffers, which would count as the forward's peak.
    """
    dev = _device_of(model, device)
    persistent = persistent_bytes(model) if model is not None else 0
    if dev.type != "cuda":
        with torch.no_grad():
            out = fn()
        return out, MemoryStats(persistent, None, None, None, str(dev))
    torch.cuda.synchronize(dev)
    resident = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        out = fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return out, MemoryStats(persistent, resident, peak, peak - resident, str(dev))


def measure_latency(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 10, device=None) -> Timing:
    """Latency of ``fn()`` after ``warmup`` calls: CUDA events on GPU, ``perf_counter`` on CPU."""
    dev = (
        torch.device(device)
        if device is not None
        else (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    )
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times = times_ms(fn, repeats, dev)
    return Timing(statistics.median(times), statistics.fmean(times), min(times), repeats, warmup, str(dev))
