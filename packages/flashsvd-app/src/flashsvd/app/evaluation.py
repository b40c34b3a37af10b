"""The app side of evaluation: choose how to score a model on a task, score it, measure it, describe it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flashsvd.app.console import Console
from flashsvd.app.errors import AppError
from flashsvd.app.measurement import DEFINITIONS, measure_forward
from flashsvd.app.modelio import ModelSource, flashsvd_block, read_config
from flashsvd.app.tasks import runner
from flashsvd.app.tasks.data import Columns, Examples, load_examples, load_text
from flashsvd.app.tasks.registry import TaskSpec


def mode_for(spec: TaskSpec, head: str, zero_shot: bool | None = None) -> str:
    """``perplexity``, ``head`` (the model's task head) or ``zero-shot`` (embedding cosine, STS-B)."""
    if spec.kind == "perplexity":
        if head != "causal-lm":
            raise AppError(f"task {spec.name} needs a causal language model, got a {head} model")
        return "perplexity"
    if zero_shot or (zero_shot is None and head == "base"):
        if spec.name != "stsb":
            raise AppError(
                f"the model has no task head, and only stsb can be scored zero-shot (got {spec.name})",
                hint=f"fine-tune first: flashsvd finetune --model ... --task {spec.name}",
            )
        return "zero-shot"
    if head != "classification":
        raise AppError(
            f"a {head} model cannot be scored on {spec.name}", hint="use a sequence-classification model."
        )
    return "head"


def load_data(
    spec: TaskSpec,
    mode: str,
    split: str,
    data_file: Path | None,
    data_dir: Path | None,
    columns: Columns | None,
    max_samples: int | None,
    seed: int,
) -> Examples | tuple[str, str]:
    if mode == "perplexity":
        return load_text(spec, "test" if split == "dev" else split, data_file, data_dir)
    fallback = ("train",) if mode == "zero-shot" else ()  # nothing is trained on it
    return load_examples(spec, split, data_file, data_dir, columns, fallback).subset(max_samples, seed)


def fallback_note(data: Any, split: str) -> str | None:
    """The on-screen note when ``data`` comes from another split than the one asked for."""
    used = getattr(data, "fallback_split", None)
    if used is None:
        return None
    return (f"note: no {split} file for this task, so the {used} split is scored ({data.source}); "
            f"the figure is not comparable with published {split} results")  # fmt: skip


def score(
    model: Any,
    tokenizer: Any,
    spec: TaskSpec,
    mode: str,
    data: Any,
    *,
    batch_size: int,
    max_length: int,
    device: Any,
    console: Console,
    seq_len: int = 512,
    max_tokens: int | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` on ``data`` plus the measured batch (for memory/latency)."""
    if mode == "perplexity":
        text, source = data
        res = runner.perplexity(model, tokenizer, text, seq_len, max_tokens, device, console.progress)
        ids = tokenizer(text[: 20 * seq_len], return_tensors="pt", add_special_tokens=False).input_ids[
            :, :seq_len
        ]
        return {"metrics": {"perplexity": res.pop("perplexity")}, "details": res, "data": source,
                "n_examples": res["windows"], "measure_inputs": {"input_ids": ids.to(device)}}  # fmt: skip
    if mode == "zero-shot":
        preds = runner.predict_sts_zeroshot(
            model, tokenizer, data, batch_size, max_length, device, console.progress
        )
    else:
        preds = runner.predict_head(
            model, tokenizer, data, spec, batch_size, max_length, device, console.progress
        )
    metrics = runner.score(spec, preds, data.labels)
    first = data.subset(min(batch_size, len(data)))
    inputs = runner.tokenize(tokenizer, first.texts[:batch_size], None if first.pairs is None else
                             first.pairs[:batch_size], max_length, device)  # fmt: skip
    return {"metrics": metrics, "data": data.source, "n_examples": len(data), "measure_inputs": inputs}


def model_facts(model: Any, source: ModelSource) -> dict[str, Any]:
    """What was evaluated: its origin, compression (method, keep_ratio, ranks) and parameter counts."""
    from flashsvd.app.modelio import count_parameters

    facts: dict[str, Any] = {"source": source.location, "name": source.name, "kind": source.kind,
                             "params": count_parameters(model), "class": type(model).__name__}  # fmt: skip
    block = flashsvd_block(read_config(source.path)) if source.kind == "flashsvd" else None
    if block:
        for key in ("method", "keep_ratio", "kept_fraction", "params_before", "params_after",
                    "target_params_before", "target_params_after", "ranks"):  # fmt: skip
            facts[key] = block.get(key)
    else:
        facts.update(method="dense", keep_ratio=1.0, kept_fraction=1.0)
    return facts


def evaluate(
    model: Any,
    tokenizer: Any,
    source: ModelSource,
    spec: TaskSpec,
    mode: str,
    data: Any,
    *,
    batch_size: int,
    max_length: int,
    device: Any,
    console: Console,
    seq_len: int = 512,
    max_tokens: int | None = None,
    repeats: int = 5,
) -> dict[str, Any]:
    """Score and measure; the result dictionary written by ``flashsvd eval --output``."""
    import time

    t0 = time.perf_counter()
    res = score(model, tokenizer, spec, mode, data, batch_size=batch_size, max_length=max_length, device=device,
                console=console, seq_len=seq_len, max_tokens=max_tokens)  # fmt: skip
    seconds = time.perf_counter() - t0
    measured = measure_forward(model, res.pop("measure_inputs"), device, repeats=repeats)
    return {
        "task": spec.name,
        "mode": mode,
        "main_metric": spec.main_metric,
        **res,
        "eval_seconds": seconds,
        "memory_latency": measured,
        "definitions": DEFINITIONS,
        "model": model_facts(model, source),
    }
