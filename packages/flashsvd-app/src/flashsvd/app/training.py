"""Fine-tuning of (compressed) GLUE classifiers and regressors, on transformers' ``Trainer``.

What trains: for a compressed model, the low-rank factors (``u``, ``v`` and their biases) and the task head
(classifier, pooler); everything else stays frozen. A dense model trains fully (``train_all``).

How: :class:`flashsvd.app.hf_trainer.FlashSVDTrainer`, the ``Trainer`` subclass the causal-LM path uses
too (its linear warm-up/decay plan, its safetensors + JSON checkpoints and resume). The dev set is the
``eval_dataset`` and the task's metrics (:mod:`flashsvd.app.tasks.metrics`, through
:func:`flashsvd.app.tasks.runner.score`) are ``compute_metrics``; the model is evaluated and checkpointed
every ``eval_steps`` (default: once per epoch) and at the last step; ``--early-stopping`` is Trainer's
``EarlyStoppingCallback``; the number of checkpoints kept is ``save_total_limit``. Under ``torchrun``
Trainer trains data-parallel (``batch_size`` per process) and only the main process writes and prints.

Layout of ``output_dir``::

    checkpoint-<step>/   model + tokenizer and the training state (see flashsvd.app.hf_trainer)
    best/                the best model so far on the dev metric (model, tokenizer, trainer_state.json,
                         training_args.json)
    runs/                TensorBoard logs
    training_state.json  which checkpoint is the latest (what a rerun resumes from)
    results.json         the final summary (written by ``flashsvd finetune``)

No pickle anywhere: tensors go to safetensors, the rest to JSON. Every folder is written to a temporary
name and renamed. Importing this module imports transformers (``flashsvd finetune`` imports it only when
it runs).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from flashsvd.app.console import Console
from flashsvd.app.errors import AppError
from flashsvd.app.hf_trainer import (
    ARGS_FILE,
    STATE_FILE,
    TRAINER_STATE,
    FlashSVDTrainer,
    float_weights_for_trainer,
    training_arguments,
)
from flashsvd.app.runtime import launched_rank, launched_world_size
from flashsvd.app.tasks import runner
from flashsvd.app.tasks.data import Examples
from flashsvd.app.tasks.registry import TaskSpec

HEAD_PREFIXES = ("classifier", "pre_classifier", "score", "head", "pooler", "bert.pooler", "roberta.pooler")


@dataclass
class TrainConfig:
    epochs: float = 3.0
    learning_rate: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_steps: int | None = None
    eval_steps: int | None = None
    early_stopping: bool = False
    patience: int = 3
    max_length: int = 128
    eval_batch_size: int = 64
    keep_checkpoints: int = 2
    train_all: bool = False
    seed: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainResult:
    """What a run did: steps, the dev evaluations (``history``) and the best of them."""

    step: int = 0
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    metric: str = ""
    world_size: int = 1
    is_main: bool = True


def trainable_parameters(model: Any, train_all: bool) -> list[tuple[str, Any]]:
    """``(name, parameter)`` pairs to train: all of them, or low-rank factors plus the task head."""
    from flashsvd.models import LowRankLinear

    names = []
    lowrank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    for name, p in model.named_parameters():
        owner = name.rsplit(".", 1)[0]
        head = name.startswith(HEAD_PREFIXES) or any(f".{h}." in f".{name}" for h in ("classifier", "pooler"))
        if train_all or owner in lowrank or head:
            names.append((name, p))
    return names


# ---- the run folder ------------------------------------------------------------------------------------


#: what ``train`` writes into its output folder (a folder holding anything else is not a run of ours)
RUN_ENTRIES = ("best", "runs", STATE_FILE, "results.json")
#: hyper-parameters a resumed run must share with the run it continues (the rest may change: a rerun
#: with a larger --max-steps or --epochs extends the run)
RESUME_MUST_MATCH = {
    "learning_rate": "--learning-rate", "batch_size": "--batch-size", "warmup_ratio": "--warmup-ratio",
    "weight_decay": "--weight-decay", "max_length": "--max-length", "train_all": "--train-all",
    "seed": "--seed", "grad_clip": "grad_clip",
}  # fmt: skip


def is_run_folder(output_dir: Path) -> bool:
    """Whether ``output_dir`` holds only what a fine-tune run writes (leftovers of killed saves aside)."""
    from flashsvd.app.outputs import is_leftover

    return all(
        p.name in RUN_ENTRIES or p.name.startswith("checkpoint-") or is_leftover(p)
        for p in Path(output_dir).iterdir()
    )


def check_resume_config(checkpoint: Path, cfg: TrainConfig) -> None:
    """Refuse to resume ``checkpoint`` with other hyper-parameters than it was trained with.

    Continuing with a new learning rate or batch size would train with the new values while the run's
    records kept the old ones; another number of processes would change the global batch and the batches
    to skip. The user must either repeat the old values or start over.
    """
    start_over = "pass --no-resume --overwrite to start over."
    try:
        saved = json.loads((checkpoint / ARGS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AppError(f"{checkpoint} was written by an earlier flashsvd (before fine-tuning ran on transformers' "
                       "Trainer) and cannot be resumed", hint=start_over) from None  # fmt: skip
    except (OSError, ValueError) as err:
        raise AppError(f"{checkpoint}/{ARGS_FILE} cannot be read ({err}); the checkpoint is damaged",
                       hint=start_over) from None  # fmt: skip
    old, now = saved.get("config") or {}, asdict(cfg)
    diff = [(flag, old[k], now[k]) for k, flag in RESUME_MUST_MATCH.items() if k in old and old[k] != now[k]]
    if saved.get("world_size", 1) != launched_world_size():
        diff.append(
            ("processes (torchrun --nproc-per-node)", saved.get("world_size", 1), launched_world_size())
        )
    if diff:
        told = "; ".join(f"{flag} was {was}, now {new}" for flag, was, new in diff)
        raise AppError(
            f"cannot resume {checkpoint} with other hyper-parameters ({told})",
            hint="repeat the run's values to continue it, or pass --no-resume --overwrite (or another "
            "--output-dir) to start a new run with the new ones.",
        )


def evaluate_dev(
    model, tokenizer, spec: TaskSpec, dev: Examples, cfg: TrainConfig, device
) -> dict[str, float]:
    """Every metric of ``spec`` on ``dev``, in one process (the Trainer run scores through ``_scorer``)."""
    preds = runner.predict_head(model, tokenizer, dev, spec, cfg.eval_batch_size, cfg.max_length, device)
    return runner.score(spec, preds, dev.labels)


# ---- pieces of the Trainer run ---------------------------------------------------------------------------


class _Rows:
    """``Examples`` as a map-style dataset of dicts; :class:`_Batches` tokenizes them a batch at a time."""

    def __init__(self, examples: Examples) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples
        return {"text": ex.texts[i], "pair": None if ex.pairs is None else ex.pairs[i], "label": ex.labels[i]}


class _Batches:
    """Data collator: tokenizes as evaluation does (:func:`runner.tokenize`: padded to the longest,
    truncated to ``max_length``) and adds float (regression) or class-id labels."""

    def __init__(self, tokenizer: Any, max_length: int, regression: bool) -> None:
        self.tokenizer, self.max_length, self.regression = tokenizer, max_length, regression

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        pairs = None if rows[0]["pair"] is None else [r["pair"] for r in rows]
        batch = runner.tokenize(self.tokenizer, [r["text"] for r in rows], pairs, self.max_length, "cpu")
        labels = [r["label"] for r in rows]
        batch["labels"] = torch.tensor(labels, dtype=torch.float32 if self.regression else torch.long)
        return batch


def _scorer(spec: TaskSpec):
    """``compute_metrics``: class ids (argmax) or regression scores, scored by :func:`runner.score`."""

    def compute(pred: Any) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = logits.reshape(-1) if spec.kind == "regression" else logits.argmax(-1)
        return runner.score(spec, preds.tolist(), pred.label_ids.reshape(-1).tolist())

    return compute


class _Progress(TrainerCallback):
    """The console's progress bar (step, loss) and a line per evaluation, on the main process; stamps each
    evaluation in the log history with the seconds since training started; stops a run whose loss is no
    longer finite (with a message, rather than training on NaN)."""

    def __init__(self, console: Console, spec: TaskSpec) -> None:
        self.console, self.spec, self.bar, self.t0 = console, spec, None, 0.0

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
        if state.is_world_process_zero:
            self.bar = self.console.bar(state.max_steps, f"finetune {self.spec.name}", unit="step",
                                        initial=state.global_step)  # fmt: skip

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            raise AppError(
                f"the loss became {loss} at step {state.global_step}", hint="lower --learning-rate."
            )
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}")

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        key = f"eval_{self.spec.main_metric}"
        if state.log_history and key in state.log_history[-1]:
            state.log_history[-1]["seconds"] = time.perf_counter() - self.t0
        value = (metrics or {}).get(key)
        if value is None or not state.is_world_process_zero:
            return
        best, at = state.best_metric, state.best_global_step  # Trainer updates them after this callback
        if best is None or at is None or value > best:
            best, at = value, state.global_step
        self.console.info(f"step {state.global_step}: dev {self.spec.main_metric} {value:.4f} "
                          f"(best {best:.4f} at step {at})")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _tensorboard(folder: Path, console: Console) -> list[Any]:
    """Trainer's TensorBoard callback writing into ``folder`` (the main process only), if installed."""
    try:
        from transformers.integrations import TensorBoardCallback

        callback = TensorBoardCallback()
    except (ImportError, RuntimeError):
        console.info("TensorBoard logging is off: pip install tensorboard")
        return []
    callback.logging_dir = str(folder)
    return [callback]


