"""Block-by-block compression of a LLaMA-7B-shaped model (random weights) on one GPU, with resume.

    python benchmarks/quality/bigmodel.py --device cuda --out benchmarks/results/bigmodel_h200.csv
    python benchmarks/quality/bigmodel.py --tiny --device cpu --out /tmp/big.csv      # CPU check

The model stays on the CPU (bf16); ``flashsvd.models.compress`` with a sequential recipe moves one
decoder block at a time to the GPU, calibrates it on the cached block inputs (``n_calib`` sequences of
``seq`` random tokens), factorizes it, and moves it back (llm-compressor's sequential pipeline).
Finished blocks and the next block's inputs go to ``--state-dir``; ``--stop-after N`` interrupts the
run after N blocks (as a crash would), and running again with the same folder resumes there.

Measured: GPU peak allocated memory (``torch.cuda.max_memory_allocated``), wall time per block and in
total, host peak RSS; one CSV row per finished block plus a summary row. The weights are random (no
7B checkpoint is reachable), so this measures memory and time, not quality.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
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


def build(cfg: dict, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight LlamaForCausalLM on the CPU: built on the meta device, then filled (fast init)."""
    import transformers as T

    config = T.LlamaConfig(**cfg)
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(dtype))
    # buffers were not initialized by to_empty: rebuild the rotary tables on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a 3-layer toy config (CPU test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--n-calib", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--multiple", type=int, default=64)
    p.add_argument("--state-dir", type=Path, default=Path("/tmp/flashsvd_bigmodel_state"))
    p.add_argument("--fresh", action="store_true", help="delete the state folder first")
    p.add_argument("--stop-after", type=int, default=None, help="interrupt after this many blocks")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    import flashsvd.models as fm
    from flashsvd.models.recipe import Recipe

    if a.fresh and a.state_dir.exists():
        shutil.rmtree(a.state_dir)
    dtype = getattr(torch, a.dtype)
    cfg = TINY if a.tiny else LLAMA_7B
    t0 = time.perf_counter()
    model = build(cfg, dtype)
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
        model="llama-7b-shaped" if not a.tiny else "llama-tiny", layers=cfg["num_hidden_layers"], dtype=a.dtype,
        calib=f"{a.n_calib}x{a.seq}", keep_ratio=a.keep, rank_multiple=a.multiple,
        block_weights_gib=f"{block_bytes / 2**30:.3f}", calib_activations_gib=f"{act_bytes / 2**30:.3f}",
        build_seconds=f"{t_build:.1f}",
        device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
        torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
    )  # fmt: skip
    a.out.parent.mkdir(parents=True, exist_ok=True)
    new = not a.out.exists()
    fh = a.out.open("a", newline="")
    writer = csv.DictWriter(
        fh, fieldnames=[*common, "event", "seconds", "kept_fraction", "gpu_peak_gib", "host_peak_gib"]
    )
    if new:
        writer.writeheader()

    def row(**kw) -> None:
        writer.writerow({**common, **kw})
        fh.flush()

    clock = {"last": time.perf_counter(), "done": 0}
    print(
        f"built in {t_build:.1f}s; block {block_bytes / 2**30:.3f} GiB; activations {act_bytes / 2**30:.3f} GiB",
        flush=True,
    )

    class Interrupted(Exception):
        pass

    def log(msg: str) -> None:
        now = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
        if msg.startswith("block ") and msg.endswith(" done"):
            row(event=msg, seconds=f"{now - clock['last']:.2f}",
                gpu_peak_gib=f"{torch.cuda.max_memory_allocated() / 2**30:.3f}" if cuda else "",
                host_peak_gib=f"{host_peak_gib():.2f}")  # fmt: skip
            clock["done"] += 1
            if a.stop_after is not None and clock["done"] >= a.stop_after:
                raise Interrupted
        clock["last"] = now

    t1 = time.perf_counter()
    status = "finished"
    try:
        _, rep = fm.compress(model, recipe=recipe, keep_ratio=a.keep, calibration=batches, device=a.device,
                             state_dir=a.state_dir, log=log)  # fmt: skip
        kept = f"{rep.kept_fraction:.5f}"
    except Interrupted:
        status, kept = f"interrupted after {clock['done']} blocks", ""
    wall = time.perf_counter() - t1
    summary = dict(
        event=f"summary: {status}", seconds=f"{wall:.1f}", kept_fraction=kept,
        gpu_peak_gib=f"{torch.cuda.max_memory_allocated() / 2**30:.3f}" if cuda else "",
        host_peak_gib=f"{host_peak_gib():.2f}",
    )  # fmt: skip
    row(**summary)
    fh.close()
    print(summary, common, flush=True)


if __name__ == "__main__":
    main()
