"""Tuning aid for the fused FFN kernel: every autotune candidate's time, and each execution mode
(fused / split-r2 / store-h with two h-chunk sizes) forced at one shape, with transient memory.

Why: the benchmark reports only what the dispatcher picks; choosing candidates and the mode
thresholds in ``_ffn_kernel`` needs the alternatives measured on the same device.
Usage: PYTHONPATH=packages/flashsvd-kernels/src python3 benchmarks/kernels/ffn_configs.py [T d d_ff r1 r2]
"""

from __future__ import annotations

import sys

import torch
from triton.testing import do_bench

from flashsvd.kernels import FFNFactors, _ffn_kernel, lowrank_ffn


def _forced(name: str) -> dict:
    big = {"MAX_R2_CHUNK": 16}
    return {
        "fused": {},
        "split_r2": {**big, "MAX_R2_CHUNK": 128, "STORE_H_COST_FLOPS": 1e9},
        "store_h_64MiB": {**big, "STORE_H_COST_FLOPS": 0.0},
        "store_h_8MiB": {**big, "STORE_H_COST_FLOPS": 0.0, "H_CHUNK_BYTES": 8 * 2**20},
    }[name]


def main(argv: list[str]) -> None:
    t, d, f, r1, r2 = (int(a) for a in argv) if argv else (8192, 768, 3072, 240, 240)
    dtype = torch.float16

    def rnd(*s):
        return (torch.randn(*s, device="cuda") / s[0] ** 0.5).to(dtype)

    fac = FFNFactors(rnd(d, r1), rnd(r1, f), rnd(f), rnd(f, r2), rnd(r2, d), rnd(d))
    xs = [rnd(t, d) for _ in range(4)]
    saved = {k: getattr(_ffn_kernel, k) for k in ("MAX_R2_CHUNK", "STORE_H_COST_FLOPS", "H_CHUNK_BYTES")}
    for mode in ("fused", "split_r2", "store_h_64MiB", "store_h_8MiB"):
        for k, v in {**saved, **_forced(mode)}.items():
            setattr(_ffn_kernel, k, v)
        lowrank_ffn(xs[0], fac, "gelu")
        if mode == "fused":
            timings = getattr(_ffn_kernel._lowrank_ffn_kernel, "configs_timings", None) or {}
            for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1]):
                ms = ms[0] if isinstance(ms, list) else ms
                print(f"  candidate {ms:.4f} ms  {cfg}")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = lowrank_ffn(xs[1], fac, "gelu")
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - before - out.numel() * out.element_size()) / 2**20
        i = iter(range(10**9))
        ms = do_bench(lambda i=i: lowrank_ffn(xs[next(i) % 4], fac, "gelu"), rep=200, return_mode="median")
        print(f"{dtype} T={t} r={r1}/{r2} mode={mode:14s} {ms:.4f} ms  transient {mib:.2f} MiB")
    for k, v in saved.items():
        setattr(_ffn_kernel, k, v)


if __name__ == "__main__":
    main(sys.argv[1:])
