"""``flashsvd demo``: the embedded default job, offline, on the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Compress the packaged all-MiniLM-L6-v2 with two methods and compare them with the dense model.

Offline and CPU-friendly: each model is scored zero-shot on STS-B (Spearman of cosine similarities,
pairs from <data-dir>/stsb/train.tsv, a seeded subset by default) and measured (parameters, memory,
latency). Calibration texts are STS-B sentences not used for scoring. Without the data folder the demo
still compresses and measures, and says where the data was expected.

\b
Examples:
  flashsvd demo
  flashsvd demo --all-pairs --methods svd,whiten,svdllm --keep-ratio 0.6
  flashsvd demo --data-dir /path/to/shared/data --json > demo.json
"""


def demo(
    methods: Annotated[
        str, typer.Option("--methods", help="Comma-separated methods to compare.")
    ] = "svd,whiten",
    keep_ratio: Annotated[
        float, typer.Option("--keep-ratio", help="Fraction of targeted parameters kept.")
    ] = 0.75,
    max_pairs: Annotated[int, typer.Option("--max-pairs", min=1, help="STS-B pairs to score.")] = 1000,
    all_pairs: Annotated[
        bool, typer.Option("--all-pairs", help="Score every STS-B pair in the file.")
    ] = False,
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", min=1, help="Calibration sentences.")
    ] = 128,
    data_dir: Annotated[
        Path,
        typer.Option("--data-dir", help="Folder holding stsb/train.tsv (relative to the current directory)."),
    ] = Path("../shared/data"),
    batch_size: O.BatchSize = 64,
    max_length: O.MaxLength = 64,
    device: O.Device = "auto",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Also write the comparison JSON.")
    ] = None,
    seed: O.Seed = 0,
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


@guarded
def run(**kw) -> None:
    import time

    import torch

    from flashsvd.app import modelio
    from flashsvd.app.compression import RankChoice, compress_model
    from flashsvd.app.console import Console, mib, silence_libraries
    from flashsvd.app.evaluation import model_facts
    from flashsvd.app.measurement import DEFINITIONS, measure_forward
    from flashsvd.app.outputs import check_result_file, write_json_atomic
    from flashsvd.app.runtime import provenance, resolve_device
    from flashsvd.app.tasks import runner
    from flashsvd.app.tasks.data import Columns, load_examples
    from flashsvd.app.tasks.registry import get_task

    console = Console(kw["quiet"], kw["json_out"])
    silence_libraries()
    if kw["output"] is not None:  # checked before the work, not after it
        check_result_file(Path(kw["output"]))
    device = resolve_device(kw["device"])
    backend = "flash" if device.type == "cuda" else "torch"
    names = [m.strip().lower() for m in kw["methods"].split(",") if m.strip()]
    spec = get_task("stsb")
    source = modelio.resolve("default")
    tok = modelio.load_tokenizer(source)
    stsb_file = Path(kw["data_dir"]) / "stsb" / "train.tsv"
    data = calib = None
    if stsb_file.is_file():
        everything = load_examples(spec, "train", stsb_file, None, Columns())
        n = len(everything) if kw["all_pairs"] else min(kw["max_pairs"], len(everything))
        data = everything.subset(n, kw["seed"])
        used = set(data.texts)
        calib = [t for t in everything.texts if t not in used][: kw["calib_samples"]] or data.texts[
            : kw["calib_samples"]
        ]
    else:
        typer.echo(
            f"note: STS-B data not found at {stsb_file.resolve()} (expected ../shared/data from the repository "
            "root); pass --data-dir DIR. Scoring is skipped; data-aware methods are skipped too.",
            err=True,
        )
    sample = (data.texts if data else ["A man is playing a flute.", "A plane is taking off."] * 64)[
        : kw["batch_size"]
    ]
    inputs = runner.tokenize(tok, sample, None, kw["max_length"], device)

    rows, results = [], []

    def evaluate(model, label: str, seconds: float | None, report=None) -> None:
        entry = {"model": label, "compress_seconds": seconds}
        if data is not None:
            t0 = time.perf_counter()
            sims = runner.predict_sts_zeroshot(model, tok, data, kw["batch_size"], kw["max_length"], device,
                                               console.progress)  # fmt: skip
            entry["metrics"] = runner.score(spec, sims, data.labels)
            entry["eval_seconds"] = time.perf_counter() - t0
        entry["memory_latency"] = measure_forward(model, inputs, device, repeats=3)
        entry["facts"] = model_facts(model, source) | (
            {"kept_fraction": report.kept_fraction} if report else {}
        )
        if report is not None:
            entry["facts"].update(method=report.method, keep_ratio=report.keep_ratio, ranks=report.ranks,
                                  params_before=report.params_before, params_after=report.params_after)  # fmt: skip
        results.append(entry)

    console.info(f"dense {source.name}")
    dense = modelio.load(source).to(device)
    evaluate(dense, "dense", None)
    del dense
    from flashsvd.methods import get_method

    for method in names:
        spec_m = get_method(method)
        if spec_m.data_aware and calib is None:
            console.info(f"skipping {method}: it needs calibration data")
            continue
        model = modelio.load(source).to(device)
        t0 = time.perf_counter()
        model, report = compress_model(
            model, tok, method, RankChoice(keep_ratio=kw["keep_ratio"]), console, backend=backend,
            texts=list(calib) if spec_m.data_aware else None, calib_samples=kw["calib_samples"], seed=kw["seed"],
            calib_max_length=kw["max_length"],
        )  # fmt: skip
        evaluate(model, f"{method} @ keep {kw['keep_ratio']:g}", time.perf_counter() - t0, report)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    base = results[0]
    for r in results:
        m = r.get("metrics", {})
        ml = r["memory_latency"]
        delta = None if not m else m["spearman"] - base["metrics"]["spearman"]
        rows.append((r["model"], r["facts"]["params"], r["facts"].get("kept_fraction"), m.get("spearman"), delta,
                     mib(ml["persistent_bytes"]), mib(ml["transient_bytes"]), ml["latency_ms"],
                     r["compress_seconds"]))  # fmt: skip
    title = f"all-MiniLM-L6-v2, STS-B zero-shot on {data.source if data else 'no data'}, {device} ({backend})"
    console.table(title, ["model", "params", "kept", "spearman", "Δ vs dense", "persistent MiB",
                          "transient MiB", "latency ms", "compress s"], rows)  # fmt: skip
    out = {"results": results, "task": "stsb zero-shot", "data": data.source if data else None,
           "backend": backend, "definitions": DEFINITIONS, **provenance(device)}  # fmt: skip
    if kw["output"] is not None:
        write_json_atomic(Path(kw["output"]), out)
    if data is not None:
        summary = "; ".join(f"{r['model']}: spearman {r['metrics']['spearman']:.4f}" for r in results)
    else:
        summary = "; ".join(f"{r['model']}: {r['facts']['params']:,} params" for r in results)
    console.result(out, summary)
