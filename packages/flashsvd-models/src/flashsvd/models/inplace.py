"""When a runtime block may overwrite a buffer, and the post-LN residual norm that does it.

Why: a post-LN encoder layer (BERT) holds its input, the attention block's output and the FFN's
output at once, and Hugging Face's frames keep the first two alive whatever we do.  What a layer
allocates on top of that sets the flash backend's activation peak, so the blocks write results into
buffers that are theirs alone: the LayerNorm goes into the projection it normalizes, and the FFN
block writes its normalized output into its own input, chunk by chunk, when that input is the
attention block's fresh output.  Overwriting is safe only when no autograd graph runs through the
buffer and no one else can hold it: no forward hooks on the modules that saw it (a hook may keep a
reference), and the very tensor a block returned, at the version it returned.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.modules import module as nn_module

from flashsvd.kernels.norm import add_layer_norm

__all__ = ["inference", "mark_owned", "may_overwrite", "observed", "post_norm"]


def inference(*tensors: torch.Tensor) -> bool:
    """No autograd graph is being built through ``tensors``."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def post_norm(
    h: torch.Tensor,
    x: torch.Tensor,
    output: nn.Module,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``output.LayerNorm(output.dropout(h) + x)``: a post-LN encoder's residual add and norm, one kernel.

    ``output`` is HF's ``*Output`` module (BERT).  ``h`` must be the caller's own temporary: in
    inference the result overwrites it (or ``out``, e.g. ``x`` itself when the caller may overwrite it).
    """
    h = output.dropout(h)
    ln = output.LayerNorm
    if not inference(h, x, ln.weight):
        out = None
    elif out is None:
        out = h
    return add_layer_norm(h, x, ln.weight, ln.bias, ln.eps, backend=backend, out=out)


class _Owned:
    """The last tensor a runtime block returned for a next block to overwrite (held weakly)."""

    ref: weakref.ref | None = None
    version: int | None = None


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version  # inference tensors keep no version counter


def mark_owned(t: torch.Tensor) -> None:
    """Record ``t`` (just created by a runtime block) as overwritable by the block that consumes it."""
    if not torch.compiler.is_compiling():
        _Owned.ref, _Owned.version = weakref.ref(t), _version(t)


def observed(*modules: nn.Module, subtrees: bool = True) -> bool:
    """Whether a forward hook could see what ``modules`` compute: a global hook, or one on a module
    of ``modules`` (and, with ``subtrees``, on any of their submodules).  Runtime paths that skip a
    module call (or overwrite what it returned) ask this first."""
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return True
    mods = (m for root in modules for m in root.modules()) if subtrees else modules
    return any(m._forward_hooks or m._forward_pre_hooks for m in mods)


def may_overwrite(x: torch.Tensor, *seen_by: nn.Module) -> bool:
    """``x`` is the tensor :func:`mark_owned` recorded, unchanged, and nothing can hold it.

    ``seen_by``: every module whose hooks could have seen ``x`` (its producer, the consumer).
    """
    if torch.compiler.is_compiling() or not inference(x) or not x.is_contiguous():
        return False
    ref = _Owned.ref
    if ref is None or ref() is not x or _version(x) != _Owned.version:
        return False
    return not observed(*seen_by)
