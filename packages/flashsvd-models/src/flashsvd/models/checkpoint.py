"""Compressed checkpoints: ``save_compressed``, ``load``, ``merge_to_dense`` and skeleton rebuilding.

Format (a ``save_pretrained``-style folder, no pickle anywhere; ``format_version`` 2):

* ``config.json`` — the HF config with ``model_type: "flashsvd"``, an ``auto_map`` into the shim below,
  and a ``quantization_config`` block: ``quant_method: "flashsvd"``, the source ``base_model_type``,
  method, keep_ratio, ranks per module (``null`` = dense), exact parameter counts, calibration summary,
  package versions, ``format_version``;
* ``flashsvd.safetensors`` — the state dict (low-rank layers as ``<path>.u``, ``<path>.v``, ``<path>.bias``;
  fused matrices as ``<path>.parts.<q|k|v|input|gate>.*``); tied tensors are stored once.  It is not called
  ``model.safetensors`` on purpose: a plain ``from_pretrained`` that does not know flashsvd must fail
  rather than load randomly initialised factors (:mod:`flashsvd.models.hf_integration`);
* ``flashsvd_auto.py`` — the ``trust_remote_code`` shim (it only imports ``flashsvd.models``);
* ``generation_config.json`` when the model has one, the tokenizer when one is given, and every file of
  the source model folder that compression does not change (sentence-transformers' ``modules.json``,
  ``1_Pooling/``, ``config_sentence_transformers.json``, tokenizer files, ...).

Format 1 checkpoints (source ``model_type``, ``model.safetensors``) still load.

Rebuilding needs only the ranks: the adapter recomputes every target's geometry from the fresh HF
skeleton, so the same code serves :func:`load` and ``AutoModel*.from_pretrained`` (see
:mod:`flashsvd.models.hf_integration`).  Writes go to a temporary folder in the same parent and are
renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashsvd.models.adapters import Target, get_adapter
from flashsvd.models.lowrank import FusedLinear, LowRankLinear, dense_weight_and_bias
from flashsvd.models.runtime import get_module, set_module

__all__ = [
    "CheckpointError",
    "check_format",
    "FORMAT_VERSION",
    "attach_config",
    "flashsvd_block",
    "load",
    "merge_to_dense",
    "biased_targets",
    "rebuild_lowrank",
    "save_compressed",
]

FORMAT_VERSION = 2
WEIGHTS = "flashsvd.safetensors"
LEGACY_WEIGHTS = "model.safetensors"  # format 1
CONFIG = "config.json"
#: files and folders of a source model that a compressed checkpoint must not inherit: its dense weights
#: (in any format), the files we write ourselves, and the dense model's card
_NOT_INHERITED = {CONFIG, "generation_config.json", "README.md", "onnx", "openvino", ".git", ".cache"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".gguf", ".ckpt")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing a file, or holds a corrupt or inconsistent one."""


