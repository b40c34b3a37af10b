"""Memory and latency of one forward pass, through ``flashsvd.models.measure``, with written definitions.

The app adds only the bookkeeping a result file needs: which batch was measured, the output's size, and
the definitions below (repeated in every JSON so a reader never has to guess).
"""

from __future__ import annotations

from typing import Any

DEFINITIONS = {
    "persistent_bytes": "bytes of the model's parameters and buffers (tied tensors once)",
    "resident_bytes": "torch.cuda.memory_allocated() just before the measured forward (weights, inputs)",
    "peak_bytes": "torch.cuda.max_memory_allocated() during one forward of the measured batch "
    "(after reset_peak_memory_stats); null on CPU, where PyTorch keeps no allocator statistics",
    "transient_bytes": "peak_bytes - resident_bytes: what the forward needs on top of what existed before",
    "activation_bytes": "transient_bytes - output_bytes: the working memory beyond the result itself",
    "latency_ms": "median time of one forward of the measured batch after warm-up, over `repeats` runs "
    "(CUDA events on GPU, perf_counter on CPU)",
}


def _output_bytes(out: Any) -> int:
    import torch

    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, dict):
        return sum(_output_bytes(v) for v in out.values())
    if isinstance(out, (list, tuple)):
        return sum(_output_bytes(v) for v in out)
    if hasattr(out, "to_tuple"):
        return _output_bytes(out.to_tuple())
    return 0


def measure_forward(
    model: Any, inputs: dict[str, Any], device: Any, warmup: int = 2, repeats: int = 5
) -> dict:
    """Memory (see DEFINITIONS) and median latency of ``model(**inputs)``."""
    from flashsvd.models.measure import measure_latency, measure_memory

    model.eval()

    def forward():
        return model(**inputs)

    timing = measure_latency(forward, warmup=warmup, repeats=repeats, device=device)
    out, mem = measure_memory(forward, model=model, device=device)
    out_bytes = _output_bytes(out)
    del out
    transient = mem.transient_bytes
    return {
        "persistent_bytes": mem.persistent_bytes,
        "resident_bytes": mem.resident_bytes,
        "peak_bytes": mem.peak_bytes,
        "transient_bytes": transient,
        "output_bytes": out_bytes,
        "activation_bytes": None if transient is None else max(0, transient - out_bytes),
        "latency_ms": timing.median_ms,
        "latency_min_ms": timing.min_ms,
        "repeats": repeats,
        "warmup": warmup,
        "batch_shape": list(next(iter(inputs.values())).shape),
    }
