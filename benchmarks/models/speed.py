"""Every figure of issue 14's targets, in one call: dense vs vanilla low-rank vs flash, eager and graphed.

* ``bert``: BERT-base (random fp16 weights), B64, seq 128 and 512, keep 0.75 with aligned ranks:
  dense HF eager and captured in one CUDA graph, torch backend (vanilla low-rank) and flash backend,
  each eager and graphed; median latency after warm-up, peak and transient memory.
* ``llama``: LLaMA-7B-shaped decoder (4 layers, fp16): 4K-token prompt, 256 greedy tokens at B=1 and
  B=16; eager ``generate()`` and a static-cache decode loop captured in a CUDA graph, for dense and
  compressed alike; tokens/s, prefill time, KV-cache bytes and the weight-bandwidth limit.
* ``kernels``: attention at BERT 8192 tokens (dense SDPA, vanilla, ours; eager and graphed, from
  ``benchmarks/kernels/attention.py``) and decode over an 8K cache; FFN fused vs cuBLAS chain at
  r ∈ {240, 464} with transient memory (``benchmarks/kernels/ffn.py``).

Anything that fails (a capture that breaks, a missing static cache) becomes a row with its error.
Writes ``speed.csv`` (one schema, device and versions in every row) under ``--out``.  Run on a GPU
from the repo root::

    PYTHONPATH=packages/flashsvd-kernels/src:packages/flashsvd-methods/src:packages/flashsvd-models/src \\
        python3 benchmarks/models/speed.py --out $OUT
    python benchmarks/models/speed.py --plot benchmarks/results/speed_h200.csv   # PNG, locally
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import importlib.util
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FIELDS = ["bench", "variant", "mode", "batch", "seq", "new_tokens", "ranks", "kept_fraction", "latency_ms",
          "prefill_ms", "tokens_per_s", "limit_tokens_per_s", "peak_mb", "transient_mb", "kv_cache_mb",
          "vs_dense", "vs_torch", "device_mallocs", "error", "device", "torch", "triton", "transformers", "date"]  # fmt: skip


def _load(name: str, path: Path):
    """Import a sibling benchmark script as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _versions() -> dict[str, str]:
    import transformers
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": dev, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": datetime.date.today().isoformat()}  # fmt: skip


def _mb(x):
    return None if x is None else round(x / 2**20, 2)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# ---- ranks ---------------------------------------------------------------------------------------------
