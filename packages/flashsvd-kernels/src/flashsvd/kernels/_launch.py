"""Launch Triton kernels with little host time: compiled kernels remembered per call signature.

Why: on every call ``JITFunction.run`` re-derives the specialization of each argument, hashes it,
builds launch metadata and checks globals, and ``triton.autotune`` first builds its own key from
the arguments.  With our ~70-argument kernels (strides of views are the point of the API) that is
tens of microseconds of host time per call, as long as an encoder attention's GPU time, and an
eager model pays it in every layer.

Our kernels take their tensors first and their scalars after.  What Triton specializes a compiled
kernel on is then determined by: each tensor's dtype and 16-byte alignment, the exact scalar values
(integers equal to 1, divisible by 16 or wider than 32 bits are specialized), the constexpr keywords,
the device, and for an autotuned kernel the caller's tuning key.  The first call with a new signature
goes through Triton (compiling, autotuning); later calls hand the arguments straight to the compiled
kernel's launcher.  Under the interpreter, with Triton launch hooks installed (profilers), or when a
signature is first seen inside a CUDA-graph capture, calls take Triton's own path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
from triton import knobs

from flashsvd.kernels._triton_compat import interpreter_enabled

__all__ = [
    "Prepared",
    "cdiv",
    "launch",
    "launch_tuned",
    "next_power_of_2",
    "prepare",
    "prepare_tuned",
    "prepared_launches",
    "tile_size",
]

_BEST: dict[tuple, Any] = {}  # autotune key -> the config the autotuner picked
_LAST: dict[int, Any] = {}  # per kernel: the config tuned last (the fallback inside a graph capture)
_COMPILED: dict[tuple, tuple] = {}  # call signature -> (launcher, function, metadata, constexpr tail)
_N_TENSORS: dict[int, int] = {}  # per kernel: how many leading arguments are tensors
_MAX_SIGNATURES = 4096  # a bound, not a tuning knob: varying shapes must not grow the cache forever
_DRIVER: list = []  # Triton's (current device, current stream) getters, bound on first use
#: Triton versions whose ``CudaLauncher.launch`` argument order :class:`Prepared` calls directly
_DIRECT_C_LAUNCH = triton.__version__.startswith("3.6.")


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch sizes (``triton.cdiv`` is a constexpr function: microseconds a call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``); host-side twin of ``triton.next_power_of_2``."""
    return 1 << max(int(n) - 1, 0).bit_length()


# Smallest rank / d_head / row tile.  ``tl.dot`` accepts 16, but triton 3.6 on the H200 computed
# wrong outputs (relative error 0.2-0.7, fp16/bf16 only) or faulted in prefill attention with 16-wide
# tiles whenever the key count was not a multiple of 16 (ranks 5-16, d_head 24-40, 19 or 37 keys):
# every config with BLOCK_M >= 64 (the wgmma path), while BLOCK_M = 32 stayed exact.  A floor of 32
# made every probed (shape, config) pair float64-exact; only tiny ranks pay, in FLOPs that were
# padding.  The fused FFN's faults on tiny ranks were the same bug in other tiles (4-warp 64x64 and
# 128-row tiles), which its autotuner no longer tries (``_ffn_kernel._ACC_TILES``).
MIN_TILE = 32


def tile_size(n: int) -> int:
    """A tile dimension covering ``n``: its next power of two, at least ``MIN_TILE``."""
    return max(MIN_TILE, next_power_of_2(n))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _hooks_installed() -> bool:
    rt = knobs.runtime
    return any(
        h is not None and getattr(h, "calls", True) for h in (rt.launch_enter_hook, rt.launch_exit_hook)
    )


