"""What rounding ranks to a hardware multiple costs in quality (MiniLM, zero-shot STS-B).

    python benchmarks/quality/rounding.py --out benchmarks/results/quality_minilm_rounding.csv

The encoder recipe (``flashsvd.models.recipe.RECIPES["encoder"]``) with ``rank_multiple`` 1, 8, 16, 32
at each keep_ratio. Statistics depend only on the dense model and the calibration data, so they are
collected once with the pipeline's own ``collect`` and every cell then runs the pipeline's
``allocate`` + ``factor_targets`` on a copy of the dense model: the same steps ``compress`` runs,
without recollecting the same statistics for each cell. Calibration: the CLI's default (2,048 seeded
SST-2 train sentences of at least 4 words, batches of 32); scored on all 4,248 STS-B train pairs.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import minilm
from common import ResultWriter, log, sst2_sentences

from flashsvd.models.adapters import get_adapter
from flashsvd.models.pipeline import allocate, collect, factor_targets, unpad
from flashsvd.models.recipe import RECIPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5])
    p.add_argument("--multiples", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--n-calib", type=int, default=2048)
    a = p.parse_args()
    dense, tok = minilm.load()
    sts = minilm.STSB(tok)
    batches = minilm.padded_batches(tok, sst2_sentences(a.n_calib))
    base = RECIPES["encoder"].with_(gradients="simcse")
    targets = get_adapter(dense).targets(dense)
    t0 = time.time()
    info: dict = {}
    stats = collect(dense, targets, base, batches, unpad(batches), info)
    log(f"statistics in {time.time() - t0:.0f}s ({info})")
    writer = ResultWriter(a.out)
    for keep in a.ratios:
        for m in a.multiples:
            t0 = time.time()
            recipe = base.with_(rank_multiple=m)
            alloc, how = allocate(dense, targets, recipe, keep, stats, batches)
            model = copy.deepcopy(dense)
            factor_targets(model, get_adapter(model).targets(model), alloc.ranks, recipe.method, stats,
                           recipe.method_options(), {})  # fmt: skip
            value = sts.spearman(model, tok)
            writer.row(
                model="all-MiniLM-L6-v2", metric="stsb_spearman", method=recipe.method,
                variant=f"encoder recipe, ranks x{m}", keep_ratio=keep, kept_fraction=f"{alloc.keep_fraction:.6f}",
                kept_params=alloc.kept_params, dense_params=alloc.dense_params,
                n_dense_layers=sum(r is None for r in alloc.ranks.values()), value=f"{value:.5f}",
                seconds=f"{time.time() - t0:.1f}",
            )  # fmt: skip
            log(
                f"keep={keep} x{m}: kept {alloc.keep_fraction:.5f} unrounded {how.get('unrounded')} -> {value:.4f}"
            )


if __name__ == "__main__":
    main()
