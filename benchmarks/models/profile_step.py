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
* ``host-layer``: host microseconds (no profiler, synchronized between batches of calls, median) of
  one BERT-base B64 layer and its sublayers (dense, flash, flash-fastest), of the kernel calls inside
  it beside their dense counterparts, and a ``cProfile`` of a whole forward in µs per forward.
* ``eager-ab``: eager BERT-base B64 latency (synchronized) and host time (not) of dense and
  flash-fastest (two models) measured in alternating rounds, so that neither gets the cold start or a
  slow stretch of the host alone.
* ``llama-ab``: eager LLaMA ``generate()`` decode tokens/s (``--batches``, ``--prefill``-token prompt, 64
  new tokens) of dense, flash and flash without its decode and RMSNorm launch plans, in alternating rounds.
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
import statistics
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


def _cprofile(fn, n: int) -> cProfile.Profile:
    """``cProfile`` of ``n`` calls of ``fn`` (synchronized before and after)."""
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    return pr


def _host_profile(label, fn, n, log):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    pr = _cprofile(fn, n)
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


def _host_us(fn, batches: int = 15, per: int = 10) -> float:
    """Median host µs per call of ``fn``: batches of ``per`` calls, synchronized between batches so
    the launch queue never fills (a full queue would make the host wait for the GPU)."""
    fn()
    times = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(per):
            fn()
        times.append((time.perf_counter() - t0) / per * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def _profile_us(fn, n: int, log, top: int = 30) -> None:
    """``cProfile`` of ``n`` calls of ``fn``, per call: µs own time, µs cumulative, calls."""
    fn()
    stats = pstats.Stats(_cprofile(fn, n)).stats
    total = sum(nc for (_, nc, _, _, _) in stats.values()) / n
    log(f"  cProfile: {total:.0f} function calls per call; own us, cumulative us, calls per call:")
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (file, line, func), (_, nc, tt, ct, _) in rows:
        where = f"{Path(file).name}:{line}({func})" if line else func
        log(f"  {tt / n * 1e6:8.1f} {ct / n * 1e6:8.1f} {nc / n:6.1f}  {where[:100]}")


def profile_host_layer(args, log):
    for seq, name, model, forward in _bert_cases(args):
        if name in ("dense", "flash", "flash-fastest"):
            _host_layer_case(seq, name, model, forward, log)


def _host_layer_case(seq, name, model, forward, log) -> None:
    """One ``host-layer`` row group: layer 0 and its sublayers, the whole forward, primitives."""
    import torch.nn.functional as F

    from flashsvd.kernels import add_layer_norm, lowrank_attention
    from flashsvd.kernels.attention import prepare_attention
    from flashsvd.kernels.norm import prepare_add_norm

    layer = model.encoder.layer[0]
    parts = {"layer": layer, "attention": layer.attention, "intermediate": layer.intermediate}
    seen: dict = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, kw, n=n: seen.setdefault(n, (a, kw)), with_kwargs=True)
        for n, m in parts.items()
    ]
    forward(1)
    for h in hooks:  # (a hook on a block turns its in-place path off: removed before timing)
        h.remove()
    with torch.no_grad():
        for part, module in parts.items():
            a, kw = seen[part]
            log(f"host {name} seq={seq} {part}: {_host_us(lambda m=module, a=a, kw=kw: m(*a, **kw)):.1f} us")
    log(f"host {name} seq={seq} whole forward: {_host_us(lambda: forward(1), 7, 3) / 1e3:.2f} ms")
    if name == "flash-fastest":
        _profile_us(lambda: forward(1), 10, log)
    sp = layer.attention.self
    x = seen["layer"][0][0]
    if name == "dense":
        lin = sp.query
        q = torch.randn(64, 12, seq, 64, device="cuda", dtype=x.dtype)
        w, b = layer.output.LayerNorm.weight, layer.output.LayerNorm.bias
        prims = {
            "nn.Linear module": lambda: lin(x),
            "F.linear": lambda: F.linear(x, lin.weight, lin.bias),
            "sdpa": lambda: F.scaled_dot_product_attention(q, q, q),
            "add + F.layer_norm": lambda: F.layer_norm(x + x, (768,), w, b),
            "add_layer_norm (ours)": lambda: add_layer_norm(x, x, w, b),
            "add_layer_norm out=": lambda: add_layer_norm(x, x, w, b, out=x),
        }
    elif name == "flash-fastest":
        qq, kk, vv = sp.query, sp.key, sp.value
        pq, pk, pv = ((x @ t.u).unflatten(-1, (12, t.rank)) for t in (qq, kk, vv))
        heads = [t.bias.view(12, -1) for t in (qq, kk, vv)]
        out = torch.empty(*pq.shape[:3], 64, device="cuda", dtype=x.dtype)
        with torch.no_grad():
            lowrank_attention(pq, pk, pv, qq.v, kk.v, vv.v, *heads, out=out)  # compiled and tuned
            lowrank_attention(pq, pk, pv, qq.v, kk.v, vv.v, *heads, out=out)
            lowrank_attention(pq, pk, pv, qq.v, kk.v, vv.v, *heads, out=out)
        attend = prepare_attention(pq, pk, pv, qq.v, kk.v, vv.v, *heads, out=out)
        x2d = x.view(-1, 768)
        ln = layer.output.LayerNorm
        norm = prepare_add_norm(x2d, x2d, ln.weight, ln.bias, ln.eps, x2d)
        prims = {
            "x @ u": lambda: x @ qq.u,
            "lowrank_attention (ours)": lambda: lowrank_attention(pq, pk, pv, qq.v, kk.v, vv.v, *heads),
        }
        if attend is not None:
            prims["attention, prepared (launch plans)"] = lambda: attend(pq, pk, pv, None, out)
        if norm is not None:
            prims["add_layer_norm, prepared (launch plans)"] = lambda: norm(x2d, x2d, x2d)
    else:
        return
    with torch.no_grad():
        for k, fn in prims.items():
            log(f"host primitive {k}: {_host_us(fn):.1f} us")


