"""Recovery fine-tuning of (compressed) causal LMs: next-token loss on local text, through ``transformers.Trainer``.

Why a module of its own, apart from :mod:`flashsvd.app.training` (GLUE classifiers): a GLUE run evaluates
on a dev set, keeps checkpoints and resumes; a language model's recovery run (accelerate underneath: bf16
autocast, gradient accumulation, data-parallel under ``torchrun``) reads free text, packs it into blocks,
may distil from a teacher or train LoRA adapters, and ends in one ordinary flashsvd checkpoint. Keeping
it here lets ``flashsvd finetune --task lm`` and ``benchmarks/quality/recovery.py`` call the same code
from Python without the CLI. ``datasets``/``peft`` are imported inside the functions that need them.

What trains (``train_params``):

* ``all``: every low-rank factor ``u``, ``v`` and its bias; dense layers (embeddings, norms, LM head, the
  layers left dense) stay frozen. A dense model trains everything.
* ``v``: only the ``v`` factors.
* ``lora``: LoRA adapters (peft, :mod:`flashsvd.models.peft_lora`) on every low-rank layer (a dense
  model: on every linear layer). Before saving, each adapter is merged into its layer's factors with the
  rank kept: ``u·v + s·Aᵀ·Bᵀ`` is re-factorized to its best approximation of the layer's rank (an exact SVD
  of the thin factors), so the checkpoint has the input's size; the relative Frobenius error of that
  truncation is reported (``lora_merge_rel_error``).

The Trainer is the project's subclass (:mod:`flashsvd.app.hf_trainer`, shared with the GLUE path: its
linear warm-up/decay plan, which the time budget re-estimates). No intermediate checkpoints
(``save_strategy="no"``): a recovery run is short and ends in one checkpoint, written by the caller with
:func:`flashsvd.app.hf_trainer.save_model`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flashsvd.app.errors import AppError

TRAIN_PARAMS = ("all", "v", "lora")
#: the WikiText-2 test file: perplexity is reported on it, so it is never trained on
WIKITEXT_TEST_NAMES = ("wiki.test.raw", "wiki.test.tokens")


@dataclass
class LMTrainConfig:
    """Hyper-parameters of a recovery run (the CLI flags of ``flashsvd finetune --task lm``)."""

    train_params: str = "all"
    learning_rate: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int | None = None
    minutes: float | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int = 512
    grad_clip: float = 1.0
    seed: int = 0
    lora_r: int = 16
    lora_alpha: float = 32.0
    bf16: bool | None = None  # None: on CUDA when supported
    logging_steps: int = 10
    distill_alpha: float = 1.0  # with a teacher: the share of the KL loss (the rest is next-token loss)
    teacher_samples: int = 0  # with a teacher: also train on this many blocks it writes (teacher_blocks)
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.train_params not in TRAIN_PARAMS:
            raise AppError(f"unknown --train-params {self.train_params!r}", hint="use all, v or lora.")
        if self.max_length < 2:
            raise AppError(f"--max-length must be at least 2 for language modelling, got {self.max_length}")
        if self.teacher_samples < 0:
            raise AppError(f"--teacher-samples must be 0 or more, got {self.teacher_samples}")


# ---- data ------------------------------------------------------------------------------------------


def refuse_wikitext_test(path: Path, flag: str = "--train-file") -> None:
    """Training on the WikiText-2 test split would make the reported perplexity meaningless."""
    if Path(path).name.lower() in WIKITEXT_TEST_NAMES:
        raise AppError(
            f"{flag} {path} is the WikiText-2 test split, on which perplexity is reported: refusing to train on it",
            hint="train on other text (e.g. ../shared/data/sst2/train.tsv, stsb/train.tsv); "
            "wiki.test.raw is for --eval-file only.",
        )


def read_texts(path: Path, text_column: str | None = None) -> list[str]:
    """The texts of a local file (see ``flashsvd finetune --help``).

    ``.txt``/``.raw``: one text per line (``datasets.load_dataset("text")``). ``.tsv``/``.csv``/``.jsonl``/
    ``.json``: read by :func:`flashsvd.app.tasks.data.read_table` (the reader calibration data goes
    through too), ``text_column`` (a name, a 0-based index, or several joined by commas), else a
    ``sentence``/``text`` column (or the ``sentence1``+``sentence2`` pair, ...), else the first column; a
    column's texts come before the next column's. A table without a header line has its columns named
    ``0``, ``1``, ...: pass ``--text-column 7,8`` for GLUE's STS-B layout there.
    """
    from flashsvd.app.tasks.data import TABLE_SUFFIXES, read_table

    path = Path(path)
    if path.suffix.lower() in TABLE_SUFFIXES:
        table = read_table(path)
        cols = table.pick(text_column, "--text-column")
        texts = [t.strip() for c in cols for t in table.columns[c]]
        where = f" in column(s) {', '.join(cols)}" if len(table.names) > 1 else ""
    else:
        if text_column is not None:
            raise AppError(f"--text-column applies to .tsv/.csv/.jsonl files, not {path.name}")
        texts, where = [t.strip() for t in _text_lines(path)], ""
    texts = [t for t in texts if t]
    if not texts:
        raise AppError(f"{path} holds no text{where}")
    return texts


def _text_lines(path: Path) -> list[str]:
    import datasets

    if not path.is_file():
        raise AppError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    datasets.disable_progress_bars()
    try:
        return [str(t) for t in datasets.load_dataset("text", data_files=str(path), split="train")["text"]]
    except Exception as err:  # say which file, not a datasets traceback
        raise AppError(
            f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from err


class PackedBlocks:
    """Token ids cut into blocks of ``block`` tokens (a ``torch.utils.data.Dataset`` of LM examples); ``ids``
    is a flat sequence, or already ``[blocks, block]``."""

    def __init__(self, ids: Any, block: int) -> None:
        self.block = block
        self.data = ids if ids.dim() == 2 else ids[: (len(ids) // block) * block].view(-1, block)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.data[i]
        return {"input_ids": x, "attention_mask": x.new_ones(x.shape), "labels": x.clone()}

    @property
    def tokens(self) -> int:
        return int(self.data.numel())


def pack(tokenizer: Any, texts: list[str], block: int, what: str = "--train-file") -> PackedBlocks:
    """Tokenize ``texts`` (each followed by the end-of-text token), concatenate, cut into ``block``-token blocks."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 1000):
        for row in tokenizer(texts[start : start + 1000], add_special_tokens=False)["input_ids"]:
            ids += row
            if eos is not None:
                ids.append(eos)
    blocks = PackedBlocks(torch.tensor(ids, dtype=torch.long), block)
    if len(blocks) == 0:
        raise AppError(f"{what} holds {len(ids)} tokens, less than one block of --max-length {block}",
                       hint="pass more text or a smaller --max-length.")  # fmt: skip
    return blocks


