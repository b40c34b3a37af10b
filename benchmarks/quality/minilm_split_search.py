"""MiniLM at keep 0.5: recipe variants scored on the even and the odd STS-B pairs separately.

Why: the issue's keep-0.5 target (>= 0.770 zero-shot STS-B) is missed by the default (loss-curve)
recipe, and the reported score uses every pair of stsb/train.tsv. Variants are *chosen* on the even pairs
and *confirmed* on the odd ones, so no choice is tuned on the pairs that confirm it. Calibration: 2,048
SST-2 train sentences, as the benchmark tables. CPU, fp32. Prints one line per variant:

    cd benchmarks/quality && python minilm_split_search.py [--keep 0.5] [VARIANT ...]
"""

import argparse
import copy
import time

import minilm as M
import torch
from common import sst2_sentences

import flashsvd.models as fm
from flashsvd.models.recipe import RECIPES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="*")
    p.add_argument("--keep", type=float, default=0.5)
    a = p.parse_args()
    torch.manual_seed(0)
    dense, tok = M.load()
    sts = M.STSB(tok)

    def score(model):
        return sts.spearman_parts(model, tok, 2)

    batches: dict[int, list] = {}  # calibration batches per recipe.calib_samples (2,048 as the tables)
    enc = RECIPES["encoder"]
    variants = {
        "default": enc,
        "uniform": enc.with_(allocation="uniform"),
        "uniform-noqk": enc.with_(allocation="uniform", keep_dense=()),
        "svdllm-seq-c": enc.with_(
            method="svdllm", output_fisher=False, allocation="uniform", sequential=True, update="v"
        ),
        "svdllm-seq-c-curve": enc.with_(method="svdllm", output_fisher=False, sequential=True, update="v"),
        "svdllm-seq-c-uv": enc.with_(
            method="svdllm", output_fisher=False, allocation="uniform", sequential=True, update="uv"
        ),
        "svdllm-seq-c-asvd": enc.with_(
            method="svdllm", output_fisher=False, allocation="asvd", sequential=True, update="v"
        ),
        "svdllm-seq-c-asvd-uv": enc.with_(
            method="svdllm", output_fisher=False, allocation="asvd", sequential=True, update="uv"
        ),
        "asvd-alloc": enc.with_(allocation="asvd"),
        "svdllm-seq-c-r1": enc.with_(
            method="svdllm",
            output_fisher=False,
            allocation="uniform",
            sequential=True,
            update="v",
            rank_multiple=1,
        ),
        # ridge toward isotropic inputs (calibration is SST-2, scoring STS-B: another domain)
        **{f"damp{d:g}": enc.with_(options={"damping": d}) for d in (0.01, 0.1, 0.3, 1.0, 3.0)},
        **{
            f"svdllm-seq-c-asvd-damp{d:g}": enc.with_(
                method="svdllm",
                output_fisher=False,
                allocation="asvd",
                sequential=True,
                update="v",
                options={"damping": d},
            )
            for d in (0.1, 0.3)
        },
        "lean-nocenter": RECIPES["encoder-lean"].with_(center=False),
        # Q/K compressed too (their budget goes to the rest); more calibration text for the whitening
        "lean-noqk": RECIPES["encoder-lean"].with_(keep_dense=()),
        "lean-qkdense": RECIPES["encoder-lean"].with_(keep_dense=("q", "k")),
        "lean-calib4096": RECIPES["encoder-lean"].with_(calib_samples=4096),
        "whiten-seq-asvd": enc.with_(allocation="asvd", output_fisher=False, sequential=True),
    }
    only = a.variants or list(variants)
    print("dense", score(dense), flush=True)
    for k in only:
        t0 = time.time()
        n = variants[k].calib_samples
        if n not in batches:
            batches[n] = M.padded_batches(tok, sst2_sentences(n))
        m, rep = fm.compress(
            copy.deepcopy(dense), recipe=variants[k], keep_ratio=a.keep, calibration=batches[n]
        )
        print(
            k,
            f"keep={a.keep} kept={rep.kept_fraction:.4f}",
            [round(x, 4) for x in score(m)],
            f"{time.time() - t0:.0f}s",
            flush=True,
        )


if __name__ == "__main__":
    main()
