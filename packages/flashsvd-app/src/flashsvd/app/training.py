"""Fine-tuning of (compressed) classifiers: the loop, its checkpoints, and resuming after interruption.

What trains: for a compressed model, the low-rank factors (``u``, ``v`` and their biases) and the task head
(classifier, pooler); everything else stays frozen. A dense model trains fully (``train_all``).

Layout of ``output_dir``::

    checkpoint-<step>/   model + tokenizer, optimizer.safetensors (+ optimizer.json), trainer_state.json
    best/                the best model so far on the dev metric (model + tokenizer + trainer_state.json)
    runs/                TensorBoard logs
    training_state.json  which checkpoint is the latest (what a rerun resumes from)
    results.json         the final summary

No pickle anywhere: tensors go to safetensors, the rest (step, learning-rate schedule position, history,
optimizer hyper-parameters) to JSON. Every folder is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashsvd.app.console import Console
from flashsvd.app.errors import AppError
from flashsvd.app.outputs import atomic_dir, write_json_atomic
from flashsvd.app.tasks import runner
from flashsvd.app.tasks.data import Examples
from flashsvd.app.tasks.registry import TaskSpec

STATE_FILE = "training_state.json"
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
class TrainerState:
    step: int = 0
    total_steps: int = 0
    steps_per_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    task: str = ""
    metric: str = ""
    stopped_early: bool = False


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


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then linear decay to 0 at ``total``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    return base * max(0.0, (total - step) / max(1, total - warmup))


# ---- optimizer state as safetensors + JSON --------------------------------------------------------------


def save_optimizer(optimizer: Any, folder: Path) -> None:
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if hasattr(value, "shape"):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups, "scalars": scalars}, indent=1))


def load_optimizer(optimizer: Any, folder: Path, device: Any) -> None:
    from safetensors.torch import load_file

    meta = json.loads((folder / "optimizer.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"), device=str(device))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- the loop ----------------------------------------------------------------------------------------


def _save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    from flashsvd.models import is_compressed, save_compressed

    if is_compressed(model):
        save_compressed(model, folder)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _write_folder(folder: Path, fill) -> None:
    """Write a complete folder under a temporary name, then put it in place (replacing an old one)."""
    with atomic_dir(folder, overwrite=True) as tmp:
        fill(tmp)


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
    records kept the old ones; the user must either repeat the old values or start over.
    """
    try:
        saved = (
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")).get("config") or {}
        )
    except (OSError, ValueError) as err:
        raise AppError(f"{checkpoint}/trainer_state.json cannot be read ({err}); the checkpoint is damaged",
                       hint="pass --no-resume --overwrite to start over.") from None  # fmt: skip
    now = asdict(cfg)
    diff = [
        (flag, saved[k], now[k]) for k, flag in RESUME_MUST_MATCH.items() if k in saved and saved[k] != now[k]
    ]
    if diff:
        told = "; ".join(f"{flag} was {old}, now {new}" for flag, old, new in diff)
        raise AppError(
            f"cannot resume {checkpoint} with other hyper-parameters ({told})",
            hint="repeat the run's values to continue it, or pass --no-resume --overwrite (or another "
            "--output-dir) to start a new run with the new ones.",
        )


def latest_checkpoint(output_dir: Path) -> Path | None:
    state = output_dir / STATE_FILE
    if not state.is_file():
        return None
    name = json.loads(state.read_text()).get("latest")
    path = output_dir / name if name else None
    return path if path is not None and (path / "trainer_state.json").is_file() else None