#: tokens of a training block that prompt each teacher sample
TEACHER_PROMPT_TOKENS = 8


def teacher_blocks(
    teacher: Any, data: PackedBlocks, n: int, *, device: Any, seed: int = 0, batch_size: int = 1024
) -> Any:
    """``n`` blocks of ``data.block`` tokens sampled from ``teacher`` (temperature 1, no truncation).

    Why: a recovery run on a small corpus overfits it. Measured on the H200 (SmolLM2 at keep 0.8, SST-2 +
    STS-B sentences, ~700K tokens): 3.5 and 11 minutes of distillation both end at 1.63× the dense
    WikiText-2 perplexity, the longer run after 36 epochs. The teacher's own samples are as varied as its
    pretraining text, and distillation labels them for free. Each sample continues the first
    :data:`TEACHER_PROMPT_TOKENS` tokens of a random training block. The seed fixes the samples, so every
    ``torchrun`` process draws the same ones (the Trainer then shards them like the rest of the data).

    ``batch_size``: HF's eager ``generate`` is host-bound for a small model, so a step costs about the same
    at any batch; measured on the H200 (SmolLM2-135M, 2026-11-30), 4,000 blocks of 512 tokens took about 5
    minutes at 256 per call (≈ 6.8K tokens/s). 1024 per call holds a ~12 GB bf16 KV cache for SmolLM2.
    """
    import torch

    if n <= 0:
        return data.data[:0]
    g = torch.Generator().manual_seed(seed)
    prompts = data.data[torch.randint(len(data), (n,), generator=g), :TEACHER_PROMPT_TOKENS]
    new = data.block - prompts.shape[1]
    pad = getattr(teacher.generation_config, "pad_token_id", None)
    eos = getattr(teacher.generation_config, "eos_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(0, n, batch_size):
            p = prompts[i : i + batch_size].to(device)
            ids = teacher.generate(input_ids=p, attention_mask=torch.ones_like(p), do_sample=True,
                                   temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new,
                                   min_new_tokens=new, pad_token_id=pad, use_cache=True)  # fmt: skip
            out.append(ids[:, : data.block].cpu())
    return torch.cat(out)


def eval_text(path: Path, text_column: str | None = None) -> str:
    """Held-out text for perplexity: a text file as ``flashsvd eval --task wikitext2`` reads it (lines joined
    by blank lines), a table's texts joined the same way."""
    path = Path(path)
    if path.suffix.lower() in (".tsv", ".csv", ".jsonl", ".json"):
        return "\n\n".join(read_texts(path, text_column))
    from flashsvd.app.tasks.data import load_text
    from flashsvd.app.tasks.registry import get_task

    if not path.is_file():
        raise AppError(f"--eval-file {path} does not exist")
    return load_text(get_task("wikitext2"), "test", path)[0]


# ---- what trains ---------------------------------------------------------------------------------------


def lowrank_names(model: Any) -> list[str]:
    from flashsvd.models import LowRankLinear

    return [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]


def select_trainable(model: Any, train_params: str, cfg: LMTrainConfig | None = None) -> Any:
    """Set ``requires_grad`` for ``train_params`` (wrapping the model with LoRA adapters for ``lora``).

    Returns the model to train (the peft wrapper for ``lora``).
    """
    from flashsvd.models import is_compressed

    cfg = cfg or LMTrainConfig(train_params=train_params)
    compressed = is_compressed(model)
    names = lowrank_names(model)
    if compressed and not names:
        raise AppError("the checkpoint holds no low-rank layers to train")
    if train_params == "lora":
        from peft import get_peft_model

        from flashsvd.models.peft_lora import lora_config

        for p in model.parameters():
            p.requires_grad_(False)
        targets: Any = names if compressed else "all-linear"
        config = lora_config(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets,
                             task_type="CAUSAL_LM")  # fmt: skip
        return get_peft_model(model, config)
    if train_params == "v" and not compressed:
        raise AppError("--train-params v trains the v factors of a compressed model; this model is dense",
                       hint="use --train-params all (or lora) for a dense model.")  # fmt: skip
    owners = set(names)
    for name, p in model.named_parameters():
        owner, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if not compressed:
            p.requires_grad_(True)
        elif train_params == "v":
            p.requires_grad_(owner in owners and leaf == "v")
        else:
            p.requires_grad_(owner in owners)
    return model


def _refactor(left: Any, right: Any, rank: int) -> tuple[Any, Any, float, float]:
    """Best rank-``rank`` factors ``(u, v)`` of ``left @ right`` (thin QR on both sides, SVD of the core);
    also the dropped and total squared singular values."""
    import torch

    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.T)
    uc, s, vh = torch.linalg.svd(r1 @ r2.T)
    root = s[:rank].sqrt()
    u = q1 @ (uc[:, :rank] * root)
    v = (root[:, None] * vh[:rank]) @ q2.T
    return u, v, float((s[rank:] ** 2).sum()), float((s**2).sum())


