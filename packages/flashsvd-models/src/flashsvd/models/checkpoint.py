"""Compressed checkpoints: ``save_compressed``, ``load``, ``merge_to_dense`` and skeleton rebuilding.

Format (a ``save_pretrained``-style folder, no pickle anywhere):

* ``config.json`` — the HF config plus a ``quantization_config`` block with ``quant_method:
  "flashsvd"``: method, keep_ratio, ranks per module (``null`` = dense), exact parameter counts,
  calibration summary, package versions, ``format_version``;
* ``model.safetensors`` — the state dict (low-rank layers as ``<path>.u``, ``<path>.v``, ``<path>.bias``;
  fused matrices as ``<path>.parts.<q|k|v|input|gate>.*``); tied tensors are stored once;
* ``generation_config.json`` when the model has one.

Rebuilding needs only the ranks: the adapter recomputes every target's geometry from the fresh HF
skeleton, so the same code serves :func:`load` and ``AutoModel*.from_pretrained`` (see
:mod:`flashsvd.models.hf_integration`).  Writes go to a temporary folder in the same parent and are
renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flashsvd.models.adapters import Target, get_adapter
from flashsvd.models.lowrank import FusedLinear, LowRankLinear, dense_weight_and_bias
from flashsvd.models.runtime import get_module, set_module

__all__ = [
    "CheckpointError",
    "FORMAT_VERSION",
    "attach_config",
    "flashsvd_block",
    "load",
    "merge_to_dense",
    "rebuild_lowrank",
    "save_compressed",
]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


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
        "method": report.method,
        "keep_ratio": report.keep_ratio,
        "kept_fraction": report.kept_fraction,
        "ranks": dict(report.ranks),
        "dense_reasons": dict(report.dense),
        "params_before": report.params_before,
        "params_after": report.params_after,
        "target_params_before": report.target_params_before,
        "target_params_after": report.target_params_after,
        "calibration": dict(report.calibration),
        "versions": _versions(),
    }
    model.config.quantization_config = block


def flashsvd_block(config) -> dict[str, Any] | None:
    """The ``quantization_config`` block of a config if it is ours (dict or config object), else None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    d = q if isinstance(q, Mapping) else q.to_dict() if hasattr(q, "to_dict") else None
    return dict(d) if d and d.get("quant_method") == "flashsvd" else None


# ---- rebuilding a skeleton ---------------------------------------------------------------------------
def _empty_like_target(t: Target, model: nn.Module, rank: int, device, dtype) -> LowRankLinear:
    w, b = t.weight(model)
    lr = LowRankLinear.empty(int(w.shape[1]), int(w.shape[0]), rank, n_heads=t.n_heads, bias=b is not None,
                             device=device, dtype=dtype)  # fmt: skip
    lr.conv1d = t.is_conv1d(model) and t.part is None
    return lr


def rebuild_lowrank(
    model: nn.Module, ranks: Mapping[str, int | None], *, device=None, dtype=None
) -> nn.Module:
    """Replace the targets of a fresh HF ``model`` by empty low-rank modules of the recorded ranks.

    The model then has exactly the state-dict keys and shapes of the saved compressed model.
    """
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
                model, t.name, _empty_like_target(t, model, int(r), device or p.device, dtype or p.dtype)
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
                built[p.part] = _empty_like_target(p, model, int(r), dev, dt)
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


def merge_to_dense(model: nn.Module) -> nn.Module:
    """Multiply every low-rank layer back into a dense one (``nn.Linear`` or ``Conv1D``), in place.

    The result is a plain HF model (torch backend, no ``quantization_config``) that ``save_pretrained``
    writes as an ordinary checkpoint.
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


def save_compressed(model: nn.Module, folder: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``model`` (compressed by :func:`flashsvd.models.compress`) to ``folder`` atomically."""
    from safetensors.torch import save_file

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
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(tmp)
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
def read_config(folder: str | os.PathLike):
    """The HF config of a checkpoint folder, with clear errors for a missing or corrupt ``config.json``."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder")
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: not a saved model folder (or an interrupted save)")
    try:
        json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is corrupt") from e
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    block = flashsvd_block(config)
    if block is None:
        raise CheckpointError(f"{path} has no quantization_config with quant_method 'flashsvd'")
    if int(block.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {block.get('format_version')} is newer than this flashsvd-models "
            f"supports ({FORMAT_VERSION}); upgrade flashsvd-models"
        )
    if not isinstance(block.get("ranks"), Mapping):
        raise CheckpointError(f"{path}: quantization_config.ranks is missing or not a mapping")
    return config


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from e


def load(folder: str | os.PathLike, *, backend: str = "torch", device=None, dtype=None, model_class=None):
    """Rebuild a compressed model saved by :func:`save_compressed` (no pickle, no remote code).

    Args:
        folder: the checkpoint folder.
        backend: ``"torch"`` or ``"flash"``.
        device, dtype: where/how to materialize (default: CPU, the saved dtype).
        model_class: the HF class to build (default: ``config.architectures[0]`` from ``transformers``).
    """
    import transformers

    from flashsvd.models.backend import set_backend

    config = read_config(folder)
    block = flashsvd_block(config)
    if model_class is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, arch, None) if arch else None
        if model_class is None:
            raise CheckpointError(
                f"{Path(folder) / CONFIG}: unknown architectures {arch!r}; pass model_class="
            )
    state = read_weights(folder)
    saved_q = config.quantization_config
    config.quantization_config = None
    del config.quantization_config
    first = next(iter(state.values()), None)
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else None)
    model = model_class._from_config(config, dtype=dtype) if dtype else model_class._from_config(config)
    rebuild_lowrank(model, block["ranks"], dtype=dtype)
    expected = model.state_dict()
    bad = [k for k, v in state.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if bad:
        raise CheckpointError(f"{Path(folder) / WEIGHTS}: tensors with unexpected shapes, e.g. {bad[:3]}")
    result = model.load_state_dict(state, strict=False)
    tied = _tied_keys(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{Path(folder) / WEIGHTS} does not match the architecture: missing {missing[:4]}, "
            f"unexpected {list(result.unexpected_keys)[:4]}"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config.quantization_config = saved_q
    if device is not None:
        model.to(device)
    model.eval()
    set_backend(model, backend)
    return model


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
