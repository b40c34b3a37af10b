"""Scores on EleutherAI's lm-evaluation-harness, for the benchmarks LLaMA-family users report.

The harness takes an already-built model (``HFLM(pretrained=model)``), so a compressed model is scored
on the backend it was loaded with, flash or torch.  Offline, tasks read local files: a task YAML with
``dataset_path: csv`` (or ``json``) and ``dataset_kwargs.data_files``, in a folder passed as
``include_path``.  Online, the harness's own task names (``hellaswag``, ``arc_easy``, ``winogrande``,
``piqa``, ...) download their data sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashsvd.app.errors import AppError

__all__ = ["run_harness"]


def _import_harness():
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise AppError(
            "lm-evaluation-harness is not installed", hint="pip install 'flashsvd-app[lm-eval]' (or lm-eval)."
        ) from err
    return evaluator, HFLM, TaskManager


def run_harness(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate`` on ``model`` as it is."""
    evaluator, HFLM, TaskManager = _import_harness()
    if include_path is not None and not Path(include_path).is_dir():
        raise AppError(f"--lm-eval-include {include_path} is not a folder of task YAML files")
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise AppError(
            f"unknown lm-eval task(s): {', '.join(unknown)}",
            hint="use the harness's task names (lm-eval ls tasks) or a local YAML via --lm-eval-include.",
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = evaluator.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit)
    results: dict[str, dict[str, float]] = {}
    for task, metrics in (out or {}).get("results", {}).items():
        results[task] = {
            k.replace(",none", ""): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and k != "alias"
        }
    return results