def merge_lora(model: Any) -> tuple[Any, float | None]:
    """Merge the LoRA adapters of a peft-wrapped model; returns ``(plain model, relative merge error)``.

    A dense model merges as peft does (exactly). A compressed one re-factorizes each low-rank layer at its
    own rank (see the module docstring); the error is ``‖dropped singular values‖ / ‖all‖`` over all layers.
    """
    import torch

    from flashsvd.models import LowRankLinear, is_compressed

    base = model.get_base_model()
    if not is_compressed(base):
        return model.merge_and_unload(), None
    dropped = total = 0.0
    with torch.no_grad():
        for module in model.modules():
            layer = getattr(module, "base_layer", None)
            if not isinstance(layer, LowRankLinear) or not hasattr(module, "lora_A"):
                continue
            for name in module.active_adapters:
                if name not in module.lora_A:
                    continue
                a = module.lora_A[name].weight.double()  # [rl, in]
                b = module.lora_B[name].weight.double() * module.scaling[name]  # [out, rl]
                u, v = layer.u.double(), layer.v.double()
                if layer.per_head:
                    heads, r, d = v.shape
                    us, vs = [], []
                    for h in range(heads):
                        lh = torch.cat([u[:, h * r : (h + 1) * r], a.T], 1)
                        rh = torch.cat([v[h], b[h * d : (h + 1) * d].T], 0)
                        uh, vh, dr, tt = _refactor(lh, rh, r)
                        us.append(uh), vs.append(vh)
                        dropped, total = dropped + dr, total + tt
                    new_u, new_v = torch.cat(us, 1), torch.stack(vs)
                else:
                    new_u, new_v, dr, tt = _refactor(
                        torch.cat([u, a.T], 1), torch.cat([v, b.T], 0), layer.rank
                    )
                    dropped, total = dropped + dr, total + tt
                layer.u.data = new_u.to(layer.u.dtype).contiguous()
                layer.v.data = new_v.to(layer.v.dtype).contiguous()
    return model.unload(), (math.sqrt(dropped / total) if total else 0.0)


