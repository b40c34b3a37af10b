"""``flashsvd finetune``: recover accuracy by training the low-rank factors and the task head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Fine-tune a (compressed) model on a GLUE task, with dev evaluation, checkpoints and resume.

A compressed checkpoint trains its low-rank factors and task head (--train-all: everything); a dense
model (e.g. --model default) gets a classification head and trains fully. Output (default
models/finetuned/<arch>/<method>/<name>/): best/, checkpoint-<step>/ (with optimizer state as
safetensors + JSON), runs/ (TensorBoard), results.json. Rerunning the same command resumes from the
latest checkpoint (--no-resume starts over, with --overwrite).

\b
Examples:
  flashsvd finetune --model default --task sst2 --epochs 1 --max-train-samples 5000
  flashsvd finetune -c compressed_models/sst2-minilm_whiten_k0.75 --task sst2 --learning-rate 1e-4
  flashsvd finetune -c out/mrpc_svd --task mrpc --early-stopping --patience 2 --eval-steps 200
"""


def finetune(
    checkpoint: O.Checkpoint = None,
    model: O.Model = None,
    task: Annotated[str, typer.Option("--task", "-t", help="A GLUE task (cola, sst2, mrpc, ...).")] = "sst2",
    epochs: Annotated[float, typer.Option("--epochs", min=0.0, help="Passes over the training data.")] = 3.0,
    learning_rate: Annotated[
        float, typer.Option("--learning-rate", "--lr", min=0.0, help="Peak AdamW rate.")
    ] = 5e-5,
    batch_size: O.BatchSize = 32,
    warmup_ratio: Annotated[
        float, typer.Option("--warmup-ratio", min=0.0, max=1.0, help="Warm-up share.")
    ] = 0.06,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", min=0.0, help="AdamW weight decay.")
    ] = 0.01,
    early_stopping: Annotated[
        bool, typer.Option("--early-stopping", help="Stop after --patience evaluations without improvement.")
    ] = False,
    patience: Annotated[int, typer.Option("--patience", min=1, help="Evaluations without improvement.")] = 3,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", min=1, help="Stop after this many steps.")
    ] = None,
    eval_steps: Annotated[
        int | None,
        typer.Option("--eval-steps", min=1, help="Evaluate and checkpoint every N steps (default: epoch)."),
    ] = None,
    max_train_samples: Annotated[
        int | None, typer.Option("--max-train-samples", min=1, help="Train on a seeded subset of this size.")
    ] = None,
    max_eval_samples: Annotated[
        int | None,
        typer.Option("--max-eval-samples", min=1, help="Evaluate on a seeded subset of this size."),
    ] = None,
    train_file: Annotated[Path | None, typer.Option("--train-file", help="Local training file.")] = None,
    eval_file: Annotated[Path | None, typer.Option("--eval-file", help="Local dev file.")] = None,
    data_dir: O.DataDir = None,
    max_length: O.MaxLength = 128,
    train_all: Annotated[bool, typer.Option("--train-all", help="Train every parameter.")] = False,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", "-o", help="Where runs are written.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume/--no-resume", help="Continue from the latest checkpoint.")
    ] = True,
    overwrite: O.Overwrite = False,
    device: O.Device = "auto",
    seed: O.Seed = 0,
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


def default_output_dir(source, model, spec) -> Path:
    import re

    from flashsvd.app.modelio import flashsvd_block, read_config

    arch = getattr(model.config, "model_type", "model")
    block = flashsvd_block(read_config(source.path)) if source.kind == "flashsvd" else None
    method = block.get("method", "compressed") if block else "dense"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{source.name}_{spec.name}").strip("-")
    return Path("models") / "finetuned" / arch / method / name


def prepare_output_dir(out: Path, cfg, resume: bool, overwrite: bool, console) -> Path | None:
    """Decide what happens to an existing ``out``; returns the checkpoint to resume from, if any.

    A run with a checkpoint resumes (with the same hyper-parameters) unless --no-resume; --overwrite
    starts over; a run stopped before its first checkpoint starts over by itself (its best/ stays until
    the new run's first evaluation replaces it). Folders that are not fine-tune runs are never touched.
    """
    import shutil

    from flashsvd.app.errors import AppError
    from flashsvd.app.outputs import check_writable, clean_stale_partials, is_leftover
    from flashsvd.app.training import check_resume_config, is_run_folder, latest_checkpoint

    if out.exists() and not out.is_dir():
        raise AppError(f"--output-dir {out} is a file", hint="choose a folder for the run.")
    check_writable(out / "runs", "--output-dir")
    if not out.is_dir() or not any(p for p in out.iterdir() if not is_leftover(p)):
        return None
    if not is_run_folder(out):
        raise AppError(
            f"--output-dir {out} holds files that `flashsvd finetune` did not write; refusing to use it"
            + (" even with --overwrite" if overwrite else ""),
            hint="choose another --output-dir, or move those files away yourself.",
        )
    for folder in (out, *(p for p in out.iterdir() if p.is_dir() and not is_leftover(p))):
        clean_stale_partials(folder)
    latest = latest_checkpoint(out)
    if latest is not None and resume:
        check_resume_config(latest, cfg)
        return latest
    if overwrite:
        shutil.rmtree(out)
        return None
    if latest is None:
        console.info(
            f"{out} holds no complete checkpoint (the last run stopped before its first): starting over"
        )
        return None
    raise AppError(f"{out} already holds a run and --no-resume was given",
                   hint="pass --overwrite as well to start over, or another --output-dir.")  # fmt: skip


