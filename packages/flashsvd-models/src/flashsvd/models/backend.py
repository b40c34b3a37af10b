"""One switch between the two runtimes of a compressed model.

* ``"torch"``: HF's own modules with low-rank linear layers (plain matmuls; trainable baseline).
* ``"flash"``: attention and FFN modules replaced by runtime blocks calling ``flashsvd.kernels``
  (Triton on CUDA; the kernels fall back to their PyTorch references on CPU), rank-space KV cache.
"""

from __future__ import annotations

from torch import nn

from flashsvd.kernels.ffn_policy import POLICIES
from flashsvd.models.runtime import FlashAttention, FlashFFN, swap_out

__all__ = ["BACKENDS", "get_backend", "set_backend"]

BACKENDS = ("torch", "flash")


def get_backend(model: nn.Module) -> str:
    return getattr(model, "_flashsvd_backend", "torch")


def set_backend(
    model: nn.Module, backend: str, *, kernel_backend: str = "auto", policy: str = "balanced"
) -> list[str]:
    """Switch ``model`` to ``backend``; returns notes about parts that stay on the torch path.

    ``kernel_backend`` is passed to the kernels (``"auto"``: Triton on CUDA, reference elsewhere).
    ``policy`` trades speed for activation memory per call shape: ``"balanced"`` (default; the FFN's
    fastest implementation within 1/8 of the chain's activation memory, long cache-less attention
    calls in head groups), ``"fastest"`` or ``"leanest"`` (:mod:`flashsvd.kernels.ffn_policy`,
    :meth:`flashsvd.models.runtime.FlashAttention.head_groups`).  Caches built on one backend cannot
    be continued on the other (start a new one).
    """
    from flashsvd.models.adapters import get_adapter

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose 'torch' or 'flash'")
    swap_out(model)
    notes: list[str] = []
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if backend == "flash":
        notes = get_adapter(model).install_flash(model, backend=kernel_backend)
        for block in model.modules():
            if isinstance(block, (FlashFFN, FlashAttention)):
                block.policy = policy
    object.__setattr__(model, "_flashsvd_backend", backend)
    return notes
