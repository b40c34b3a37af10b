"""Let ``AutoModel*.from_pretrained(folder)`` rebuild flashsvd checkpoints.

``transformers`` dispatches on ``config.json``'s ``quantization_config.quant_method``; we register a
config class and an ``HfQuantizer`` for ``"flashsvd"`` whose only job is to replace the target
layers of the freshly built (meta-device) skeleton with empty low-rank modules of the recorded ranks
before the weights are loaded (:func:`flashsvd.models.checkpoint.rebuild_lowrank`).  Nothing is
quantized; the weights are loaded as ordinary floating-point tensors.

:func:`register` is called by ``import flashsvd.models`` (that is the documented way to enable
``from_pretrained``); it is idempotent.  If a future ``transformers`` drops the registration API,
``flashsvd.models.load(folder)`` keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]

_REGISTERED = False


def register() -> bool:
    """Register the ``flashsvd`` quantization config and quantizer with transformers (once)."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - older/newer transformers without the API
        return False
    if "flashsvd" in AUTO_QUANTIZER_MAPPING:
        _REGISTERED = True
        return True

    @register_quantization_config("flashsvd")
    class FlashSVDConfig(QuantizationConfigMixin):
        """The ``quantization_config`` block of a flashsvd checkpoint (see ``checkpoint.py``)."""

        def __init__(self, ranks: dict[str, int | None] | None = None, **kwargs: Any) -> None:
            self.quant_method = "flashsvd"
            self.ranks = dict(ranks or {})
            for k, v in kwargs.items():
                if k != "quant_method":
                    setattr(self, k, v)

        def to_dict(self) -> dict[str, Any]:
            d = dict(self.__dict__)
            d["quant_method"] = "flashsvd"
            return d

    @register_quantizer("flashsvd")
    class FlashSVDQuantizer(HfQuantizer):
        """Rebuilds the low-rank skeleton before HF loads the weights."""

        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            from flashsvd.models.checkpoint import rebuild_lowrank

            rebuild_lowrank(model, self.quantization_config.ranks)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from flashsvd.models.backend import set_backend

            set_backend(model, "torch")
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

    _REGISTERED = True
    return True
