"""Small compatibility layer between our kernels and Triton's runtime.

Why it exists: the same kernels must run compiled on CUDA and under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, used for correctness tests in CI).  The interpreter has three quirks we
work around here, in one place, instead of in every kernel:

* autotuning with more than one config fails ("0 active drivers"), so :func:`autotune` keeps only
  the first config when the interpreter is on;
* ``triton.runtime.driver.active`` must not be touched at import time (there is no driver on a CPU
  machine), so nothing here queries the device until a kernel is actually launched;
* a bf16 ``tl.dot`` gives wrong results, so kernels take an ``UPCAST_DOT`` constexpr (see
  :func:`upcast_dot`) and cast dot operands to fp32 when it is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import triton

__all__ = [
    "BACKENDS",
    "autotune",
    "interpreter_enabled",
    "resolve_backend",
    "upcast_dot",
]

BACKENDS = ("auto", "triton", "torch")


def interpreter_enabled() -> bool:
    """True when Triton runs kernels through its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune(configs: Sequence[triton.Config], key: list[str], **kwargs: Any) -> Callable:
    """``triton.autotune`` that keeps a single config under the interpreter.

    The interpreter cannot benchmark several configs, and tuning is meaningless there anyway.
    """
    configs = list(configs)
    if interpreter_enabled():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, **kwargs)


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast ``tl.dot`` operands to fp32 (interpreter + bf16 bug)."""
    return interpreter_enabled() and dtype == torch.bfloat16


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Turn a user-facing ``backend`` into ``"triton"`` or ``"torch"``.

    ``"auto"`` picks Triton when every tensor lives on a CUDA device and the reference otherwise;
    ``"triton"`` on CPU tensors is allowed only under the interpreter (that is how CI tests the
    kernels).  Anything else is a user error with a message that says what to do.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if backend == "auto":
        return "triton" if on_cuda else "torch"
    if backend == "triton" and not on_cuda and not interpreter_enabled():
        raise ValueError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            "use backend='auto' or 'torch' on CPU"
        )
    return backend