# ---- the run --------------------------------------------------------------------------------------------


@dataclass
class LMResult:
    train_loss: float | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    train_blocks: int = 0
    train_tokens_available: int = 0
    trainable_params: int = 0
    lora_merge_rel_error: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    ppl_before: float | None = None
    ppl_after: float | None = None
    eval_tokens: int | None = None
    world_size: int = 1
    teacher_blocks: int = 0  # training blocks written by the teacher (``teacher_samples``)
    teacher_seconds: float = 0.0
    is_main: bool = True
    dtype: str = "float32"
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _trainer_class():
    import torch

    from flashsvd.app.hf_trainer import FlashSVDTrainer

    class RecoveryTrainer(FlashSVDTrainer):
        """The project's Trainer (planned LR schedule, see :mod:`flashsvd.app.hf_trainer`) with optional
        distillation from a teacher."""

        def __init__(self, *args, teacher=None, distill_alpha=1.0, **kw):
            super().__init__(*args, **kw)
            self.teacher, self.distill_alpha = teacher, distill_alpha
            if teacher is not None:  # our loss is a mean: Trainer scales it for accumulation
                self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch.nn.functional as F

            labels = inputs["labels"]
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            if next(self.teacher.parameters()).device != labels.device:
                self.teacher.to(labels.device)
            with torch.no_grad():
                t = self.teacher(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                ).logits
            s = out.logits[:, :-1].float()
            kl = F.kl_div(F.log_softmax(s, -1).flatten(0, 1), F.log_softmax(t[:, :-1].float(), -1).flatten(0, 1),
                          log_target=True, reduction="batchmean")  # fmt: skip
            loss = self.distill_alpha * kl
            if self.distill_alpha < 1:
                ce = F.cross_entropy(s.flatten(0, 1), labels[:, 1:].flatten())
                loss = loss + (1 - self.distill_alpha) * ce
            return (loss, out) if return_outputs else loss

    return RecoveryTrainer


