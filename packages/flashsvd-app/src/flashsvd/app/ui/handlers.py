"""What each UI button does, as plain functions of a :class:`Workspace` (tested without a browser).

Long jobs are generators over :func:`flashsvd.app.ui.jobs.run_job` (the ``flashsvd`` command in a
child process); they yield tuples matching the outputs of their Gradio event.  Quick reads (lists,
reports, plots) happen in process.  Failures raise :class:`UIError` with the command's own message.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flashsvd.app.ui.jobs import JobState, run_job
from flashsvd.app.ui.workspace import Workspace

METHODS = ("svd", "fwsvd", "whiten", "svdllm", "asvd", "ars")
TASKS = ("stsb", "sst2", "cola", "mrpc", "qqp", "mnli", "mnli-mm", "qnli", "rte", "wnli", "wikitext2")
DENSE_DEFAULT = "default (dense all-MiniLM-L6-v2)"
EVAL_COLUMNS = ["model", "method", "keep_ratio", "backend", "task", "metric", "value",
                "params", "peak MiB", "transient MiB", "latency ms"]  # fmt: skip


class UIError(Exception):
    """A failure to show on the page as a readable message."""


def _finish(state: JobState) -> None:
    if not state.ok:
        raise UIError(state.error_message())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def checkpoint_name(name: str) -> str:
    """A user-typed checkpoint name as one plain folder name; anything else is refused, never guessed.

    The name becomes ``compressed_models/<name>``: ``.``, ``..``, separators or a leading dot would put the
    checkpoint somewhere else (or replace the whole folder), so they are errors.
    """
    raw = (name or "").strip()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")
    if "/" in raw or "\\" in raw or not slug or slug.startswith(".") or not slug.strip("._-"):
        raise UIError(
            f"checkpoint name {raw!r} is not a plain folder name: use letters, digits, '-', '_' or '.' "
            "(not starting with '.', no '/'), or leave it empty for an automatic name"
        )
    return slug


# --- compress ---------------------------------------------------------------------------------------


def compress_args(ws: Workspace, model: str, method: str, keep_ratio: float, calib_task: str,
                  calib_samples: int, name: str = "") -> tuple[list[str], Path]:  # fmt: skip
    if method not in METHODS:
        raise UIError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0 < float(keep_ratio) <= 1:
        raise UIError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    model = (model or "default").strip()
    folder = checkpoint_name(name) if (name or "").strip() else None
    out = ws.checkpoints / (folder or f"{_slug(Path(model).name)}_{method}_k{float(keep_ratio):g}")
    if out.exists():
        raise UIError(
            f"a checkpoint named {out.name!r} already exists in {ws.checkpoints}: type another name, "
            "or delete the old one in the Checkpoints tab first"
        )
    # never --overwrite: the UI replaces nothing behind the user's back
    args = ["compress", "--model", model, "--method", method, "--keep-ratio", f"{float(keep_ratio):g}",
            "--calib-samples", str(int(calib_samples)), "--output", str(out)]  # fmt: skip
    if calib_task:
        args += ["--task", calib_task, *ws.data_args()]
    return args, out


def report_card(folder: Path) -> str:
    """Markdown card of a checkpoint's compression report."""
    from flashsvd.app.compression import REPORT_FILE, report_rows
    from flashsvd.app.console import fmt

    path = Path(folder) / REPORT_FILE
    if not path.is_file():
        return f"**{folder}**: no {REPORT_FILE}"
    report = json.loads(path.read_text())
    rows = report_rows(report.get("report", report))
    lines = [f"### Checkpoint `{folder}`", "", "| | |", "| --- | --- |"]
    lines += [f"| {label} | {fmt(value)} |" for label, value in rows]
    return "\n".join(lines)


def run_compress(ws: Workspace, model: str, method: str, keep_ratio: float, calib_task: str,
                 calib_samples: int, name: str = "") -> Iterator[tuple[str, str, str]]:  # fmt: skip
    """Yields ``(log, result card, checkpoint path)``."""
    args, out = compress_args(ws, model, method, keep_ratio, calib_task, calib_samples, name)
    ws.checkpoints.mkdir(parents=True, exist_ok=True)
    state = None
    for state in run_job(args, ws.root):
        yield state.log_tail(), "", ""
    _finish(state)
    yield state.log_tail(), report_card(out), str(out)


