"""LoRA adapters (peft) on compressed layers, for recovery fine-tuning that trains a few parameters.

peft only wraps layer types it knows; a :class:`~flashsvd.models.lowrank.LowRankLinear` is registered
through peft's custom-module dispatch (``LoraConfig._register_custom_module``), so the usual
``target_modules`` names (``q_proj``, ``up_proj``, ...) select compressed layers as they select dense
ones::

    from peft import get_peft_model
    from flashsvd.models.peft_lora import lora_config

    model = get_peft_model(model, lora_config(r=16, target_modules=["q_proj", "v_proj", "up_proj"]))

The adapter adds ``scale · B·A·x`` to the low-rank layer's output.  Training and evaluation run on the
``torch`` backend: the flash kernels read the factors directly and would skip the adapter, so
``set_backend(model, "flash")`` refuses a wrapped layer.  Adapters are not merged into the factors
(that would raise each rank by the adapter's): keep them separate, or ``merge_and_unload`` after
:func:`flashsvd.models.merge_to_dense`.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from flashsvd.models.lowrank import LowRankLinear

__all__ = ["lora_config", "register_lowrank"]


@cache
def _lora_layer_class() -> type:
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as err:
        raise ImportError(
            "LoRA on compressed layers needs peft: pip install 'flashsvd-models[peft]'"
        ) from err

    class LowRankLoraLinear(Linear):
        """peft's LoRA ``Linear`` around a :class:`LowRankLinear` base layer (forward: base + adapter)."""

        def _get_in_out_features(self, module):
            if isinstance(module, LowRankLinear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise NotImplementedError(
                "a LoRA adapter on a low-rank layer is kept unmerged (merging would raise its rank); "
                "merge the model to dense first (flashsvd.models.merge_to_dense) to merge adapters"
            )

    return LowRankLoraLinear


def register_lowrank(config: Any) -> Any:
    """Let a peft ``LoraConfig`` wrap :class:`LowRankLinear` layers; returns the same config."""
    config._register_custom_module({LowRankLinear: _lora_layer_class()})
    return config


def lora_config(**kwargs: Any) -> Any:
    """A ``peft.LoraConfig(**kwargs)`` that can target compressed (low-rank) layers."""
    try:
        from peft import LoraConfig
    except ImportError as err:
        raise ImportError(
            "LoRA on compressed layers needs peft: pip install 'flashsvd-models[peft]'"
        ) from err
    return register_lowrank(LoraConfig(**kwargs))
