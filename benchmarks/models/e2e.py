"""End-to-end model benchmark: dense vs torch-backend (vanilla low-rank) vs flash-backend.

* BERT-base encoder (random weights, fp16, batch 64, seq 128 and 512, keep 0.75): peak, transient
  and persistent memory and latency of one forward.
* LLaMA-7B-shaped decoder (4 layers, random weights, fp16): prefill 4096 tokens + greedy decode 256
  tokens: peak memory, KV-cache bytes, prefill latency and decode tokens/s.

Writes one CSV (fixed schema, device and versions in every row).  ``--plot results.csv`` makes PNGs
locally.  Run on a GPU:

    PYTHONPATH=packages/flashsvd-kernels/src:packages/flashsvd-methods/src:packages/flashsvd-models/src \\
        python3 benchmarks/models/e2e.py --out $OUT/models_e2e.csv
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import sys
import time

import torch

FIELDS = ["bench", "variant", "batch", "seq", "new_tokens", "keep_ratio", "params", "persistent_mb", "peak_mb",
          "transient_mb", "latency_ms", "tokens_per_s", "kv_cache_mb", "vs_dense_peak", "vs_dense_latency",
          "device", "torch", "triton", "transformers", "date"]  # fmt: skip


def _versions() -> dict[str, str]:
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": dev, "torch": torch.__version__, "triton": tv, "transformers": transformers.__version__,
            "date": datetime.date.today().isoformat()}  # fmt: skip


def _mb(x):
    return None if x is None else round(x / 2**20, 2)


def _variants(build, keep, ffn_split: bool = False):
    """Yield (name, model) for dense, torch-backend and flash-backend, one at a time (memory).

    ``ffn_split`` adds ``flash-attn``: the flash backend with its FFN blocks on the plain low-rank
    matmul chain (the kernels' torch path), which separates the attention kernel's share from the FFN's.
    """
    import flashsvd.models as fm
    from flashsvd.models.runtime import FlashFFN

    yield "dense", build()
    for backend in ("torch", "flash", *(("flash-attn",) if ffn_split else ())):
        model = build()
        model, _ = fm.compress(
            model, keep_ratio=keep, backend="flash" if backend == "flash-attn" else backend
        )
        if backend == "flash-attn":
            for block in model.modules():
                if isinstance(block, FlashFFN):
                    block.kernel_backend = "torch"
        yield backend, model


def bench_bert(rows, dev, args):
    import transformers as T

    from flashsvd.models.compress import count_parameters
    from flashsvd.models.measure import measure_latency, measure_memory

    cfg = T.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)

    def build():
        torch.manual_seed(0)
        return T.BertModel(cfg).to(dev, torch.float16).eval()

    for seq in args.bert_seqs:
        dense_ref = {}
        for name, model in _variants(build, args.keep, ffn_split=True):
            ids = torch.randint(0, cfg.vocab_size, (args.batch, seq), device=dev)
            mask = torch.ones_like(ids)

            def call(model=model, ids=ids, mask=mask):
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

            # Timing first, as the app's measure_forward does: its warm-up also runs Triton's autotuning,
            # whose benchmark buffers must not count as the forward's peak memory.
            t = measure_latency(call, warmup=args.warmup, repeats=args.repeats, device=dev)
            out, mem = measure_memory(call, model)
            out_bytes = out.numel() * out.element_size()
            del out
            transient = None if mem.transient_bytes is None else mem.transient_bytes - out_bytes
            row = {"bench": "bert-base", "variant": name, "batch": args.batch, "seq": seq, "new_tokens": 0,
                   "keep_ratio": 1.0 if name == "dense" else args.keep, "params": count_parameters(model),
                   "persistent_mb": _mb(mem.persistent_bytes), "peak_mb": _mb(mem.peak_bytes),
                   "transient_mb": _mb(transient), "latency_ms": round(t.median_ms, 3)}  # fmt: skip
            if name == "dense":
                dense_ref = row
            if dense_ref.get("peak_mb"):
                row["vs_dense_peak"] = round(row["peak_mb"] / dense_ref["peak_mb"], 3)
            row["vs_dense_latency"] = round(row["latency_ms"] / dense_ref["latency_ms"], 3)
            rows.append(row)
            print(row, flush=True)
            del model
            gc.collect()
            torch.cuda.empty_cache() if dev.type == "cuda" else None


def bench_llama(rows, dev, args):
    import transformers as T

    from flashsvd.models.cache import RankSpaceCacheLayer
    from flashsvd.models.compress import count_parameters
    from flashsvd.models.measure import measure_memory

    cfg = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                        num_hidden_layers=args.llama_layers, vocab_size=32000, max_position_embeddings=8192)  # fmt: skip

    def build():
        torch.manual_seed(0)
        with torch.device(dev):
            return T.LlamaForCausalLM(cfg).to(torch.float16).eval()

    dense_ref = {}
    for name, model in _variants(build, args.keep):
        ids = torch.randint(0, cfg.vocab_size, (1, args.prefill), device=dev)

        def run(model=model, ids=ids):
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            sync()
            t1 = time.perf_counter()
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(args.decode):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            sync()
            t2 = time.perf_counter()
            return cache, (t1 - t0) * 1e3, args.decode / (t2 - t1)

        with torch.no_grad():
            run()  # warm-up (compiles kernels)
        (cache, prefill_ms, tps), mem = measure_memory(run, model)
        kv = sum((lay.nbytes if isinstance(lay, RankSpaceCacheLayer) else lay.keys.nbytes + lay.values.nbytes)
                 for lay in cache.layers)  # fmt: skip
        row = {"bench": "llama7b-4layer", "variant": name, "batch": 1, "seq": args.prefill,
               "new_tokens": args.decode, "keep_ratio": 1.0 if name == "dense" else args.keep,
               "params": count_parameters(model), "persistent_mb": _mb(mem.persistent_bytes),
               "peak_mb": _mb(mem.peak_bytes), "transient_mb": _mb(mem.transient_bytes),
               "latency_ms": round(prefill_ms, 2), "tokens_per_s": round(tps, 1), "kv_cache_mb": _mb(kv)}  # fmt: skip
        if name == "dense":
            dense_ref = row
        if dense_ref.get("peak_mb"):
            row["vs_dense_peak"] = round(row["peak_mb"] / dense_ref["peak_mb"], 3)
        row["vs_dense_latency"] = round(row["latency_ms"] / dense_ref["latency_ms"], 3)
        rows.append(row)
        print(row, flush=True)
        del model, cache
        gc.collect()
        torch.cuda.empty_cache() if dev.type == "cuda" else None


def plot(path: str) -> None:
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = list(csv.DictReader(f))
    for bench in sorted({r["bench"] for r in rows}):
        sub = [r for r in rows if r["bench"] == bench]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        labels = [f"{r['variant']}\nseq {r['seq']}" for r in sub]
        axes[0].bar(labels, [float(r["peak_mb"] or 0) for r in sub])
        axes[0].set_ylabel("peak MiB")
        axes[1].bar(labels, [float(r["latency_ms"] or 0) for r in sub])
        axes[1].set_ylabel("latency ms (prefill for decoders)")
        fig.suptitle(f"{bench} ({sub[0]['device']})")
        fig.tight_layout()
        fig.savefig(path.replace(".csv", f"_{bench}.png"), dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results/models_e2e.csv")
    p.add_argument("--plot", metavar="CSV", help="only make PNGs from an existing CSV")
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bert-seqs", type=int, nargs="+", default=[128, 512])
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", choices=["bert", "llama"], default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.plot:
        plot(args.plot)
        return 0
    dev = torch.device(args.device)
    rows: list[dict] = []
    try:
        if args.only in (None, "bert"):
            bench_bert(rows, dev, args)
        if args.only in (None, "llama"):
            bench_llama(rows, dev, args)
    finally:
        meta = _versions()
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({**{k: "" for k in FIELDS}, **r, **meta})
    return 0


if __name__ == "__main__":
    sys.exit(main())
