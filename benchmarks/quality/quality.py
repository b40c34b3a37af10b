"""Regenerate the quality tables (method × keep_ratio) of issue 5 and write CSV + PNG.

    python benchmarks/quality/quality.py minilm --out benchmarks/results
    python benchmarks/quality/quality.py smollm --out benchmarks/results
    python benchmarks/quality/quality.py --plot benchmarks/results/quality_minilm.csv

CPU only. See minilm.py / smollm.py for the exact protocols; every cell is a ``flashsvd.models.compress``
call with a recipe (``--only`` picks variants by their keys in ``VARIANTS``).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common import ResultWriter, log


def plot(csv_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[tuple[float, float]]] = {}
    dense = None
    for r in rows:
        if r["method"] == "dense":
            dense = float(r["value"])
            continue
        series.setdefault(f"{r['method']} ({r['variant']})", []).append(
            (float(r["kept_fraction"]), float(r["value"]))
        )
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    metric = rows[0]["metric"] if rows else ""
    if dense is not None:
        ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
    if metric == "wikitext2_ppl":
        ax.set_yscale("log")
    ax.set_xlabel("kept fraction of the compressed layers' parameters")
    ax.set_ylabel(metric)
    ax.set_title(rows[0]["model"] if rows else "")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    out = csv_path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", choices=["minilm", "smollm"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--ratios", type=float, nargs="+", default=None)
    p.add_argument("--only", nargs="+", default=None, help="subset of method variants")
    p.add_argument("--smoke", action="store_true", help="tiny eval/calibration sets to check the pipeline")
    p.add_argument(
        "--n-calib",
        type=int,
        default=None,
        help="calibration size (MiniLM: sentences; SmolLM2: 256-token windows)",
    )
    p.add_argument("--tag", default="", help="suffix of the CSV name")
    p.add_argument("--plot", type=Path, default=None, help="only plot an existing CSV")
    a = p.parse_args()
    if a.plot:
        log(f"wrote {plot(a.plot)}")
        return
    if a.model is None:
        p.error("give a model (minilm|smollm) or --plot CSV")
    a.out.mkdir(parents=True, exist_ok=True)
    csv_path = a.out / f"quality_{a.model}{a.tag}.csv"
    writer = ResultWriter(csv_path)
    only = list(a.only) if a.only else None  # run in the order given
    if a.model == "minilm":
        import minilm

        kw = {"n_calib": a.n_calib} if a.n_calib else {}
        minilm.run(a.out, writer, ratios=tuple(a.ratios or (0.9, 0.75, 0.5)), only=only, smoke=a.smoke, **kw)
    else:
        import smollm

        kw = {"n_calib": a.n_calib} if a.n_calib else {}
        smollm.run(a.out, writer, ratios=tuple(a.ratios or (0.9, 0.8, 0.5)), only=only, smoke=a.smoke, **kw)
    try:
        log(f"wrote {plot(csv_path)}")
    except ImportError:
        log("matplotlib missing: no plot")


if __name__ == "__main__":
    main()
