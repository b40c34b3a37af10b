"""Per-shape choice between the fused FFN kernel and the cuBLAS matmul chain, from measured costs.

Why: no single FFN implementation wins everywhere.  The fused kernel never writes the ``[tokens,
d_ff]`` activation (transient ≈ the rank-space projections only) but at large ranks it is slower than
the plain chain ``x·u1 → ·v1 → act → ·u2 → ·v2``, whose transient is the whole activation.  A
token-chunked chain sits between the two: chain speed, transient bounded by one chunk.

Three policies (the user's knob, ``lowrank_ffn(..., policy=...)`` and ``set_backend(..., policy=...)``):

* ``"fastest"``: the quickest of fused, chain and chunked chain;
* ``"leanest"``: always the fused kernel (least activation memory);
* ``"balanced"`` (default): the quickest whose transient stays under ``1/8`` of the plain chain's
  (or under :data:`SMALL_TRANSIENT_BYTES`, where memory does not matter: decode steps).

The first call of a shape (tokens bucketed to a power of two) times each candidate with CUDA events
and caches the winner per device; later calls look it up (a dict access).  Inside a CUDA-graph capture
or ``torch.compile`` nothing is timed: an uncached shape takes :func:`default_choice`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from flashsvd.kernels.timing import times_ms

__all__ = ["CANDIDATES", "POLICIES", "SMALL_TRANSIENT_BYTES", "choose", "clear_cache", "default_choice"]

POLICIES = ("fastest", "leanest", "balanced")
CANDIDATES = ("fused", "chain", "chunked")
#: balanced: transient at most 1/CHUNKS of the plain chain's (the chunked chain runs CHUNKS chunks).
CHUNKS = 8
#: below this transient any candidate is lean enough (a decode step's activation is a few KiB).
SMALL_TRANSIENT_BYTES = 8 * 2**20

_CHOICE: dict[tuple, str] = {}


def clear_cache() -> None:
    """Forget every measured choice (e.g. after changing clocks or sharing the GPU)."""
    _CHOICE.clear()


def chain_transient(tokens: int, d_ff: int, element_size: int, gated: bool) -> int:
    """Bytes of the plain chain's ``[tokens, d_ff]`` activations (two of them when gated)."""
    return tokens * d_ff * element_size * (2 if gated else 1)


def allowed(policy: str, tokens: int, d_ff: int, element_size: int, gated: bool) -> tuple[str, ...]:
    """Candidates a policy may pick for this shape."""
    if policy == "leanest":
        return ("fused",)
    if policy == "fastest":
        return CANDIDATES
    if chain_transient(tokens, d_ff, element_size, gated) <= SMALL_TRANSIENT_BYTES:
        return CANDIDATES
    return ("fused", "chunked")


def default_choice(policy: str, tokens: int, d_ff: int, element_size: int, gated: bool) -> str:
    """Choice without a measurement (capture/compile of an unseen shape): chain where allowed."""
    ok = allowed(policy, tokens, d_ff, element_size, gated)
    return "chain" if "chain" in ok else ("chunked" if "chunked" in ok else "fused")


def _capturing() -> bool:
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    )


def _graph_time_ms(fn: Callable[[], object], repeats: int) -> float:
    """GPU time of ``fn`` alone: replays of a CUDA graph of it (no host launch cost in the number)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="relaxed"):
        fn()
    times = times_ms(graph.replay, repeats, "cuda")
    del graph
    return statistics.median(times)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Median time of ``fn``: GPU time from graph replays on CUDA (what a captured model pays; the
    chunked chain's many short launches would otherwise count host time), wall time elsewhere."""
    fn()  # warm-up: compiles/autotunes the kernel, picks cuBLAS algorithms
    if device.type == "cuda":
        try:
            return _graph_time_ms(fn, repeats)
        except RuntimeError:  # a candidate that cannot be captured is timed eagerly
            torch.cuda.synchronize()
    return statistics.median(times_ms(fn, repeats, device))


def choose(key: tuple, policy: str, run: Callable[[str], object], tokens: int, d_ff: int, x: torch.Tensor,
           gated: bool) -> str:  # fmt: skip
    """The candidate to run for ``key`` (shape, dtype, ranks, activation) under ``policy``.

    ``run(name)`` executes one candidate on the real inputs (used only to time a new shape).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown FFN policy {policy!r}: choose one of {', '.join(POLICIES)}")
    full = (x.device.index, policy, *key)
    hit = _CHOICE.get(full)
    if hit is not None:
        return hit
    ok = allowed(policy, tokens, d_ff, x.element_size(), gated)
    if len(ok) == 1:
        _CHOICE[full] = ok[0]
        return ok[0]
    if _capturing():
        return default_choice(policy, tokens, d_ff, x.element_size(), gated)
    costs = {name: _time_ms(lambda name=name: run(name), x.device) for name in ok}
    best = min(costs, key=costs.get)
    _CHOICE[full] = best
    return best
