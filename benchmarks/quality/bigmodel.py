"""Block-by-block compression of a LLaMA-7B-shaped model (random weights) on GPUs, with resume.

    python benchmarks/quality/bigmodel.py --device cuda --out benchmarks/results/bigmodel_h200.csv
    python benchmarks/quality/bigmodel.py --tiny --device cpu --out /tmp/big.csv      # CPU check
    torchrun --standalone --nproc-per-node 2 benchmarks/quality/bigmodel.py --n-calib 256 --out ...

Under ``torchrun`` each process takes its shard of the calibration sequences on its own GPU
(``flashsvd.methods.distributed``); only rank 0 writes. ``benchmarks/distributed/scaling.py`` runs
1 and 2 processes and compares their factors.

The model stays on the CPU (bf16); ``flashsvd.models.compress`` with a sequential recipe moves one
decoder block at a time to the GPU, calibrates it on the cached block inputs (``n_calib`` sequences of
``seq`` random tokens), factorizes it, and moves it back (llm-compressor's sequential pipeline).
With ``--state-dir`` (one process) finished blocks and the next block's inputs are saved after every
block; ``--stop-after N`` interrupts the run after N blocks (as a crash would), and running again
with the same folder resumes there.

Measured: GPU peak allocated memory (``torch.cuda.max_memory_allocated``, per process), wall time per
block and in total with its factorization and all-reduce shares, bytes all-reduced, host peak RSS;
one CSV row per finished block plus a summary row. The weights are random (no
7B checkpoint is reachable), so this measures memory and time, not quality.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import resource
import shutil
import time
from pathlib import Path

import torch

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                num_hidden_layers=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
TINY = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2,
            num_hidden_layers=3, vocab_size=128, max_position_embeddings=256)  # fmt: skip


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def peak_breakdown(snapshot: dict, top: int = 12) -> list[str]:
    """The allocations alive at the highest point of a CUDA memory trace, grouped by the innermost
    ``flashsvd``/benchmark frame that made them (lines: GiB, count, frame)."""
    best, live, total, at_peak = 0, {}, 0, {}
    for ev in snapshot["device_traces"][torch.cuda.current_device()]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], ev.get("frames", []))
            total += ev["size"]
            if total > best:
                best, at_peak = total, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]

    def where(frames: list[dict]) -> str:
        ours = [f for f in frames if "flashsvd" in f["filename"] or "benchmarks" in f["filename"]]
        f = ours[0] if ours else (frames[0] if frames else {"filename": "?", "line": 0, "name": "?"})
        return f"{Path(f['filename']).name}:{f['line']} {f['name']}"

    title = f"peak of the trace {best / 2**30:.3f} GiB (allocations made while recording)"
    return grouped_sizes(title, [(size, where(frames)) for size, frames in at_peak.values()], top)


def grouped_sizes(title: str, items: list[tuple[int, str]], top: int) -> list[str]:
    """``title``, then one line per place (GiB, count, place), largest first, at most ``top``."""
    groups: dict[str, list[int]] = {}
    for size, place in items:
        g = groups.setdefault(place, [0, 0])
        g[0] += size
        g[1] += 1
    lines = [title]
    for place, (size, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {size / 2**30:7.3f} GiB  {n:5d}  {place}")
    return lines


def build(cfg: dict, dtype: torch.dtype, init_device: str = "cpu") -> torch.nn.Module:
    """Random-weight LlamaForCausalLM on the CPU: built on the meta device, filled on ``init_device``.

    Filling on a GPU (then copying to the CPU) takes seconds instead of a minute for 7B; the values
    depend only on the seed and the device type, so every process of a torchrun job builds the same
    model, and so does a one-process run on another GPU.
    """
    import transformers as T

    config = T.LlamaConfig(**cfg)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator(device=init_device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                r = torch.randn(p.shape, generator=g, dtype=torch.float32, device=init_device)
                p.copy_(r.mul_(0.02).to(dtype))
    # buffers were not initialized by to_empty: rebuild the rotary tables on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def save_factors(model: torch.nn.Module, path: Path) -> None:
    """The compressed blocks' tensors (factors and the layers left dense) to safetensors, atomically."""
    from safetensors.torch import save_file

    sd = {n: t.detach().contiguous().cpu() for n, t in model.model.layers.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp))
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 3-layer toy config (CPU test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--multiple", type=int, default=64)
    p.add_argument("--state-dir", type=Path, default=None,
                   help="resume folder (one process only); without it nothing is written per block")  # fmt: skip
    p.add_argument("--fresh", action="store_true", help="delete the state folder first")
    p.add_argument("--stop-after", type=int, default=None, help="interrupt after this many blocks")
    p.add_argument("--offload", choices=["auto", "cpu", "device"], default="auto",
                   help="cached block inputs: on the CPU, on the GPU, or on the GPU when they fit (compress(offload=))")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a quick check)")
    p.add_argument(
        "--save-factors", type=Path, default=None, help="write the compressed blocks here (rank 0)"
    )
    p.add_argument("--memory-snapshot", type=Path, default=None,
                   help="CUDA: record allocations during compression and dump torch's memory snapshot here "
                   "(a pickle for torch.cuda.memory tools / pytorch.org/memory_viz; a diagnostic, not a checkpoint)")  # fmt: skip
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    from flashsvd.methods.distributed import distributed_session

    with distributed_session():
        run(a)


