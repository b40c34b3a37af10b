"""Where a decode step's and a forward's GPU time goes, and where an eager kernel call's host time goes.

Companion of ``speed.py`` (issue 14): same models, same aligned ranks, same variants.

* ``decode``: LLaMA-7B-shaped (``--llama-layers``, fp16), ``--prefill``-token prompt; per-kernel GPU
  time of one eager static-cache decode step (``generate_greedy(graph=False)`` with ``--steps + 1`` new
  tokens minus the same call with 1, divided by ``--steps``), per variant and batch.
* ``bert``: BERT-base B64 forward at ``--bert-seqs``, per-kernel GPU time of one forward.
* ``decode-kernel``: GPU time (CUDA graph replays) of the decode-attention kernel at LLaMA-7B shapes
  (32 heads, d_head 128, ``--prefill``-token cache, rank ``--kernel-rank``) for B in ``--batches``:
  RoPE with explicit key positions (what the runtime passes), RoPE by slot (no positions), no RoPE;
  and dense SDPA over the same cache length.
* ``host-bert``, ``host-llama``: eager BERT-base B64 forward (``--bert-seqs``; dense, flash and flash-fastest),
  eager LLaMA ``generate()`` (dense and flash, B=1, ``--prefill``-token prompt, 64 new tokens): host ms per call without a sync, wall ms with one, the
  host-device syncs one call makes (``torch.cuda.set_sync_debug_mode``, with where they come from),
  and ``cProfile``'s top functions.
* ``host``: ``cProfile`` of eager calls of the attention kernel at BERT 8,192 tokens (r=40) and of the
  decode kernel (B=1, 8K cache, r=64): host microseconds per call by function.

Prints tables and writes ``profile_step.log`` under ``--out``.  Needs a GPU.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def kernel_times(fn) -> dict[str, tuple[float, int]]:
    """``{kernel name: (total device µs, calls)}`` of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            out[ev.name][0] += ev.device_time
            out[ev.name][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _table(title: str, times: dict[str, tuple[float, int]], per: float, top: int = 14) -> str:
    total = sum(t for t, _ in times.values()) / per
    calls = sum(c for _, c in times.values()) / per
    lines = [f"{title}: {total:.1f} us GPU, {calls:.0f} kernels"]
    for name, (t, c) in sorted(times.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {t / per:9.1f} us  {c / per:6.1f}x  {name[:110]}")
    return "\n".join(lines)


def _diff(a, b):
    return {k: (a.get(k, (0, 0))[0] - b.get(k, (0, 0))[0], a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1])
            for k in a}  # fmt: skip


def profile_decode(args, log):
    import speed as sp  # the sibling script: same models, ranks and variants

    from flashsvd.models.graphs import generate_greedy

    dense = sp.llama7b(args.llama_layers)
    cfg = dense.config
    for name, model, _ in sp.compressed_variants(dense, args.keep, args.multiple, kv_rank=64):
        for B in args.batches:
            ids = torch.randint(0, cfg.vocab_size, (B, args.prefill), device="cuda")
            generate_greedy(model, ids, 3, graph=False)  # warm-up, autotune
            many = kernel_times(lambda m=model, i=ids: generate_greedy(m, i, args.steps + 1, graph=False))
            one = kernel_times(lambda m=model, i=ids: generate_greedy(m, i, 1, graph=False))
            log(_table(f"decode step {name} B={B}", _diff(many, one), args.steps))
            t = {}
            generate_greedy(model, ids, 64, graph=True, timings=t)
            log(f"  graphed step: {t['decode_ms'] / t['decode_steps'] * 1e3:.1f} us")
            del ids
            sp._free()
    del dense
    sp._free()


def _bert_cases(args):
    """``(seq, variant name, model, forward)`` for every ``--bert-seqs`` length and ``speed.py`` variant
    (dense, torch, flash, flash-fastest) of BERT-base at batch 64; ``forward(n)`` runs ``n`` eager calls."""
    import speed as sp  # the sibling script: same models, ranks and variants

    dense = sp.bert_base()
    for seq in args.bert_seqs:
        ids = torch.randint(0, dense.config.vocab_size, (64, seq), device="cuda")
        mask = torch.ones_like(ids)
        for name, model, _ in sp.compressed_variants(dense, args.keep, args.multiple, fastest=True):

            def forward(n=1, model=model, ids=ids, mask=mask):
                with torch.no_grad():
                    for _ in range(n):
                        model(input_ids=ids, attention_mask=mask)

            yield seq, name, model, forward
            sp._free()
    del dense
    sp._free()


def profile_bert(args, log):
    for seq, name, _, forward in _bert_cases(args):

        def fwd(forward=forward):
            forward(3)

        fwd()
        log(_table(f"bert forward {name} seq={seq}", kernel_times(fwd), 3))


def _host_profile(label, fn, n, log):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    log(f"{label}: {host:.1f} us host per call (no sync; cProfile below over {n} calls)")
    log("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:6000])


def profile_host(args, log):
    from flashsvd.kernels import lowrank_attention, lowrank_attention_decode

    torch.manual_seed(0)
    dt, dev = torch.float16, "cuda"
    B, S, H, r, D = 64, 128, 12, 40, 64
    pq, pk, pv = (torch.randn(B, S, H, r, device=dev, dtype=dt) for _ in range(3))
    vq, vk, vv = (torch.randn(H, r, D, device=dev, dtype=dt) / r**0.5 for _ in range(3))
    bq, bk, bv = (torch.randn(H, D, device=dev, dtype=dt) for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.bool, device=dev)
    _host_profile("attention BERT 8192 tok r=40", lambda: lowrank_attention(
        pq, pk, pv, vq, vk, vv, bq, bk, bv, key_padding_mask=mask), args.host_calls, log)  # fmt: skip
    N, r = 8192, 64
    pq1 = torch.randn(1, 1, 32, r, device=dev, dtype=dt)
    ck, cv = (torch.randn(1, N, 32, r, device=dev, dtype=dt) for _ in range(2))
    wq, wk, wv = (torch.randn(32, r, 128, device=dev, dtype=dt) / r**0.5 for _ in range(3))
    lengths = torch.full((1,), N, dtype=torch.int32, device=dev)
    _host_profile("decode B=1 8K r=64", lambda: lowrank_attention_decode(
        pq1, (ck, cv), wq, wk, wv, lengths=lengths), args.host_calls, log)  # fmt: skip


def _syncs(fn) -> list[str]:
    """Where ``fn`` synchronizes host and device: one line per distinct call site (file:line of the
    innermost frame outside torch)."""
    import traceback
    import warnings

    sites: collections.Counter = collections.Counter()
    old = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "prototype feature" in str(message):  # torch's notice that the debug mode is on, not a sync
            return
        frames = [
            f
            for f in traceback.extract_stack()[:-1]
            if "/torch/" not in f.filename and "warnings" not in f.filename
        ]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else f"{filename}:{lineno}"
        sites[f"{str(message)[:60]} @ {where}"] += 1

    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    return [f"{n}x {k}" for k, n in sites.most_common()]


def _host_model(label, fn, n, log, top=28):
    """Host ms per call (no sync), wall ms per call (synchronized), syncs per call, cProfile top."""
    for _ in range(10):  # warm-up: autotuning and the FFN policy's first-call measurements
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e3
    syncs = _syncs(fn)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(top + 12)
    log(f"{label}: host {host:.2f} ms/call before its sync, wall {wall:.2f} ms/call; {len(syncs)} sync sites")
    for line in syncs[:12]:
        log(f"  sync {line}")
    log("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:20000])


def profile_host_bert(args, log):
    for seq, name, _, forward in _bert_cases(args):
        if name in ("dense", "flash", "flash-fastest"):
            _host_model(f"bert eager {name} seq={seq}", forward, 20, log)


def profile_host_llama(args, log):
    import speed as sp  # the sibling script: same models, ranks and variants

    dense = sp.llama7b(args.llama_layers)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.prefill), device="cuda")
    kw = dict(do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)

    def gen(model):
        with torch.no_grad():
            model.generate(ids, **kw)

    for name, model, _ in sp.compressed_variants(dense, args.keep, args.multiple, kv_rank=64):
        if name in ("dense", "flash"):
            _host_model(
                f"llama eager generate() B=1 {args.prefill}-token prompt, 64 new {name}",
                lambda m=model: gen(m),
                2,
                log,
            )
    del dense
    sp._free()


def _graph_ms(fn) -> float:
    """Median ms of replays of ``fn`` captured in a CUDA graph (as ``benchmarks/kernels`` time them)."""
    from triton.testing import do_bench

    from flashsvd.models.graphs import cuda_graph

    return do_bench(cuda_graph(fn), warmup=25, rep=100, return_mode="median")


def profile_decode_kernel(args, log):
    from flashsvd.kernels import attention_decode

    default = attention_decode.PROGRAMS_PER_SM
    for per_sm in args.programs_per_sm or [default]:
        attention_decode.PROGRAMS_PER_SM = per_sm  # how many splits the cache is cut into
        log(f"# decode kernel with PROGRAMS_PER_SM = {per_sm}")
        for B in args.batches:
            _decode_kernel_point(B, args.prefill, args.kernel_rank, log)
            torch.cuda.empty_cache()
    attention_decode.PROGRAMS_PER_SM = default


def _decode_kernel_point(B: int, N: int, r: int, log) -> None:
    import torch.nn.functional as F

    from flashsvd.kernels import lowrank_attention_decode, rope_table

    dt, dev, H, D = torch.float16, "cuda", 32, 128
    cos, sin = rope_table(N + 64, D, dtype=dt, device=dev)
    vq, vk, vv = (torch.randn(H, r, D, device=dev, dtype=dt) / r**0.5 for _ in range(3))
    pq = torch.randn(B, 1, H, r, device=dev, dtype=dt)
    pk, pv = (torch.randn(B, N, H, r, device=dev, dtype=dt) for _ in range(2))
    lengths = torch.full((B,), N, dtype=torch.int32, device=dev)
    kpos = torch.arange(N, device=dev)[None].expand(B, N).contiguous()
    qpos = torch.full((B, 1), N - 1, device=dev)
    variants = {
        "rope, key positions": dict(rope=(cos, sin), positions=qpos, key_positions=kpos),
        "rope by slot": dict(rope=(cos, sin)),
        "no rope": {},
    }
    for name, kw in variants.items():
        ms = _graph_ms(
            lambda kw=kw: lowrank_attention_decode(pq, (pk, pv), vq, vk, vv, lengths=lengths, **kw)
        )
        log(f"decode kernel B={B} N={N} r={r} {name}: {ms * 1e3:.1f} us")
    q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    k, v = (torch.randn(B, H, N, D, device=dev, dtype=dt) for _ in range(2))
    log(f"dense SDPA B={B} N={N}: {_graph_ms(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3:.1f} us")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--only", default="host,decode,bert")
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--multiple", type=int, default=16)
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--bert-seqs", type=int, nargs="+", default=[128])
    p.add_argument("--host-calls", type=int, default=300)
    p.add_argument("--kernel-rank", type=int, default=64)
    p.add_argument(
        "--programs-per-sm", type=int, nargs="+", help="decode-kernel: split heuristics to compare"
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA device", file=sys.stderr)
        return 2
    out = Path(args.out) / "profile_step.log"
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(text: str) -> None:
        print(text, flush=True)
        with out.open("a") as fh:
            fh.write(text + "\n")

    log(f"# {torch.cuda.get_device_name()} torch {torch.__version__} {time.strftime('%Y-%m-%d %H:%M')}")
    jobs = {"host": profile_host, "host-bert": profile_host_bert, "host-llama": profile_host_llama, "decode": profile_decode, "bert": profile_bert,
            "decode-kernel": profile_decode_kernel}  # fmt: skip
    for name in args.only.split(","):
        jobs[name](args, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
