"""Where and how a command runs: device and dtype checks, and the provenance stamped on every result."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from flashsvd.app.errors import AppError

DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16"}
DTYPES.update({"bfloat16": "bfloat16", "bf16": "bfloat16"})


def resolve_device(device: str | None) -> Any:
    """``auto`` (or None) → CUDA when present else CPU; a CUDA request without CUDA is an error."""
    import torch

    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise AppError(f"unknown device {device!r}", hint="use cpu, cuda, cuda:N or auto") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AppError(
            f"--device {device} was requested but CUDA is not available "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}).",
            hint="use --device cpu (or auto), or install a CUDA build of torch.",
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise AppError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present.")
    return dev


def resolve_dtype(dtype: str | None, device: Any, model_dtype: str | None = None) -> Any:
    """``auto`` → float32 on CPU; on CUDA the model's own half dtype (``model_dtype``, the config's
    ``dtype``: bfloat16 for LLaMA-family models, whose activations overflow float16), else float16.
    Otherwise one of float32/float16/bfloat16."""
    import torch

    name = (dtype or "auto").lower()
    if name == "auto":
        if getattr(device, "type", "cpu") != "cuda":
            return torch.float32
        return torch.bfloat16 if str(model_dtype).removeprefix("torch.") == "bfloat16" else torch.float16
    if name not in DTYPES:
        raise AppError(f"unknown dtype {dtype!r}", hint="use auto, float32, float16 or bfloat16.")
    return getattr(torch, DTYPES[name])


def launched_rank() -> int:
    """This process's rank under ``torchrun`` / ``accelerate launch`` (0 without a launcher).

    Read from the launcher's environment, so a command can decide who prints and writes before a process
    group exists (transformers' Trainer joins it only when it is built)."""
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of processes the launcher started (1 without one); see :func:`launched_rank`."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device_description(device: Any) -> str:
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """Installed versions of the four flashsvd packages and the libraries results depend on."""
    out = {"python": platform.python_version()}
    for dist in ("flashsvd-app", "flashsvd-models", "flashsvd-methods", "flashsvd-kernels"):
        out[dist] = _version(dist)
    for dist in ("torch", "transformers", "triton"):
        out[dist] = _version(dist)
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the git checkout around ``start`` (or this source file), or None outside one."""
    where = start or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(device: Any) -> dict[str, Any]:
    """Device, versions, git commit and time: the block every result file carries."""
    return {
        "device": str(device),
        "device_name": device_description(device),
        "versions": versions(),
        "git_commit": git_commit(),
        "timestamp": timestamp(),
        "platform": platform.platform(),
    }
