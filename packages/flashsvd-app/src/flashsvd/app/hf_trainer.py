"""The project's ``transformers.Trainer``: what both fine-tuning paths share.

GLUE classifiers (:mod:`flashsvd.app.training`) and causal LMs (:mod:`flashsvd.app.lm_training`) train
through :class:`FlashSVDTrainer`. It differs from a plain ``Trainer`` where the project needs it to:

* **A learning-rate plan.** Linear warm-up, then linear decay to zero at ``plan["total"]`` steps. The total
  sits in a dict that the caller (and the LM path's time budget, which re-estimates it while training) may
  change, so a run cut short by ``--minutes`` still ends its schedule at zero, and a resumed run that was
  given a larger ``--max-steps`` decays towards the new total; Trainer's own schedules fix their length
  when they are built.
* **Checkpoints without pickle.** Trainer's checkpoints ``torch.save`` the optimizer, the scheduler, the
  RNG states and its arguments. The project keeps checkpoints in safetensors + JSON, so the hooks Trainer
  calls to save and to resume (``_save_checkpoint``, ``_save``, ``_load_from_checkpoint``,
  ``_load_optimizer_and_scheduler``, ``_load_rng_state``) are replaced. Everything else about resuming is
  Trainer's own, read from its ``trainer_state.json`` (already JSON): the step, the epoch, skipping the
  batches already seen, the log history and the early-stopping counter.
* **Whole folders or nothing.** Each checkpoint is written under a temporary name and renamed into place
  (:func:`flashsvd.app.outputs.atomic_dir`), so a killed run never leaves half a checkpoint to resume from;
  rotation (``save_total_limit``) is Trainer's ``rotate_checkpoints``.

A checkpoint folder (``checkpoint-<step>/``; ``best/`` holds the model and the two state files)::

    config.json, flashsvd.safetensors | model.safetensors, tokenizer   the model (save_model)
    trainer_state.json      Trainer's TrainerState
    training_args.json      TrainingArguments as JSON (Trainer pickles them) and the caller's run_info
    optimizer.safetensors   optimizer state tensors, keyed "<parameter index>.<name>"
    optimizer.json          parameter groups and the non-tensor optimizer state
    scheduler.json          the LR scheduler's state (its lambda is code: rebuilt from the plan)
    rng.safetensors         per process: the torch CPU (and current CUDA device) generator states
    rng.json                per process: Python's and NumPy's Mersenne-Twister states, as integers

``training_state.json`` beside the checkpoints names the latest complete one: what a rerun resumes from.

This module imports torch and transformers when it is imported; the command modules import it inside the
functions that train, so ``flashsvd --help`` stays fast.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import ExportableState, PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from flashsvd.app.errors import AppError
from flashsvd.app.outputs import atomic_dir, write_json_atomic

#: beside the checkpoints: ``{"latest": "checkpoint-<step>", "step": <step>}``
STATE_FILE = "training_state.json"
TRAINER_STATE = "trainer_state.json"
ARGS_FILE = "training_args.json"
SCHEDULER_FILE = "scheduler.json"


# ---- what a checkpoint holds --------------------------------------------------------------------------


def save_model(model: Any, tokenizer: Any, folder: Path, extra_files: dict[str, Any] | None = None) -> None:
    """Write ``model`` into ``folder``: a compressed model through ``flashsvd.models.save_compressed``, a
    dense one with ``save_pretrained`` (safetensors), the tokenizer beside it, and each ``extra_files``
    entry as JSON. Write into a fresh folder (an ``atomic_dir``): files already there may be replaced."""
    from flashsvd.models import is_compressed, save_compressed

    folder = Path(folder)
    if is_compressed(model):
        save_compressed(model, folder, tokenizer=tokenizer)
    else:
        model.save_pretrained(folder, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    for name, data in (extra_files or {}).items():
        write_json_atomic(folder / name, data)


def save_optimizer(optimizer: Any, folder: Path) -> None:
    """The optimizer's state: tensors to ``optimizer.safetensors``, groups and scalars to ``optimizer.json``."""
    from safetensors.torch import save_file

    sd = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(tensors, str(Path(folder) / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    write_json_atomic(Path(folder) / "optimizer.json", {"param_groups": groups, "scalars": scalars})


def load_optimizer(optimizer: Any, folder: Path) -> None:
    """Read back what :func:`save_optimizer` wrote (torch moves the state onto its parameters' devices)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
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


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """This process's generator states: torch's as tensors, Python's and NumPy's as integers."""
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    version, key, gauss = random.getstate()
    kind, mt, pos, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": {"version": version, "state": list(key), "gauss": gauss},
        "numpy": {"kind": kind, "state": mt.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }  # fmt: skip


def _save_rng(states: list[tuple[dict[str, torch.Tensor], dict[str, Any]]], folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {
        f"{rank}.{name}": t.contiguous() for rank, (ts, _) in enumerate(states) for name, t in ts.items()
    }
    save_file(tensors, str(Path(folder) / "rng.safetensors"))
    write_json_atomic(Path(folder) / "rng.json", {"processes": [meta for _, meta in states]})


def _set_rng(folder: Path, rank: int) -> None:
    """Restore process ``rank``'s generators (rank 0's when the checkpoint has fewer processes)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "rng.json").is_file():
        return
    processes = json.loads((folder / "rng.json").read_text(encoding="utf-8"))["processes"]
    rank = rank if rank < len(processes) else 0
    py, npy = processes[rank]["python"], processes[rank]["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state((npy["kind"], np.asarray(npy["state"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))  # fmt: skip
    tensors = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(tensors[f"{rank}.cpu"])
    if f"{rank}.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors[f"{rank}.cuda"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint ``training_state.json`` names, if it is there (a complete folder: see above)."""
    state = Path(output_dir) / STATE_FILE
    if not state.is_file():
        return None
    name = json.loads(state.read_text(encoding="utf-8")).get("latest")
    path = Path(output_dir) / name if name else None
    return path if path is not None and (path / TRAINER_STATE).is_file() else None


# ---- the trainer ---------------------------------------------------------------------------------------


def training_arguments(
    output_dir: Path, *, on_cuda: bool, seed: int, quiet: bool, **kw: Any
) -> TrainingArguments:
    """``TrainingArguments`` with the settings both paths share: no reporting integrations, seeded data
    order (the same on every process, so a resumed run skips exactly the batches it saw), plain dict batches
    (``remove_unused_columns=False``), no worker processes, Trainer's own logging silenced."""
    return TrainingArguments(
        output_dir=str(output_dir), use_cpu=not on_cuda, report_to=[], seed=seed, data_seed=seed,
        remove_unused_columns=False, label_names=["labels"], disable_tqdm=quiet, log_level="error",
        dataloader_num_workers=0, ddp_find_unused_parameters=False, **kw,
    )  # fmt: skip


class FlashSVDTrainer(Trainer):
    """``Trainer`` with the planned LR schedule and safetensors + JSON checkpoints (see the module docstring).

    Extra arguments: ``plan`` (``{"warmup_ratio": r}``, and ``"total"`` steps, else Trainer's step count),
    ``tokenizer`` (saved with every checkpoint; not given to Trainer as ``processing_class``, which would
    rewrite the model config's special tokens), ``best_dir`` (where a copy of the model at the best
    evaluation goes, if anywhere) and ``run_info`` (JSON stored in every ``training_args.json``).
    """

    def __init__(self, *args: Any, plan: dict[str, Any], tokenizer: Any = None, best_dir: Path | None = None,
                 run_info: dict[str, Any] | None = None, **kw: Any) -> None:  # fmt: skip
        super().__init__(*args, **kw)
        self.plan, self.tokenizer, self.best_dir, self.run_info = plan, tokenizer, best_dir, run_info or {}
        self.remove_callback(PrinterCallback)  # stdout stays clean (--json)

    # ---- schedule

    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.lr_scheduler is None:
            plan = self.plan
            plan.setdefault("total", num_training_steps)

            def factor(step: int) -> float:  # linear warm-up, then linear decay to 0 at the planned total
                total = max(1, plan["total"])
                warm = int(plan["warmup_ratio"] * total)
                if step < warm:
                    return (step + 1) / warm
                return max(0.0, (total - step) / max(1, total - warm))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    # ---- saving

    def _write_model_and_state(self, folder: Path) -> None:
        save_model(self.model, self.tokenizer, folder)
        self.state.save_to_json(str(folder / TRAINER_STATE))
        write_json_atomic(
            folder / ARGS_FILE, {**self.run_info, "trainer": json.loads(self.args.to_json_string())}
        )

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """What Trainer's ``_save_checkpoint`` saves, as safetensors + JSON, each folder whole or not at all;
        ``best_dir`` too when this step's evaluation was the best so far."""
        self.store_flos()
        states = [_rng_state()]
        if self.args.world_size > 1:  # every process's generators, written by the main one
            states = [None] * self.args.world_size
            torch.distributed.all_gather_object(states, _rng_state())
        if not self.args.should_save:
            return
        for cb in [*self.callback_handler.callbacks, self.control]:  # e.g. the early-stopping counter
            if isinstance(cb, ExportableState):
                self.state.stateful_callbacks[type(cb).__name__] = cb.state()
        run_dir = Path(self._get_output_dir(trial))
        if self.best_dir is not None and self.state.best_global_step == self.state.global_step:
            with atomic_dir(self.best_dir, overwrite=True) as tmp:
                self._write_model_and_state(tmp)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        with atomic_dir(run_dir / name, overwrite=True) as tmp:
            self._write_model_and_state(tmp)
            save_optimizer(self.optimizer, tmp)
            sched = {k: v for k, v in self.lr_scheduler.state_dict().items() if k != "lr_lambdas"}
            write_json_atomic(tmp / SCHEDULER_FILE, sched)
            _save_rng(states, tmp)
        write_json_atomic(run_dir / STATE_FILE, {"latest": name, "step": self.state.global_step})
        rotate_checkpoints(str(run_dir), save_total_limit=self.args.save_total_limit, use_mtime=False)

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        """``Trainer.save_model`` through :func:`save_model` (Trainer's adds a pickled ``training_args.bin``)."""
        if self.args.should_save:
            save_model(self.model, self.tokenizer, Path(output_dir or self.args.output_dir))

    # ---- resuming

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The checkpoint's weights. (A compressed model must already have the checkpoint's ranks: build it
        from the checkpoint folder, as ``flashsvd finetune`` does; this fills in the values.)"""
        from flashsvd.models.checkpoint import read_weights

        model = self.model if model is None else model
        _, unexpected = model.load_state_dict(read_weights(resume_from_checkpoint), strict=False)
        if unexpected:
            raise AppError(f"{resume_from_checkpoint} holds weights this model does not have ({unexpected[:3]})",
                           hint="resume with the model the run was started from.")  # fmt: skip

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Optimizer and scheduler state from the checkpoint; the learning rate of the next step is taken from
        the current plan (a rerun with a larger ``--max-steps`` continues on the longer schedule)."""
        if checkpoint is None:
            return
        folder = Path(checkpoint)
        load_optimizer(self.optimizer, folder)
        sched = json.loads((folder / SCHEDULER_FILE).read_text(encoding="utf-8"))
        sched["lr_lambdas"] = [None] * len(self.lr_scheduler.lr_lambdas)
        self.lr_scheduler.load_state_dict(sched)
        step = self.lr_scheduler.last_epoch
        lrs = [base * fn(step) for base, fn in zip(self.lr_scheduler.base_lrs, self.lr_scheduler.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.lr_scheduler._last_lr = lrs

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            _set_rng(Path(checkpoint), self.args.process_index)


def float_weights_for_trainer(model: Any) -> bool:
    """Let Trainer train a model transformers calls quantized although its weights are plain floats.

    A flashsvd checkpoint loads through its quantizer (low-rank factors, trainable) and a GGUF file is
    dequantized to float weights, yet both mark the model ``is_quantized``, which Trainer refuses without
    adapters. The GGUF quantizer is dropped (nothing of it is left in the weights); a flashsvd model
    gets its flag back after training (returns whether it had one to give back).
    """
    if not getattr(model, "is_quantized", False):
        return False
    if not all(p.is_floating_point() for p in model.parameters()):
        return False  # really quantized weights: Trainer says what to do
    if getattr(model, "quantization_method", None) == "gguf" or type(
        getattr(model, "hf_quantizer", None)
    ).__name__.startswith("Gguf"):
        for attr in ("hf_quantizer", "quantization_method"):
            if hasattr(model, attr):
                delattr(model, attr)
        model.is_quantized = False
        return False
    model.is_quantized = False
    return True
