"""CUDA graphs for whole models: the one documented way to run a model (dense or compressed) graphed.

Why: at small batch a transformer forward is a few hundred short kernels, and Python launching them
costs more than the GPU running them.  Captured once in a CUDA graph, a forward (or one decode step)
replays with a single launch.  Every op on both backends is graph-safe (no host syncs, no
allocation-dependent shapes); a decode step needs a preallocated cache, so :func:`generate_greedy`
uses HF's ``StaticCache``, which the flash backend turns into a static rank-space cache
(:class:`flashsvd.models.RankSpaceCacheLayer` over :class:`flashsvd.kernels.RankSpaceKVCache`).

    fwd = GraphedForward(model, input_ids=ids, attention_mask=mask)   # captures
    out = fwd(input_ids=new_ids, attention_mask=new_mask)             # same shapes: copies + replay
    tokens = generate_greedy(model, prompt_ids, max_new_tokens=256)   # static cache, graphed steps
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["GraphedForward", "cuda_graph", "generate_greedy"]


def cuda_graph(fn: Callable[[], Any], warmup: int = 3) -> Callable[[], Any]:
    """Capture ``fn()`` (reading only static tensors) in one CUDA graph; return ``replay()``.

    ``replay()`` re-runs the captured work and returns the output tensors of the capture (the same
    storage every time: copy them to keep a result past the next replay).  The warm-up runs on a side
    stream first, so lazy initialization (Triton autotuning, cuBLAS handles) stays out of the graph.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # "relaxed": a kernel specialization first met during the capture may load its module there.
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        out = fn()

    def replay():
        graph.replay()
        return out

    replay.graph = graph
    return replay


class GraphedForward:
    """``model(**inputs)`` captured for fixed input shapes; calls copy new inputs in and replay.

    Inference only (captured under ``torch.no_grad``).  The returned output is the graph's static
    output (overwritten by the next call).
    """

    def __init__(self, model: nn.Module, warmup: int = 3, **example_inputs: torch.Tensor) -> None:
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs.values()):
            raise ValueError("GraphedForward needs CUDA tensors as inputs (CUDA graphs run on the GPU only)")
        self.model = model
        self.static = {k: t.clone() for k, t in example_inputs.items()}

        def run():
            with torch.no_grad():
                return model(**self.static)

        self._replay = cuda_graph(run, warmup=warmup)

    def __call__(self, **inputs: torch.Tensor):
        if inputs.keys() != self.static.keys():
            raise ValueError(
                f"GraphedForward was captured with inputs {sorted(self.static)}, got {sorted(inputs)}"
            )
        for name, t in inputs.items():
            if t.shape != self.static[name].shape:
                raise ValueError(
                    f"input {name} has shape {tuple(t.shape)}; the graph was captured for "
                    f"{tuple(self.static[name].shape)}: capture another GraphedForward for this shape"
                )
            self.static[name].copy_(t)
        return self._replay()


def _accepts(model: nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def generate_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    graph: bool = True,
    timings: dict[str, float] | None = None,
) -> torch.Tensor:
    """Greedy decoding over a preallocated ``StaticCache``; ``[B, prompt + new]`` token ids.

    The prompt runs eagerly (prefill); each decode step is one replay of a captured CUDA graph when
    ``graph`` (the default; needs CUDA) or a plain eager call otherwise.  Works the same for the dense
    model and both compressed backends.  No stopping criteria: it decodes ``max_new_tokens`` tokens.
    ``timings``, if given, receives ``prefill_ms`` and ``decode_ms`` (the steps after the capture,
    ``decode_steps`` of them), measured with device synchronization.
    """
    from transformers import StaticCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if graph and not input_ids.is_cuda:
        raise ValueError("graph=True needs a CUDA model and input_ids; pass graph=False on CPU")
    B, P = input_ids.shape
    cache = StaticCache(config=model.config, max_cache_len=P + max_new_tokens)
    with_pos = _accepts(model, "cache_position")  # transformers < 5.24 indexes static caches by it
    kw = {"cache" if _accepts(model, "cache") else "past_key_values": cache, "use_cache": True}
    out_ids = input_ids.new_empty(B, P + max_new_tokens)
    out_ids[:, :P] = input_ids
    clock = _Clock(input_ids.device)
    with torch.no_grad():
        extra = {"cache_position": torch.arange(P, device=input_ids.device)} if with_pos else {}
        logits = model(input_ids=input_ids, logits_to_keep=1, **kw, **extra).logits
        prefill_ms = clock.lap()
        tok = logits[:, -1:].argmax(-1)
        out_ids[:, P : P + 1] = tok
        if max_new_tokens == 1:
            return out_ids
        pos = torch.full((1,), P, dtype=torch.long, device=input_ids.device)

        def step():
            extra = {"cache_position": pos} if with_pos else {}
            logits = model(input_ids=tok, position_ids=pos[None].expand(B, 1), **kw, **extra).logits
            tok.copy_(logits[:, -1:].argmax(-1))
            pos.add_(1)

        if graph:
            # The capture's warm-up runs one real step (writing slot P); replays then continue.
            replay = cuda_graph(step, warmup=1)
            out_ids[:, P + 1 : P + 2] = tok
            n = 1
        else:
            replay, n = step, 0
        clock.lap()
        for i in range(n, max_new_tokens - 1):
            replay()
            out_ids[:, P + 1 + i : P + 2 + i] = tok
        if timings is not None:
            timings.update(prefill_ms=prefill_ms, decode_ms=clock.lap(), decode_steps=max_new_tokens - 1 - n)
    return out_ids


class _Clock:
    """Host wall clock with a device synchronization at each lap (timings are optional extras)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._sync()
        self.t = time.perf_counter()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def lap(self) -> float:
        self._sync()
        now = time.perf_counter()
        ms, self.t = (now - self.t) * 1e3, now
        return ms
