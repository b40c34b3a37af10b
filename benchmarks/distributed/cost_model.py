"""Cost model (not a measurement) of distributed compression of a LLaMA-7B-shaped model.

Whitening with sequential, paired calibration (``flashsvd.methods.calibrate_blockwise``: per block the
groups [q/k/v, o, gate/up, down]; per group one dense reference pass and one compressed pass over the
cached inputs, then one pass to move forward), 256 × 2,048 calibration tokens, bf16 weights, float64
statistics. Under ``torchrun --nproc-per-node N`` the passes and statistics split over N shards; each
group's statistics are all-reduced (ring: ``2(N−1)/N · bytes`` per GPU); the group's matrices are
factorized on different ranks (:func:`flashsvd.methods.distributed.spread`), so within a group the
factorization takes as long as its largest matrix once N ≥ the group's size.

The throughputs below are assumptions (labelled). ``--measured`` replaces them by the per-block
split that ``benchmarks/distributed/scaling.py`` measured on H200s (1 and 2 processes): the forward
passes and statistics divide by N, the factorization is kept at its one-GPU time (conservative: it
went from 30.0 to 22.4 s on 2 GPUs, as each group waits for its largest matrix), the all-reduce grows
as ``2(N−1)/N``.

    python benchmarks/distributed/cost_model.py [--csv benchmarks/results/distributed_cost_model_llama7b.csv]
    python benchmarks/distributed/cost_model.py --measured benchmarks/results/distributed_h200x2_blocks.csv \
        --csv benchmarks/results/distributed_projection_llama7b.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass

# ---- the model and the calibration set ----
D, FFN, LAYERS, HEADS, KV_HEADS = 4096, 11008, 32, 32, 32
TOKENS = 256 * 2048
PARAMS = 6.74e9
PAIRED = True  # sequential mode pairs every group with the dense model (cross statistics)

# ---- assumed throughputs of one H200 (ASSUMPTIONS, not measured) ----
BF16_FLOPS = 600e12  # achieved dense bf16 GEMM in the forward passes (~60 % of 989 TFLOP/s)
FP64_GEMM_FLOPS = 50e12  # achieved float64 GEMM for XᵀX and X̃ᵀX_ref (67 TFLOP/s FP64 tensor-core peak)
FP64_SOLVER_FLOPS = 2e12  # achieved float64 SVD/Cholesky (cuSOLVER, 4k-11k matrices): the big unknown
ALLREDUCE_BUSBW = 350e9  # NCCL all-reduce bus bandwidth over NVLink/NVSwitch, bytes/s


@dataclass(frozen=True)
class Matrix:
    name: str
    out: int
    inp: int
    heads: int | None = None

    def svd_flops(self) -> float:
        """Whitening: Cholesky + triangular inverse of the Gram, W·S, economy SVD (R-SVD 6mn² + 20n³)."""
        chol = 2 * self.inp**3 / 3
        ws = 2 * self.out * self.inp**2
        blocks = [(self.out // self.heads, self.inp)] * self.heads if self.heads else [(self.out, self.inp)]
        svd = sum(6 * max(m, n) * min(m, n) ** 2 + 20 * min(m, n) ** 3 for m, n in blocks)
        return chol + ws + svd


GROUPS = [
    [Matrix("q", D, D, HEADS), Matrix("k", D, D, KV_HEADS), Matrix("v", D, D, KV_HEADS)],
    [Matrix("o", D, D)],
    [Matrix("gate", FFN, D), Matrix("up", FFN, D)],
    [Matrix("down", D, FFN)],
]


#: bytes all-reduced per statistic element: a ReproducibleSum's two float64 limbs and its int8 bin
BYTES_PER_ELEMENT = 17


def gram_bytes(group: list[Matrix]) -> int:
    """Bytes all-reduced for a group: a Gram (and, paired, a cross matrix) per hooked matrix."""
    return sum(m.inp**2 * BYTES_PER_ELEMENT * (2 if PAIRED else 1) for m in group)


def block_seconds(n: int, spread: str = "group") -> dict[str, float]:
    """Seconds per block on ``n`` GPUs. ``spread="group"``: the block is calibrated group by group (each
    group behind the compressed previous ones) and each group's matrices are spread; ``"block"``: one
    group per block (all its matrices calibrated together, then spread at once)."""
    block_fwd = 2 * (PARAMS / LAYERS) * TOKENS + 4 * 2048 * D * TOKENS  # weights + attention scores
    passes = (len(GROUPS) if spread == "group" else 1) * (2 if PAIRED else 1) + 1  # see calibrate_blockwise
    forward = passes * block_fwd / BF16_FLOPS / n
    grams = sum(2 * TOKENS * m.inp**2 * (2 if PAIRED else 1) for g in GROUPS for m in g)
    statistics = grams / FP64_GEMM_FLOPS / n
    factor = 0.0
    batches = GROUPS if spread == "group" else [[m for group in GROUPS for m in group]]
    for batch in batches:
        costs = sorted((m.svd_flops() for m in batch), reverse=True)
        load = [0.0] * n
        for c in costs:  # the LPT assignment of flashsvd.methods.distributed.assign
            load[load.index(min(load))] += c
        factor += max(load) / FP64_SOLVER_FLOPS
    comm = sum(gram_bytes(g) for g in GROUPS) * 2 * (n - 1) / n / ALLREDUCE_BUSBW if n > 1 else 0.0
    return {"forward": forward, "statistics": statistics, "factorization": factor, "all_reduce": comm}


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def measured_rows(blocks_csv: str) -> list[dict]:
    """Seconds for the whole model on N GPUs from the measured per-block split (1 and 2 processes)."""
    with open(blocks_csv) as fh:
        rows = [r for r in csv.DictReader(fh) if r["event"].startswith("block ")]
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(int(r["processes"]), []).append(r)

    def mean(n: int, col: str) -> float:
        return sum(float(r[col]) for r in by_n[n]) / len(by_n[n])

    layers = len(by_n[1])
    block, factor = mean(1, "seconds"), mean(1, "factorization_seconds")
    rest = block - factor  # forward passes, Gram updates, host<->device copies
    reduce2 = mean(2, "all_reduce_seconds") if 2 in by_n else 0.0
    out, base = [], None
    for n in (1, 2, 4, 8):
        comm = reduce2 * 2 * (n - 1) / n if n > 1 else 0.0
        total = (rest / n + factor + comm) * layers
        base = base or total
        measured = sum(float(r["seconds"]) for r in by_n[n]) if n in by_n else None
        out.append({"gpus": n, "forward_and_statistics": round(rest / n * layers, 1),
                    "factorization": round(factor * layers, 1), "all_reduce": round(comm * layers, 1),
                    "total_s": round(total, 1), "speedup": round(base / total, 2),
                    "measured_total_s": "" if measured is None else round(measured, 1),
                    "device": by_n[1][0]["device"], "calib": by_n[1][0]["calib"]})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--spread", choices=["group", "block"], default="group", help="matrices spread together")
    p.add_argument("--measured", help="per-block CSV of scaling.py: project from measured stage times")
    args = p.parse_args(argv)
    if args.measured:
        rows = measured_rows(args.measured)
        cols = list(rows[0])[:7]
        print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in cols) + " |")
        if args.csv:
            write_csv(args.csv, rows)
        return 0
    per_block_bytes = sum(gram_bytes(g) for g in GROUPS)
    print(
        f"all-reduced per block: {per_block_bytes / 1e9:.2f} GB (order-independent Gram{' + cross' if PAIRED else ''}: 17 bytes per element)"
    )
    rows = []
    base = None
    for n in (1, 2, 4, 8):
        s = block_seconds(n, args.spread)
        total = sum(s.values()) * LAYERS
        base = base or total
        rows.append({"gpus": n, "spread": args.spread, **{k: round(v * LAYERS, 1) for k, v in s.items()},
                     "total_s": round(total, 1), "speedup": round(base / total, 2)})  # fmt: skip
    print("| GPUs | forward s | statistics s | factorization s | all-reduce s | total s | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['gpus']} | {r['forward']} | {r['statistics']} | {r['factorization']} | "
              f"{r['all_reduce']} | {r['total_s']} | {r['speedup']}× |")  # fmt: skip
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