def layer_ranks(folder: str | Path) -> list[dict[str, Any]]:
    """``{layer, rank, full}`` per targeted layer of a checkpoint (rank ``None``: kept dense).

    Shapes come from the weights file's header (nothing is loaded): ``u [in, H·r]`` with ``v [r, out]``
    or, per head, ``v [H, r, d]`` (full rank ``min(in, d)``); a dense layer's ``weight [out, in]``.
    """
    from safetensors import safe_open

    from flashsvd.app.modelio import flashsvd_block, read_config
    from flashsvd.models.checkpoint import weights_path

    block = flashsvd_block(read_config(Path(folder))) or {}
    ranks = block.get("ranks") or {}
    rows = []
    with safe_open(str(weights_path(folder)), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (no __iter__)

    def shape(name: str, leaf: str) -> list[int] | None:
        hits = [v for k, v in shapes.items() if k == f"{name}.{leaf}" or k.endswith(f".{name}.{leaf}")]
        return hits[0] if hits else None

    for name, r in ranks.items():
        u, v, w = shape(name, "u"), shape(name, "v"), shape(name, "weight")
        if u is not None and v is not None:
            full = min(u[0], v[-1]) if len(v) == 3 else min(u[0], v[1])
        elif w is not None:
            full = min(w)
        else:
            continue
        rows.append({"layer": name, "rank": r, "full": int(full)})
    return rows


def rank_figure(folder: str | Path, rows: list[dict[str, Any]] | None = None):
    """The rank chart of a checkpoint (``rows``: its :func:`layer_ranks`, when already read)."""
    from flashsvd.app.ui.plots import rank_chart

    return rank_chart(layer_ranks(folder) if rows is None else rows)


def spectrum_figure(model: str, folder: str | Path, layer: str):
    """Singular values of ``layer``'s dense weight in the source ``model``, with the checkpoint's rank."""
    import torch

    from flashsvd.app import modelio
    from flashsvd.app.ui.plots import spectrum_plot
    from flashsvd.models.checkpoint import base_prefix
    from flashsvd.models.lowrank import dense_weight_and_bias

    rows = {r["layer"]: r for r in layer_ranks(folder)}
    if layer not in rows:
        raise UIError(f"{layer!r} is not a compressed layer of {folder}; choose one from the list")
    dense = modelio.load(modelio.resolve((model or "default").strip()))
    try:
        mod = dense.get_submodule(layer)
    except AttributeError:  # a checkpoint of the base model, a source with a task head over it
        mod = dense.get_submodule(f"{base_prefix(dense)}.{layer}")
    w = dense_weight_and_bias(mod)[0].detach().float()  # [out, in], GPT-2's Conv1D transposed
    values = torch.linalg.svdvals(w).tolist()
    return spectrum_plot(values, rows[layer]["rank"], f"{layer} ({tuple(w.shape)})")


# --- evaluate ---------------------------------------------------------------------------------------


def checkpoint_choices(ws: Workspace) -> list[str]:
    return [DENSE_DEFAULT, *[str(p) for p in ws.list_checkpoints()]]


def result_row(result: dict[str, Any]) -> list[Any]:
    mem = result.get("memory_latency", {})
    facts = result.get("model", {})
    metric = result.get("main_metric")

    def mib(v: Any) -> Any:
        return None if v is None else round(v / 2**20, 2)

    return [facts.get("name"), facts.get("method"), facts.get("keep_ratio"), result.get("backend"),
            result.get("task"), metric, result.get("metrics", {}).get(metric), facts.get("params"),
            mib(mem.get("peak_bytes")), mib(mem.get("transient_bytes")), mem.get("latency_ms")]  # fmt: skip


def run_evaluate(ws: Workspace, checkpoints: list[str], task: str, backend: str,
                 max_samples: int) -> Iterator[tuple[str, list[list[Any]]]]:  # fmt: skip
    """Evaluates each chosen model in turn; yields ``(log, results table rows)``."""
    if not checkpoints:
        raise UIError("choose at least one checkpoint (or the dense default) to evaluate")
    ws.results.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    logs: list[str] = []
    for choice in checkpoints:
        if choice == DENSE_DEFAULT:
            target, label = ["--model", "default"], "dense"
        else:
            folder = ws.confine(choice)
            target, label = ["--checkpoint", str(folder)], folder.name
        out = ws.results / f"{_slug(label)}__{task}__{backend}__{time.strftime('%Y%m%d-%H%M%S')}.json"
        args = [
            "eval",
            *target,
            "--task",
            task,
            "--backend",
            backend,
            "--output",
            str(out),
            "--quiet",
            *ws.data_args(),
        ]
        if max_samples:
            args += ["--max-eval-samples", str(int(max_samples))]
        state = None
        for state in run_job(args, ws.root):
            yield "\n".join([*logs, state.log_tail(15)]), rows
        _finish(state)
        logs.append(state.log_tail(3))
        rows.append(result_row(json.loads(out.read_text())))
        yield "\n".join(logs), rows


# --- fine-tune --------------------------------------------------------------------------------------

#: a progress-bar update of ``flashsvd finetune``: ``train: 40%|...| 4/10 [00:01<00:02, loss=0.6931]``
_LOSS = re.compile(r"\b(\d+)/\d+ \[[^\]]*?\bloss=([0-9.eE+-]+)")


def losses(log: str) -> list[tuple[int, float]]:
    """(step, loss) pairs from the fine-tune log, one per progress-bar update (last one per step wins)."""
    return sorted({int(s): float(v) for s, v in _LOSS.findall(log)}.items())


def run_finetune(ws: Workspace, checkpoint: str, task: str, epochs: float, learning_rate: float,
                 batch_size: int, max_steps: int, max_train_samples: int = 0,
                 max_eval_samples: int = 0) -> Iterator[tuple[str, Any, str]]:  # fmt: skip
    """Yields ``(log, loss curve figure, best checkpoint path)``."""
    from flashsvd.app.ui.plots import loss_curve

    if not checkpoint:
        raise UIError("choose a checkpoint to fine-tune")
    target = (
        ["--model", "default"]
        if checkpoint == DENSE_DEFAULT
        else ["--checkpoint", str(ws.confine(checkpoint))]
    )
    # cwd is the workspace root, so the command's default output lands in ws.finetuned
    args = ["finetune", *target, "--task", task, "--epochs", f"{float(epochs):g}", "--learning-rate",
            f"{float(learning_rate):g}", "--batch-size", str(int(batch_size)), *ws.data_args()]  # fmt: skip
    for flag, value in (("--max-steps", max_steps), ("--max-train-samples", max_train_samples),
                        ("--max-eval-samples", max_eval_samples)):  # fmt: skip
        if value:
            args += [flag, str(int(value))]
    state = None
    for state in run_job(args, ws.root, poll_seconds=1.0):
        yield state.log_tail(), loss_curve(losses(state.output)), ""
    _finish(state)
    best = re.findall(r"(\S+/best)\b", state.output)
    # the command prints paths relative to its working directory, the workspace root
    yield state.log_tail(), loss_curve(losses(state.output)), str(ws.root / best[-1]) if best else ""


# --- checkpoints ------------------------------------------------------------------------------------


def checkpoint_table(ws: Workspace) -> list[list[Any]]:
    """One row per checkpoint: path, method, keep_ratio, kept fraction, parameters, size on disk."""
    from flashsvd.app.errors import AppError
    from flashsvd.app.modelio import flashsvd_block, read_config

    rows = []
    for folder in ws.list_checkpoints():
        try:
            block = flashsvd_block(read_config(folder)) or {}
            method = block.get("method", "dense")
        except AppError:  # a damaged folder is listed as such, never breaks the table
            block, method = {}, "unreadable config.json"
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        rows.append([str(folder), method, block.get("keep_ratio"),
                     block.get("kept_fraction"), block.get("params_after"), round(size / 2**20, 2)])  # fmt: skip
    return rows


def checkpoint_files(ws: Workspace, folder: str) -> list[str]:
    """The metadata/results JSON files of one checkpoint, offered for download (confined)."""
    base = ws.confine(folder)
    return [str(ws.confine(p)) for p in sorted(base.glob("*.json"))]


def delete_checkpoint(ws: Workspace, folder: str) -> str:
    return f"deleted {ws.delete_checkpoint(folder)}"
