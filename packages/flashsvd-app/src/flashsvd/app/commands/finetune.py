"""``flashsvd finetune``: recover accuracy by training the low-rank factors and the task head."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Fine-tune a (compressed) model on a GLUE task, or recover a causal LM on local text (--task lm).

A compressed checkpoint trains its low-rank factors and task head (--train-all: everything); a dense
model (e.g. --model default) gets a classification head and trains fully. Both run on transformers'
Trainer (torchrun for data-parallel; --batch-size is per process). Output (default
models/finetuned/<arch>/<method>/<name>/): best/, checkpoint-<step>/ (with optimizer, schedule and
random-generator state as safetensors + JSON), runs/ (TensorBoard), results.json. Rerunning the same
command resumes from the latest checkpoint (--no-resume starts over, with --overwrite).

Causal LMs (--task lm; chosen by itself for a decoder given --train-file): next-token loss on --train-file
(.txt: a text per line; .tsv/.csv/.jsonl: --text-column, else a sentence/text column, else the first),
packed into --max-length blocks (default 512), through transformers' Trainer (bf16 on CUDA, torchrun for
data-parallel). --train-params all (every low-rank factor u, v and bias; a dense model: everything), v
(the v factors) or lora (adapters merged back into the factors at the layer's rank). No intermediate
checkpoints: the output folder is the trained checkpoint plus results.json (perplexity on --eval-file
before/after). --teacher MODEL distils from MODEL instead (KL to its next-token distribution). WikiText-2
test (wiki.test.raw) is refused as training text.

\b
Examples:
  flashsvd finetune --model default --task sst2 --epochs 1 --max-train-samples 5000
  flashsvd finetune -c compressed_models/sst2-minilm_whiten_k0.75 --task sst2 --learning-rate 1e-4
  flashsvd finetune -c out/mrpc_svd --task mrpc --early-stopping --patience 2 --eval-steps 200
  flashsvd finetune -c out/smollm2_k0.8 --train-file notes.txt --eval-file held_out.txt --max-steps 500
  flashsvd finetune -m smollm2 --task lm --train-file data.tsv --train-params lora --minutes 10
  flashsvd finetune -c out/smollm2_k0.8 --train-file notes.txt --teacher smollm2 --minutes 15
"""


def finetune(
    checkpoint: O.Checkpoint = None,
    model: O.Model = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            "-t",
            help="A GLUE task (cola, sst2, mrpc, ...) or lm (default: lm for a causal LM with --train-file, else sst2).",
        ),
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", min=0.0, help="Passes over the training data (GLUE 3, lm 1).")
    ] = None,
    learning_rate: Annotated[
        float | None,
        typer.Option("--learning-rate", "--lr", min=0.0, help="Peak AdamW rate (GLUE 5e-5, lm 1e-4)."),
    ] = None,
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
    max_length: Annotated[
        int | None,
        typer.Option("--max-length", min=8, help="Tokens per input (GLUE 128) or per block (lm 512)."),
    ] = None,
    train_all: Annotated[bool, typer.Option("--train-all", help="Train every parameter.")] = False,
    train_params: Annotated[
        str | None, typer.Option("--train-params", help="lm: all (low-rank factors), v or lora.")
    ] = None,
    text_column: Annotated[
        str | None,
        typer.Option(
            "--text-column", help="lm: column(s) of a .tsv/.csv/.jsonl --train-file/--eval-file (a,b)."
        ),
    ] = None,
    grad_accum: Annotated[
        int, typer.Option("--grad-accum", min=1, help="lm: gradient accumulation steps.")
    ] = 1,
    minutes: Annotated[
        float | None, typer.Option("--minutes", min=0.0, help="lm: stop after this many minutes of training.")
    ] = None,
    lora_r: Annotated[
        int, typer.Option("--lora-r", min=1, help="lm --train-params lora: adapter rank.")
    ] = 16,
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="lm: distil from this model (e.g. the dense one: smollm2, a folder, a .gguf), same tokenizer.",
        ),
    ] = None,
    teacher_samples: Annotated[
        int,
        typer.Option(
            "--teacher-samples",
            min=0,
            help="lm --teacher: also train on this many --max-length blocks sampled from the teacher "
            "(each continues 8 tokens of the training text): varied text when the train file is small.",
        ),
    ] = 0,
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


