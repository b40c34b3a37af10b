"""SmolLM2-135M decoder-recipe variants, chosen on held-out perplexities (SST-2 dev, STS-B train), confirmed on WikiText-2.

Why: the issue's SmolLM2 targets (WikiText-2 perplexity <= 60 at keep 0.8, <= 35 at 0.9) are scored on
WikiText-2 test, so a recipe must not be picked by that score. ``sst2/dev.tsv`` is the data README's split for
model selection (never trained or calibrated on): its sentences, joined with ``"\\n"``, give 16 windows of
512 tokens. A second selection score is out of the calibration's domain: STS-B train sentences (news,
captions, forums; never used for calibration here), 16 windows of 512 the same way. The WikiText-2 figure (``smollm.py``'s protocol: 32 windows of 512) is printed beside it only to
confirm. Calibration as in ``smollm.py``: SST-2 *train* sentences cut into windows (each recipe's
``calib_samples`` x ``calib_window`` unless ``--n-calib``). fp32 on the CPU, or on a GPU with TF32 off
(``--device cuda``; sampled calibration then differs from the CPU's, same seed). One line per variant:

    cd benchmarks/quality && python smollm_split_search.py --keep 0.8 0.9 -- [VARIANT ...]
"""

import argparse
import copy
import time

import smollm as S
import torch
from common import selection_texts, sst2_sentences, wikitext_test_text

import flashsvd.models as fm
from flashsvd.models.recipe import RECIPES

#: the decoder default of 2026-12-01 (before the search below): calibrated on the model's own samples of
#: 128 windows, no centering, no output Fisher; every "self-*" variant is named by what it changes.
SELF = RECIPES["decoder"].with_(center=False, output_fisher=False, calib_samples=128)
DEC = SELF.with_(calib_source="data")  # the first rows were measured on the SST-2 windows themselves
#: what each "self-ofisher-center-n256-*" variant changes on the decoder default since (it is that variant)
OFC256 = SELF.with_(output_fisher=True, center=True, calib_samples=256)
VARIANTS = {
    "default": DEC,
    # calibrated on the dense model's own samples, each continuing 8 tokens of one SST-2 window
    "self-calibrated": SELF,
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
    # self-calibrated: more / longer samples, other prompt lengths, the fit's options
    "self-n256": SELF.with_(calib_samples=256),
    "self-w512": SELF.with_(calib_window=512),
    "self-p4": SELF.with_(calib_prompt_tokens=4),
    "self-p32": SELF.with_(calib_prompt_tokens=32),
    "self-center": SELF.with_(center=True),
    "self-ofisher-center": SELF.with_(output_fisher=True, center=True),
    "self-grads-all": SELF.with_(gradient_batches=None),
    "self-seq": SELF.with_(sequential=True),
    "self-svdllm-seq": SELF.with_(method="svdllm", sequential=True, update="v"),
    "self-asvd-alloc": SELF.with_(allocation="asvd"),
    **{f"self-damp{d:g}": SELF.with_(options={"damping": d}) for d in (0.01, 0.1)},
    "self-ofisher-center-n256": OFC256,
    "self-ofisher-center-n512": OFC256.with_(calib_samples=512),
    "self-ofisher-center-n256-w512": OFC256.with_(calib_window=512),
    "self-ofisher-center-n256-kv-dense": OFC256.with_(keep_dense=("k", "v")),
    "self-ofisher-center-n256-asvd-alloc": OFC256.with_(allocation="asvd"),
    "self-ofisher-center-n256-p4": OFC256.with_(calib_prompt_tokens=4),
    "self-ofisher-center-n256-damp0.01": OFC256.with_(options={"damping": 0.01}),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--keep", type=float, nargs="+", default=[0.8])
    p.add_argument("--n-calib", type=int, help="calibration windows (default: each recipe's calib_samples)")
    p.add_argument("--device", default="cpu", help="where compression and scoring run (cpu, cuda)")
    a = p.parse_args()
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    dense, tok = S.load()
    dense = dense.to(a.device)
    name = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu"
    print(f"# device {a.device} ({name}) torch {torch.__version__}", flush=True)

    def ids(text: str) -> torch.Tensor:
        return tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]

    sel = selection_texts()
    dev = S.windows(ids(sel["sst2-dev"]), 16, 512)
    wiki = S.windows(ids(wikitext_test_text()), 32, 512)
    sts = S.windows(ids(sel["stsb"]), 16, 512)

    def score(model) -> tuple[float, float, float]:
        return tuple(round(S.perplexity(model, w), 3) for w in (dev, sts, wiki))

    print(f"dense (sst2-dev, stsb, wikitext2) {score(dense)} n_calib={a.n_calib} keep={a.keep}", flush=True)
    for keep in a.keep:
        for key in a.variants:
            rec = VARIANTS[key]
            n, window = a.n_calib or rec.calib_samples, rec.calib_window or 256
            # ~12 tokens a sentence: 6,000 sentences (the published rows' stream) cover 128 x 256 tokens
            calib = S.windows(ids("\n".join(sst2_sentences(max(6000, n * window // 8)))), n, window)
            t0 = time.time()
            m, rep = fm.compress(copy.deepcopy(dense), recipe=rec, keep_ratio=keep, calibration=calib)
            print(
                key,
                f"keep={keep} kept={rep.kept_fraction:.4f} calib={n}x{window}",
                score(m),
                f"{time.time() - t0:.0f}s",
                flush=True,
            )


if __name__ == "__main__":
    main()