def evaluate_dev(
    model, tokenizer, spec: TaskSpec, dev: Examples, cfg: TrainConfig, device
) -> dict[str, float]:
    preds = runner.predict_head(model, tokenizer, dev, spec, cfg.eval_batch_size, cfg.max_length, device)
    return runner.score(spec, preds, dev.labels)


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
) -> TrainerState:
    """Fine-tune ``model`` on ``train_data``, evaluating on ``dev``; see the module docstring for outputs."""
    import torch

    torch.manual_seed(cfg.seed)
    params = trainable_parameters(model, cfg.train_all)
    if not params:
        raise AppError("nothing to train: the model has no low-rank factors nor a task head",
                       hint="pass --train-all to fine-tune every parameter.")  # fmt: skip
    wanted = {id(p) for _, p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate,
    )
    steps_per_epoch = math.ceil(len(train_data) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)
    eval_steps = cfg.eval_steps or steps_per_epoch
    state = TrainerState(total_steps=total, steps_per_epoch=steps_per_epoch, config=asdict(cfg), task=spec.name,
                         metric=spec.main_metric)  # fmt: skip
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())
        state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
        state.total_steps = total
        load_optimizer(optimizer, resume_from, device)
        rng = resume_from / "rng.safetensors"
        if rng.is_file():
            from safetensors.torch import load_file

            torch.set_rng_state(load_file(str(rng))["cpu"])
        console.info(f"resuming from {resume_from} at step {state.step}")
    writer = _tensorboard(output_dir / "runs", console)
    labels_dtype = torch.float32 if spec.kind == "regression" else torch.long
    model.train()
    bar = console.bar(total, f"finetune {spec.name}", unit="step", initial=state.step)
    t0 = time.perf_counter()
    try:
        while state.step < total and not state.stopped_early:
            epoch, offset = divmod(state.step, steps_per_epoch)
            order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for b in range(offset, steps_per_epoch):
                if state.step >= total:
                    break
                idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size].tolist()
                texts = [train_data.texts[i] for i in idx]
                pairs = None if train_data.pairs is None else [train_data.pairs[i] for i in idx]
                inputs = runner.tokenize(tokenizer, texts, pairs, cfg.max_length, device)
                inputs["labels"] = torch.tensor(
                    [train_data.labels[i] for i in idx], dtype=labels_dtype, device=device
                )
                lr = lr_at(state.step, total, warmup, cfg.learning_rate)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                loss = model(**inputs).loss
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise AppError(f"the loss became {value} at step {state.step}",
                                   hint="lower --learning-rate.")  # fmt: skip
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if writer is not None:
                    writer.add_scalar("train/loss", value, state.step)
                    writer.add_scalar("train/lr", lr, state.step)
                if state.step % eval_steps == 0 or state.step == total:
                    _evaluate_and_save(model, tokenizer, spec, dev, cfg, device, optimizer, state, output_dir,
                                       writer, console, time.perf_counter() - t0)  # fmt: skip
                    model.train()
                    if state.stopped_early:
                        break
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    model.eval()
    return state


def _evaluate_and_save(model, tokenizer, spec, dev, cfg, device, optimizer, state, output_dir, writer, console,
                       seconds) -> None:  # fmt: skip
    import torch

    model.eval()
    metrics = evaluate_dev(model, tokenizer, spec, dev, cfg, device)
    value = metrics[spec.main_metric]
    state.history.append({"step": state.step, "seconds": seconds, **metrics})
    if writer is not None:
        for k, v in metrics.items():
            writer.add_scalar(f"eval/{k}", v, state.step)
        writer.flush()
    improved = state.best_metric is None or value > state.best_metric
    if improved:
        state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
    else:
        state.bad_evals += 1
        if cfg.early_stopping and state.bad_evals >= cfg.patience:
            state.stopped_early = True
    console.info(f"step {state.step}: dev {spec.main_metric} {value:.4f} (best {state.best_metric:.4f} "
                 f"at step {state.best_step})")  # fmt: skip
    if improved:
        _write_folder(
            output_dir / "best",
            lambda d: (
                _save_model(model, tokenizer, d),
                write_json_atomic(d / "trainer_state.json", asdict(state)),
            ),
        )
    name = f"checkpoint-{state.step}"

    def fill(d: Path) -> None:
        from safetensors.torch import save_file

        _save_model(model, tokenizer, d)
        save_optimizer(optimizer, d)
        save_file({"cpu": torch.get_rng_state()}, str(d / "rng.safetensors"))
        write_json_atomic(d / "trainer_state.json", asdict(state))

    _write_folder(output_dir / name, fill)
    write_json_atomic(output_dir / STATE_FILE, {"latest": name, "step": state.step})
    ckpts = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _tensorboard(folder: Path, console: Console):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        console.info("TensorBoard logging is off: pip install tensorboard")
        return None
    return SummaryWriter(log_dir=str(folder))
