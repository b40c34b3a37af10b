"""GPU cost of the steps of a whitening factorization at LLaMA-7B shapes (float64), per driver.

Why: the block-by-block pipeline spends most of a 7B block in float64 linear algebra (Gram updates,
Cholesky, triangular inverse, SVD). This times each step, and the SVD drivers cuSOLVER offers, on the
three matrix shapes of a LLaMA-7B block, so the pipeline can use the fastest exact route.

    python benchmarks/methods/factorization.py --out benchmarks/results/factorization_h200.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch


def timed(fn, reps: int = 3, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up (cuSOLVER workspaces, kernels)
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def gram_steps(tokens: int, d_in: int, dev: str, g: torch.Generator, add) -> None:
    """One Gram update (three ways), then Cholesky, S⁻¹ and eigh of a ``d_in``² SPD matrix."""
    x = torch.randn(tokens, d_in, device=dev, generator=g).to(torch.bfloat16)
    acc = torch.zeros(d_in, d_in, dtype=torch.float64, device=dev)
    flops = 2.0 * tokens * d_in * d_in

    def gram64():
        x64 = x.double()
        acc.add_(x64.T @ x64)

    def gram64_addmm():
        x64 = x.double()
        acc.addmm_(x64.T, x64)

    def gram32():
        x32 = x.float()
        acc.add_(x32.T @ x32)

    add("gram_update_fp64", f"{tokens}x{d_in}", timed(gram64), flops)
    add("gram_update_fp64_addmm", f"{tokens}x{d_in}", timed(gram64_addmm), flops)
    add("gram_update_fp32_then_fp64", f"{tokens}x{d_in}", timed(gram32), flops)
    xs = torch.randn(4 * d_in, d_in, device=dev, generator=g, dtype=torch.float64)
    gram = xs.T @ xs  # well conditioned: 4·d_in random tokens
    eye = torch.eye(d_in, dtype=torch.float64, device=dev)
    chol = torch.linalg.cholesky(gram)
    add("cholesky_ex", f"{d_in}", timed(lambda: torch.linalg.cholesky_ex(gram)))
    add(
        "solve_triangular(L, I)",
        f"{d_in}",
        timed(lambda: torch.linalg.solve_triangular(chol, eye, upper=False)),
    )
    add("inv_ex(L)", f"{d_in}", timed(lambda: torch.linalg.inv_ex(chol)))
    add("eigh", f"{d_in}", timed(lambda: torch.linalg.eigh(gram), reps=1, warm=False))


def svd_steps(m: int, n: int, dev: str, g: torch.Generator, add) -> None:
    """The float64 SVD of an ``m × n`` matrix by each cuSOLVER driver, and the eigen route."""
    w = torch.randn(m, n, device=dev, generator=g, dtype=torch.float64)
    for driver in (None, "gesvd", "gesvdj", "gesvda"):
        if driver == "gesvda" and m < n:
            continue
        try:
            s = timed(lambda d=driver: torch.linalg.svd(w, full_matrices=False, driver=d), reps=1, warm=False)
        except RuntimeError as err:  # a driver may refuse a shape
            print(f"svd {driver}: {err}")
            continue
        add(f"svd[{driver or 'default'}]", f"{m}x{n}", s)
    add("eigh of the smaller Gram (W Wᵀ or WᵀW)", f"{m}x{n}",
        timed(lambda: torch.linalg.eigh(w @ w.T if m <= n else w.T @ w), reps=1, warm=False))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per Gram update (one sequence)")
    a = p.parse_args()
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    common = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                  date=time.strftime("%Y-%m-%d"))  # fmt: skip

    def add(step: str, shape: str, seconds: float, flops: float | None = None) -> None:
        rows.append(dict(common, step=step, shape=shape, ms=f"{seconds * 1e3:.2f}",
                         tflops="" if flops is None else f"{flops / seconds / 1e12:.2f}"))  # fmt: skip
        print(f"{step:34s} {shape:14s} {seconds * 1e3:10.2f} ms", flush=True)

    for d_in in (4096, 11008):
        gram_steps(a.tokens, d_in, dev, g, add)
    for m, n in ((4096, 4096), (11008, 4096), (4096, 11008)):
        svd_steps(m, n, dev, g, add)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)


if __name__ == "__main__":
    main()
