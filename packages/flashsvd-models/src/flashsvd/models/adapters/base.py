"""What every architecture adapter provides, and the registry keyed on ``config.model_type``.

An adapter answers three questions about a Hugging Face model, nothing else:

* **where** the compressible linear layers are (:meth:`Adapter.targets`): module paths, role
  (q/k/v/o/up/gate/down), head counts for per-head attention factors, fused-matrix slices
  (GPT-2 ``c_attn``, ModernBERT ``Wqkv``/``Wi``) and the ``Conv1D`` layout;
* **how** to install the flash runtime blocks (:meth:`Adapter.install_flash`);
* which layer a target belongs to (for sequential calibration).

Adding an architecture is one file: subclass :class:`Adapter` and list it in ``adapters/__init__.py``
(or call :func:`flashsvd.models.adapters.register` for an out-of-tree adapter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flashsvd.models.lowrank import dense_weight_and_bias
from flashsvd.models.runtime import get_module

__all__ = ["Adapter", "Target", "base_prefix"]


@dataclass(frozen=True)
class Target:
    """One compressible matrix.

    Attributes:
        name: module path of the low-rank layer *after* conversion (``...c_attn.parts.q`` for a fused part).
        source: path of the HF module holding the weight now (``...c_attn``).
        role: ``q``, ``k``, ``v``, ``o``, ``up``, ``gate`` or ``down``.
        layer: transformer block index.
        n_heads: heads for per-head factors (q/k/v), else ``None``.
        part: name of the slice in a fused matrix, or ``None``.
        rows: ``(start, stop)`` of the output rows of the slice in the fused matrix.
    """

    name: str
    source: str
    role: str
    layer: int
    n_heads: int | None = None
    part: str | None = None
    rows: tuple[int, int] | None = None

    @property
    def kind(self) -> str:
        """Rank-budget group (``flashsvd.methods.ranks.KINDS``)."""
        return {"q": "attn", "k": "attn", "v": "attn", "o": "wo"}.get(self.role, "ffn")

    def weight(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W [out, in], bias)`` of this target, read from the current (dense) model."""
        w, b = dense_weight_and_bias(get_module(model, self.source))
        if self.rows is not None:
            lo, hi = self.rows
            w, b = w[lo:hi], None if b is None else b[lo:hi]
        return w, b

    def is_conv1d(self, model: nn.Module) -> bool:
        return type(get_module(model, self.source)).__name__ == "Conv1D"


def base_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The base model (``model.base_model``) and its path prefix inside ``model`` (``""`` or ``"x."``)."""
    base = getattr(model, "base_model", model)
    for name, module in model.named_modules():
        if module is base:
            return base, (name + "." if name else "")
    return model, ""


class Adapter:
    """Base class; subclasses set ``model_types`` and implement the three methods."""

    model_types: tuple[str, ...] = ()
    #: whether the model is a causal decoder (generate, KV cache).
    decoder: bool = False

    def targets(self, model: nn.Module) -> list[Target]:
        raise NotImplementedError

    def install_flash(self, model: nn.Module, backend: str = "auto") -> list[str]:
        """Install runtime blocks; return human-readable notes about parts left on the torch path."""
        raise NotImplementedError

    def num_layers(self, model: nn.Module) -> int:
        return int(model.config.num_hidden_layers)
