"""Evaluation tasks: GLUE classification/regression, zero-shot STS for embedding models, causal-LM perplexity."""

from flashsvd.app.tasks.registry import TASKS, TaskSpec, get_task

__all__ = ["TASKS", "TaskSpec", "get_task"]
