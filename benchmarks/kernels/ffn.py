"""Benchmark the fused low-rank FFN kernels against the dense FFN and the vanilla low-rank chain.

Why: the kernels exist to make a compressed FFN run faster and in less activation memory than both
the dense layer and the naive factored chain; this script measures exactly that, in one run, on one
device, and records the roofline floor so the remaining gap is visible.

Usage (from the repo root; the packages are not installed on the GPU machine)::

    PYTHONPATH=packages/flashsvd-kernels/src python3 benchmarks/kernels/ffn.py --quick --out DIR
    PYTHONPATH=packages/flashsvd-kernels/src python3 benchmarks/kernels/ffn.py --out DIR   # full sweep
    python benchmarks/kernels/ffn.py --plot benchmarks/results/ffn_h100.csv                  # PNG, locally

For each point and variant: median latency (``triton.testing.do_bench``, inputs rotated so that
they do not sit in L2), transient memory (peak during the call minus memory held before it, minus
the output), achieved TFLOP/s (the variant's own flops), the roofline floor of the low-rank op
(``max(flops/peak, bytes/bandwidth)`` with ceilings measured in the same run) and the relative
error against a float32 evaluation of the same factors.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import itertools
import os
import sys
from pathlib import Path

FIELDS = [
    "device", "torch", "triton", "date", "model", "dtype", "tokens", "d_model", "d_ff", "ranks",
    "activation", "variant", "latency_ms", "transient_mib", "tflops", "floor_ms", "time_over_floor",
    "speedup_vs_dense", "speedup_vs_vanilla", "rel_err", "peak_tflops", "peak_tbps",
]  # fmt: skip

BERT = {"model": "bert-base", "d_model": 768, "d_ff": 3072, "gated": False, "activation": "gelu"}
LLAMA = {"model": "llama-7b", "d_model": 4096, "d_ff": 11008, "gated": True, "activation": "swiglu"}


def keep_ratio_rank(m: int, n: int, keep: float) -> int:
    """Rank that keeps ``keep`` of an ``m × n`` matrix's parameters (``r (m + n) = keep m n``),
    rounded down to a multiple of 8: fp16 rows of a rank not divisible by 8 are not 16-byte aligned
    and push cuBLAS (vanilla chain and our projections) onto slow kernels (1492 vs 1488: 0.75×)."""
    return int(keep * m * n / (m + n)) // 8 * 8


def points(quick: bool, all_dtypes: bool = False):
    """(model spec, tokens, ranks, dtype name) tuples.

    ``quick``: the issue's headline points (BERT-base r=240 and LLaMA-7B keep 0.5 at 8192 tokens) in
    fp16 and bf16.  Otherwise the headline points in both dtypes plus the token and rank sweeps in
    fp16 (and bf16 too with ``all_dtypes``; every new shape costs a compile + autotune).
    """
    r_llama = keep_ratio_rank(4096, 11008, 0.5)
    llama_ranks = (r_llama, r_llama, r_llama)
    for dtype in ("float16", "bfloat16"):
        yield BERT, 8192, (240, 240), dtype
        yield LLAMA, 8192, llama_ranks, dtype
    if quick:
        return
    for dtype in ("float16", "bfloat16") if all_dtypes else ("float16",):
        for tokens in (1024, 4096, 16384, 32768, 65536):
            yield BERT, tokens, (240, 240), dtype
        for r in (32, 128, 384, 768):
            yield BERT, 8192, (r, r), dtype
        for tokens in (1024, 4096, 16384, 32768):
            yield LLAMA, tokens, llama_ranks, dtype
        for keep in (0.1, 0.25):
            r = keep_ratio_rank(4096, 11008, keep)
            yield LLAMA, 8192, (r, r, r), dtype


def _flops(spec, tokens, ranks) -> tuple[float, float]:
    """(low-rank flops, dense flops) of one forward."""
    d, f = spec["d_model"], spec["d_ff"]
    if spec["gated"]:
        rg, ru, rd = ranks
        low = 2.0 * tokens * (rg * (d + f) + ru * (d + f) + rd * (f + d))
        return low, 2.0 * tokens * 3 * d * f
    r1, r2 = ranks
    return 2.0 * tokens * (r1 * (d + f) + r2 * (f + d)), 2.0 * tokens * 2 * d * f


def _min_bytes(spec, tokens, ranks, elt) -> float:
    """Each input (x, factors) read once and the output written once."""
    d, f = spec["d_model"], spec["d_ff"]
    params = sum(r * (d + f) for r in ranks) + f + d
    return elt * (2.0 * tokens * d + params)


def measure_ceilings(torch, do_bench):
    """Measured fp16 matmul rate (TFLOP/s) and copy bandwidth (TB/s, read + write) on this device."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    tflops = 2 * 8192**3 / ms / 1e9
    src = torch.empty(2**28, device="cuda", dtype=torch.float16).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    tbps = 2 * src.numel() * 2 / ms / 1e9
    return tflops, tbps