def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for dist in ("transformers", "safetensors", "flashsvd-models", "flashsvd-methods", "flashsvd-kernels"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def attach_config(model: nn.Module, report) -> None:
    """Record the compression in ``model.config.quantization_config`` (what checkpoints carry)."""
    block = {
        "quant_method": "flashsvd",
        "format_version": FORMAT_VERSION,
        "base_model_type": model.config.model_type,
        "method": report.method,
        "keep_ratio": report.keep_ratio,
        "kept_fraction": report.kept_fraction,
        "ranks": dict(report.ranks),
        # read by loaders that rebuild before they see the weights (transformers' quantizer hook)
        "biased": biased_targets(report.ranks, model.state_dict()),
        "dense_reasons": dict(report.dense),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "target_params_before": report.target_params_before,
        "target_params_after": report.target_params_after,
        "calibration": dict(report.calibration),
        "versions": _versions(),
    }
    # the typed Recipe (flashsvd.models.recipe) that made it: `flashsvd compress --recipe` reads it back
    recipe = getattr(report, "recipe", None)
    if recipe:
        block["recipe"] = dict(recipe)
    model.config.quantization_config = block


def flashsvd_block(config) -> dict[str, Any] | None:
    """The ``quantization_config`` block of a config if it is ours, else None.

    ``config`` is a config object or the parsed ``config.json`` (a dict): the one test of "is this a
    flashsvd checkpoint" for this package and the app.
    """
    q = (
        config.get("quantization_config")
        if isinstance(config, Mapping)
        else getattr(config, "quantization_config", None)
    )
    if q is None:
        return None
    d = q if isinstance(q, Mapping) else q.to_dict() if hasattr(q, "to_dict") else None
    return dict(d) if d and d.get("quant_method") == "flashsvd" else None


# ---- rebuilding a skeleton ---------------------------------------------------------------------------
def biased_targets(ranks: Mapping[str, int | None], keys: Iterable[str]) -> list[str]:
    """The factorized modules among ``ranks`` whose state (``keys``: state-dict names) holds a bias.

    Why: a centered fit (``Recipe.center``) folds the input mean into a bias, so a factorized module
    can carry one where the architecture has none (LLaMA's projections); rebuilding from the
    architecture alone would then drop it (:func:`rebuild_lowrank` takes these names).
    """
    keys = set(keys)
    return sorted(n for n, r in ranks.items() if r is not None and f"{n}.bias" in keys)


def _empty_like_target(t: Target, model: nn.Module, rank: int, device, dtype, bias: bool) -> LowRankLinear:
    w, b = t.weight(model)
    lr = LowRankLinear.empty(int(w.shape[1]), int(w.shape[0]), rank, n_heads=t.n_heads,
                             bias=bias or b is not None, device=device, dtype=dtype)  # fmt: skip
    lr.conv1d = t.is_conv1d(model) and t.part is None
    return lr


def rebuild_lowrank(
    model: nn.Module,
    ranks: Mapping[str, int | None],
    *,
    biased: Iterable[str] = (),
    device=None,
    dtype=None,
) -> nn.Module:
    """Replace the targets of a fresh HF ``model`` by empty low-rank modules of the recorded ranks.

    ``biased`` names the factorized modules that hold a bias the architecture's module lacks
    (:func:`biased_targets`). The model then has exactly the state-dict keys and shapes of the saved
    compressed model.
    """
    biased = set(biased)
    targets = get_adapter(model).targets(model)
    known = {t.name for t in targets}
    unknown = sorted(set(ranks) - known)
    if unknown:
        raise CheckpointError(
            f"{CONFIG}: quantization_config.ranks names modules this architecture does not have: {unknown[:4]}"
        )
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        r = ranks.get(t.name)
        if t.part is not None:
            groups[t.source].append(t)
            continue
        if r is not None:
            src_w = get_module(model, t.source)
            p = next(src_w.parameters())
            set_module(
                model,
                t.name,
                _empty_like_target(t, model, int(r), device or p.device, dtype or p.dtype, t.name in biased),
            )
    for source, parts in groups.items():
        if all(ranks.get(p.name) is None for p in parts):
            continue
        mod = get_module(model, source)
        p0 = next(mod.parameters())
        dev, dt = device or p0.device, dtype or p0.dtype
        conv = parts[0].is_conv1d(model)
        built: dict[str, nn.Module] = {}
        for p in sorted(parts, key=lambda p: p.rows[0]):
            r = ranks.get(p.name)
            if r is not None:
                built[p.part] = _empty_like_target(p, model, int(r), dev, dt, p.name in biased)
            else:
                w, b = p.weight(model)
                built[p.part] = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=dev, dtype=dt)
        fused = FusedLinear(built)
        fused.conv1d = conv
        set_module(model, source, fused)
    return model


# ---- merge ----------------------------------------------------------------------------------------
def _dense_module(weight: torch.Tensor, bias: torch.Tensor | None, conv1d: bool) -> nn.Module:
    out_f, in_f = weight.shape
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        m = Conv1D(out_f, in_f).to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            m.weight.copy_(weight.T)
            m.bias.copy_(bias if bias is not None else torch.zeros_like(m.bias))
        return m
    m = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _bias_keys(model: nn.Module, config) -> set[str]:
    """The bias names of a fresh ``type(model)`` built from ``config`` (on the meta device: no memory)."""
    with torch.device("meta"):
        fresh = type(model)._from_config(config)
    return {k for k in fresh.state_dict() if k.endswith(".bias")}