def aligned_ranks(model, keep: float, multiple: int, kv_rank: int | None = None) -> dict[str, int]:
    """Keep-``keep`` ranks of every target, rounded to the nearest multiple of ``multiple``.

    A stand-in for the allocator's hardware rounding: per-head projections use
    ``keep·d·d_head/(d + d_head)`` per head, plain ones ``keep·m·n/(m + n)``.  ``kv_rank`` (decoders)
    fixes the K/V ranks per head (64 of d_head 128 halves the KV cache) and hands the parameters this
    frees or costs to the plain targets (o and the MLP), so the kept fraction stays ``keep``.
    """
    from flashsvd.models.adapters import get_adapter

    shapes = {}
    for t in get_adapter(model).targets(model):
        w = model.get_submodule(t.source).weight
        out_f, in_f = w.shape
        if t.rows is not None or t.part is not None:
            raise ValueError(f"{t.name}: fused projections are not handled by this benchmark's rank rule")
        shapes[t.name] = (t.role, t.n_heads, in_f, out_f // t.n_heads if t.n_heads else out_f)

    def rank(name, k):
        _, _, in_f, out_f = shapes[name]
        exact = k * in_f * out_f / (in_f + out_f)
        return max(multiple, round(exact / multiple) * multiple)

    def params(name, r):
        _, heads, in_f, out_f = shapes[name]
        return r * (in_f * (heads or 1) + (heads or 1) * out_f) if heads else r * (in_f + out_f)

    def dense(name):
        _, heads, in_f, out_f = shapes[name]
        return in_f * out_f * (heads or 1)

    ranks = {name: rank(name, keep) for name in shapes}
    if kv_rank is not None:
        fixed = {n for n, (role, heads, _, _) in shapes.items() if heads}
        for n in fixed:
            if shapes[n][0] in ("k", "v"):
                ranks[n] = kv_rank
        left = keep * sum(dense(n) for n in shapes) - sum(params(n, ranks[n]) for n in fixed)
        free = [n for n in shapes if n not in fixed]
        k_free = left / sum(dense(n) for n in free)
        ranks.update({n: rank(n, k_free) for n in free})
    return ranks


def _rank_summary(report) -> str:
    vals = sorted({r for r in report.ranks.values() if r is not None})
    return "/".join(map(str, vals))


def compressed_variants(dense, keep: float, multiple: int, fastest: bool = False, kv_rank: int | None = None):
    """Yield ``(name, model, report)``: dense, torch backend, flash backend (one compressed copy).

    The flash backend runs its default policy (``balanced``); ``fastest`` adds ``flash-fastest``.
    ``kv_rank``: see :func:`aligned_ranks`.
    """
    import flashsvd.models as fm

    yield "dense", dense, None
    model = copy.deepcopy(dense)
    model, report = fm.compress(model, ranks=aligned_ranks(model, keep, multiple, kv_rank), backend="torch")
    yield "torch", model, report
    fm.set_backend(model, "flash")
    yield "flash", model, report
    if fastest:
        fm.set_backend(model, "flash", policy="fastest")
        yield "flash-fastest", model, report
    del model


def bert_base():
    """The encoder of issue 14: BERT-base, random weights (seed 0), fp16 on CUDA, eval mode."""
    import transformers as T

    cfg = T.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    return T.BertModel(cfg).to("cuda", torch.float16).eval()


def llama7b(layers: int):
    """The decoder of issue 14: ``layers`` LLaMA-7B-shaped blocks, random weights (seed 0), fp16 on CUDA."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=8192)  # fmt: skip
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()


# ---- timing ----------------------------------------------------------------------------------------
def cuda_graph(fn):
    from flashsvd.models.graphs import cuda_graph as capture

    return capture(fn)


def _time(fn, warmup: int, repeats: int) -> float:
    from flashsvd.models.measure import measure_latency

    return measure_latency(fn, warmup=warmup, repeats=repeats).median_ms


# ---- BERT ---------------------------------------------------------------------------------------------
def bench_bert(rows, args):
    from flashsvd.models.measure import measure_memory

    dense = bert_base()
    for seq in args.bert_seqs:
        ids = torch.randint(0, dense.config.vocab_size, (args.batch, seq)).cuda()
        mask = torch.ones_like(ids)
        for name, model, report in compressed_variants(dense, args.keep, args.multiple, fastest=True):
            base = {"bench": "bert-base", "variant": name, "batch": args.batch, "seq": seq, "new_tokens": 0,
                    "ranks": "" if report is None else _rank_summary(report),
                    "kept_fraction": 1.0 if report is None else round(report.kept_fraction, 4)}  # fmt: skip

            def call(model=model, ids=ids, mask=mask):
                with torch.no_grad():
                    return model(input_ids=ids, attention_mask=mask).last_hidden_state

            for mode in ("eager", "graphed"):
                row = {**base, "mode": mode}
                try:
                    fn = call if mode == "eager" else cuda_graph(call)
                    row["latency_ms"] = round(_time(fn, args.warmup, args.repeats), 3)
                    if mode == "eager":
                        out, mem = measure_memory(fn, model)
                        out_bytes = out.numel() * out.element_size()
                        del out
                        # The model's own peak: its weights + what the forward allocates (the
                        # allocator's raw peak would also count the dense model kept for comparison).
                        row["peak_mb"] = _mb(mem.persistent_bytes + mem.transient_bytes)
                        row["transient_mb"] = _mb(mem.transient_bytes - out_bytes)
                    fn = None
                except Exception as exc:  # a row with the error, not a crash
                    traceback.print_exc()
                    row["error"] = _err(exc)
                rows.append(row)
                print(row, flush=True)
                _free()
        _ratios(rows, "bert-base", seq)
    del dense
    _free()


def _ratios(rows, bench, seq, key="latency_ms", batch=None):
    group = [
        r for r in rows if r["bench"] == bench and r["seq"] == seq and (batch is None or r["batch"] == batch)
    ]
    for mode in ("eager", "eager-loop", "graphed"):
        by = {r["variant"]: r.get(key) for r in group if r["mode"] == mode}
        for r in group:
            if r["mode"] != mode or not r.get(key):
                continue
            for ref, col in (("dense", "vs_dense"), ("torch", "vs_torch")):
                if by.get(ref):
                    r[col] = round(r[key] / by[ref], 3)


# ---- LLaMA decode --------------------------------------------------------------------------------------
def _kv_bytes(cache) -> int:
    """Bytes of the cached tokens (rank-space layers: the used part of their preallocated store)."""
    return sum(
        lay.keys.nbytes + lay.values.nbytes for lay in cache.layers if getattr(lay, "keys", None) is not None
    )


def _static_kv_bytes(model, batch: int, length: int) -> int:
    """Bytes of a static cache of ``length`` tokens: rank-space on the flash backend, else dense."""
    from flashsvd.models import get_backend
    from flashsvd.models.lowrank import LowRankLinear

    cfg, total = model.config, 0
    for layer in model.model.layers:
        k, v = layer.self_attn.k_proj, layer.self_attn.v_proj
        if get_backend(model) == "flash" and isinstance(k, LowRankLinear):
            width = k.n_heads * k.rank + v.n_heads * v.rank
        else:
            width = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
        total += batch * length * width * 2  # fp16
    return total


def _prefill_ms(model, ids, repeats=3) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            _sync()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            _sync()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _generate(model, ids, new_tokens):
    """Eager greedy ``generate()``: (decode tokens/s excluding prefill, cache)."""
    kw = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0,
              return_dict_in_generate=True)  # fmt: skip
    with torch.no_grad():
        # Warm-up over every cache length the timed call sees: the first model in the process otherwise
        # pays a one-time per-shape setup at each new length (H200: dense B=1 generate() measured
        # 14-19 tok/s with a 4-token warm-up, 158 tok/s with this one; likely cuDNN attention plans
        # built per KV length)
        model.generate(ids, **kw)
        _sync()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync()
        total = time.perf_counter() - t0
    return total, out.past_key_values


def _eager_loop(model, ids, new_tokens):
    """Decode tokens/s of a plain eager loop (model calls only, HF's default cache): generate()'s
    own per-step work left out, as ``benchmarks/models/e2e.py`` measures."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        _sync()
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        _sync()
        dt = time.perf_counter() - t0
    return ids.shape[0] * new_tokens / dt, cache


def _static_decode(model, ids, new_tokens):
    """(prefill ms, decode tokens/s, cache bytes) of :func:`flashsvd.models.generate_greedy` (graphed)."""
    from flashsvd.models.graphs import generate_greedy

    t: dict[str, float] = {}
    generate_greedy(model, ids, new_tokens, timings=t)
    return t["prefill_ms"], ids.shape[0] * t["decode_steps"] / (t["decode_ms"] / 1e3)


def bench_llama(rows, args):
    bandwidth = args.ceilings[1]
    dense = llama7b(args.llama_layers)
    cfg = dense.config
    for name, model, report in compressed_variants(
        dense, args.keep, args.multiple, kv_rank=args.llama_kv_rank or None
    ):
        from flashsvd.models.measure import persistent_bytes

        # Bytes one decode step must read: every weight but the input embedding table (one row each).
        weight_bytes = persistent_bytes(model) - model.get_input_embeddings().weight.nbytes
        for B in args.llama_batches:
            ids = torch.randint(0, cfg.vocab_size, (B, args.prefill)).cuda()
            base = {"bench": "llama7b-4layer", "variant": name, "batch": B, "seq": args.prefill,
                    "new_tokens": args.decode, "ranks": "" if report is None else _rank_summary(report),
                    "kept_fraction": 1.0 if report is None else round(report.kept_fraction, 4)}  # fmt: skip
            for mode in ("eager", "eager-loop", "graphed"):
                row = {**base, "mode": mode}
                mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
                try:
                    if mode == "eager":
                        prefill = _prefill_ms(model, ids)
                        total, cache = _generate(model, ids, args.decode)
                        row["tokens_per_s"] = round(B * args.decode / (total - prefill / 1e3), 1)
                        kv = _kv_bytes(cache)
                        del cache
                    elif mode == "eager-loop":
                        tps, cache = _eager_loop(model, ids, args.decode)
                        row["tokens_per_s"] = round(tps, 1)
                        kv = _kv_bytes(cache)
                        del cache
                    else:
                        prefill, tps = _static_decode(model, ids, args.decode)
                        row["tokens_per_s"] = round(tps, 1)
                        kv = _static_kv_bytes(model, B, args.prefill + args.decode)
                    row["prefill_ms"] = round(prefill, 2)
                    row["kv_cache_mb"] = _mb(kv)
                    # Weight-bandwidth limit: weights + the (average) cache read once per step.
                    per_step = weight_bytes + 0.5 * kv * (1 + args.prefill / (args.prefill + args.decode))
                    row["limit_tokens_per_s"] = round(B * bandwidth * 1e12 / per_step, 1)
                    # cudaMalloc calls during the row: a cache that grows by torch.cat can defeat the
                    # caching allocator (one of the suspects for dense eager decoding's 45 ms per step)
                    row["device_mallocs"] = torch.cuda.memory_stats().get("num_device_alloc", 0) - mallocs
                except Exception as exc:
                    traceback.print_exc()
                    row["error"] = _err(exc)
                rows.append(row)
                print(row, flush=True)
                _free()
        _free()
    for B in args.llama_batches:
        _ratios(rows, "llama7b-4layer", args.prefill, key="tokens_per_s", batch=B)
    del dense
    _free()


# ---- kernels -------------------------------------------------------------------------------------------
def bench_kernels(rows, args):
    """Attention (eager and graphed) and FFN rows from the kernel benchmarks, in this CSV's schema."""
    katt = _load("bench_attention", HERE.parent / "kernels" / "attention.py")
    kffn = _load("bench_ffn", HERE.parent / "kernels" / "ffn.py")
    katt.PEAK_TFLOPS, katt.PEAK_TBPS = args.ceilings
    att_rows: list[dict] = []
    names = {"dense_sdpa": "dense", "vanilla_lowrank": "torch", "flashsvd": "flash"}
    for run, pts in ((katt.run_encoder, [128]), (katt.run_decode, [(1, 8192)])):
        try:
            run(pts, torch.float16, att_rows)
        except Exception as exc:
            traceback.print_exc()
            rows.append({"bench": f"attention-{run.__name__}", "error": _err(exc)})
    for r in att_rows:
        for mode, col in (("eager", "ms"), ("graphed", "ms_graph")):
            rows.append({"bench": f"attention-{r['scenario']}", "variant": names[r["path"]], "mode": mode,
                         "batch": r["batch"], "seq": r["seq"], "new_tokens": r["new_tokens"], "ranks": r["rank"],
                         "latency_ms": r[col], "transient_mb": r["transient_mib"], "kv_cache_mb": r["cache_mib"],
                         "vs_dense": r.get("vs_dense" if mode == "eager" else "vs_dense_graph"),
                         "vs_torch": r.get("vs_vanilla" if mode == "eager" else "vs_vanilla_graph")})  # fmt: skip
    ns = argparse.Namespace(out=args.out, tag="speed", quick=True, all_dtypes=False, rep=args.ffn_rep)
    try:
        path = kffn.run(ns, [(kffn.BERT, 8192, (r, r), "float16") for r in args.ffn_ranks])
        with open(path) as fh:
            for r in csv.DictReader(fh):
                name = {"vanilla": "torch"}.get(r["variant"], r["variant"])
                rows.append({"bench": "ffn-bert", "variant": name, "mode": "eager", "batch": 1, "seq": 8192,
                             "ranks": r["ranks"], "latency_ms": float(r["latency_ms"]),
                             "transient_mb": float(r["transient_mib"]),
                             "vs_dense": round(1 / float(r["speedup_vs_dense"]), 3),
                             "vs_torch": round(1 / float(r["speedup_vs_vanilla"]), 3),
                             "error": f"rel_err {r['rel_err']}"})  # fmt: skip
        path.unlink()
    except Exception as exc:
        traceback.print_exc()
        rows.append({"bench": "ffn-bert", "error": _err(exc)})


# ---- output --------------------------------------------------------------------------------------------
def write(rows, path: Path) -> None:
    meta = _versions()
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**{k: "" for k in FIELDS}, **{k: v for k, v in r.items() if k in FIELDS}, **meta})
    tmp.replace(path)


