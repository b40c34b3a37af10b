"""Distributed compression, measured: the same job under ``torchrun`` with 1 and with N processes.

Compresses a LLaMA-7B-shaped model (``benchmarks/quality/bigmodel.py``: random bf16 weights, whitening,
sequential block-by-block calibration) once per process count, then checks that every run wrote the
same factors as the first (max abs difference, count of differing elements) and writes one summary
row per run: wall time and speed-up, per-GPU peak memory, bytes all-reduced per layer, the
factorization and all-reduce shares, device and versions. Per-block rows go to ``--blocks-csv``.

    python benchmarks/distributed/scaling.py --procs 1 2 \\
        --csv benchmarks/results/distributed_h200x2.csv --blocks-csv benchmarks/results/distributed_h200x2_blocks.csv

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` and friends are set for every process).
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BIGMODEL = HERE.parent / "quality" / "bigmodel.py"
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def compare(reference: Path, other: Path) -> tuple[float, int, int]:
    """``(max |a − b|, differing elements, elements)`` over every tensor of two factor files."""
    from safetensors import safe_open

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    worst, differ, total = 0.0, 0, 0
    with safe_open(str(reference), "pt", device=dev) as fa, safe_open(str(other), "pt", device=dev) as fb:
        if set(fa.keys()) != set(fb.keys()):
            raise SystemExit(f"{other} holds different tensors than {reference}")
        for k in fa.keys():  # noqa: SIM118 (safe_open has no __iter__)
            a, b = fa.get_tensor(k), fb.get_tensor(k)
            if a.shape != b.shape:
                raise SystemExit(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            d = (a.double() - b.double()).abs()
            worst = max(worst, float(d.max()) if d.numel() else 0.0)
            differ += int((d != 0).sum())
            total += d.numel()
    return worst, differ, total


def summary_row(blocks_csv: Path, processes: int) -> dict[str, str]:
    with blocks_csv.open() as fh:
        rows = [
            r
            for r in csv.DictReader(fh)
            if r["processes"] == str(processes) and r["event"].startswith("summary")
        ]
    if not rows:
        raise SystemExit(f"no summary row for {processes} process(es) in {blocks_csv}")
    return rows[-1]


def plot(blocks_csv: Path, png: Path) -> None:
    """Per-block wall time for each process count, with its factorization and all-reduce shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with blocks_csv.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["event"].startswith("block ")]
    fig, ax = plt.subplots(figsize=(8, 4))
    for n in sorted({int(r["processes"]) for r in rows}):
        mine = [r for r in rows if int(r["processes"]) == n]
        x = [int(r["event"].split()[1]) for r in mine]
        total = sum(float(r["seconds"]) for r in mine)
        ax.plot(
            x,
            [float(r["seconds"]) for r in mine],
            marker=".",
            label=f"{n} GPU(s): block ({total:.0f} s total)",
        )
        ax.plot(
            x, [float(r["factorization_seconds"]) for r in mine], ls="--", label=f"{n} GPU(s): factorization"
        )
        if n > 1:
            ax.plot(
                x, [float(r["all_reduce_seconds"]) for r in mine], ls=":", label=f"{n} GPU(s): all-reduce"
            )
    r0 = rows[0]
    ax.set(xlabel="decoder block", ylabel="seconds", ylim=(0, None),
           title=f"{r0['model']} whiten sequential, {r0['calib']} tokens, {r0['device']}, torch {r0['torch']}")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plot-only", type=Path, default=None, metavar="PNG",
                   help="only draw --blocks-csv (an earlier run) to this PNG")  # fmt: skip
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--n-calib", type=int, default=256)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--multiple", type=int, default=64)
    p.add_argument("--offload", choices=["auto", "cpu", "device"], default="auto")
    p.add_argument(
        "--tiny", action="store_true", help="a toy model on the CPU (gloo): a check of this script"
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/flashsvd_scaling"), help="factor files go here")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--blocks-csv", type=Path, required=True)
    a = p.parse_args()
    if a.plot_only is not None:
        plot(a.blocks_csv, a.plot_only)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1"}
    if a.tiny:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    results = []
    for n in a.procs:
        factors = a.work / f"factors_{n}.safetensors"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", str(BIGMODEL),
               "--n-calib", str(a.n_calib), "--seq", str(a.seq), "--keep", str(a.keep), "--multiple", str(a.multiple),
               "--layers", str(a.layers), "--offload", a.offload, "--out", str(a.blocks_csv), "--save-factors", str(factors)]  # fmt: skip
        cmd += ["--tiny", "--device", "cpu"] if a.tiny else ["--device", "cuda"]
        print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        launch = time.perf_counter() - t0
        results.append((n, factors, launch, summary_row(a.blocks_csv, n)))
    base_n, base_factors, _, base = results[0]
    rows = []
    for n, factors, launch, s in results:
        worst, differ, total = compare(base_factors, factors) if n != base_n else (0.0, 0, 0)
        layers = int(s["layers"])
        rows.append(dict(
            model=s["model"], layers=layers, dtype=s["dtype"], calib=s["calib"], method="whiten sequential",
            keep_ratio=s["keep_ratio"], processes=n, compress_seconds=s["seconds"],
            speedup=f"{float(base['seconds']) / float(s['seconds']):.2f}",
            factorization_seconds=s["factorization_seconds"], all_reduce_seconds=s["all_reduce_seconds"],
            launch_seconds=f"{launch:.1f}", build_seconds=s["build_seconds"],
            gpu_peak_gib_per_process=s["gpu_peak_gib_per_process"], host_peak_gib_rank0=s["host_peak_gib"],
            all_reduced_bytes_per_layer=int(s["all_reduced_bytes"]) // layers,
            max_abs_diff_vs_first=f"{worst:.3g}", differing_elements=differ,
            compared_elements=total if n != base_n else "", kept_fraction=s["kept_fraction"],
            device=s["device"], torch=s["torch"],
            nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "",
            date=s["date"],
        ))  # fmt: skip
    a.csv.parent.mkdir(parents=True, exist_ok=True)
    with a.csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["processes", "compress_seconds", "speedup", "factorization_seconds", "all_reduce_seconds",
            "gpu_peak_gib_per_process", "all_reduced_bytes_per_layer", "max_abs_diff_vs_first", "differing_elements"]  # fmt: skip
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    plot(a.blocks_csv, a.csv.with_suffix(".png"))


if __name__ == "__main__":
    main()