def default_output_dir(source, model, task: str) -> Path:
    """``models/finetuned/<arch>/<method>/<name>_<task>``: where a run goes without ``--output-dir``."""
    import re

    from flashsvd.app.modelio import flashsvd_block, read_config

    arch = getattr(model.config, "model_type", "model")
    block = flashsvd_block(read_config(source.path)) if source.kind == "flashsvd" else None
    method = block.get("method", "compressed") if block else "dense"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{source.name}_{task}").strip("-")
    return Path("models") / "finetuned" / arch / method / name


def prepare_output_dir(
    out: Path, cfg, resume: bool, overwrite: bool, console, main: bool = True
) -> Path | None:
    """Decide what happens to an existing ``out``; returns the checkpoint to resume from, if any.

    A run with a checkpoint resumes (with the same hyper-parameters) unless --no-resume; --overwrite
    starts over; a run stopped before its first checkpoint starts over by itself (its best/ stays until
    the new run's first evaluation replaces it). Folders that are not fine-tune runs are never touched.
    Under ``torchrun`` every process decides the same from the folder, but only the main one
    (``main``) removes anything: the others' answer does not depend on whether it already has.
    """
    import shutil

    from flashsvd.app.errors import AppError
    from flashsvd.app.hf_trainer import latest_checkpoint
    from flashsvd.app.outputs import check_writable, clean_stale_partials, is_leftover
    from flashsvd.app.training import check_resume_config, is_run_folder

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
    if main:
        for folder in (out, *(p for p in out.iterdir() if p.is_dir() and not is_leftover(p))):
            clean_stale_partials(folder)
    latest = latest_checkpoint(out)
    if latest is not None and resume:
        check_resume_config(latest, cfg)
        return latest
    if overwrite:
        if main:
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
    from flashsvd.app.hf_trainer import latest_checkpoint
    from flashsvd.app.outputs import write_json_atomic
    from flashsvd.app.runtime import launched_rank, provenance, resolve_device
    from flashsvd.app.tasks.data import Columns, load_examples
    from flashsvd.app.tasks.registry import get_task
    from flashsvd.app.training import TrainConfig, train

    main = launched_rank() == 0
    if not main:  # under torchrun only rank 0 prints (and writes)
        kw = {**kw, "quiet": True, "json_out": False}
    console = Console(kw["quiet"], kw["json_out"])
    silence_libraries()
    if kw["checkpoint"] is not None and kw["model"] is not None:
        raise AppError("pass either --checkpoint or --model, not both")
    if kw["checkpoint"] is not None and not Path(kw["checkpoint"]).exists():
        raise AppError(f"checkpoint {kw['checkpoint']} does not exist")
    source = modelio.resolve(str(kw["checkpoint"]) if kw["checkpoint"] is not None else kw["model"])
    head = modelio.model_head(source)
    task = kw["task"]
    if task is None:
        task = "lm" if head == "causal-lm" and kw["train_file"] is not None else "sst2"
    if task.lower() == "lm":
        return run_lm(kw, source, head, console)
    spec = get_task(task)
    if spec.kind == "perplexity":
        raise AppError(f"finetune trains GLUE classifiers/regressors or causal LMs (--task lm); {spec.name} is "
                       "an evaluation task", hint="recover a causal LM with --task lm --train-file TEXT.")  # fmt: skip
    if head == "causal-lm":
        raise AppError(
            f"{source.name} is a causal LM: GLUE fine-tuning ({spec.name}) needs an encoder or classifier",
            hint="recover a causal LM on text with --task lm --train-file FILE.",
        )
    if kw["teacher_samples"]:
        raise AppError("--teacher-samples applies to --task lm (with --teacher)")
    if kw["train_params"] is not None:
        raise AppError(
            "--train-params applies to --task lm",
            hint="GLUE runs train the factors and head (--train-all: everything).",
        )
    kw["epochs"] = 3.0 if kw["epochs"] is None else kw["epochs"]
    kw["learning_rate"] = 5e-5 if kw["learning_rate"] is None else kw["learning_rate"]
    kw["max_length"] = 128 if kw["max_length"] is None else kw["max_length"]
    device = resolve_device(kw["device"])
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
    out = Path(kw["output_dir"]) if kw["output_dir"] else default_output_dir(source, model, spec.name)
    cfg = TrainConfig(
        epochs=kw["epochs"], learning_rate=kw["learning_rate"], batch_size=kw["batch_size"],
        warmup_ratio=kw["warmup_ratio"], weight_decay=kw["weight_decay"], max_steps=kw["max_steps"],
        eval_steps=kw["eval_steps"], early_stopping=kw["early_stopping"], patience=kw["patience"],
        max_length=kw["max_length"], train_all=kw["train_all"] or source.kind != "flashsvd", seed=kw["seed"],
    )  # fmt: skip
    resume_from = prepare_output_dir(out, cfg, kw["resume"], kw["overwrite"], console, main)
    if resume_from is not None:  # the checkpoint's ranks; it inherits the source's files as a fresh run would
        model = modelio.load(modelio.resolve(str(resume_from)), head="classification",
                             num_labels=spec.num_labels, backend="torch")  # fmt: skip
        model.name_or_path = model.config._name_or_path = source.location
    model.to(device)
    console.info(f"training {source.name} on {len(train_data)} {spec.name} examples ({train_data.source}); "
                 f"dev {len(dev)} ({dev.source}); output {out}")  # fmt: skip
    if main:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        state = train(model, tokenizer, spec, train_data, dev, cfg, out, device, console, resume_from)
    except KeyboardInterrupt:
        if not main:
            raise AppError("interrupted", exit_code=130) from None
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
        "world_size": state.world_size,
        **provenance(device),
    }
    if not main:
        return
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