def summary(rows) -> None:
    print(f"\n{'bench':18s} {'variant':7s} {'mode':8s} {'B':>3s} {'seq':>5s} {'ms':>9s} {'tok/s':>8s} "
          f"{'peakMB':>8s} {'trMB':>8s} {'/dense':>6s} {'/torch':>6s} error")  # fmt: skip
    for r in rows:
        print(f"{r.get('bench', ''):18s} {r.get('variant', ''):7s} {r.get('mode', ''):8s} {r.get('batch', '')!s:>3s} "
              f"{r.get('seq', '')!s:>5s} {r.get('latency_ms') or r.get('prefill_ms') or ''!s:>9s} "
              f"{r.get('tokens_per_s') or ''!s:>8s} {r.get('peak_mb') or ''!s:>8s} {r.get('transient_mb') or ''!s:>8s} "
              f"{r.get('vs_dense') or ''!s:>6s} {r.get('vs_torch') or ''!s:>6s} {r.get('error', '')[:60]}")  # fmt: skip


def plot(path: str) -> Path:
    """One PNG: BERT latency (eager/graphed), LLaMA tokens/s, kernel latency, per variant."""
    import matplotlib.pyplot as plt

    with open(path) as f:
        rows = list(csv.DictReader(f))  # rows that failed carry no value and drop out per panel
    panels = [("bert-base", "latency_ms", "BERT-base B64 forward (ms)"),
              ("llama7b-4layer", "tokens_per_s", "LLaMA-7B 4 layers decode (tok/s)"),
              ("attention-encoder", "latency_ms", "attention, BERT 8192 tokens (ms)"),
              ("ffn-bert", "latency_ms", "FFN, BERT 8192 tokens (ms)")]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (bench, key, title) in zip(axes, panels):
        sub = [r for r in rows if r["bench"] == bench and r[key]]
        labels = [f"{r['variant']} {r['mode']}\nB{r['batch']} s{r['seq']} r{r['ranks']}" for r in sub]
        colors = [{"dense": "tab:gray", "torch": "tab:blue", "flash": "tab:orange"}.get(r["variant"], "tab:green")
                  for r in sub]  # fmt: skip
        ax.barh(range(len(sub)), [float(r[key]) for r in sub], color=colors)
        ax.set_yticks(range(len(sub)), labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    rows = [r for r in rows if r["bench"] != "ceilings"]
    dev = rows[0]["device"] if rows else ""
    fig.suptitle(f"{dev}, {rows[0]['date'] if rows else ''}, fp16, keep 0.75 aligned ranks", fontsize=10)
    fig.tight_layout()
    png = Path(path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=".", help="output folder (speed.csv)")
    p.add_argument("--plot", metavar="CSV", help="only make the PNG from an existing CSV")
    p.add_argument(
        "--quick", action="store_true", help="small iteration run (seq 128, B=1 decode, 64 tokens)"
    )
    p.add_argument("--only", default="bert,llama,kernels")
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--multiple", type=int, default=16, help="ranks rounded to this multiple")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--bert-seqs", type=int, nargs="+", default=[128, 512])
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--decode", type=int, default=256)
    p.add_argument("--llama-batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--llama-kv-rank", type=int, default=64,
                   help="K/V rank per head of the LLaMA model (its d_head is 128); 0: the uniform rule")  # fmt: skip
    p.add_argument("--ffn-ranks", type=int, nargs="+", default=[240, 464])
    p.add_argument("--ffn-rep", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--section", choices=["kernels", "bert", "llama"], help=argparse.SUPPRESS)
    p.add_argument("--ceilings", type=float, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plot:
        print(plot(args.plot))
        return 0
    if not torch.cuda.is_available():
        print("error: speed.py measures on a CUDA device; none is visible", file=sys.stderr)
        return 2
    if args.quick:
        args.bert_seqs, args.llama_batches, args.decode, args.repeats = [128], [1], 64, 10
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kffn = _load("bench_ffn", HERE.parent / "kernels" / "ffn.py")
    from triton.testing import do_bench

    if not args.ceilings:
        args.ceilings = kffn.measure_ceilings(torch, do_bench)
    print(
        f"ceilings: {args.ceilings[0]:.0f} TFLOP/s fp16 matmul, {args.ceilings[1]:.2f} TB/s copy", flush=True
    )
    rows: list[dict] = [{"bench": "ceilings", "variant": "device", "latency_ms": "",
                         "error": f"{args.ceilings[0]:.0f} TFLOP/s fp16, {args.ceilings[1]:.2f} TB/s copy"}]  # fmt: skip
    sections = {"kernels": bench_kernels, "bert": bench_bert, "llama": bench_llama}
    if args.section:  # child process: one section, rows to its own CSV
        try:
            sections[args.section](rows, args)
        except Exception as exc:
            traceback.print_exc()
            rows.append({"bench": args.section, "error": _err(exc)})
        write(rows[1:], out / f"speed_{args.section}.csv")
        return 0
    try:
        jobs = []
        for n in args.only.split(","):  # in the order asked; BERT one process per sequence length
            jobs += [("bert", ["--bert-seqs", str(q)]) for q in args.bert_seqs] if n == "bert" else [(n, [])]
        for name, extra in jobs:
            # One process per section: a failed CUDA-graph capture leaves the CUDA RNG and allocator
            # in a state that breaks later work in the same process.
            child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), *extra,
                     "--section", name, "--ceilings", *map(str, args.ceilings)]  # fmt: skip
            proc = subprocess.run(child, check=False)
            part = out / f"speed_{name}.csv"
            if part.exists():
                with part.open() as fh:
                    rows += [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]
                part.unlink()
            if proc.returncode:
                rows.append({"bench": name, "error": f"section exited with code {proc.returncode}"})
            write(rows, out / "speed.csv")
    finally:
        write(rows, out / "speed.csv")
        summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
