"""Architecture adapters (one file each), looked up by ``config.model_type``."""

from __future__ import annotations

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.adapters.bert import BertAdapter
from flashsvd.models.adapters.distilbert import DistilBertAdapter
from flashsvd.models.adapters.gpt2 import GPT2Adapter
from flashsvd.models.adapters.llama import LlamaAdapter
from flashsvd.models.adapters.modernbert import ModernBertAdapter

__all__ = ["ADAPTERS", "Adapter", "Target", "base_prefix", "get_adapter", "register"]

ADAPTERS: dict[str, type[Adapter]] = {
    t: cls
    for cls in (BertAdapter, DistilBertAdapter, GPT2Adapter, LlamaAdapter, ModernBertAdapter)
    for t in cls.model_types
}


def register(cls: type[Adapter], *, replace: bool = False) -> type[Adapter]:
    """Add an out-of-tree adapter for its ``model_types`` (refuses to shadow one unless ``replace``)."""
    for t in cls.model_types:
        if t in ADAPTERS and not replace:
            raise ValueError(
                f"an adapter for model_type {t!r} exists ({ADAPTERS[t].__name__}); pass replace=True"
            )
        ADAPTERS[t] = cls
    return cls


def get_adapter(model_or_config) -> Adapter:
    """The adapter for ``config.model_type`` (``ValueError`` listing the supported types otherwise)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"no flashsvd adapter for model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]()
