"""Make ``AutoModel*.from_pretrained(checkpoint)`` give the compressed model or a clear error, never random weights.

A checkpoint's ``config.json`` says ``model_type: "flashsvd"`` (the source architecture's type is kept in
``quantization_config.base_model_type``) and carries an ``auto_map`` that points at a tiny shim file saved
beside it (:data:`SHIM_FILE`).  That gives exactly three outcomes:

* ``import flashsvd.models`` first (it calls :func:`register`): ``"flashsvd"`` is a registered config type
  and every ``AutoModel*`` class maps it to a small loader class whose ``from_pretrained`` calls
  :func:`flashsvd.models.load` — one loader, which refuses a file that lacks any tensor the model needs;
* no import, ``trust_remote_code=True`` (lm-eval, ``pipeline``, sentence-transformers pass it through):
  transformers imports the shim, the shim imports ``flashsvd.models``, and the same loader runs (or the
  shim says ``pip install flashsvd-models``);
* no import and no ``trust_remote_code``: transformers does not know ``"flashsvd"`` and raises its own
  error asking for ``trust_remote_code=True``.  The weights file is not named ``model.safetensors``, so
  even ``BertModel.from_pretrained(checkpoint)`` fails loudly instead of loading random factors.

Registration is idempotent and done only by :func:`register` (``import flashsvd.models`` calls it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["AUTO_CLASSES", "SHIM_FILE", "auto_map", "register", "shim_source"]

MODEL_TYPE = "flashsvd"
SHIM_FILE = "flashsvd_auto.py"

#: transformers auto class -> the loader class name exported by the shim
AUTO_CLASSES = {
    "AutoModel": "FlashSVDModel",
    "AutoModelForCausalLM": "FlashSVDForCausalLM",
    "AutoModelForSequenceClassification": "FlashSVDForSequenceClassification",
    "AutoModelForMaskedLM": "FlashSVDForMaskedLM",
    "AutoModelForTokenClassification": "FlashSVDForTokenClassification",
    "AutoModelForQuestionAnswering": "FlashSVDForQuestionAnswering",
}

_CLASSES: dict[str, Any] = {}


def auto_map() -> dict[str, str]:
    """The ``auto_map`` a checkpoint's ``config.json`` carries (class references into the shim)."""
    stem = SHIM_FILE.removesuffix(".py")
    return {"AutoConfig": f"{stem}.FlashSVDConfig", **{a: f"{stem}.{c}" for a, c in AUTO_CLASSES.items()}}


def shim_source() -> str:
    """Text of the shim file saved in every checkpoint (what ``trust_remote_code=True`` imports)."""
    names = ", ".join(["FlashSVDConfig", *AUTO_CLASSES.values()])
    return (
        '"""Loads this FlashSVD checkpoint through transformers\' trust_remote_code.\n\n'
        "It only imports the installed ``flashsvd-models`` package (pip install flashsvd-models), which rebuilds\n"
        'the low-rank layers and checks that every tensor is present; nothing else runs from here."""\n\n'
        "try:\n"
        f"    from flashsvd.models.hf_integration import load_classes\n"
        "except ImportError as err:  # transformers' import check skips try blocks: this message is what users see\n"
        "    raise ImportError(\n"
        '        "this checkpoint was compressed with FlashSVD: `pip install flashsvd-models`, then load it again"\n'
        "    ) from err\n\n"
        f"{names} = load_classes()\n"
    )


def load_classes() -> tuple:
    """``(FlashSVDConfig, *loader classes in AUTO_CLASSES order)``, registering them with transformers."""
    register()
    return (_CLASSES["FlashSVDConfig"], *(_CLASSES[c] for c in AUTO_CLASSES.values()))