def _early_stop_count(state: Any) -> int:
    saved = (state.stateful_callbacks or {}).get("EarlyStoppingCallback") or {}
    saved = saved[-1] if isinstance(saved, list) and saved else saved
    return int((saved.get("attributes") or {}).get("early_stopping_patience_counter", 0)) if saved else 0


def _result(state: Any, spec: TaskSpec, cfg: TrainConfig, total: int, world: int, main: bool) -> TrainResult:
    """The run's summary from Trainer's state (the evaluations are in its log history)."""
    key = f"eval_{spec.main_metric}"
    history = [
        {"step": e["step"], "seconds": e.get("seconds"),
         **{m: e[f"eval_{m}"] for m in spec.metrics if f"eval_{m}" in e}}
        for e in state.log_history if key in e
    ]  # fmt: skip
    best = state.best_metric if state.best_metric is not None and math.isfinite(state.best_metric) else None
    return TrainResult(
        step=state.global_step, total_steps=total, best_metric=best,
        best_step=state.best_global_step if best is not None else None,
        stopped_early=cfg.early_stopping and _early_stop_count(state) >= cfg.patience and state.global_step < total,
        history=history, config=asdict(cfg), task=spec.name, metric=spec.main_metric, world_size=world, is_main=main,
    )  # fmt: skip


