"""``flashsvd bench``: dense vs low-rank (torch) vs low-rank (flash) memory and latency on synthetic batches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flashsvd.app import options as O
from flashsvd.app.errors import guarded

HELP = """Measure dense vs low-rank (torch matmuls) vs low-rank (FlashSVD kernels) on synthetic batches.

The model is compressed once (data-free --method, default svd) and run on random token ids for every
--batch-sizes x --seq-lens shape. Prints a table and writes bench.csv and bench.png to --output-dir.
Latency is the median of --repeats forwards after warm-up; peak/transient memory are CUDA-only.

\b
Examples:
  flashsvd bench
  flashsvd bench --batch-sizes 1,8,32 --seq-lens 128,512 --keep-ratio 0.5 --device cuda --dtype float16
  flashsvd bench -m smollm2 --batch-sizes 1 --seq-lens 64 --variants dense,torch
"""

COLUMNS = ["model", "method", "keep_ratio", "variant", "batch", "seq_len", "dtype", "device", "device_name",
           "latency_ms", "persistent_bytes", "peak_bytes", "transient_bytes", "params", "torch", "triton", "date"]  # fmt: skip


def _ints(text: str, what: str) -> list[int]:
    from flashsvd.app.errors import AppError

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise AppError(f"{what} must be comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise AppError(f"{what} must be positive integers, got {text!r}")
    return values


def bench(
    model: O.Model = None,
    method: Annotated[str, typer.Option("--method", help="Compression method (data-free: svd).")] = "svd",
    keep_ratio: Annotated[
        float, typer.Option("--keep-ratio", help="Fraction of targeted parameters kept.")
    ] = 0.5,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated batch sizes.")] = "1,8",
    seq_lens: Annotated[str, typer.Option("--seq-lens", help="Comma-separated sequence lengths.")] = "128",
    variants: Annotated[
        str, typer.Option("--variants", help="Subset of dense,torch,flash.")
    ] = "dense,torch,flash",
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed forwards per point (median).")] = 5,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed forwards first.")] = 2,
    device: O.Device = "auto",
    dtype: O.DType = "auto",
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Where bench.csv/bench.png go.")
    ] = Path("bench_results"),
    plot: Annotated[bool, typer.Option("--plot/--no-plot", help="Write bench.png.")] = True,
    seed: O.Seed = 0,
    quiet: O.Quiet = False,
    json_out: O.JsonOut = False,
    debug: O.Debug = False,
) -> None:
    run(**locals())


@guarded
def run(**kw) -> None:
    import csv
    import io

    import torch

    from flashsvd.app import modelio
    from flashsvd.app.compression import RankChoice, compress_model
    from flashsvd.app.console import Console, mib, silence_libraries
    from flashsvd.app.errors import AppError
    from flashsvd.app.measurement import measure_forward
    from flashsvd.app.outputs import check_writable, write_text_atomic
    from flashsvd.app.runtime import resolve_device, resolve_dtype, timestamp, versions

    console = Console(kw["quiet"], kw["json_out"])
    silence_libraries()
    batches, lens = _ints(kw["batch_sizes"], "--batch-sizes"), _ints(kw["seq_lens"], "--seq-lens")
    wanted = [v.strip() for v in kw["variants"].split(",") if v.strip()]
    if not wanted or set(wanted) - {"dense", "torch", "flash"}:
        raise AppError(f"--variants must be a subset of dense,torch,flash, got {kw['variants']!r}")
    check_writable(Path(kw["output_dir"]) / "bench.csv", "--output-dir")  # before the work, not after
    device = resolve_device(kw["device"])
    dtype = resolve_dtype(kw["dtype"], device)
    source = modelio.resolve(kw["model"])
    if source.kind == "flashsvd":
        raise AppError("bench compresses a dense model itself: pass the dense --model")
    from flashsvd.methods import get_method

    if get_method(kw["method"]).data_aware:
        raise AppError(
            f"bench uses synthetic inputs, so it needs a data-free method (svd), not {kw['method']}"
        )
    net = modelio.load(source, dtype=dtype).to(device)
    tok = modelio.load_tokenizer(source)
    vocab = int(getattr(net.config, "vocab_size", 1000))
    max_pos = int(getattr(net.config, "max_position_embeddings", 1 << 30))
    if max(lens) > max_pos:
        raise AppError(f"--seq-lens {max(lens)} exceeds the model's {max_pos} positions")
    gen = torch.Generator().manual_seed(kw["seed"])
    shapes = [(b, s) for b in batches for s in lens]
    inputs = {
        shape: {"input_ids": torch.randint(0, vocab, shape, generator=gen).to(device),
                "attention_mask": torch.ones(shape, dtype=torch.long, device=device)}
        for shape in shapes
    }  # fmt: skip
    ver = versions()
    rows: list[dict] = []

    def measure(variant: str, m) -> None:
        from flashsvd.app.modelio import count_parameters

        for (b, s), x in console.progress(
            inputs.items(), desc=f"bench {variant}", total=len(inputs), unit="shape"
        ):
            try:
                r = measure_forward(m, x, device, warmup=kw["warmup"], repeats=kw["repeats"])
            except torch.cuda.OutOfMemoryError:
                r = {
                    "latency_ms": None,
                    "persistent_bytes": None,
                    "peak_bytes": None,
                    "transient_bytes": None,
                }
                torch.cuda.empty_cache()
            rows.append({
                "model": source.name, "method": "dense" if variant == "dense" else kw["method"],
                "keep_ratio": 1.0 if variant == "dense" else kw["keep_ratio"], "variant": variant, "batch": b,
                "seq_len": s, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "latency_ms": r["latency_ms"], "persistent_bytes": r["persistent_bytes"],
                "peak_bytes": r["peak_bytes"], "transient_bytes": r["transient_bytes"],
                "params": count_parameters(m), "torch": ver["torch"], "triton": ver["triton"], "date": timestamp(),
            })  # fmt: skip

    if "dense" in wanted:
        measure("dense", net)
    if {"torch", "flash"} & set(wanted):
        from flashsvd.models import set_backend

        net, _ = compress_model(net, tok, kw["method"], RankChoice(keep_ratio=kw["keep_ratio"]), console)
        for variant in ("torch", "flash"):
            if variant in wanted:
                notes = set_backend(net, variant)
                for note in notes or []:
                    console.info(f"{variant}: {note}")
                measure(variant, net)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    out = Path(kw["output_dir"])
    write_text_atomic(out / "bench.csv", buf.getvalue())
    png = None
    if kw["plot"]:
        png = out / "bench.png"
        plot(rows, png)
    table = [(r["variant"], r["batch"], r["seq_len"], r["latency_ms"], mib(r["persistent_bytes"]),
              mib(r["peak_bytes"]), mib(r["transient_bytes"])) for r in rows]  # fmt: skip
    console.table(f"{source.name}, {kw['method']} keep {kw['keep_ratio']:g}, {device} {dtype}",
                  ["variant", "batch", "seq", "latency ms", "persistent MiB", "peak MiB", "transient MiB"], table)  # fmt: skip
    console.result({"rows": rows, "csv": str(out / "bench.csv"), "png": str(png) if png else None},
                   f"wrote {out / 'bench.csv'}" + (f" and {png}" if png else ""))  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """Latency (and, on CUDA, transient memory) per shape and variant, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["batch"], r["seq_len"]) for r in rows})
    variants = [v for v in ("dense", "torch", "flash") if any(r["variant"] == v for r in rows)]
    has_mem = any(r["transient_bytes"] for r in rows)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(10 if has_mem else 6, 4), squeeze=False)
    width = 0.8 / max(1, len(variants))
    for ax, key, label in zip(axes[0], ("latency_ms", "transient_bytes"), ("latency (ms)", "transient MiB")):
        for i, v in enumerate(variants):
            vals = []
            for shape in shapes:
                r = next((r for r in rows if r["variant"] == v and (r["batch"], r["seq_len"]) == shape), None)
                x = r[key] if r else None
                vals.append(0 if x is None else (x / 2**20 if key == "transient_bytes" else x))
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=v)
        ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(shapes))])
        ax.set_xticklabels([f"B{b}×S{s}" for b, s in shapes])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{rows[0]['model']}: dense vs low-rank ({rows[0]['device_name']})" if rows else "bench")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
