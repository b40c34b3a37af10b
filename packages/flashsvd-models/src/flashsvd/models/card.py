"""The ``README.md`` model card every checkpoint carries, so that ``push_to_hub`` gives a useful page.

It is written from the checkpoint's own compression block (what was done, with which numbers), never
from the source model's card: that one describes a different, dense model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["model_card"]


def _ranks_summary(ranks: Mapping[str, int | None]) -> str:
    kept = [r for r in ranks.values() if r is not None]
    dense = sum(1 for r in ranks.values() if r is None)
    if not kept:
        return f"all {dense} targeted layers kept dense"
    return (
        f"{len(kept)} layers factorized, rank {min(kept)}–{max(kept)} (median {sorted(kept)[len(kept) // 2]}); "
        f"{dense} kept dense"
    )


def model_card(
    block: Mapping[str, Any], *, source: str | None = None, metrics: Mapping[str, Any] | None = None
) -> str:
    """Markdown model card for a checkpoint whose ``quantization_config`` block is ``block``."""
    base = block.get("base_model_type", "?")
    method = block.get("method", "?")
    hub_id = (
        source
        if source and "/" in source and not Path(source).exists() and not Path(source).is_absolute()
        else None
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags: [flashsvd, low-rank, svd, compressed]",
        *([f"base_model: {hub_id}"] if hub_id else []),
        "---",
        "",
        f"# {Path(source).name if source and not hub_id else source or base} compressed with FlashSVD ({method})",
        "",
        "Low-rank factorization of the linear layers (each `W` replaced by `u · v`), saved by",
        "[FlashSVD](https://pypi.org/project/flashsvd-models/). The weights are not quantized; they are",
        "smaller matrices.",
        "",
        "| | |",
        "| --- | --- |",
        f"| source model | {source or 'unknown'} ({base}) |",
        f"| method | `{method}` |",
        f"| keep_ratio (targeted parameters kept) | {block.get('keep_ratio')} (exactly {block.get('kept_fraction')}) |",
        f"| parameters | {block.get('params_after')} of {block.get('params_before')} |",
        f"| targeted parameters | {block.get('target_params_after')} of {block.get('target_params_before')} |",
        f"| ranks | {_ranks_summary(block.get('ranks') or {})} (all in `config.json`) |",
    ]
    recipe = block.get("recipe")
    if isinstance(recipe, Mapping) and recipe:
        shown = ", ".join(f"{k}={v}" for k, v in recipe.items() if v not in (None, False, [], {}, ""))
        lines.append(f"| recipe | {shown} (all of it in `config.json`) |")
    calib = block.get("calibration") or {}
    if calib:
        lines.append("| calibration | " + ", ".join(f"{k}={v}" for k, v in sorted(calib.items())) + " |")
    if metrics:
        lines += ["", "## Measured", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import flashsvd.models  # pip install flashsvd-models",
        "from transformers import AutoModel",
        "",
        'model = AutoModel.from_pretrained("this-folder")  # or trust_remote_code=True without the import',
        'flashsvd.models.set_backend(model, "flash")  # fused low-rank kernels on CUDA',
        "```",
        "",
        "Runtimes that only read dense weights (vLLM, TGI, llama.cpp) need `flashsvd export --dense`,",
        "which multiplies the factors back: same outputs, no memory or speed gain.",
        "",
    ]
    return "\n".join(lines)