# ---- the run ------------------------------------------------------------------------------------------


def train(
    model: Any,
    tokenizer: Any,
    spec: TaskSpec,
    train_data: Examples,
    dev: Examples,
    cfg: TrainConfig,
    output_dir: Path,
    device: Any,
    console: Console,
    resume_from: Path | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``train_data``, evaluating on ``dev``; see the module docstring for outputs.

    ``resume_from`` (a ``checkpoint-<step>`` folder of this run) continues the run: the model must have
    been loaded from that folder (its ranks), the rest (weights, optimizer, schedule, data position, random
    generators, early-stopping counter) is restored here. A run already at its last step, or stopped
    early, is not trained further. Only the main process writes; all of them return the summary.
    """
    import torch
    from transformers import EarlyStoppingCallback
    from transformers.trainer_callback import TrainerState

    output_dir = Path(output_dir)
    params = trainable_parameters(model, cfg.train_all)
    if not params:
        raise AppError("nothing to train: the model has no low-rank factors nor a task head",
                       hint="pass --train-all to fine-tune every parameter.")  # fmt: skip
    wanted = {id(p) for _, p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    world = launched_world_size()
    steps_per_epoch = math.ceil(len(train_data) / (cfg.batch_size * world))
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    every = cfg.eval_steps or steps_per_epoch
    main = launched_rank() == 0
    if resume_from is not None:
        saved = TrainerState.load_from_json(str(Path(resume_from) / TRAINER_STATE))
        if saved.global_step >= total or (cfg.early_stopping and _early_stop_count(saved) >= cfg.patience):
            console.info(f"{resume_from} is at step {saved.global_step}: nothing left to train")
            model.eval()
            return _result(saved, spec, cfg, max(total, saved.global_step), world, main)
        console.info(f"resuming from {resume_from} at step {saved.global_step}")
    args = training_arguments(
        output_dir, on_cuda=torch.device(device).type == "cuda", seed=cfg.seed, quiet=True,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, max_steps=total,
        max_grad_norm=cfg.grad_clip, eval_strategy="steps", eval_steps=every, save_strategy="steps",
        save_steps=every, save_total_limit=cfg.keep_checkpoints, metric_for_best_model=spec.main_metric,
        greater_is_better=True, logging_steps=1, logging_nan_inf_filter=False,
        restore_callback_states_from_checkpoint=True,
    )  # fmt: skip
    progress = _Progress(console, spec)
    callbacks = [progress, *_tensorboard(output_dir / "runs", console)]
    if cfg.early_stopping:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.patience))
    quantized = float_weights_for_trainer(model)
    run_info = {"task": spec.name, "metric": spec.main_metric, "config": asdict(cfg), "world_size": world}
    trainer = FlashSVDTrainer(
        model=model, args=args, train_dataset=_Rows(train_data), eval_dataset=_Rows(dev),
        data_collator=_Batches(tokenizer, cfg.max_length, spec.kind == "regression"),
        compute_metrics=_scorer(spec), callbacks=callbacks, plan={"warmup_ratio": cfg.warmup_ratio, "total": total},
        tokenizer=tokenizer, best_dir=output_dir / "best", run_info=run_info,
    )  # fmt: skip
    try:
        trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    finally:
        progress.close()
        if quantized:
            model.is_quantized = True
        model.eval()
    return _result(trainer.state, spec, cfg, total, trainer.args.world_size, trainer.is_world_process_zero())
