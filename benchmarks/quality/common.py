"""Shared helpers of the quality benchmark: data files, calibration capture, applying factorizations.

Not part of any package. Quality is measured by replacing each target weight with the merged
low-rank approximation ``Ŵ`` (numerically the same function as running the factors).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flashsvd.methods import LayerShape, LayerStatistics, factorize

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data --------------------------------------------------------------------------------------------
def sst2_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences sampled (fixed seed) from SST-2 *train* — calibration text only."""
    lines = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sents = [ln.split("\t")[0].strip() for ln in lines if ln.strip()]
    sents = [s for s in sents if len(s.split()) >= 4]
    rng = random.Random(seed)
    return rng.sample(sents, n)


def stsb_pairs() -> tuple[list[str], list[str], list[float]]:
    """STS-B pairs from ``stsb/train.tsv`` (GLUE columns 8, 9, 10; non-numeric score rows skipped)."""
    a, b, y = [], [], []
    for ln in (DATA / "stsb" / "train.tsv").read_text(encoding="utf-8").splitlines():
        cols = ln.split("\t")
        if len(cols) < 10:
            continue
        try:
            score = float(cols[9])
        except ValueError:
            continue
        a.append(cols[7])
        b.append(cols[8])
        y.append(score)
    return a, b, y


def wikitext_test_text() -> str:
    """WikiText-2 raw test: the file's lines (CRLF stripped by ``splitlines``) joined with ``"\\n\\n"``."""
    raw = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    return "\n\n".join(raw.splitlines())


# ---- targets and factorization -------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    module: nn.Linear
    n_heads: int | None
    kind: str

    @property
    def shape(self) -> LayerShape:
        w = self.module.weight
        return LayerShape(self.name, w.shape[1], w.shape[0], self.n_heads, self.kind)


def apply_factorization(
    targets: Iterable[Target],
    ranks: dict[str, int | None],
    method: str,
    stats: dict[str, LayerStatistics] | None = None,
    **options,
) -> dict[str, float]:
    """Replace each target weight by its merged rank-``r`` approximation (``None`` = leave dense)."""
    errors = {}
    for t in targets:
        r = ranks.get(t.name)
        if r is None:
            continue
        st = None if stats is None else stats.get(t.name)
        bias = t.module.bias.data if t.module.bias is not None else None
        f = factorize(
            t.module.weight.data, r, method=method, stats=st, bias=bias, n_heads=t.n_heads, **options
        )
        t.module.weight.data.copy_(f.merged_weight().to(t.module.weight.dtype))
        if f.bias is not None and bias is not None:
            bias.copy_(f.bias)
        elif f.bias is not None:
            raise ValueError(f"{t.name}: the factorization added a bias the dense layer cannot hold")
        errors[t.name] = f.error
    return errors


class Snapshot:
    """Saves target weights so every table cell starts from the dense model."""

    def __init__(self, targets: Iterable[Target]) -> None:
        self.saved = {
            t.name: (
                t.module,
                t.module.weight.data.clone(),
                None if t.module.bias is None else t.module.bias.data.clone(),
            )
            for t in targets
        }

    def restore(self) -> None:
        for module, w, b in self.saved.values():
            module.weight.data.copy_(w)
            if b is not None:
                module.bias.data.copy_(b)


class _Stop(Exception):
    pass


def capture_block_inputs(first_block: nn.Module, run: Callable[[object], object], batches) -> list:
    """Cache ``(args, kwargs)`` reaching ``first_block`` for each batch (the forward stops there)."""
    cached = []

    def hook(module, args, kwargs):
        cached.append((tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args), dict(kwargs)))
        raise _Stop

    h = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for b in batches:
                with contextlib.suppress(_Stop):
                    run(b)
    finally:
        h.remove()
    return cached


def run_block(block: nn.Module, inp):
    """Run one cached ``(args, kwargs)`` through ``block``; returns the next block's ``(args, kwargs)``."""
    args, kwargs = inp
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    return (hidden, *args[1:]), kwargs


# ---- results -----------------------------------------------------------------------------------------
FIELDS = [
    "model",
    "metric",
    "method",
    "variant",
    "keep_ratio",
    "kept_fraction",
    "kept_params",
    "dense_params",
    "n_dense_layers",
    "value",
    "seconds",
    "device",
    "torch",
    "date",
]


class ResultWriter:
    """Appends rows to a CSV (header written once), flushing each row so partial tables survive."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        self.f = path.open("a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=FIELDS)
        if new:
            self.w.writeheader()

    def row(self, **kw) -> None:
        kw.setdefault("device", f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
        kw.setdefault("torch", torch.__version__)
        kw.setdefault("date", time.strftime("%Y-%m-%d"))
        self.w.writerow({k: kw.get(k, "") for k in FIELDS})
        self.f.flush()


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=lambda o: None))


def fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)
