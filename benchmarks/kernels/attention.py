"""Benchmark: rank-aware attention vs dense QKV + SDPA vs the vanilla low-rank path (one run, one GPU).

Scenarios (fp16 unless --dtype):
  encoder  BERT-base (d_model 768, 12 heads × 64, rank 40/head), 8192 tokens, seq 128–4096, padding mask
  prefill  LLaMA-7B (d_model 4096, 32 heads × 128, rank 64/head), batch 1, seq 512–8192, causal + RoPE
  decode   LLaMA-7B, one new token, cache 1K–32K, batch 1–64, RoPE

Every path starts from the hidden states ``x`` and ends with the attention output ``[B, L, H·d_head]``
that feeds the output projection (the ``includes`` column of the CSV says exactly what is timed):
  dense_sdpa       x·Wqkv (+b) → (RoPE) → PyTorch SDPA → [B, L, H·D]     (decode: dense KV cache)
  vanilla_lowrank  x·U → P·V per head (+b) rebuilds Q, K, V → (RoPE) → SDPA  (decode: rebuilds K, V
                   of the whole rank-space cache every step)
  flashsvd         x·U → flashsvd.kernels.lowrank_attention / lowrank_attention_decode

Usage (device):  python benchmarks/kernels/attention.py [--full] [--check] --out results.csv
Plot (locally):  python benchmarks/kernels/attention.py --plot results.csv [--png out.png]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
from pathlib import Path

import torch

FIELDS = [
    "device", "torch", "triton", "date", "scenario", "path", "includes", "dtype", "batch", "seq",
    "new_tokens", "heads", "kv_heads", "d_head", "rank", "ms", "ms_graph", "transient_mib", "output_mib",
    "cache_mib", "gflop", "mbytes", "tflops", "roofline_ms", "roofline_frac", "roofline_frac_graph", "vs_dense",
    "vs_vanilla", "vs_dense_graph", "vs_vanilla_graph",
]  # fmt: skip

INCLUDES = {
    ("encoder", "dense_sdpa"): "x@Wqkv+b; SDPA(attn_mask=padding); transpose to [B,L,H*D]",
    ("encoder", "vanilla_lowrank"): "x@U; per-head P@V+b for q,k,v; SDPA(attn_mask=padding); transpose",
    ("encoder", "flashsvd"): "x@U; lowrank_attention(key_padding_mask) -> [B,L,H,D] view",
    ("prefill", "dense_sdpa"): "x@Wqkv; RoPE q,k (torch ops); SDPA(is_causal); transpose",
    ("prefill", "vanilla_lowrank"): "x@U; per-head P@V for q,k,v; RoPE q,k; SDPA(is_causal); transpose",
    ("prefill", "flashsvd"): "x@U; lowrank_attention(causal, rope tables)",
    ("decode", "dense_sdpa"): "x@Wqkv; RoPE; write k,v slot of dense cache [B,H,L,D]; SDPA over L keys",
    ("decode", "vanilla_lowrank"): "x@U; write pk,pv slot; rebuild K,V of all L keys (P@V+RoPE); SDPA",
    ("decode", "flashsvd"): "x@U; write pk,pv slot of RankSpaceKVCache; lowrank_attention_decode(rope)",
}

PEAK_TFLOPS = 800.0  # overwritten by the measured ceiling when --measure-ceilings (default on)
PEAK_TBPS = 3.0


def _env():
    import triton

    return dict(
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.date.today().isoformat(),
    )


def measure_ceilings():
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    ms = do_bench(lambda: a @ b, warmup=50, rep=200, return_mode="median")
    tflops = 2 * 8192**3 / ms / 1e9
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    tbps = 2 * src.nbytes / ms / 1e9
    torch.cuda.empty_cache()
    return tflops, tbps


def bench(fn, n_rot):
    """Median ms (eager) and median ms of CUDA-graph replays, over rotating input sets, + transient MiB.

    Eager timing includes the host-side launch cost (Python + Triton launcher) whenever that exceeds
    the GPU time; graph replay shows the GPU time alone (how a serving stack runs a decode step).
    """
    from triton.testing import do_bench

    state = {"i": 0}

    def step():
        state["i"] += 1
        return fn(state["i"] % n_rot)

    ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    out_bytes = out.numel() * out.element_size()
    transient = (peak - before - out_bytes) / 2**20
    del out
    ms_graph = float("nan")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(n_rot):
                fn(i)
        torch.cuda.current_stream().wait_stream(side)
        graphs = []
        for i in range(n_rot):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                keep = fn(i)
            graphs.append((g, keep))

        def replay():
            state["i"] += 1
            graphs[state["i"] % n_rot][0].replay()

        ms_graph = do_bench(replay, warmup=25, rep=100, return_mode="median")
    except Exception as exc:  # capture problems must not stop the sweep; the CSV shows nan
        torch.cuda.synchronize()
        print(f"graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    torch.cuda.empty_cache()
    return ms, ms_graph, transient, out_bytes / 2**20


def _roof(gflop, mbytes):
    return max(gflop / PEAK_TFLOPS, mbytes / 1e3 / PEAK_TBPS)  # ms


def _rope_torch(x, cos, sin, pos):
    """HF RoPE on [B, L, H, D] at positions pos [L] (torch ops, as a dense model does)."""
    from flashsvd.kernels.rope import apply_rope

    c = cos[pos][None, :, None, :]
    s = sin[pos][None, :, None, :]
    return apply_rope(x, c, s)


def _lowrank_qkv(P, H, r, vq, vk, vv, bq, bk, bv):
    B, L = P.shape[:2]
    pq, pk, pv = P.view(B, L, 3, H, r).unbind(2)
    q = torch.einsum("blhr,hrd->blhd", pq, vq)
    k = torch.einsum("blhr,hrd->blhd", pk, vk)
    v = torch.einsum("blhr,hrd->blhd", pv, vv)
    if bq is not None:
        q, k, v = q + bq, k + bk, v + bv
    return q, k, v


def _sdpa(q, k, v, **kw):
    import torch.nn.functional as F

    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kw)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)


def _factors(H, r, D, d_model, dtype, bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, device="cuda", generator=g) * scale).to(dtype)

    f = dict(
        W=rnd(3 * H * D, d_model, scale=d_model**-0.5),
        bW=rnd(3 * H * D, scale=0.02) if bias else None,
        U=rnd(d_model, 3 * H * r, scale=d_model**-0.5),
        vq=rnd(H, r, D, scale=r**-0.5),
        vk=rnd(H, r, D, scale=r**-0.5),
        vv=rnd(H, r, D, scale=r**-0.5),
    )
    f.update(
        {k: (rnd(H, D, scale=0.02) if bias else None) for k in ("bq", "bk", "bv")},
    )
    return f


# --------------------------------------------------------------------------------------------- encoder
def run_encoder(seqs, dtype, rows, tokens=8192, H=12, D=64, r=40, d_model=768):
    f = _factors(H, r, D, d_model, dtype, bias=True)
    it = torch.finfo(dtype).bits // 8
    for S in seqs:
        _encoder_point(S, f, it, dtype, rows, tokens, H, D, r, d_model)
        torch.cuda.empty_cache()


def _encoder_point(S, f, it, dtype, rows, tokens, H, D, r, d_model):
    import torch.nn.functional as F

    from flashsvd.kernels import lowrank_attention

    B = tokens // S
    n_rot = 4
    xs = [torch.randn(B, S, d_model, device="cuda", dtype=dtype) for _ in range(n_rot)]
    lens = torch.randint(int(0.75 * S), S + 1, (B,), device="cuda")
    lens[0] = S
    mask = torch.arange(S, device="cuda")[None, :] < lens[:, None]
    amask = mask[:, None, None, :]
    T = B * S

    def dense(i):
        qkv = F.linear(xs[i], f["W"], f["bW"]).view(B, S, 3, H, D)
        q, k, v = qkv.unbind(2)
        return _sdpa(q, k, v, attn_mask=amask)

    def vanilla(i):
        P = xs[i] @ f["U"]
        q, k, v = _lowrank_qkv(P, H, r, f["vq"], f["vk"], f["vv"], f["bq"], f["bk"], f["bv"])
        return _sdpa(q, k, v, attn_mask=amask)

    def ours(i):
        P = (xs[i] @ f["U"]).view(B, S, 3, H, r)
        pq, pk, pv = P.unbind(2)
        return lowrank_attention(
            pq, pk, pv, f["vq"], f["vk"], f["vv"], f["bq"], f["bk"], f["bv"], key_padding_mask=mask
        )

    att = 4 * B * H * S * S  # per unit of head dim (QK^T + PV), MACs*2
    cost = {
        "dense_sdpa": (
            2 * T * d_model * 3 * H * D + att * D,
            it * (T * d_model + 3 * H * D * d_model + 2 * 3 * T * H * D + T * H * D),
        ),
        "vanilla_lowrank": (
            2 * T * d_model * 3 * H * r + 2 * T * 3 * H * r * D + att * D,
            it * (T * d_model + 3 * H * r * d_model + 2 * 3 * T * H * r + 2 * 3 * T * H * D + T * H * D),
        ),
        "flashsvd": (
            2 * T * d_model * 3 * H * r + att * r + 2 * T * H * (r * D + D * r + r * D),
            it * (T * d_model + 3 * H * r * d_model + 2 * 3 * T * H * r + T * H * D),
        ),
    }
    _emit(rows, "encoder", dtype, B, S, 0, H, H, D, r, {"dense_sdpa": dense, "vanilla_lowrank": vanilla,
          "flashsvd": ours}, cost, n_rot, cache_mib=0.0)  # fmt: skip


# --------------------------------------------------------------------------------------------- prefill
def run_prefill(seqs, dtype, rows, H=32, D=128, r=64, d_model=4096):
    from flashsvd.kernels import rope_table

    f = _factors(H, r, D, d_model, dtype, bias=False)
    it = torch.finfo(dtype).bits // 8
    cos, sin = rope_table(max(seqs), D, dtype=dtype, device="cuda")
    for S in seqs:
        _prefill_point(S, f, it, dtype, rows, cos, sin, H, D, r, d_model)
        torch.cuda.empty_cache()


def _prefill_point(S, f, it, dtype, rows, cos, sin, H, D, r, d_model):
    import torch.nn.functional as F

    from flashsvd.kernels import lowrank_attention

    B = 1
    n_rot = 2
    xs = [torch.randn(B, S, d_model, device="cuda", dtype=dtype) for _ in range(n_rot)]
    pos = torch.arange(S, device="cuda")
    T = B * S

    def dense(i):
        q, k, v = F.linear(xs[i], f["W"]).view(B, S, 3, H, D).unbind(2)
        q, k = _rope_torch(q, cos, sin, pos), _rope_torch(k, cos, sin, pos)
        return _sdpa(q, k, v, is_causal=True)

    def vanilla(i):
        q, k, v = _lowrank_qkv(xs[i] @ f["U"], H, r, f["vq"], f["vk"], f["vv"], None, None, None)
        q, k = _rope_torch(q, cos, sin, pos), _rope_torch(k, cos, sin, pos)
        return _sdpa(q, k, v, is_causal=True)

    def ours(i):
        pq, pk, pv = (xs[i] @ f["U"]).view(B, S, 3, H, r).unbind(2)
        return lowrank_attention(pq, pk, pv, f["vq"], f["vk"], f["vv"], causal=True, rope=(cos, sin))

    att = 4 * B * H * S * S // 2
    cost = {
        "dense_sdpa": (2 * T * d_model * 3 * H * D + att * D,
                       it * (T * d_model + 3 * H * D * d_model + 2 * 3 * T * H * D + T * H * D)),
        "vanilla_lowrank": (2 * T * d_model * 3 * H * r + 2 * T * 3 * H * r * D + att * D,
                            it * (T * d_model + 3 * H * r * d_model + 2 * 3 * T * H * r
                                  + 2 * 3 * T * H * D + T * H * D)),
        "flashsvd": (2 * T * d_model * 3 * H * r + att * D + 2 * T * H * 3 * r * D,
                     it * (T * d_model + 3 * H * r * d_model + 2 * 3 * T * H * r + T * H * D)),
    }  # fmt: skip
    _emit(rows, "prefill", dtype, B, S, 0, H, H, D, r, {"dense_sdpa": dense, "vanilla_lowrank": vanilla,
          "flashsvd": ours}, cost, n_rot, cache_mib=0.0)  # fmt: skip


# --------------------------------------------------------------------------------------------- decode
def run_decode(points, dtype, rows, H=32, D=128, r=64, d_model=4096, vanilla_max_tokens=128 * 1024):
    from flashsvd.kernels import rope_table

    f = _factors(H, r, D, d_model, dtype, bias=False)
    it = torch.finfo(dtype).bits // 8
    cos, sin = rope_table(max(L for _, L in points), D, dtype=dtype, device="cuda")
    for B, L in points:
        _decode_dense_point(B, L, f, it, dtype, rows, cos, sin, H, D, r, d_model)
        torch.cuda.empty_cache()
        _decode_lowrank_point(B, L, f, it, dtype, rows, cos, sin, H, D, r, d_model, vanilla_max_tokens)
        torch.cuda.empty_cache()


def _decode_dense_point(B, L, f, it, dtype, rows, cos, sin, H, D, r, d_model):
    import torch.nn.functional as F

    n_rot = 2
    xs = [torch.randn(B, 1, d_model, device="cuda", dtype=dtype) for _ in range(n_rot)]
    pos = torch.tensor([L - 1], device="cuda")
    paths = {}
    # dense cache [B, H, L, D] (HF layout), filled with random values
    Kc = torch.randn(B, H, L, D, device="cuda", dtype=dtype)
    Vc = torch.randn(B, H, L, D, device="cuda", dtype=dtype)

    def dense(i):
        q, k, v = F.linear(xs[i], f["W"]).view(B, 1, 3, H, D).unbind(2)
        q, k = _rope_torch(q, cos, sin, pos), _rope_torch(k, cos, sin, pos)
        Kc[:, :, L - 1 : L].copy_(k.transpose(1, 2))
        Vc[:, :, L - 1 : L].copy_(v.transpose(1, 2))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), Kc, Vc)
        return o.transpose(1, 2).reshape(B, 1, H * D)

    paths["dense_sdpa"] = dense
    dense_cache_mib = (Kc.nbytes + Vc.nbytes) / 2**20
    cost = {"dense_sdpa": (2 * B * d_model * 3 * H * D + 4 * B * H * L * D,
                           it * (3 * H * D * d_model + 2 * B * H * L * D))}  # fmt: skip
    _emit(rows, "decode", dtype, B, L, 1, H, H, D, r, paths, cost, n_rot, cache_mib=dense_cache_mib)


def _decode_lowrank_point(B, L, f, it, dtype, rows, cos, sin, H, D, r, d_model, vanilla_max_tokens):
    from flashsvd.kernels import RankSpaceKVCache, lowrank_attention_decode

    n_rot = 2
    xs = [torch.randn(B, 1, d_model, device="cuda", dtype=dtype) for _ in range(n_rot)]
    pos = torch.tensor([L - 1], device="cuda")

    cache = RankSpaceKVCache(B, L, H, r, dtype=dtype, device="cuda")
    cache.append(torch.randn(B, L, H, r, device="cuda", dtype=dtype),
                 torch.randn(B, L, H, r, device="cuda", dtype=dtype))  # fmt: skip
    paths = {}
    if vanilla_max_tokens >= B * L:

        def vanilla(i):
            pq, pk, pv = (xs[i] @ f["U"]).view(B, 1, 3, H, r).unbind(2)
            cache.pk[:, L - 1 : L].copy_(pk)
            cache.pv[:, L - 1 : L].copy_(pv)
            q = torch.einsum("blhr,hrd->blhd", pq, f["vq"])
            k = torch.einsum("blhr,hrd->blhd", cache.pk, f["vk"])
            v = torch.einsum("blhr,hrd->blhd", cache.pv, f["vv"])
            q = _rope_torch(q, cos, sin, pos)
            k = _rope_torch(k, cos, sin, torch.arange(L, device="cuda"))
            return _sdpa(q, k, v)

        paths["vanilla_lowrank"] = vanilla

    def ours(i):
        pq, pk, pv = (xs[i] @ f["U"]).view(B, 1, 3, H, r).unbind(2)
        cache.pk[:, L - 1 : L].copy_(pk)
        cache.pv[:, L - 1 : L].copy_(pv)
        o = lowrank_attention_decode(pq, cache, f["vq"], f["vk"], f["vv"], rope=(cos, sin))
        return o.view(B, 1, H * D)

    paths["flashsvd"] = ours
    cost = {
        "vanilla_lowrank": (2 * B * d_model * 3 * H * r + 2 * B * L * H * 2 * r * D + 4 * B * H * L * D,
                            it * (3 * H * r * d_model + 2 * B * H * L * r + 4 * B * H * L * D)),
        "flashsvd": (2 * B * d_model * 3 * H * r + 2 * B * L * H * r * D + 2 * B * H * L * (D + r),
                     it * (3 * H * r * d_model + 2 * B * H * L * r)),
    }  # fmt: skip
    _emit(rows, "decode", dtype, B, L, 1, H, H, D, r, paths, cost, n_rot, cache_mib=cache.nbytes / 2**20)


def _emit(rows, scenario, dtype, B, S, new, H, Hkv, D, r, paths, cost, n_rot, cache_mib):
    env = _env()
    for name, fn in paths.items():
        try:
            ms, ms_graph, tr, out_mib = bench(fn, n_rot)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"OOM {scenario} {name} B={B} S={S}", file=sys.stderr)
            continue
        gflop, mbytes = cost[name][0] / 1e9, cost[name][1] / 1e6
        roof = _roof(gflop, mbytes)
        rows.append(dict(env, scenario=scenario, path=name, includes=INCLUDES[(scenario, name)],
                         dtype=str(dtype).replace("torch.", ""), batch=B, seq=S, new_tokens=new, heads=H,
                         kv_heads=Hkv, d_head=D, rank=r, ms=round(ms, 5), ms_graph=round(ms_graph, 5),
                         transient_mib=round(tr, 2),
                         output_mib=round(out_mib, 2), cache_mib=round(cache_mib, 2), gflop=round(gflop, 3),
                         mbytes=round(mbytes, 2), tflops=round(gflop / ms, 2), roofline_ms=round(roof, 5),
                         roofline_frac=round(roof / ms, 3), roofline_frac_graph=round(roof / ms_graph, 3)))  # fmt: skip
        print(f"{scenario:8s} {name:16s} B={B:3d} S={S:6d} {ms:8.4f} ms  graph {ms_graph:8.4f} ms  transient {tr:8.1f} MiB  "
              f"out {out_mib:6.1f} MiB  roof {roof:.4f} ms ({roof / ms:.2f})", flush=True)  # fmt: skip
    # ratios within this (scenario, B, S) group
    group = [x for x in rows if x["scenario"] == scenario and x["batch"] == B and x["seq"] == S]
    for col in ("ms", "ms_graph"):
        by = {x["path"]: x[col] for x in group}
        sfx = "" if col == "ms" else "_graph"
        for x in group:
            x["vs_dense" + sfx] = round(x[col] / by["dense_sdpa"], 3) if "dense_sdpa" in by else ""
            x["vs_vanilla" + sfx] = (
                round(x[col] / by["vanilla_lowrank"], 3) if "vanilla_lowrank" in by else ""
            )


# --------------------------------------------------------------------------------------------- checks
def run_checks(dtype=torch.float16):
    """Correctness at real sizes vs the fp32 PyTorch reference (rel. error ≤ 1e-2), incl. decode == prefill."""
    from flashsvd.kernels import (
        RankSpaceKVCache,
        lowrank_attention,
        lowrank_attention_decode,
        lowrank_attention_reference,
        rope_table,
    )

    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    torch.manual_seed(0)
    ok = True

    def mk(B, M, N, Hq, Hkv, r, D, bias):
        g = lambda *s, sc=1.0: (torch.randn(*s, device="cuda") * sc).to(dtype)  # noqa: E731
        t = [g(B, M, Hq, r), g(B, N, Hkv, r), g(B, N, Hkv, r), g(Hq, r, D, sc=r**-0.5),
             g(Hkv, r, D, sc=r**-0.5), g(Hkv, r, D, sc=r**-0.5)]  # fmt: skip
        t += [g(Hq, D, sc=0.1), g(Hkv, D, sc=0.1), g(Hkv, D, sc=0.1)] if bias else [None] * 3
        return t

    cases = [
        ("bert S=2048 pad", (4, 2048, 2048, 12, 12, 40, 64, True), dict(mask=True)),
        ("bert S=77 left-pad", (8, 77, 77, 12, 12, 40, 64, True), dict(mask="left")),
        ("llama S=1000 causal rope", (1, 1000, 1000, 32, 32, 64, 128, False), dict(causal=True, rope=True)),
        (
            "gqa D=80 causal+pad rope",
            (2, 300, 300, 8, 2, 24, 80, True),
            dict(causal=True, rope=True, mask=True),
        ),
    ]
    cos, sin = rope_table(8192, 128, dtype=dtype, device="cuda")
    for name, (B, M, N, Hq, Hkv, r, D, bias), kw in cases:
        t = mk(B, M, N, Hq, Hkv, r, D, bias)
        mask = None
        if kw.get("mask"):
            lens = torch.randint(N // 2, N + 1, (B,), device="cuda")
            ar = torch.arange(N, device="cuda")[None, :]
            mask = ar < lens[:, None] if kw["mask"] is True else ar >= (N - lens[:, None])
        rope = rope_table(4096, D, dtype=dtype, device="cuda") if kw.get("rope") else None
        a = dict(key_padding_mask=mask, causal=kw.get("causal", False), rope=rope)
        out = torch.full((B, M, Hq, D), float("nan"), device="cuda", dtype=dtype)
        lowrank_attention(*t, backend="triton", out=out, **a)
        ref = lowrank_attention_reference(*[x.float() if x is not None else None for x in t],
                                          **dict(a, rope=tuple(x.float() for x in rope) if rope else None))  # fmt: skip
        e = rel(out, ref)
        good = e <= 1e-2 and not torch.isnan(out).any().item()
        ok &= good
        print(f"check {name:28s} rel {e:.2e} {'OK' if good else 'FAIL'}", flush=True)
    # decode == last rows of prefill, LLaMA shape, cache 8K, batch 4, ragged lengths
    B, L, H, r, D = 4, 8192, 32, 64, 128
    t = mk(B, L, L, H, H, r, D, False)
    lens = torch.tensor([L, L - 5, 4000, 129], device="cuda", dtype=torch.int32)
    cache = RankSpaceKVCache(B, L, H, r, dtype=dtype, device="cuda")
    cache.append(t[1], t[2])
    cache.lengths.copy_(lens)
    rows_b = torch.arange(B, device="cuda")
    pqd = t[0][rows_b, lens.long() - 1][:, None].contiguous()  # each row's last token
    for rp in (None, (cos, sin)):
        outd = lowrank_attention_decode(pqd, cache, *t[3:], rope=rp, backend="triton")
        worst = 0.0
        for b in range(B):
            n = int(lens[b])
            ref = lowrank_attention_reference(pqd[b : b + 1].float(), t[1][b : b + 1, :n].float(),
                                              t[2][b : b + 1, :n].float(), *[x.float() for x in t[3:6]],
                                              causal=True, rope=tuple(x.float() for x in rp) if rp else None)  # fmt: skip
            worst = max(worst, rel(outd[b : b + 1], ref))
        good = worst <= 1e-2 and not torch.isnan(outd).any().item()
        ok &= good
        print(
            f"check decode==prefill rope={rp is not None} ragged 8K rel {worst:.2e} {'OK' if good else 'FAIL'}"
        )
    return ok


def main(argv=None):
    global PEAK_TFLOPS, PEAK_TBPS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="full sweep (default: headline points)")
    ap.add_argument("--check", action="store_true", help="correctness checks at real sizes first")
    ap.add_argument("--check-only", action="store_true", help="only the correctness checks")
    ap.add_argument("--only", default="encoder,prefill,decode")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default="attention.csv")
    ap.add_argument("--plot", metavar="CSV", help="make a PNG from a results CSV (no GPU needed)")
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    if args.plot:
        plot(args.plot, args.png or str(Path(args.plot).with_suffix(".png")))
        return 0
    dtype = getattr(torch, args.dtype)
    ok = run_checks(dtype) if (args.check or args.check_only) else True
    if args.check_only:
        print("checks:", "OK" if ok else "FAILED")
        return 0 if ok else 1
    PEAK_TFLOPS, PEAK_TBPS = measure_ceilings()
    print(f"ceilings: {PEAK_TFLOPS:.0f} TFLOP/s fp16 matmul, {PEAK_TBPS:.2f} TB/s copy", flush=True)
    only = set(args.only.split(","))
    rows: list[dict] = []
    if "encoder" in only:
        run_encoder([128, 256, 512, 1024, 2048, 4096] if args.full else [128, 2048], dtype, rows)
    if "prefill" in only:
        run_prefill([512, 1024, 2048, 4096, 8192] if args.full else [2048, 8192], dtype, rows)
    if "decode" in only:
        if args.full:
            pts = [(B, L) for B in (1, 16, 64) for L in (1024, 8192, 32768) if B * L <= 512 * 1024]
        else:
            pts = [(1, 8192), (16, 8192), (64, 2048)]
        run_decode(pts, dtype, rows)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        for x in rows:
            w.writerow({k: x.get(k, "") for k in FIELDS})
    print(f"\n{'scenario':8s} {'path':9s} {'B':>3s} {'seq':>6s} {'eager':>7s} {'graph':>7s} {'MiB':>7s} "
          f"{'/dense':>6s} {'/van':>6s} {'/denseG':>7s} {'/vanG':>6s} roofG")  # fmt: skip
    for x in rows:
        print(f"{x['scenario']:8s} {x['path'][:9]:9s} {x['batch']:3d} {x['seq']:6d} {x['ms']:7.4f} "
              f"{x['ms_graph']:7.4f} {x['transient_mib']:7.1f} {x.get('vs_dense', ''):>6} "
              f"{x.get('vs_vanilla', ''):>6} {x.get('vs_dense_graph', ''):>7} {x.get('vs_vanilla_graph', ''):>6} "
              f"{x['roofline_frac_graph']}")  # fmt: skip
    print("checks:", "OK" if ok else "FAILED")
    return 0 if ok else 1


def plot(csv_path, png_path):
    """One panel per scenario: GPU time (CUDA-graph replay; eager as thin dotted lines) vs length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    scen = ["encoder", "prefill", "decode"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, sc in zip(axes, scen):
        sel = [x for x in rows if x["scenario"] == sc]
        keys = sorted({(x["path"], int(x["batch"])) for x in sel}) if sc == "decode" else sorted(
            {(x["path"], None) for x in sel})  # fmt: skip
        colors = {}
        for path, B in keys:
            sub = [x for x in sel if x["path"] == path and (B is None or int(x["batch"]) == B)]
            pts = sorted((int(x["seq"]), float(x.get("ms_graph") or x["ms"])) for x in sub)
            eager = sorted((int(x["seq"]), float(x["ms"])) for x in sub)
            if not pts:
                continue
            style = {"dense_sdpa": "-o", "vanilla_lowrank": "--s", "flashsvd": "-^"}[path]
            (line,) = ax.plot(*zip(*pts), style, label=path + (f" B={B}" if B else ""))
            colors[(path, B)] = line.get_color()
            ax.plot(*zip(*eager), ":", color=line.get_color(), linewidth=0.8, alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cache length" if sc == "decode" else "sequence length")
        ax.set_ylabel("ms per call (median; solid = graph replay, dotted = eager)", fontsize=8)
        title = {"encoder": "BERT-base encoder, 8192 tokens, r=40/head", "prefill": "LLaMA-7B prefill, causal+RoPE, r=64",
                 "decode": "LLaMA-7B decode step, RoPE, r=64"}[sc]  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    r0 = rows[0] if rows else {}
    fig.suptitle(f"FlashSVD attention — {r0.get('device', '?')}, {r0.get('dtype', '')}, torch {r0.get('torch', '')}, "
                 f"triton {r0.get('triton', '')}, measured {r0.get('date', '')}", fontsize=11)  # fmt: skip
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


if __name__ == "__main__":
    sys.exit(main())
