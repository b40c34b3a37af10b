"""Shared helpers of the quality benchmark: data files and result rows.

Not part of any package, and no compression logic: every compressed model comes from
``flashsvd.models.compress`` (the one pipeline) with a recipe.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".." / "shared" / "data"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data --------------------------------------------------------------------------------------------
def sst2_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` sentences sampled (fixed seed) from SST-2 *train* — calibration text only."""
    from flashsvd.app.compression import pick_texts  # the CLI's own sampling of calibration texts

    lines = (DATA / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sents = [ln.split("\t")[0].strip() for ln in lines if ln.strip()]
    return pick_texts(sents, n, min_words=4, seed=seed)


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


def selection_texts() -> dict[str, str]:
    """Texts to choose a decoder recipe by (perplexity), never WikiText-2 test, which reports it:
    ``sst2-dev`` (the data README's selection split; in the calibration's domain) and ``stsb`` (STS-B
    train sentences: news, captions, forums; out of it), each as lines joined with ``"\\n"``."""
    dev = (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    sts = (DATA / "stsb" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return {
        "sst2-dev": "\n".join(ln.split("\t")[0].strip() for ln in dev if ln.strip()),
        "stsb": "\n".join(c for ln in sts for c in ln.split("\t")[7:9] if c.strip()),
    }


def wikitext_test_text() -> str:
    """WikiText-2 raw test: the file's lines (CRLF stripped by ``splitlines``) joined with ``"\\n\\n"``."""
    raw = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    return "\n\n".join(raw.splitlines())


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


def record_variant(writer, out_dir: Path, *, model: str, metric: str, key: str, variant: str, keep: float,
                   rep, value: float, t0: float, digits: int) -> None:  # fmt: skip
    """One compressed variant's CSV row and its ranks/recipe JSON (the same for every model)."""
    stem = "quality_minilm" if metric == "stsb_spearman" else "quality_smollm"
    save_json(out_dir / f"{stem}_{key}_ranks_{keep}.json", {"ranks": rep.ranks, "recipe": rep.recipe})
    writer.row(
        model=model, metric=metric, method=rep.method, variant=variant, keep_ratio=keep,
        kept_fraction=f"{rep.kept_fraction:.6f}", kept_params=rep.target_params_after,
        dense_params=rep.target_params_before, n_dense_layers=len(rep.dense), value=f"{value:.{digits}f}",
        seconds=f"{time.time() - t0:.1f}",
    )  # fmt: skip


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=lambda o: None))


def fmt(x: float) -> str:
    return f"{x:.4g}" if math.isfinite(x) else str(x)
