"""Would a shared input basis help SmolLM2?  Whitened truncation error at equal parameters (issue 15).

Today every projection is factorized on its own, and Q/K/V per head: a rank of one query head costs
``r · (576 + 64)`` parameters, so per-head factors break even only at rank 57.6 of 64, and a gate or up
rank costs ``576 + 1536``.  Projections that read the same input could share one input factor ``U``
(``x·U`` once, then a small output factor per projection): Q, K and V together (a rank costs
``576 + 960``), or gate and up (``576 + 3072``).  Before building that into the pipeline, runtime and
checkpoints, this probe measures what it could buy, block by block, on SmolLM2's own statistics.

For each block, with ``S`` the Cholesky factor of the input's Gram (SST-2 *train* calibration, as the
CLI's), it takes the singular values of the whitened weights ``W·S`` of each group and compares, at
the same parameter count (a fraction ``f`` of the group's dense parameters), the discarded energy
(relative whitened Frobenius error²) of:

* ``separate``: every matrix (every head for Q/K/V) factorized alone, ranks spread over them greedily
  by singular value per parameter (the best allocation for this measure);
* ``shared``: the group stacked (``[W_q; W_k; W_v]``, ``[W_gate; W_up]``; for ``q``, the query heads
  of ``W_q``) and factorized once.

A first-order proxy (the loss weighs heads and matrices differently).  ``--whole q,k,v`` measures the
real thing for a shared basis across heads, which needs no new factorization: the decoder recipe
(ranks × 1, as the published row) at ``--keep`` with those projections factorized as whole matrices
(``x·U·V``, ``V`` split by head) instead of per head, scored as ``smollm.py`` scores (WikiText-2, 32
windows of 512).  Such a model runs on the torch backend only: the flash attention blocks take
per-head factors.  CPU fp32 model, float64 linear algebra; prints a table and writes
``basis_probe.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import time
from pathlib import Path

import torch
from common import log, sst2_sentences, wikitext_test_text
from smollm import load, perplexity, windows

from flashsvd.methods.linalg import whitening_transform


def grams(model, tok, n_windows: int, length: int = 256) -> dict[str, torch.Tensor]:
    """Input Gram (float64) of each block's attention and MLP projections over the calibration."""
    stream = tok("\n".join(sst2_sentences(6000)), add_special_tokens=False, return_tensors="pt")["input_ids"][
        0
    ]
    out: dict[str, torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, mod in (("attn", layer.self_attn.q_proj), ("mlp", layer.mlp.gate_proj)):
            key = f"{i}.{name}"

            def hook(_m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                out[key] = out.get(key, 0) + x.T @ x

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for w in range(n_windows):
            model(input_ids=stream[w * length : (w + 1) * length][None])
    for h in hooks:
        h.remove()
    return out


def spectra(mats: list[torch.Tensor], s: torch.Tensor) -> list[torch.Tensor]:
    return [torch.linalg.svdvals(m.detach().double() @ s) ** 2 for m in mats]


def kept_separate(energies: list[torch.Tensor], costs: list[int], budget: float) -> float:
    """Energy kept by the best spread of ranks over separate matrices within ``budget`` parameters."""
    units = sorted(((float(e) / c, float(e), c) for es, c in zip(energies, costs) for e in es), reverse=True)
    kept = spent = 0.0
    for _, e, c in units:  # singular values of one matrix come in decreasing order: greedy is exact here
        if spent + c > budget:
            break
        kept, spent = kept + e, spent + c
    return kept


def kept_shared(energy: torch.Tensor, cost: int, budget: float) -> float:
    return float(energy[: int(budget // cost)].sum())


def whole(roles: set[str], keep: float) -> None:
    """WikiText-2 perplexity of the decoder recipe with ``roles`` factorized as whole matrices."""
    import flashsvd.models as fm
    from flashsvd.models.adapters.llama import LlamaAdapter
    from flashsvd.models.recipe import RECIPES

    per_head = LlamaAdapter.targets

    def targets(self, model):
        return [dataclasses.replace(t, n_heads=None) if t.role in roles else t for t in per_head(self, model)]

    LlamaAdapter.targets = targets  # this process only: the probe's one change to the pipeline's input
    torch.manual_seed(0)
    dense, tok = load()
    ids = tok(wikitext_test_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    stream = tok("\n".join(sst2_sentences(6000)), add_special_tokens=False, return_tensors="pt")["input_ids"][
        0
    ]
    t0 = time.time()
    # the recipe the probe's rows were measured with (the first decoder recipe, on the SST-2 windows)
    recipe = RECIPES["decoder"].with_(rank_multiple=1, calib_source="data", center=False, output_fisher=False)
    model, rep = fm.compress(
        copy.deepcopy(dense), recipe=recipe, keep_ratio=keep, calibration=windows(stream, 128, 256)
    )
    ppl = perplexity(model, windows(ids, 32, 512))
    log(f"whole {','.join(sorted(roles))}: keep {keep}, kept {rep.kept_fraction:.5f}, WikiText-2 perplexity "
        f"{ppl:.3f} ({time.time() - t0:.0f} s)")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--n-calib", type=int, default=64)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--whole", help="comma-separated roles (q, k, v) factorized as whole matrices, end to end")
    p.add_argument("--keep", type=float, default=0.8)
    args = p.parse_args(argv)
    if args.whole:
        whole(set(args.whole.split(",")), args.keep)
        return 0
    model, tok = load()
    cfg = model.config
    d, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    log(f"calibration: {args.n_calib} windows of 256 SST-2 train tokens")
    g = grams(model, tok, args.n_calib)
    rows = []
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        s_attn = whitening_transform(g[f"{i}.attn"]).forward
        s_mlp = whitening_transform(g[f"{i}.mlp"]).forward
        heads = [w for proj in (a.q_proj, a.k_proj, a.v_proj) for w in proj.weight.detach().split(hd)]
        q_heads = list(a.q_proj.weight.detach().split(hd))
        groups = {
            "q": (q_heads, [hd + d] * len(q_heads), a.q_proj.weight, s_attn),
            "qkv": (heads, [hd + d] * len(heads), torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), s_attn),
            "gate+up": ([m.gate_proj.weight, m.up_proj.weight], [m.gate_proj.weight.shape[0] + d] * 2,
                        torch.cat([m.gate_proj.weight, m.up_proj.weight]), s_mlp),
        }  # fmt: skip
        for name, (mats, costs, stacked, s) in groups.items():
            sep = spectra(mats, s)
            shared = spectra([stacked.detach()], s)[0]
            total = float(shared.sum())
            dense = stacked.numel()
            for f in args.fractions:
                budget = f * dense
                row = {"block": i, "group": name, "fraction": f,
                       "separate_error": 1 - kept_separate(sep, costs, budget) / total,
                       "shared_error": 1 - kept_shared(shared, stacked.shape[0] + d, budget) / total}  # fmt: skip
                rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "basis_probe.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for name in ("q", "qkv", "gate+up"):
        for f in args.fractions:
            sel = [r for r in rows if r["group"] == name and r["fraction"] == f]
            sep = sum(r["separate_error"] for r in sel) / len(sel)
            sha = sum(r["shared_error"] for r in sel) / len(sel)
            better = sum(r["shared_error"] < r["separate_error"] for r in sel)
            log(f"{name} at {f:.1f} of its parameters: mean relative whitened error² separate {sep:.4f}, "
                f"shared {sha:.4f} ({sha / sep:.2f}x); shared better in {better} of {len(sel)} blocks")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