def _signature(kid: tuple, args: tuple) -> tuple | None:
    """Everything the compiled kernel depends on, or None when ``args`` break the tensors-first layout."""
    n = _N_TENSORS.get(kid[0])
    if n is None or n < 0:  # layout not learned yet, or not tensors-first
        return None
    if not _DRIVER:
        from triton.runtime import driver

        _DRIVER.extend((driver.active.get_current_device, driver.active.get_current_stream))
    try:
        tensors = tuple([(a.dtype, a.data_ptr() & 15) for a in args[:n]])
    except AttributeError:  # a scalar where a tensor was: Triton's own path decides
        return None
    return (*kid, _DRIVER[0](), tensors, args[n:])


def _remember(sig: tuple | None, fn, compiled, args: tuple, kwargs: dict) -> None:
    """Keep ``compiled`` (what ``fn[grid](*args, **kwargs)`` returned) for calls with ``sig``."""
    kid = id(fn)
    if kid not in _N_TENSORS:
        n = 0
        while n < len(args) and isinstance(args[n], torch.Tensor):
            n += 1
        # Only the tensors-first layout has a cheap signature; others always take Triton's path.
        _N_TENSORS[kid] = n if not any(isinstance(a, torch.Tensor) for a in args[n:]) else -1
        return  # the signature is computed from the next call on
    if sig is None or compiled is None or _N_TENSORS[kid] < 0 or not hasattr(compiled, "run"):
        return
    params = fn.signature.parameters
    tail = tuple(
        kwargs[name] if name in kwargs else params[name].default for name in fn.arg_names[len(args) :]
    )
    if len(_COMPILED) >= _MAX_SIGNATURES:
        _COMPILED.clear()
    _COMPILED[sig] = (compiled.run, compiled.function, compiled.packed_metadata, tail)


def _run(entry: tuple, grid: tuple, args: tuple) -> None:
    launcher, function, metadata, tail = entry
    stream = _DRIVER[1](_DRIVER[0]())
    g1 = grid[1] if len(grid) > 1 else 1
    g2 = grid[2] if len(grid) > 2 else 1
    launcher(grid[0], g1, g2, stream, function, metadata, None, None, None, *args, *tail)


def launch(fn, grid: tuple, *args: Any, **kwargs: Any) -> None:
    """``fn[grid](*args, **kwargs)`` for a ``@triton.jit`` function ``fn`` (tensors first, then scalars)."""
    if interpreter_enabled():
        fn[grid](*args, **kwargs)
        return
    sig = _signature((id(fn), grid, tuple(kwargs.items())), args)
    entry = _COMPILED.get(sig) if sig is not None else None
    if entry is None or _hooks_installed():
        _remember(sig, fn, fn[grid](*args, **kwargs), args, kwargs)
        return
    _run(entry, grid, args)