def run(a: argparse.Namespace) -> None:
    import flashsvd.models as fm
    from flashsvd.methods.distributed import Traffic, get_world_size, is_distributed, is_main_process
    from flashsvd.models.recipe import Recipe

    if is_distributed():  # torchrun: process i uses cuda:i (init_from_env set it), no resume state
        a.device = f"cuda:{torch.cuda.current_device()}" if a.device.startswith("cuda") else a.device
        a.state_dir = None
    if a.state_dir is not None and a.fresh and a.state_dir.exists():
        shutil.rmtree(a.state_dir)
    dtype = getattr(torch, a.dtype)
    cfg = dict(TINY if a.tiny else LLAMA_7B)
    if a.layers is not None:
        cfg["num_hidden_layers"] = a.layers
    t0 = time.perf_counter()
    model = build(cfg, dtype, init_device=a.device if a.device.startswith("cuda") else "cpu")
    t_build = time.perf_counter() - t0
    block = model.model.layers[0]
    block_bytes = sum(x.numel() * x.element_size() for x in block.parameters())
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg["vocab_size"], (1, a.seq), generator=g) for _ in range(a.n_calib)]
    act_bytes = a.n_calib * a.seq * cfg["hidden_size"] * torch.tensor([], dtype=dtype).element_size()
    recipe = Recipe(name="big-sequential", method="whiten", allocation="uniform", sequential=True, paired=False,
                    rank_multiple=a.multiple, calib_samples=a.n_calib, calib_window=a.seq)  # fmt: skip
    cuda = a.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    common = dict(
        model="llama-7b-shaped" if not a.tiny else "llama-tiny", offload=a.offload, layers=cfg["num_hidden_layers"], dtype=a.dtype,
        calib=f"{a.n_calib}x{a.seq}", keep_ratio=a.keep, rank_multiple=a.multiple,
        block_weights_gib=f"{block_bytes / 2**30:.3f}", calib_activations_gib=f"{act_bytes / 2**30:.3f}",
        build_seconds=f"{t_build:.1f}",
        device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        processes=get_world_size(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    main = is_main_process()
    fields = [*common, "event", "seconds", "factorization_seconds", "all_reduce_seconds",
              "all_reduced_bytes", "kept_fraction", "gpu_peak_gib", "gpu_peak_gib_per_process", "host_peak_gib"]  # fmt: skip
    if main:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        new = not a.out.exists()
        fh = a.out.open("a", newline="")
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()

    def row(**kw) -> None:
        if main:
            writer.writerow({**common, **kw})
            fh.flush()

    clock = {"last": time.perf_counter(), "done": 0, "bytes": 0}

    def gpu_peak() -> str:
        return f"{torch.cuda.max_memory_allocated() / 2**30:.3f}" if cuda else ""

    Traffic.reset()
    if main:
        print(
            f"built in {t_build:.1f}s; block {block_bytes / 2**30:.3f} GiB; activations {act_bytes / 2**30:.3f} GiB",
            flush=True,
        )

    class Interrupted(Exception):
        pass

    def log(msg: str) -> None:
        now = time.perf_counter()
        if main:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        m = re.match(
            r"block (\d+) done in ([\d.]+) s \(factorization ([\d.]+) s, all-reduce ([\d.]+) s\)", msg
        )
        if m:
            row(event=f"block {m[1]} done", seconds=m[2], factorization_seconds=m[3], all_reduce_seconds=m[4],
                all_reduced_bytes=Traffic.reduced_bytes - clock["bytes"], gpu_peak_gib=gpu_peak(),
                host_peak_gib=f"{host_peak_gib():.2f}")  # fmt: skip
            clock["done"] += 1
            clock["bytes"] = Traffic.reduced_bytes
            if a.stop_after is not None and clock["done"] >= a.stop_after:
                raise Interrupted
        clock["last"] = now

    snapshot = cuda and a.memory_snapshot is not None and main
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    t1 = time.perf_counter()
    status = "finished"
    try:
        _, rep = fm.compress(model, recipe=recipe, keep_ratio=a.keep, calibration=batches, device=a.device,
                             state_dir=a.state_dir, log=log,
                             offload={"auto": None, "cpu": True, "device": False}[a.offload])  # fmt: skip
        kept = f"{rep.kept_fraction:.5f}"
    except Interrupted:
        status, kept = f"interrupted after {clock['done']} blocks", ""
    wall = time.perf_counter() - t1
    if snapshot:
        snap = torch.cuda.memory._snapshot()
        print("\n".join(peak_breakdown(snap)), flush=True)
        a.memory_snapshot.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(a.memory_snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    peaks = all_gather_floats(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0)
    blocks = rep.calibration.get("blocks", []) if status == "finished" else []
    summary = dict(
        event=f"summary: {status}", seconds=f"{wall:.1f}", kept_fraction=kept,
        factorization_seconds=f"{sum(b['factorization_seconds'] for b in blocks):.1f}",
        all_reduce_seconds=f"{sum(b['all_reduce_seconds'] for b in blocks):.1f}",
        all_reduced_bytes=Traffic.reduced_bytes, gpu_peak_gib=gpu_peak(),
        gpu_peak_gib_per_process=" ".join(f"{x:.3f}" for x in peaks) if cuda else "",
        host_peak_gib=f"{host_peak_gib():.2f}",
    )  # fmt: skip
    row(**summary)
    if a.save_factors is not None and status == "finished" and main:
        save_factors(model, a.save_factors)
    if main:
        fh.close()
        print(summary, common, flush=True)


def all_gather_floats(x: float) -> list[float]:
    """``x`` from every process (one value per rank), for per-GPU figures."""
    import torch.distributed as dist

    from flashsvd.methods.distributed import is_distributed

    if not is_distributed():
        return [x]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([x], dtype=torch.float64, device=dev))
    return [float(t) for t in out]


if __name__ == "__main__":
    main()
