"""The app side of compression: pick calibration text, build batches, call ``flashsvd.models.compress``, save.

No factorization logic lives here; this module only turns command-line choices into the arguments of
``flashsvd.models.compress`` and writes the result atomically (model, tokenizer, report).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flashsvd.app.console import Console
from flashsvd.app.errors import AppError
from flashsvd.app.modelio import ModelSource
from flashsvd.app.outputs import REPORT_FILE
from flashsvd.app.tasks.data import DEFAULT_DATA_DIR, Columns, calibration_texts, load_examples, read_text
from flashsvd.app.tasks.registry import get_task

__all__ = ["REPORT_FILE", "RankChoice", "calibration_text", "compress_model", "save_checkpoint"]


@dataclass
class RankChoice:
    """Exactly one way of choosing ranks (see ``flashsvd compress --help``)."""

    keep_ratio: float | None = None
    rank: int | None = None
    by_kind: dict[str, int] = field(default_factory=dict)
    ranks_json: Path | None = None

    def check(self) -> None:
        given = sum(
            [
                self.keep_ratio is not None,
                self.rank is not None,
                bool(self.by_kind),
                self.ranks_json is not None,
            ]
        )
        if given > 1:
            raise AppError(
                "choose one of --keep-ratio, --rank, --rank-attn/--rank-ffn/--rank-wo, --ranks-json"
            )
        if given == 0:
            self.keep_ratio = 0.5
        if self.keep_ratio is not None and not 0 < self.keep_ratio <= 1:
            raise AppError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if self.rank is not None and self.rank < 1:
            raise AppError(f"--rank must be a positive integer, got {self.rank}")
        if self.ranks_json is not None and not Path(self.ranks_json).is_file():
            raise AppError(f"--ranks-json {self.ranks_json} does not exist")

    def tag(self) -> str:
        if self.keep_ratio is not None:
            return f"k{self.keep_ratio:g}"
        if self.rank is not None:
            return f"r{self.rank}"
        if self.by_kind:
            return "r" + "-".join(f"{k}{v}" for k, v in sorted(self.by_kind.items()))
        return "ranks-" + Path(self.ranks_json).stem

    def compress_kwargs(self, model: Any) -> dict[str, Any]:
        if self.keep_ratio is not None:
            return {"keep_ratio": self.keep_ratio}
        if self.rank is not None:
            return {"rank": self.rank}
        if self.ranks_json is not None:
            try:
                ranks = json.loads(read_text(Path(self.ranks_json), "--ranks-json"))
            except json.JSONDecodeError as err:
                raise AppError(f"--ranks-json {self.ranks_json} is not valid JSON ({err.msg})") from err
            ranks = ranks.get("ranks", ranks) if isinstance(ranks, dict) else ranks
            if not isinstance(ranks, dict):
                raise AppError(f"--ranks-json {self.ranks_json} must map module paths to ranks (or null)")
            return {"ranks": ranks}
        from flashsvd.models.adapters import get_adapter

        targets = get_adapter(model).targets(model)
        return {"ranks": {t.name: self.by_kind.get(t.kind) for t in targets}}


def default_output(model_name: str, method: str, ranks: RankChoice) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-")
    return Path("compressed_models") / f"{safe}_{method}_{ranks.tag()}"


def calibration_text(task: str | None, calib_data: Path | None, n: int, data_dir: Path | None, seed: int = 0,
                     text_column: str | None = None):  # fmt: skip
    """``(texts, pairs or None, labels or None, source)`` for calibration."""
    if calib_data is not None:
        # all of them: compress_model takes the recipe's seeded sample
        texts, columns = calibration_texts(calib_data, None, text_column)
        return (
            texts,
            None,
            None,
            f"{calib_data} (column {', '.join(columns)})" if columns else str(calib_data),
        )
    spec = None
    if task is not None:
        spec = get_task(task)
    elif (data_dir or DEFAULT_DATA_DIR).is_dir():
        spec = get_task("sst2")
    if spec is None:
        raise AppError("this method needs calibration text", hint="pass --task T or --calib-data FILE.")
    if spec.kind == "perplexity":
        from flashsvd.app.tasks.data import load_text

        text, source = load_text(spec, "train", None, data_dir)
        paras = [p for p in text.split("\n\n") if len(p.strip()) > 40]
        return paras[:n], None, None, source
    ex = load_examples(spec, "train", None, data_dir, Columns(), fallback_splits=("dev",)).subset(n, seed)
    return ex.texts, ex.pairs, ex.labels, ex.source


def calibration_batches(
    tokenizer: Any, texts, pairs, labels, batch_size: int, max_length: int, loss: str | None
):
    """Tokenized batches; with ``loss='labels'`` they carry task labels, with ``'lm'`` next-token labels."""
    import torch

    out = []
    for i in range(0, len(texts), batch_size):
        a = texts[i : i + batch_size]
        b = None if pairs is None else pairs[i : i + batch_size]
        enc = dict(tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        if loss == "labels" and labels is not None:
            y = labels[i : i + batch_size]
            enc["labels"] = torch.tensor(
                y, dtype=torch.float32 if any(v != int(v) for v in y) else torch.long
            )
        elif loss == "lm":
            lab = enc["input_ids"].clone()
            lab[enc["attention_mask"] == 0] = -100
            enc["labels"] = lab
        out.append(enc)
    return out


def save_checkpoint(model: Any, tokenizer: Any, report: dict[str, Any], folder: Path) -> None:
    """Model (via ``flashsvd.models.save_compressed``), tokenizer and the report JSON into ``folder``."""
    from flashsvd.app.outputs import write_json_atomic
    from flashsvd.models import save_compressed

    save_compressed(model, folder, tokenizer=tokenizer)
    write_json_atomic(Path(folder) / REPORT_FILE, report)


def load_recipe_option(value: str) -> Any:
    """``--recipe``: a built-in name or a JSON/YAML file, as a :class:`flashsvd.models.Recipe`."""
    from flashsvd.models.recipe import RecipeError, load_recipe

    try:
        return load_recipe(value)
    except RecipeError as err:
        raise AppError(
            f"--recipe: {err}", hint="see `flashsvd compress --help` for the recipe fields."
        ) from err


def pick_texts(texts: list[str], n: int, min_words: int, seed: int) -> list[str]:
    """A seeded sample of ``n`` texts of at least ``min_words`` words (all of them when fewer)."""
    import random

    kept = [t for t in texts if len(t.split()) >= min_words] or list(texts)
    return random.Random(seed).sample(kept, n) if len(kept) > n else kept


def window_batches(tokenizer: Any, texts: list[str], n: int, window: int, seed: int) -> list[Any]:
    """``n`` windows of ``window`` tokens cut from the texts joined by newlines (no padding, no specials)."""
    import random

    import torch

    order = list(texts)
    random.Random(seed).shuffle(order)
    ids: list[int] = []
    for start in range(0, len(order), 512):
        ids += tokenizer("\n".join(order[start : start + 512]) + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= n * window:
            break
    got = len(ids) // window
    if got == 0:
        raise AppError(f"calibration text holds {len(ids)} tokens, less than one window of {window}")
    return [torch.tensor(ids[i * window : (i + 1) * window])[None] for i in range(min(n, got))]


def compress_model(
    model: Any,
    tokenizer: Any,
    method: str | None,
    ranks: RankChoice,
    console: Console,
    *,
    task: str | None = None,
    calib_data: Path | None = None,
    calib_text_column: str | None = None,
    calib_samples: int | None = None,
    calib_batch_size: int | None = None,
    calib_max_length: int | None = None,
    data_dir: Path | None = None,
    sequential: bool | None = None,
    backend: str = "torch",
    seed: int = 0,
    texts: list[str] | None = None,
    recipe: Any = None,
) -> tuple[Any, Any]:
    """Calibrate (if the recipe is data-aware) and compress ``model`` in place; return ``(model, report)``.

    The recipe is ``recipe``, else ``method`` with uniform ranks, else the model family's default
    (``flashsvd.models.resolve_recipe``); calibration sizes not given come from the recipe. Calibration
    text: ``texts`` when given, else ``--calib-data`` (a seeded sample), else the task's train split,
    else SST-2 sentences from the shared data folder.
    """
    from flashsvd.methods import get_method
    from flashsvd.models import compress
    from flashsvd.models.adapters import get_adapter
    from flashsvd.models.compress import resolve_recipe

    rec, _ = resolve_recipe(model, recipe, method, sequential=sequential, keep_ratio=ranks.keep_ratio)
    n = calib_samples or rec.calib_samples
    batches = None
    if rec.data_aware:
        if texts is not None:
            pairs, labels, source = None, None, "the caller"
        else:
            texts, pairs, labels, source = calibration_text(
                task, calib_data, n, data_dir, seed, calib_text_column
            )
            if calib_data is not None:
                texts = pick_texts(
                    texts, n if rec.calib_window is None else len(texts), rec.calib_min_words, seed
                )
        loss = None
        if "fisher_in" in get_method(rec.method).requires:
            loss = "lm" if _is_causal(model) else "labels"
            if loss == "labels" and (labels is None or not _has_head(model)):
                raise AppError(
                    f"method {rec.method} weights by the task loss, which needs labelled data and a task head",
                    hint="pass --task T (GLUE) so the model gets a classification head, or use whiten/svdllm/asvd.",
                )
        if rec.calib_window is not None and pairs is None:
            batches = window_batches(tokenizer, texts, n, rec.calib_window, seed)
            console.info(f"calibration: {len(batches)} windows of {rec.calib_window} tokens from {source}")
            if rec.calib_source == "model":
                console.info(
                    f"calibration: the model samples {len(batches)} windows, each continuing the first "
                    f"{rec.calib_prompt_tokens} tokens of one of these (recipe calib_source: model)"
                )
        else:
            batches = calibration_batches(tokenizer, texts, pairs, labels, calib_batch_size or rec.calib_batch_size,
                                          calib_max_length or rec.calib_max_length, loss)  # fmt: skip
            console.info(f"calibration: {len(texts)} texts from {source} in {len(batches)} batches")
    console.info(f"recipe {rec.describe()}")
    n_targets = len(get_adapter(model).targets(model))
    bar = console.bar(n_targets, f"compress ({rec.name})", unit="matrix")
    try:
        model, report = compress(
            model, recipe=rec, calibration=batches, backend=backend,
            progress=lambda name: bar.update(1), **ranks.compress_kwargs(model),
        )  # fmt: skip
    finally:
        bar.close()
    return model, report


def _is_causal(model: Any) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (model.config.architectures or [])) or (
        type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))
    )


def _has_head(model: Any) -> bool:
    return type(model).__name__.endswith(("ForSequenceClassification", "ForCausalLM", "LMHeadModel"))


def needs_task_head(method: str) -> bool:
    from flashsvd.methods import get_method

    return "fisher_in" in get_method(method).requires


def report_rows(report: Any) -> list[tuple[str, Any]]:
    """The parameter report as (label, value) rows."""
    d = report.to_json() if hasattr(report, "to_json") else dict(report)
    factorized = sum(r is not None for r in d.get("ranks", {}).values())
    return [
        ("method", d.get("method")),
        ("keep_ratio (asked)", d.get("keep_ratio")),
        ("targeted params before", d.get("target_params_before")),
        ("targeted params after", d.get("target_params_after")),
        ("targeted kept fraction", d.get("kept_fraction")),
        ("model params before", d.get("params_before")),
        ("model params after", d.get("params_after")),
        ("model kept fraction", d.get("model_kept_fraction")),
        ("matrices factorized / dense", f"{factorized} / {len(d.get('dense', {}))}"),
        ("distinct ranks", ", ".join(str(r) for r in sorted({r for r in d.get("ranks", {}).values() if r}))),
        ("seconds", d.get("seconds")),
    ]


def source_summary(source: ModelSource) -> dict[str, Any]:
    return {
        "kind": source.kind,
        "location": source.location,
        "name": source.name,
        "gguf_file": source.gguf_file,
    }