def launch_tuned(kernel, key: tuple, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)`` where ``kernel`` is a ``triton.autotune`` object.

    ``key`` must determine the best config (the autotune key values, dtypes and constexpr flags).
    The first call for a key goes through the autotuner (which benchmarks the configs under the
    real arguments); later calls launch the compiled kernel of the config it picked.
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
    if interpreter_enabled():
        kernel.fn[grid(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs())
        return
    sig = _signature((id(kernel.fn), full_key), args)
    entry = _COMPILED.get(sig) if sig is not None else None
    if entry is None or _hooks_installed():
        every = {**kwargs, **cfg.all_kwargs()}
        _remember(sig, kernel.fn, kernel.fn[grid(cfg.kwargs)](*args, **every), args, every)
        return
    _run(entry, grid(cfg.kwargs), args)


# ---- prepared launches: everything fixed but the pointers ------------------------------------------
def prepared_launches() -> bool:
    """Whether :class:`Prepared` calls may run now: not under Triton launch hooks (profilers), which
    only Triton's own path calls.  (Under the interpreter they run through ``fn[grid]``.)"""
    return not _hooks_installed()


class Prepared:
    """One kernel launch with its grid, compiled kernel and every argument fixed except a few "live"
    pointer arguments, which each call passes.

    Why: an eager model calls each kernel with the same shapes, strides and dtypes again and again;
    only the addresses of its activations change.  Building the ~70-argument list, hashing its
    signature and looking the compiled kernel up cost tens of microseconds of host time per call on
    a server CPU, more than a small kernel's GPU time.  A prepared call costs the compiled launcher's
    own C code.  The caller guarantees what preparing assumed: live tensors with the same shapes,
    strides, dtypes, device and 16-byte alignment as those it was prepared with (a runtime block's
    launch plan, keyed on its input's layout, does).  Live values are tensors, or on CUDA raw device
    addresses (``int``).  Under the interpreter a call takes Triton's own path.
    """

    __slots__ = ("_args", "_fn", "_go", "_grid", "_kwargs", "_slots")

    def __init__(self, entry, fn, grid: tuple, args: tuple, kwargs: dict, live: tuple) -> None:
        slots = []
        for i, a in enumerate(args):
            j = next((j for j, t in enumerate(live) if t is not None and a is t), None)
            if j is not None:
                slots.append((i, j))
        self._slots = tuple(slots)
        live_at = {i for i, _ in slots}  # (not held: the preparing call's activations)
        self._args = [None if i in live_at else a for i, a in enumerate(args)]
        self._fn, self._grid, self._kwargs = fn, grid, kwargs
        self._go = None if entry is None else self._bind(entry, grid)

    @staticmethod
    def _bind(entry: tuple, grid: tuple):
        launcher, function, metadata, tail = entry
        g0, g1, g2 = grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1
        get_device, get_stream = _DRIVER
        c_launch = getattr(launcher, "launch", None)
        scratch = getattr(launcher, "global_scratch_size", 1) or getattr(launcher, "profile_scratch_size", 1)
        # The C launcher's argument order is Triton-internal: called directly only where it was tested.
        if c_launch is None or scratch or not _DIRECT_C_LAUNCH:  # the launcher's own call
            head = (function, metadata, None, None, None)

            def go(args: list) -> None:
                launcher(g0, g1, g2, get_stream(get_device()), *head, *args, *tail)

            return go
        head = (
            function,
            launcher.launch_cooperative_grid,
            launcher.launch_pdl,
            None,
            None,
            metadata,
            None,
            None,
            None,
        )

        def go(args: list) -> None:  # CudaLauncher.__call__ without its scratch allocation
            c_launch(g0, g1, g2, get_stream(get_device()), *head, *args, *tail)

        return go

    def __call__(self, *live) -> None:
        args = self._args.copy()
        for i, j in self._slots:
            args[i] = live[j]
        if self._go is None:
            self._fn[self._grid](*args, **self._kwargs)
        else:
            self._go(args)


def prepare(fn, grid: tuple, args: tuple, kwargs: dict, live: tuple) -> Prepared | None:
    """:func:`launch`'s call ``fn[grid](*args, **kwargs)`` prepared, with ``live`` (tensors among
    ``args``, matched by identity) passed per call; ``None`` until that signature has been launched."""
    if interpreter_enabled():
        return Prepared(None, fn, grid, args, kwargs, live)
    sig = _signature((id(fn), grid, tuple(kwargs.items())), args)
    entry = _COMPILED.get(sig) if sig is not None else None
    return None if entry is None else Prepared(entry, fn, grid, args, kwargs, live)


def prepare_tuned(kernel, key: tuple, grid: Callable[[dict], tuple], args: tuple, kwargs: dict,
                  live: tuple) -> Prepared | None:  # fmt: skip
    """:func:`launch_tuned`'s call prepared (see :func:`prepare`); ``None`` until it was tuned and launched."""
    full_key = (id(kernel), *key)
    cfg = _BEST.get(full_key)
    if cfg is None:
        return None
    every = {**kwargs, **cfg.all_kwargs()}
    if interpreter_enabled():
        return Prepared(None, kernel.fn, grid(cfg.kwargs), args, every, live)
    sig = _signature((id(kernel.fn), full_key), args)
    entry = _COMPILED.get(sig) if sig is not None else None
    return None if entry is None else Prepared(entry, kernel.fn, grid(cfg.kwargs), args, every, live)