def _declare_added_biases(model: nn.Module) -> None:
    """Make a merged model's config declare the biases a centered fit added, or refuse.

    Why: a plain Hugging Face loader builds modules from the config and drops weights it has no place
    for, so a merged LLaMA whose projections carry the biases of a centered fit would load silently
    wrong. Where the config has a switch (``attention_bias``, ``mlp_bias``) it is turned on, and the
    modules it gives a bias that the fit did not get a zero one; anything still without a place raises.
    """
    have = {k for k in model.state_dict() if k.endswith(".bias")}
    expected = _bias_keys(model, model.config)
    for flag in ("attention_bias", "mlp_bias"):
        if have <= expected or getattr(model.config, flag, None) is not False:
            continue
        trial = copy.deepcopy(model.config)
        setattr(trial, flag, True)
        more = _bias_keys(model, trial)
        if (more - expected) & have:
            setattr(model.config, flag, True)
            expected = more
    extra = sorted(have - expected)
    if extra:
        raise CheckpointError(
            f"a dense {model.config.model_type} has no bias at {', '.join(extra[:3])}"
            f"{' …' if len(extra) > 3 else ''}, which a centered fit (recipe center: true) gave these "
            "layers: a plain loader would drop them. Keep the compressed checkpoint (no dense export) or "
            "compress with a recipe without center."
        )
    for key in sorted(expected - have):  # declared by the switch, not fitted: zero
        mod = get_module(model, key[: -len(".bias")])
        mod.bias = nn.Parameter(
            torch.zeros(mod.weight.shape[0], device=mod.weight.device, dtype=mod.weight.dtype)
        )


