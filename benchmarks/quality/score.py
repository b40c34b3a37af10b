"""Score a saved checkpoint on the quality benchmark's protocols (no compression happens here).

    python benchmarks/quality/score.py stsb CHECKPOINT        # zero-shot STS-B Spearman (minilm.py)
    python benchmarks/quality/score.py wikitext CHECKPOINT    # WikiText-2 perplexity (smollm.py)
    python benchmarks/quality/score.py selection CHECKPOINT   # SST-2 dev and STS-B perplexity (recipe choice)

Used to check the CLI targets: ``flashsvd compress ...`` writes the checkpoint, this scores it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metric", choices=["stsb", "wikitext", "selection"])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--eval-windows", type=int, default=32, help="wikitext: windows of 512 tokens")
    a = p.parse_args()
    from transformers import AutoTokenizer

    import flashsvd.models as fm

    model = fm.load(a.checkpoint).float().eval()
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    if a.metric == "stsb":
        import minilm

        value = minilm.STSB(tok).spearman(model, tok)
    elif a.metric == "wikitext":
        import smollm
        from common import wikitext_test_text

        ids = tok(wikitext_test_text(), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        value = smollm.perplexity(model, smollm.windows(ids, a.eval_windows, 512))
    else:  # the decoder recipe's selection scores (smollm_split_search.py): 16 windows of 512 each
        import smollm
        from common import selection_texts

        value = {
            name: smollm.perplexity(
                model,
                smollm.windows(
                    tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0], 16, 512
                ),
            )
            for name, text in selection_texts().items()
        }
    report = json.loads((a.checkpoint / "config.json").read_text())["quantization_config"]
    shown = ", ".join(f"{k} {v:.3f}" for k, v in value.items()) if isinstance(value, dict) else f"{value:.5f}"
    log(f"{a.checkpoint}: {a.metric} = {shown} (kept {report['kept_fraction']:.5f})")
    print(json.dumps({"checkpoint": str(a.checkpoint), "metric": a.metric, "value": value,
                      "kept_fraction": report["kept_fraction"]}))  # fmt: skip


if __name__ == "__main__":
    main()