def _no_grad(model, **inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


def profile_eager_ab(args, log, rounds: int = 9, calls: int = 10):
    import copy

    import speed as sp  # the sibling script: same models and ranks

    import flashsvd.models as fm
    from flashsvd.models.measure import measure_latency

    dense = sp.bert_base()
    flash = copy.deepcopy(dense)
    flash, _ = fm.compress(flash, ranks=sp.aligned_ranks(flash, args.keep, args.multiple), backend="flash")
    fm.set_backend(flash, "flash", policy="fastest")
    for seq in args.bert_seqs:
        ids = torch.randint(0, dense.config.vocab_size, (64, seq), device="cuda")
        mask = torch.ones_like(ids)
        fns = {
            name: (lambda m=m, ids=ids, mask=mask: _no_grad(m, input_ids=ids, attention_mask=mask))
            for name, m in (("dense", dense), ("flash-fastest", flash))
        }
        times: dict = {name: [] for name in fns}
        hosts: dict = {name: [] for name in fns}
        for fn in fns.values():
            measure_latency(fn, warmup=10, repeats=3)  # compile, tune, build plans
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(measure_latency(fn, warmup=2, repeats=calls).median_ms)
                hosts[name].append(_host_us(fn, batches=3, per=3) / 1e3)
        for what, got in (("latency", times), ("host", hosts)):
            med = {name: statistics.median(t) for name, t in got.items()}
            log(f"eager-ab seq={seq} {what}: " + ", ".join(f"{n} {m:.3f} ms" for n, m in med.items())
                + f"; flash-fastest / dense {med['flash-fastest'] / med['dense']:.3f}; rounds: "
                + "; ".join(f"{n} " + " ".join(f"{t:.2f}" for t in ts) for n, ts in got.items()))  # fmt: skip


def profile_llama_ab(args, log, rounds: int = 5, new_tokens: int = 64):
    """Eager ``generate()`` decode tokens/s (B in ``--batches``, ``--prefill``-token prompt), dense vs
    flash vs flash without its decode and RMSNorm plans (the general path), in alternating rounds.
    A round times ``generate`` with 1 and with ``new_tokens + 1`` new tokens; the rate is
    ``B · new_tokens`` over their difference (prefill and the first token cancel).  Ratios are the
    median of per-round ratios."""
    import contextlib
    import copy

    import speed as sp  # the sibling script: same models and ranks

    import flashsvd.models as fm
    from flashsvd.models import plans

    dense = sp.llama7b(args.llama_layers)
    flash = copy.deepcopy(dense)
    ranks = sp.aligned_ranks(flash, args.keep, args.multiple, kv_rank=64)
    flash, _ = fm.compress(flash, ranks=ranks, backend="flash")

    @contextlib.contextmanager
    def general():
        saved = plans.decode_forward, plans.rms_norm_forward
        plans.decode_forward = plans.rms_norm_forward = lambda *a: None
        try:
            yield
        finally:
            plans.decode_forward, plans.rms_norm_forward = saved

    variants = {"dense": (dense, contextlib.nullcontext), "flash": (flash, contextlib.nullcontext),
                "flash-general": (flash, general)}  # fmt: skip
    for B in args.batches:
        ids = torch.randint(0, dense.config.vocab_size, (B, args.prefill), device="cuda")

        def gen(model, n, ids=ids):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            torch.cuda.synchronize()
            return time.perf_counter() - t0

        for model, ctx in variants.values():  # warm-up: every cache length, compile, tune, plans
            with ctx():
                gen(model, new_tokens + 1)
        rates: dict = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (model, ctx) in variants.items():
                with ctx():
                    t1, tn = gen(model, 1), gen(model, new_tokens + 1)
                rates[name].append(B * new_tokens / (tn - t1))
        med = {name: statistics.median(r) for name, r in rates.items()}
        # the ratio per round (both timed within seconds of each other), then its median: this host's
        # speed drifts by up to 1.5x between rounds
        paired = {n: statistics.median(a / d for a, d in zip(r, rates["dense"])) for n, r in rates.items()}
        log(f"llama-ab B={B} prompt {args.prefill}, {new_tokens} new: "
            + ", ".join(f"{n} {m:.1f} tok/s ({paired[n]:.3f}x dense, paired)" for n, m in med.items())
            + "; rounds: " + "; ".join(f"{n} " + " ".join(f"{r:.0f}" for r in rs) for n, rs in rates.items()))  # fmt: skip
        del ids
    del dense, flash
    torch.cuda.empty_cache()


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
    jobs = {"host": profile_host, "host-bert": profile_host_bert, "host-llama": profile_host_llama,
            "host-layer": profile_host_layer, "eager-ab": profile_eager_ab, "llama-ab": profile_llama_ab,
            "decode": profile_decode,
            "bert": profile_bert, "decode-kernel": profile_decode_kernel}  # fmt: skip
    for name in args.only.split(","):
        jobs[name](args, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