@guarded
def run(**kw) -> None:
    import time

    from flashsvd.app import modelio
    from flashsvd.app.console import Console, silence_libraries
    from flashsvd.app.errors import AppError
    from flashsvd.app.outputs import write_json_atomic
    from flashsvd.app.runtime import provenance, resolve_device
    from flashsvd.app.tasks.data import Columns, load_examples
    from flashsvd.app.tasks.registry import get_task
    from flashsvd.app.training import TrainConfig, latest_checkpoint, train

    console = Console(kw["quiet"], kw["json_out"])
    silence_libraries()
    if kw["checkpoint"] is not None and kw["model"] is not None:
        raise AppError("pass either --checkpoint or --model, not both")
    if kw["checkpoint"] is not None and not Path(kw["checkpoint"]).exists():
        raise AppError(f"checkpoint {kw['checkpoint']} does not exist")
    spec = get_task(kw["task"])
    if spec.kind == "perplexity":
        raise AppError("finetune trains GLUE classifiers/regressors; wikitext2 is not supported here")
    device = resolve_device(kw["device"])
    source = modelio.resolve(str(kw["checkpoint"]) if kw["checkpoint"] is not None else kw["model"])
    train_data = load_examples(spec, "train", kw["train_file"], kw["data_dir"], Columns())
    train_data = train_data.subset(kw["max_train_samples"], kw["seed"])
    dev = load_examples(spec, "dev", kw["eval_file"], kw["data_dir"], Columns()).subset(
        kw["max_eval_samples"], 0
    )
    model = modelio.load(source, head="classification", num_labels=spec.num_labels, backend="torch")
    if getattr(model.config, "num_labels", spec.num_labels) != spec.num_labels:
        raise AppError(
            f"the model has {model.config.num_labels} labels but task {spec.name} has {spec.num_labels}"
        )
    tokenizer = modelio.load_tokenizer(source)
    out = Path(kw["output_dir"]) if kw["output_dir"] else default_output_dir(source, model, spec)
    cfg = TrainConfig(
        epochs=kw["epochs"], learning_rate=kw["learning_rate"], batch_size=kw["batch_size"],
        warmup_ratio=kw["warmup_ratio"], weight_decay=kw["weight_decay"], max_steps=kw["max_steps"],
        eval_steps=kw["eval_steps"], early_stopping=kw["early_stopping"], patience=kw["patience"],
        max_length=kw["max_length"], train_all=kw["train_all"] or source.kind != "flashsvd", seed=kw["seed"],
    )  # fmt: skip
    resume_from = prepare_output_dir(out, cfg, kw["resume"], kw["overwrite"], console)
    if resume_from is not None:
        model = modelio.load(modelio.resolve(str(resume_from)), head="classification",
                             num_labels=spec.num_labels, backend="torch")  # fmt: skip
    model.to(device)
    console.info(f"training {source.name} on {len(train_data)} {spec.name} examples ({train_data.source}); "
                 f"dev {len(dev)} ({dev.source}); output {out}")  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        state = train(model, tokenizer, spec, train_data, dev, cfg, out, device, console, resume_from)
    except KeyboardInterrupt:
        latest = latest_checkpoint(out)
        if latest is not None:
            msg = f"interrupted: complete checkpoints are kept in {out}; rerun the same command to resume from {latest}"
        else:
            msg = f"interrupted before the first checkpoint: nothing to resume in {out}; rerun to start over"
        raise AppError(msg, exit_code=130) from None
    result = {
        "output_dir": str(out),
        "best": str(out / "best"),
        "task": spec.name,
        "metric": spec.main_metric,
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "history": state.history,
        "train_data": train_data.source,
        "dev_data": dev.source,
        "source": source.location,
        "seconds": time.perf_counter() - t0,
        "config": state.config,
        **provenance(device),
    }
    write_json_atomic(out / "results.json", result)
    if state.history:
        cols = ["step", *[k for k in state.history[-1] if k != "step"]]
        console.table(
            f"{source.name} fine-tuned on {spec.name}", cols, [tuple(h.values()) for h in state.history]
        )
    best = "n/a" if state.best_metric is None else f"{state.best_metric:.4f}"
    console.result(
        result, f"best dev {spec.main_metric} {best} at step {state.best_step}; saved {out / 'best'}"
    )