def run_lm(kw, source, head: str, console) -> None:
    """``--task lm``: recovery fine-tuning of a causal LM with :mod:`flashsvd.app.lm_training` (``kw`` and
    ``console`` are already quiet on the processes other than rank 0)."""
    import torch

    from flashsvd.app import modelio
    from flashsvd.app.errors import AppError
    from flashsvd.app.hf_trainer import save_model
    from flashsvd.app.lm_training import (
        LMTrainConfig,
        checkpoint_facts,
        eval_text,
        read_texts,
        refuse_wikitext_test,
        train_lm,
    )
    from flashsvd.app.outputs import atomic_dir, check_output_dir
    from flashsvd.app.runtime import provenance, resolve_device

    if head != "causal-lm":
        raise AppError(f"--task lm trains a causal LM with next-token loss; {source.name} is a {head} model",
                       hint="fine-tune encoders and classifiers on a GLUE task (--task sst2, ...).")  # fmt: skip
    if kw["train_file"] is None:
        raise AppError("--task lm needs --train-file (text to train on)",
                       hint="e.g. --train-file ../shared/data/sst2/train.tsv")  # fmt: skip
    refuse_wikitext_test(kw["train_file"])
    if kw["train_all"]:
        raise AppError(
            "--train-all is a GLUE flag", hint="for --task lm use --train-params all (the default)."
        )
    device = resolve_device(kw["device"])
    cfg = LMTrainConfig(
        train_params=(kw["train_params"] or "all").lower(),
        learning_rate=1e-4 if kw["learning_rate"] is None else kw["learning_rate"],
        batch_size=kw["batch_size"], grad_accum=kw["grad_accum"], epochs=1.0 if kw["epochs"] is None else kw["epochs"],
        max_steps=kw["max_steps"], minutes=kw["minutes"], warmup_ratio=kw["warmup_ratio"],
        weight_decay=kw["weight_decay"], max_length=512 if kw["max_length"] is None else kw["max_length"],
        seed=kw["seed"], lora_r=kw["lora_r"], lora_alpha=2.0 * kw["lora_r"], teacher_samples=kw["teacher_samples"],
    )  # fmt: skip
    cfg.check()
    texts = read_texts(kw["train_file"], kw["text_column"])
    held_out = eval_text(kw["eval_file"], kw["text_column"]) if kw["eval_file"] is not None else None
    model = modelio.load(source, head="causal-lm", dtype=torch.float32, backend="torch")
    tokenizer = modelio.load_tokenizer(source)
    teacher = None
    if kw["teacher"] is not None:
        teacher_source = modelio.resolve(kw["teacher"])
        if modelio.model_head(teacher_source) != "causal-lm":
            raise AppError(f"--teacher {kw['teacher']} is not a causal LM")
        teacher = modelio.load(teacher_source, head="causal-lm", dtype=torch.float32, backend="torch")
        if teacher.config.vocab_size != model.config.vocab_size:
            raise AppError(f"--teacher {kw['teacher']} has another vocabulary ({teacher.config.vocab_size} tokens, "
                           f"the model {model.config.vocab_size})", hint="distil from the model it was compressed from.")  # fmt: skip
    out = Path(kw["output_dir"]) if kw["output_dir"] else default_output_dir(source, model, "lm")
    check_output_dir(out, kw["overwrite"], "--output-dir")  # before the expensive part
    facts = checkpoint_facts(model)
    console.info(f"training {source.name} ({cfg.train_params}) on {len(texts)} texts of {kw['train_file']}; "
                 f"output {out}")  # fmt: skip
    model, res = train_lm(
        model, tokenizer, texts, cfg, eval_text=held_out, eval_seq_len=512, device=str(device), teacher=teacher,
        quiet=kw["quiet"] or kw["json_out"],
    )  # fmt: skip
    if not res.is_main:
        return
    result = {
        "output_dir": str(out),
        "task": "lm",
        "source": source.location,
        "train_file": str(kw["train_file"]),
        "eval_file": None if kw["eval_file"] is None else str(kw["eval_file"]),
        "train_params": cfg.train_params,
        "loss": "distill" if teacher is not None else "next-token",
        "teacher": kw["teacher"],
        "train_blocks": res.train_blocks,
        "teacher_blocks": res.teacher_blocks,
        "teacher_seconds": res.teacher_seconds,
        "train_loss": res.train_loss,
        "first_loss": res.first_loss,
        "last_loss": res.last_loss,
        "steps": res.steps,
        "tokens": res.tokens,
        "seconds": res.seconds,
        "trainable_params": res.trainable_params,
        "eval_perplexity_before": res.ppl_before,
        "eval_perplexity_after": res.ppl_after,
        "eval_tokens": res.eval_tokens,
        "lora_merge_rel_error": res.lora_merge_rel_error,
        **facts,
        "train_dtype": res.dtype,
        "world_size": res.world_size,
        "config": res.config,
        "history": res.history,
        **provenance(device),
    }
    with atomic_dir(out, overwrite=kw["overwrite"], flag="--output-dir") as tmp:
        save_model(model, tokenizer, tmp, {"results.json": result})
    ppl = ""
    if res.ppl_after is not None:
        ppl = f"; eval perplexity {res.ppl_before:.2f} -> {res.ppl_after:.2f}"
    console.result(result, f"trained {res.steps} steps ({res.tokens} tokens), loss {res.train_loss:.4f}{ppl}; "
                           f"saved {out}")  # fmt: skip
