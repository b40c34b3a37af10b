"""SmolLM2-135M decoder-recipe variants, chosen on SST-2 *dev* perplexity, confirmed on WikiText-2 test.

Why: the issue's SmolLM2 targets (WikiText-2 perplexity <= 60 at keep 0.8, <= 35 at 0.9) are scored on
WikiText-2 test, so a recipe must not be picked by that score. ``sst2/dev.tsv`` is the data README's split for
model selection (never trained or calibrated on): its sentences, joined with ``"\\n"``, give 16 windows of
512 tokens. A second selection score is out of the calibration's domain: STS-B train sentences (news,
captions, forums; never used for calibration here), 16 windows of 512 the same way. The WikiText-2 figure (``smollm.py``'s protocol: 32 windows of 512) is printed beside it only to
confirm. Calibration as in ``smollm.py``: SST-2 *train* sentences, ``--n-calib`` windows of 256 tokens.
CPU, fp32. One line per variant:

    cd benchmarks/quality && python smollm_split_search.py --keep 0.8 [VARIANT ...]
"""

import argparse
import copy
import time

import smollm as S
import torch
from common import selection_texts, sst2_sentences, wikitext_test_text

import flashsvd.models as fm
from flashsvd.models.recipe import RECIPES

DEC = RECIPES["decoder"].with_(calib_source="data")  # the rows below were measured on the SST-2 windows
VARIANTS = {
    "default": DEC,
    # calibrated on the dense model's own samples, each continuing 8 tokens of one SST-2 window
    "self-calibrated": DEC.with_(calib_source="model"),
    "center": DEC.with_(center=True),
    "ofisher": DEC.with_(output_fisher=True),
    "ofisher-center": DEC.with_(output_fisher=True, center=True),
    "svdllm-seq": DEC.with_(method="svdllm", sequential=True, update="v"),
    # SVD-LLM's sequential whitening: each block's statistics from the compressed prefix's outputs
    "seq": DEC.with_(sequential=True),
    "asvd-alloc": DEC.with_(allocation="asvd"),
    "seq-center": DEC.with_(sequential=True, center=True),
    # K/V are GQA-narrow (576 -> 192): little to save, and every query head reads them
    "kv-dense": DEC.with_(keep_dense=("k", "v")),
    "qkv-dense": DEC.with_(keep_dense=("q", "k", "v")),
    # the loss-curve allocation's Fisher from every calibration window instead of 16
    "grads-all": DEC.with_(gradient_batches=None),
    "ofisher-center-grads-all": DEC.with_(output_fisher=True, center=True, gradient_batches=None),
    # ridge toward isotropic inputs: less fitted to the calibration text's subspace
    **{f"damp{d:g}": DEC.with_(options={"damping": d}) for d in (0.01, 0.1, 0.3, 1.0)},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--keep", type=float, default=0.8)
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--device", default="cpu", help="where compression and scoring run (cpu, cuda)")
    a = p.parse_args()
    torch.manual_seed(0)
    dense, tok = S.load()
    dense = dense.to(a.device)
    print(f"# device {a.device} torch {torch.__version__}", flush=True)

    def ids(text: str) -> torch.Tensor:
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    sel = selection_texts()
    dev = S.windows(ids(sel["sst2-dev"]), 16, 512)
    wiki = S.windows(ids(wikitext_test_text()), 32, 512)
    sts = S.windows(ids(sel["stsb"]), 16, 512)
    calib = S.windows(ids("\n".join(sst2_sentences(max(6000, 32 * a.n_calib)))), a.n_calib, 256)

    def score(model) -> tuple[float, float, float]:
        return tuple(round(S.perplexity(model, w), 3) for w in (dev, sts, wiki))

    print(f"dense (sst2-dev, stsb, wikitext2) {score(dense)} n_calib={a.n_calib} keep={a.keep}", flush=True)
    for key in a.variants:
        t0 = time.time()
        m, rep = fm.compress(copy.deepcopy(dense), recipe=VARIANTS[key], keep_ratio=a.keep, calibration=calib)
        print(key, f"kept={rep.kept_fraction:.4f}", score(m), f"{time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