def merge_to_dense(model: nn.Module) -> nn.Module:
    """Multiply every low-rank layer back into a dense one (``nn.Linear`` or ``Conv1D``), in place.

    The result is a plain HF model (torch backend, no ``quantization_config``) that ``save_pretrained``
    writes as an ordinary checkpoint; biases a centered fit added are declared in its config
    (``attention_bias``/``mlp_bias``) or refused with a :class:`CheckpointError`.
    """
    from flashsvd.models.backend import set_backend

    set_backend(model, "torch")
    with torch.no_grad():
        for name, mod in list(model.named_modules()):
            if isinstance(mod, FusedLinear):
                set_module(
                    model,
                    name,
                    _dense_module(mod.merged_weight(), mod.merged_bias(), getattr(mod, "conv1d", False)),
                )
        for name, mod in list(model.named_modules()):
            if isinstance(mod, LowRankLinear):
                w, b = dense_weight_and_bias(mod)
                set_module(model, name, _dense_module(w, b, getattr(mod, "conv1d", False)))
    if flashsvd_block(model.config) is not None:
        del model.config.quantization_config
    _declare_added_biases(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model


# ---- save -----------------------------------------------------------------------------------------
def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (first name in module order wins), contiguous, on CPU."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out


def _config_dict(model: nn.Module) -> dict[str, Any]:
    """``config.json`` contents: the model's config under ``model_type: "flashsvd"`` with the shim's ``auto_map``."""
    from flashsvd.models.hf_integration import MODEL_TYPE, auto_map

    model.config.architectures = [type(model).__name__]
    d = model.config.to_dict()
    block = dict(d["quantization_config"])
    block.setdefault("base_model_type", d.get("model_type"))
    block["format_version"] = FORMAT_VERSION
    d["quantization_config"] = block
    d["model_type"] = MODEL_TYPE
    d["auto_map"] = auto_map()
    return d


def _source_folder(model: nn.Module, source) -> Path | None:
    if source is not None:
        return Path(source)
    name = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    return Path(name) if name and Path(name).is_dir() else None


def _copy_source_files(source: Path, dest: Path) -> None:
    """Copy what compression leaves unchanged (pooling, tokenizer, sentence-transformers files...)."""
    for item in sorted(source.iterdir()):
        if item.name in _NOT_INHERITED or item.name.startswith(".") or item.name.endswith(_WEIGHT_SUFFIXES):
            continue
        if item.name.endswith(".index.json") or (dest / item.name).exists():
            continue
        if item.is_dir():
            shutil.copytree(
                item, dest / item.name, ignore=shutil.ignore_patterns(*[f"*{x}" for x in _WEIGHT_SUFFIXES])
            )
        elif item.is_file():
            shutil.copy2(item, dest / item.name)


def save_compressed(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    overwrite: bool = True,
    tokenizer=None,
    source: str | os.PathLike | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (compressed by :func:`flashsvd.models.compress`) to ``folder`` atomically.

    Args:
        tokenizer: saved beside the model when given.
        source: the source model folder whose unchanged files (sentence-transformers modules, pooling
            config, tokenizer files) are kept; default: the folder the model was loaded from, if local.
        metrics: measured figures for the model card (``README.md``), e.g. ``{"STS-B Spearman": 0.80}``.
    """
    from safetensors.torch import save_file

    from flashsvd.models.card import model_card
    from flashsvd.models.hf_integration import SHIM_FILE, shim_source

    block = flashsvd_block(model.config)
    if block is None:
        raise ValueError(
            "model has no flashsvd quantization_config: compress it with flashsvd.models.compress first"
        )
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_file(
            _dedup_state_dict(model),
            str(tmp / WEIGHTS),
            metadata={"format": "pt", "quant_method": "flashsvd"},
        )
        (tmp / CONFIG).write_text(json.dumps(_config_dict(model), indent=2, sort_keys=True) + "\n")
        (tmp / SHIM_FILE).write_text(shim_source())
        src = _source_folder(model, source)
        name = getattr(model, "name_or_path", None) or (src.name if src is not None else None)
        (tmp / "README.md").write_text(model_card(block, source=name, metrics=metrics))
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if src is not None and src.resolve() != folder.resolve():
            _copy_source_files(src, tmp)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---- load -----------------------------------------------------------------------------------------
def check_format(block: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse a checkpoint whose ``format_version`` this flashsvd-models cannot read (a newer one)."""
    version = block.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{path}: quantization_config.format_version must be an integer, got {version!r}"
        )
    if version > FORMAT_VERSION:
        made_by = (block.get("versions") or {}).get("flashsvd-models", "a newer version")
        raise CheckpointError(
            f"{path} is a checkpoint in format {version}, written by flashsvd-models {made_by}; the installed "
            f"flashsvd-models {_versions()['flashsvd-models']} reads format {FORMAT_VERSION} at most: "
            "upgrade flashsvd-models"
        )


def _check_block(block: Mapping[str, Any], path: Path) -> None:
    """Refuse a compression block whose fields would build a wrong model (clear messages, no tracebacks)."""
    check_format(block, path)
    ranks = block.get("ranks")
    if not isinstance(ranks, Mapping):
        raise CheckpointError(f"{path}: quantization_config.ranks is missing or not a mapping")
    for name, r in ranks.items():
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise CheckpointError(
                f"{path}: quantization_config.ranks[{name!r}] is {r!r}; a rank must be a positive integer "
                "(or null for a layer kept dense)"
            )


def read_config(folder: str | os.PathLike):
    """The source architecture's HF config of a checkpoint folder (with its ``quantization_config``).

    Every problem is a :class:`CheckpointError` that names the file: missing, not JSON, not a flashsvd
    checkpoint (no block, or another quantization method), a field of the wrong type, a bad rank.
    """
    from flashsvd.models.hf_integration import MODEL_TYPE, _base_config

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a saved model folder (or an interrupted save)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is corrupt")
    q = d.get("quantization_config")
    if not isinstance(q, Mapping) or q.get("quant_method") != "flashsvd":
        found = q.get("quant_method") if isinstance(q, Mapping) else None
        raise CheckpointError(
            f"{path} has no quantization_config with quant_method 'flashsvd'"
            + (f" (it is a {found!r} checkpoint)" if found else "")
            + ": not a flashsvd checkpoint"
        )
    _check_block(q, path)
    try:
        if d.get("model_type") == MODEL_TYPE:
            config = _base_config(d)
        else:  # format 1: the source model_type
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except CheckpointError:
        raise
    except Exception as e:  # transformers' validation errors differ by version: report them all the same way
        raise CheckpointError(f"{path}: invalid config ({type(e).__name__}: {e})") from e
    return config


def weights_path(folder: str | os.PathLike) -> Path:
    """The checkpoint's weights file (``flashsvd.safetensors``; ``model.safetensors`` in format 1)."""
    folder = Path(folder)
    path = folder / WEIGHTS
    if not path.is_file() and (folder / LEGACY_WEIGHTS).is_file():
        return folder / LEGACY_WEIGHTS
    return path


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = weights_path(folder)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from e


def base_prefix(model: nn.Module) -> str | None:
    """The ``base_model_prefix`` under which ``model`` holds its base model (a task model), else None.

    Names outside it belong to a task head: the one part of a model that may be new when loading.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else None


def _retarget(model: nn.Module, state: dict, ranks: Mapping[str, Any]) -> tuple[dict, dict]:
    """Move saved names onto ``model`` when it is the base of the saved class or a head over it.

    HF lets ``AutoModel`` load a ``...ForSequenceClassification`` checkpoint (and the reverse): names
    gain or lose the ``base_model_prefix``.  Only the prefix moves; nothing else is renamed.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return state, dict(ranks)
    saved_has_prefix = any(k.startswith(prefix + ".") for k in state)
    model_has_prefix = base_prefix(model) is not None
    if saved_has_prefix and not model_has_prefix:  # head checkpoint -> base model
        n = len(prefix) + 1
        return (
            {k[n:]: v for k, v in state.items() if k.startswith(prefix + ".")},
            {k[n:]: r for k, r in ranks.items() if k.startswith(prefix + ".")},
        )
    if model_has_prefix and not saved_has_prefix:  # base checkpoint -> head model
        return {f"{prefix}.{k}": v for k, v in state.items()}, {f"{prefix}.{k}": r for k, r in ranks.items()}
    return state, dict(ranks)


def load(
    folder: str | os.PathLike,
    *,
    backend: str = "torch",
    device=None,
    dtype=None,
    model_class=None,
    config=None,
):
    """Rebuild a compressed model saved by :func:`save_compressed` (no pickle, no remote code).

    Every tensor of the compressed layers (and of the rest of the base model) must be in the file:
    anything missing is a :class:`CheckpointError`, never a randomly initialised layer.  Only a task
    head that the saved model did not have (``AutoModelForSequenceClassification`` on a base-model
    checkpoint) is initialised fresh, with a warning, as ``transformers`` does.

    Args:
        folder: the checkpoint folder.
        backend: ``"torch"`` or ``"flash"``.
        device, dtype: where/how to materialize (default: CPU, the saved dtype).
        model_class: the HF class to build (default: ``config.architectures[0]`` from ``transformers``).
        config: the source config to build with (default: read from ``folder``; loaders pass one that
            already holds the user's overrides, e.g. ``num_labels``).
    """
    import transformers

    from flashsvd.models.backend import set_backend

    folder = Path(folder)
    file_config = read_config(folder)
    block = flashsvd_block(file_config)
    config = file_config if config is None else config
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise CheckpointError(f"{folder / CONFIG}: unknown architectures {arch!r}; pass model_class=")
    state = read_weights(folder)
    saved_q = block
    config.quantization_config = None
    del config.quantization_config
    first = next(iter(state.values()), None)
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else None)
    try:
        model = model_class._from_config(config, dtype=dtype) if dtype else model_class._from_config(config)
        state, ranks = _retarget(model, state, block["ranks"])
        rebuild_lowrank(model, ranks, biased=biased_targets(ranks, state), dtype=dtype)
    except CheckpointError:
        raise
    except (AttributeError, TypeError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(
            f"{folder / CONFIG}: cannot rebuild a {model_class.__name__} from this checkpoint "
            f"({type(e).__name__}: {e}); is the config of another architecture?"
        ) from e
    expected = model.state_dict()
    bad = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{weights_path(folder)}: tensors with unexpected shapes, e.g. {bad[:3]}")
    result = model.load_state_dict(state, strict=False)
    _check_keys(
        model,
        folder,
        result.missing_keys,
        result.unexpected_keys,
        same_class=arch_matches(file_config, model),
    )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config.quantization_config = saved_q
    if device is not None:
        model.to(device)
    model.eval()
    set_backend(model, backend)
    return model


def arch_matches(config, model: nn.Module) -> bool:
    """Whether ``model`` is the class the checkpoint was saved from."""
    return type(model).__name__ in (getattr(config, "architectures", None) or [])


def _check_keys(model: nn.Module, folder: Path, missing, unexpected, *, same_class: bool) -> None:
    """Missing base-model tensors are an error; a new or dropped task head is a warning (HF's rule)."""
    import warnings

    tied = _tied_keys(model)
    missing = [k for k in missing if k not in tied]
    prefix = base_prefix(model)

    def in_head(k: str) -> bool:
        return not same_class and prefix is not None and not k.startswith(prefix + ".")

    hard_missing = [k for k in missing if not in_head(k)]
    hard_unexpected = [
        k for k in unexpected if same_class or (prefix is not None and k.startswith(prefix + "."))
    ]
    if hard_missing or hard_unexpected:
        raise CheckpointError(
            f"{weights_path(folder)} does not match the architecture: missing {hard_missing[:4]}"
            f"{' (and more)' if len(hard_missing) > 4 else ''}, unexpected {hard_unexpected[:4]}; "
            "the file is incomplete or belongs to another model (nothing is loaded with random weights)"
        )
    new_head = [k for k in missing if in_head(k)]
    if new_head:
        warnings.warn(
            f"{type(model).__name__}: newly initialized task-head weights (not in the checkpoint): {new_head[:4]}; "
            "train them before use",
            stacklevel=3,
        )


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys whose tensor is shared with an earlier key (stored once by save_compressed)."""
    seen, tied = set(), set()
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            tied.add(k)
        seen.add(key)
    tk = getattr(model, "_tied_weights_keys", None) or {}
    tied |= set(tk if not isinstance(tk, Mapping) else tk.keys())
    return tied