def run(args, pts=None) -> Path:
    """Measure every point (default :func:`points`; ``pts`` overrides) and write ``ffn_<tag>.csv``."""
    import torch
    import torch.nn.functional as F
    import triton
    from triton.testing import do_bench

    from flashsvd.kernels import (
        FFNFactors,
        GatedFFNFactors,
        lowrank_ffn,
        lowrank_ffn_reference,
        lowrank_gated_ffn,
        lowrank_gated_ffn_reference,
    )

    torch.manual_seed(0)
    dev = torch.cuda.get_device_name()
    peak_tflops, peak_tbps = measure_ceilings(torch, do_bench)
    print(f"# {dev}: measured {peak_tflops:.0f} TFLOP/s fp16 matmul, {peak_tbps:.2f} TB/s copy", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ffn_{args.tag}.csv"
    rows = []
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    common = {"device": dev, "torch": torch.__version__, "triton": triton.__version__, "date": stamp}

    for spec, tokens, ranks, dname in pts if pts is not None else points(args.quick, args.all_dtypes):
        dtype = getattr(torch, dname)
        d, f = spec["d_model"], spec["d_ff"]
        gated, act = spec["gated"], spec["activation"]

        def rnd(*shape, scale=1.0, dtype=dtype):
            return (torch.randn(*shape, device="cuda") * scale / shape[0] ** 0.5).to(dtype)

        # Low-rank factors; the dense weights are their products (same function, other algorithm).
        if gated:
            rg, ru, rd = ranks
            fac = GatedFFNFactors(
                rnd(d, rg), rnd(rg, f), None, rnd(d, ru), rnd(ru, f), None, rnd(f, rd), rnd(rd, d), None
            )
            w_g, w_u, w_d = [(u @ v).t().contiguous() for u, v in ((fac.u_gate, fac.v_gate),
                             (fac.u_up, fac.v_up), (fac.u_down, fac.v_down))]  # fmt: skip

            def dense(x, w_g=w_g, w_u=w_u, w_d=w_d):
                return F.linear(F.silu(F.linear(x, w_g)) * F.linear(x, w_u), w_d)

            def vanilla(x, fac=fac, act=act):
                return lowrank_gated_ffn_reference(x, fac, act)

            def flash(x, fac=fac, act=act):
                return lowrank_gated_ffn(x, fac, act, backend="triton")

            fac32 = GatedFFNFactors(*[None if t is None else t.float() for t in vars(fac).values()])

            def oracle(x, fac32=fac32, act=act):
                return lowrank_gated_ffn_reference(x.float(), fac32, act)
        else:
            r1, r2 = ranks
            fac = FFNFactors(rnd(d, r1), rnd(r1, f), rnd(f, scale=0.1), rnd(f, r2), rnd(r2, d), rnd(d))
            w1, w2 = (fac.u1 @ fac.v1).t().contiguous(), (fac.u2 @ fac.v2).t().contiguous()

            def dense(x, w1=w1, w2=w2, fac=fac):
                return F.linear(F.gelu(F.linear(x, w1, fac.b1)), w2, fac.b2)

            def vanilla(x, fac=fac, act=act):
                return lowrank_ffn_reference(x, fac, act)

            def flash(x, fac=fac, act=act):
                return lowrank_ffn(x, fac, act, backend="triton")

            fac32 = FFNFactors(*[None if t is None else t.float() for t in vars(fac).values()])

            def oracle(x, fac32=fac32, act=act):
                return lowrank_ffn_reference(x.float(), fac32, act)

        elt = torch.finfo(dtype).bits // 8
        n_rot = max(1, min(8, int(4 * 50e6 // (tokens * d * elt)) + 1))  # > 4× L2 in total
        xs = [torch.randn(tokens, d, device="cuda", dtype=dtype) for _ in range(n_rot)]
        low_flops, dense_flops = _flops(spec, tokens, ranks)
        floor_ms = max(
            low_flops / (peak_tflops * 1e9), _min_bytes(spec, tokens, ranks, elt) / (peak_tbps * 1e9)
        )
        ref = oracle(xs[0])
        results = {}
        for name, fn, flops in (("dense", dense, dense_flops), ("vanilla", vanilla, low_flops),
                                ("flash", flash, low_flops)):  # fmt: skip
            with torch.no_grad():
                out = fn(xs[0])  # warm-up / autotune, outside the memory window
                err = ((out.float() - ref).norm() / ref.norm()).item()
                del out
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                out = fn(xs[1 % n_rot])
                torch.cuda.synchronize()
                transient = torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()
                del out
                it = itertools.cycle(xs)
                ms = do_bench(
                    lambda fn=fn, it=it: fn(next(it)), warmup=25, rep=args.rep, return_mode="median"
                )
            results[name] = (ms, transient, flops, err)
        for name, (ms, transient, flops, err) in results.items():
            rows.append({
                **common, "model": spec["model"], "dtype": dname, "tokens": tokens, "d_model": d, "d_ff": f,
                "ranks": "/".join(map(str, ranks)), "activation": act, "variant": name,
                "latency_ms": f"{ms:.5f}", "transient_mib": f"{transient / 2**20:.3f}",
                "tflops": f"{flops / ms / 1e9:.1f}", "floor_ms": f"{floor_ms:.5f}",
                "time_over_floor": f"{ms / floor_ms:.2f}",
                "speedup_vs_dense": f"{results['dense'][0] / ms:.3f}",
                "speedup_vs_vanilla": f"{results['vanilla'][0] / ms:.3f}",
                "rel_err": f"{err:.2e}", "peak_tflops": f"{peak_tflops:.0f}", "peak_tbps": f"{peak_tbps:.2f}",
            })  # fmt: skip
        fl, de, va = results["flash"], results["dense"], results["vanilla"]
        print(
            f"{spec['model']:9s} {dname:8s} T={tokens:6d} r={'/'.join(map(str, ranks)):14s} "
            f"dense {de[0]:.4f}ms {de[1] / 2**20:7.1f}MiB | vanilla {va[0]:.4f}ms {va[1] / 2**20:7.1f}MiB | "
            f"flash {fl[0]:.4f}ms {fl[1] / 2**20:6.2f}MiB err {fl[3]:.1e} | x{de[0] / fl[0]:.2f} dense "
            f"x{va[0] / fl[0]:.2f} vanilla | floor {floor_ms:.4f}ms ({fl[0] / floor_ms:.2f}x)",
            flush=True,
        )
        del xs, fac, fac32, ref
        torch.cuda.empty_cache()
        with path.open("w", newline="") as fh:  # rewrite after every point: partial runs keep data
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            w.writeheader()
            w.writerows(rows)
    return path


def plot(csv_path: str) -> Path:
    """Latency of dense / vanilla / flash per point, one panel per model and dtype, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["dtype"]), []).append(r)
    ncols = 2
    nrows = -(-len(groups) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7 * ncols, 4.8 * nrows), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, ((model, dname), rs) in zip(
        axes.flat, sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "float16"))
    ):
        labels = sorted(
            {(int(r["tokens"]), r["ranks"]) for r in rs}, key=lambda t: (t[1] != rs[0]["ranks"], t)
        )
        xs = range(len(labels))
        for variant, color in (("dense", "tab:gray"), ("vanilla", "tab:orange"), ("flash", "tab:blue")):
            lat = {
                (int(r["tokens"]), r["ranks"]): float(r["latency_ms"]) for r in rs if r["variant"] == variant
            }
            ax.plot(xs, [lat.get(k, float("nan")) for k in labels], "o-", color=color, label=variant)
        floor = {(int(r["tokens"]), r["ranks"]): float(r["floor_ms"]) for r in rs}
        ax.plot(xs, [floor[k] for k in labels], "k--", label="roofline floor (low-rank)")
        ax.set_xticks(list(xs), [f"T={t}\nr={r}" for t, r in labels], rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{model} {dname}")
        ax.legend(fontsize=8)
    first = rows[0]
    fig.suptitle(
        f"Low-rank FFN: {first['device']}, {first['date']} (torch {first['torch']}, triton {first['triton']})"
    )
    fig.tight_layout()
    out = Path(csv_path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output folder for the CSV")
    p.add_argument("--tag", default="h100", help="CSV name suffix: ffn_<tag>.csv")
    p.add_argument(
        "--quick", action="store_true", help="headline points only (BERT and LLaMA at 8192 tokens)"
    )
    p.add_argument("--all-dtypes", action="store_true", help="full sweep in bf16 as well as fp16")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time per variant (ms)")
    p.add_argument("--plot", metavar="CSV", help="make a PNG from a CSV written by this script, then exit")
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