def _base_config(config_dict: dict[str, Any]):
    """The source architecture's config object from a checkpoint's ``config.json`` dict."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    d = dict(config_dict)
    block = d.get("quantization_config")
    if not isinstance(block, dict) or block.get("quant_method") != "flashsvd":
        raise ValueError(
            "config.json says model_type 'flashsvd' but has no quantization_config with quant_method 'flashsvd': "
            "the checkpoint was edited or is incomplete (its low-rank layers cannot be rebuilt)"
        )
    base = block.get("base_model_type")
    if not isinstance(base, str) or base not in CONFIG_MAPPING:
        raise ValueError(
            f"quantization_config.base_model_type is {base!r}: not an architecture this transformers knows"
        )
    d["model_type"] = base
    d.pop("auto_map", None)
    return CONFIG_MAPPING[base].from_dict(d)


def _resolve_folder(name_or_path, kwargs: dict[str, Any]) -> Path:
    path = Path(str(name_or_path))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    return Path(snapshot_download(str(name_or_path), **hub))


def _dtype(kwargs: dict[str, Any]):
    import torch

    value = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if value is None or value == "auto":
        return None
    return getattr(torch, value) if isinstance(value, str) else value


def _device(kwargs: dict[str, Any]):
    import torch

    dm = kwargs.get("device_map")
    if dm is None or isinstance(dm, dict):
        return None
    if dm == "auto":
        return "cuda" if torch.cuda.is_available() else None
    return dm


def register() -> bool:
    """Register the ``flashsvd`` config type and a loader class with every ``AutoModel*`` (once)."""
    if _CLASSES:
        return True
    import transformers
    from transformers import AutoConfig, PretrainedConfig

    class FlashSVDConfig(PretrainedConfig):
        """``config.json`` of a flashsvd checkpoint: the source config plus the compression block.

        Loader classes turn it back into the source architecture's config (:meth:`base_config`).
        """

        model_type = MODEL_TYPE

        def base_config(self):
            """The source architecture's config (with the ``quantization_config`` block)."""
            return _base_config(self.to_dict())

    AutoConfig.register(MODEL_TYPE, FlashSVDConfig, exist_ok=True)
    _CLASSES["FlashSVDConfig"] = FlashSVDConfig
    _register_quantization_method()

    for auto_name, cls_name in AUTO_CLASSES.items():
        auto_cls = getattr(transformers, auto_name)

        def from_pretrained(cls, name_or_path, *model_args, config=None, _auto=auto_cls, **kwargs):
            """Build the compressed model through :func:`flashsvd.models.load` (strict: no missing tensors)."""
            from flashsvd.models.checkpoint import load

            folder = _resolve_folder(name_or_path, kwargs)
            base = config.base_config() if isinstance(config, FlashSVDConfig) else None
            if base is None:
                from flashsvd.models.checkpoint import read_config

                base = read_config(folder)
            try:
                model_class = _auto._model_mapping[type(base)]
            except KeyError:
                raise ValueError(
                    f"{_auto.__name__} has no class for a {type(base).__name__} (model_type "
                    f"{base.model_type!r}); load this checkpoint with another Auto class or flashsvd.models.load"
                ) from None
            return load(
                folder, model_class=model_class, config=base, dtype=_dtype(kwargs), device=_device(kwargs)
            )

        loader = type(
            cls_name,
            (),
            {
                "__doc__": f"``{auto_name}`` entry for flashsvd checkpoints (returns the source architecture's class).",
                "config_class": FlashSVDConfig,
                "from_pretrained": classmethod(from_pretrained),
                "register_for_auto_class": classmethod(lambda cls, auto_class=None: None),
                "__module__": __name__,
            },
        )
        auto_cls.register(FlashSVDConfig, loader, exist_ok=True)
        _CLASSES[cls_name] = loader
    return True


def _register_quantization_method() -> None:
    """Make ``quant_method: "flashsvd"`` a known quantization config (and quantizer) to transformers.

    Tools that inspect a loaded model (lm-eval's ``HFLM``, ``save_pretrained``) parse
    ``config.quantization_config`` through ``AutoQuantizationConfig``; unregistered, they fail on our
    block.  The quantizer only rebuilds the low-rank skeleton if a caller goes through HF's own loading.
    """
    try:
        from transformers.quantizers.auto import (
            AUTO_QUANTIZER_MAPPING,
            register_quantization_config,
            register_quantizer,
        )
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:  # pragma: no cover - a transformers without the registration API
        return
    if MODEL_TYPE in AUTO_QUANTIZER_MAPPING:
        return

    @register_quantization_config(MODEL_TYPE)
    class FlashSVDQuantizationConfig(QuantizationConfigMixin):
        """The ``quantization_config`` block of a flashsvd checkpoint (see ``checkpoint.py``)."""

        def __init__(self, ranks: dict[str, int | None] | None = None, **kwargs: Any) -> None:
            self.quant_method = MODEL_TYPE
            self.ranks = dict(ranks or {})
            for k, v in kwargs.items():
                if k != "quant_method":
                    setattr(self, k, v)

        def to_dict(self) -> dict[str, Any]:
            d = dict(self.__dict__)
            d["quant_method"] = MODEL_TYPE
            return d

    @register_quantizer(MODEL_TYPE)
    class FlashSVDQuantizer(HfQuantizer):
        """Rebuilds the low-rank skeleton before HF loads the weights."""

        requires_calibration = False

        def _process_model_before_weight_loading(self, model, **kwargs):
            from flashsvd.models.checkpoint import rebuild_lowrank

            q = self.quantization_config
            rebuild_lowrank(model, q.ranks, biased=getattr(q, "biased", ()))
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