def _callbacks(plan: dict[str, Any], cfg: LMTrainConfig, history: list[dict[str, float]]):
    from transformers import TrainerCallback

    class Budget(TrainerCallback):
        """Stop after ``cfg.minutes``: the step total is re-estimated from the measured step time (the same
        on every rank: the slowest rank's time is used), so the LR schedule still ends at zero."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step = state.global_step
            if cfg.minutes is not None and (step in (5, 20, 50) or step % 100 == 0):
                elapsed = _max_over_ranks(time.perf_counter() - self.t0)
                fits = int(step * cfg.minutes * 60 / max(elapsed, 1e-9))
                plan["total"] = max(step + 1, min(state.max_steps, fits))
            if step >= plan["total"]:
                control.should_training_stop = True

    class Record(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                history.append({"step": state.global_step, "loss": float(logs["loss"]),
                                "lr": float(logs.get("learning_rate", 0.0))})  # fmt: skip

    return [Budget(), Record()]


def _max_over_ranks(value: float) -> float:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())
    return value


def train_lm(
    model: Any,
    tokenizer: Any,
    train_texts: list[str],
    cfg: LMTrainConfig,
    *,
    eval_text: str | None = None,
    eval_seq_len: int = 512,
    eval_max_tokens: int | None = None,
    device: str = "auto",
    teacher: Any = None,
    quiet: bool = True,
    work_dir: Path | None = None,
) -> tuple[Any, LMResult]:
    """Fine-tune ``model`` with next-token loss on ``train_texts``; returns ``(trained model, result)``.

    The returned model is a plain (compressed or dense) model: LoRA adapters are merged. Perplexity on
    ``eval_text`` (non-overlapping windows of ``eval_seq_len``, the first ``eval_max_tokens`` tokens) is
    measured before and after, on the main process. ``teacher`` (a causal LM with the same tokenizer, e.g.
    the dense model) switches the loss to distillation: KL(teacher ‖ student) per token, mixed with the
    next-token loss by ``cfg.distill_alpha``.
    """
    import tempfile

    import torch

    from flashsvd.app.hf_trainer import float_weights_for_trainer, training_arguments
    from flashsvd.app.tasks import runner

    cfg.check()
    torch.manual_seed(cfg.seed)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache:
        model.config.use_cache = False  # no KV cache while training; restored for the saved config
    data = pack(tokenizer, train_texts, cfg.max_length)
    quantized = float_weights_for_trainer(model)
    model = select_trainable(model, cfg.train_params, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise AppError("nothing to train with --train-params " + cfg.train_params)
    if cfg.teacher_samples and teacher is None:
        raise AppError("--teacher-samples needs --teacher (the model that writes the samples)")
    on_cuda = device != "cpu" and torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(on_cuda and torch.cuda.is_bf16_supported())
    plan: dict[str, Any] = {"warmup_ratio": cfg.warmup_ratio}
    if cfg.max_steps is not None:
        plan["total"] = cfg.max_steps
    history: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        args = training_arguments(
            tmp, on_cuda=on_cuda, seed=cfg.seed, quiet=quiet, per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
            weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs,
            max_steps=cfg.max_steps if cfg.max_steps is not None else -1, max_grad_norm=cfg.grad_clip,
            bf16=bf16, save_strategy="no", eval_strategy="no", logging_steps=cfg.logging_steps,
            logging_first_step=True,
        )  # fmt: skip
        dev = args.device
        if teacher is not None:  # outside the student's autocast: bf16 weights keep it as fast
            teacher.to(dev, dtype=torch.bfloat16 if bf16 else None).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        t_gen = time.perf_counter()
        written = teacher_blocks(teacher, data, cfg.teacher_samples, device=dev, seed=cfg.seed)
        gen_seconds = time.perf_counter() - t_gen
        if len(written):
            data = PackedBlocks(torch.cat([data.data, written]), cfg.max_length)
        trainer = _trainer_class()(
            model=model, args=args, train_dataset=data, plan=plan, teacher=teacher,
            distill_alpha=cfg.distill_alpha, callbacks=_callbacks(plan, cfg, history),
        )  # fmt: skip
        main = trainer.is_world_process_zero()
        res = LMResult(train_blocks=len(data), train_tokens_available=data.tokens, trainable_params=trainable,
                       world_size=trainer.args.world_size, is_main=main, dtype="bfloat16" if bf16 else "float32",
                       config=asdict(cfg), teacher_blocks=len(written), teacher_seconds=gen_seconds)  # fmt: skip
        if eval_text is not None and main:
            model.to(dev)
            ppl = runner.perplexity(model, tokenizer, eval_text, eval_seq_len, eval_max_tokens, dev)
            res.ppl_before, res.eval_tokens = ppl["perplexity"], ppl["tokens"]
        t0 = time.perf_counter()
        out = trainer.train()
        res.seconds = time.perf_counter() - t0
        res.steps = int(trainer.state.global_step)
        res.train_loss = float(out.training_loss)
        res.tokens = res.steps * cfg.batch_size * cfg.grad_accum * trainer.args.world_size * cfg.max_length
        res.history = history
        res.first_loss = history[0]["loss"] if history else None
        res.last_loss = history[-1]["loss"] if history else None
        model = trainer.model
        del trainer
    if cfg.train_params == "lora":
        model, res.lora_merge_rel_error = merge_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if use_cache:
        model.config.use_cache = use_cache
    if quantized:
        model.is_quantized = True
    model.eval()
    if eval_text is not None and main:
        ppl = runner.perplexity(model, tokenizer, eval_text, eval_seq_len, eval_max_tokens, dev)
        res.ppl_after = ppl["perplexity"]
    return model, res


def checkpoint_facts(model: Any) -> dict[str, Any]:
    """``keep_ratio``, ``kept_fraction``, ``method`` and ``ranks`` carried by a compressed model's config."""
    from flashsvd.models.checkpoint import flashsvd_block

    block = flashsvd_block(model.config) or {}
    return {k: block.get(k) for k in ("method", "keep_ratio", "kept_fraction", "ranks")}
