"""Decode over a rank-space KV cache: equals the last rows of prefill, ragged lengths, GQA, RoPE."""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import (
    RankSpaceKVCache,
    lowrank_attention_decode,
    lowrank_attention_decode_reference,
    lowrank_attention_reference,
    rope_table,
)
from flashsvd.kernels._triton_compat import interpreter_enabled

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or interpreter_enabled()), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def factors(B, L, Hq, Hkv, r, D, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)

    def rn(*s, sc=1.0):
        return torch.randn(*s, generator=g, dtype=torch.float64) * sc

    t = [rn(B, L, Hq, r), rn(B, L, Hkv, r + 1), rn(B, L, Hkv, r - 1)]
    t += [rn(Hq, r, D, sc=r**-0.5), rn(Hkv, r + 1, D, sc=r**-0.5), rn(Hkv, r - 1, D, sc=r**-0.5)]
    t += [rn(Hq, D, sc=0.3), rn(Hkv, D, sc=0.3), rn(Hkv, D, sc=0.3)] if bias else [None] * 3
    return t


@pytest.mark.parametrize("use_rope", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_reference_decode_equals_prefill_last_rows(use_rope, T):
    B, L, Hq, Hkv, r, D = 2, 17, 4, 2, 5, 8
    t = factors(B, L, Hq, Hkv, r, D)
    rope = rope_table(32, D, dtype=torch.float64) if use_rope else None
    full = lowrank_attention_reference(*t, causal=True, rope=rope)
    cache = RankSpaceKVCache(B, 20, Hkv, r + 1, r - 1, dtype=torch.float64)
    cache.append(t[1], t[2])
    out = lowrank_attention_decode(t[0][:, L - T :], cache, *t[3:], rope=rope, backend="torch")
    assert rel(out, full[:, L - T :]) < 1e-12


def test_reference_decode_ragged_lengths_and_left_padding():
    """Per-row lengths (right-ragged cache) and a left-padding mask with shifted RoPE positions."""
    B, L, Hq, Hkv, r, D = 2, 12, 2, 1, 4, 8
    t = factors(B, L, Hq, Hkv, r, D, seed=1)
    rope = rope_table(32, D, dtype=torch.float64)
    lens = torch.tensor([12, 7])
    out = lowrank_attention_decode(
        t[0][:, :1],
        (t[1], t[2]),
        *t[3:],
        lengths=lens,
        rope=rope,
        positions=(lens - 1)[:, None],
        backend="torch",
    )
    for b in range(B):
        n = int(lens[b])
        ref = lowrank_attention_reference(
            t[0][b : b + 1, :1], t[1][b : b + 1, :n], t[2][b : b + 1, :n], *t[3:], causal=True, rope=rope
        )
        assert rel(out[b : b + 1], ref) < 1e-12
    pad = torch.tensor([0, 3])
    mask = torch.arange(L)[None] >= pad[:, None]
    kpos = (torch.arange(L)[None] - pad[:, None]).clamp_min(0)
    out = lowrank_attention_decode(
        t[0][:, -1:], (t[1], t[2]), *t[3:], key_padding_mask=mask, rope=rope, key_positions=kpos,
        positions=kpos[:, -1:], backend="torch",
    )  # fmt: skip
    ref = lowrank_attention_reference(
        t[0][:, -1:], t[1], t[2], *t[3:], key_padding_mask=mask, causal=True, rope=rope, key_positions=kpos,
        positions=kpos[:, -1:],
    )  # fmt: skip
    assert rel(out, ref) < 1e-12


DECODE_CASES = [
    # B, L, T, Hq, Hkv, r, D, rope, lengths
    (2, 45, 1, 4, 2, 6, 24, True, (45, 20)),
    (3, 70, 2, 2, 2, 9, 40, False, (70, 33, 2)),
    (1, 130, 1, 4, 1, 16, 32, True, (130,)),
    # one query row per program (multi-head, one new token): the kernel's vector path
    (2, 45, 1, 2, 2, 6, 24, True, (45, 20)),
    (2, 70, 1, 3, 3, 9, 40, False, (70, 33)),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_triton_decode_matches_float64_prefill(case, dtype):
    B, L, T, Hq, Hkv, r, D, use_rope, lens = case
    t = factors(B, L, Hq, Hkv, r, D, seed=L)
    rope = rope_table(L + 8, D) if use_rope else None
    lens_t = torch.tensor(lens, dtype=torch.int32)
    cache = RankSpaceKVCache(B, L + 5, Hkv, r + 1, r - 1, dtype=dtype, device=DEV)
    cache.append(t[1].to(dtype).to(DEV), t[2].to(dtype).to(DEV))
    cache.lengths.copy_(lens_t)
    rows = torch.arange(B)
    slots = lens_t.long()[:, None] - T + torch.arange(T)
    pq = t[0][rows[:, None], slots]  # the last T tokens of every row
    dev = [x.to(dtype).to(DEV) for x in t[3:]]
    out = torch.full((B, T, Hq, D), float("nan"), dtype=dtype, device=DEV)
    lowrank_attention_decode(
        pq.to(dtype).to(DEV), cache, *dev, rope=tuple(x.to(DEV) for x in rope) if rope else None,
        backend="triton", out=out,
    )  # fmt: skip
    assert not torch.isnan(out).any()
    rope64 = tuple(x.double() for x in rope) if rope else None
    for b in range(B):
        n = lens[b]
        ref = lowrank_attention_reference(
            pq[b : b + 1], t[1][b : b + 1, :n], t[2][b : b + 1, :n], *t[3:], causal=True, rope=rope64
        )
        assert rel(out[b : b + 1].cpu(), ref) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("layout", ["left-padded", "shuffled", "mixed"])
@pytest.mark.parametrize("T, Hq", [(2, 4), (1, 2)], ids=["gqa", "one-row"])
def test_triton_decode_rope_key_positions(layout, T, Hq):
    """Explicit key positions: HF's left padding (``slot - pads``, pads at position 1), positions that
    follow no slot offset, and one row of each (tiles of both kinds): the float64 reference in every case."""
    B, L, r, D, Hkv = 2, 100, 8, 32, 2
    t = factors(B, L, Hq, Hkv, r, D, seed=3)
    pads = torch.tensor([0, 37])
    mask = torch.arange(L)[None] >= pads[:, None]
    kpos = (torch.arange(L)[None] - pads[:, None]).masked_fill(~mask, 1)
    g = torch.Generator().manual_seed(0)
    shuffled = torch.randperm(L, generator=g)[None].repeat(B, 1)
    if layout == "shuffled":
        kpos = shuffled
    elif layout == "mixed":
        kpos[1, 60:] = shuffled[1, 60:]
    qpos = kpos[:, -T:]
    rope = rope_table(L + 8, D)
    dev = [x.float().to(DEV) for x in t]
    out = lowrank_attention_decode(
        dev[0][:, -T:], (dev[1], dev[2]), *dev[3:], key_padding_mask=mask.to(DEV),
        rope=tuple(x.to(DEV) for x in rope), positions=qpos.to(DEV), key_positions=kpos.to(DEV),
        backend="triton",
    )  # fmt: skip
    ref = lowrank_attention_decode_reference(
        t[0][:, -T:], (t[1], t[2]), *t[3:], key_padding_mask=mask, rope=tuple(x.double() for x in rope),
        positions=qpos, key_positions=kpos,
    )  # fmt: skip
    assert torch.isfinite(out).all()
    assert rel(out.cpu(), ref) <= 1e-4


@needs_triton
def test_triton_decode_masked_cache_row_is_zero():
    B, L, Hq, Hkv, r, D = 2, 20, 2, 2, 4, 16
    t = factors(B, L, Hq, Hkv, r, D, seed=9)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1] = False
    dev = [x.float().to(DEV) for x in t]
    out = lowrank_attention_decode(
        dev[0][:, -1:], (dev[1], dev[2]), *dev[3:], key_padding_mask=mask.to(DEV), backend="triton"
    )
    ref = lowrank_attention_decode_reference(t[0][:, -1:], (t[1], t[2]), *t[3:], key_padding_mask=mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    assert rel(out.cpu(), ref) <= 1e-4


def test_decode_bad_inputs():
    t = factors(1, 4, 2, 2, 3, 8)
    with pytest.raises(TypeError, match="cache must be"):
        lowrank_attention_decode(t[0], t[1], *t[3:])
    with pytest.raises(TypeError, match="lengths"):
        lowrank_attention_decode(t[0], (t[1], t[2]), *t[3:], lengths=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="rope"):
        lowrank_attention_decode(t[0], (t[1], t[2]), *t[3:], rope=(torch.ones(4, 6), torch.ones(4, 6)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_every_decode_config_matches_float64(case, dtype, monkeypatch):
    """The autotuner keeps the fastest config, right or wrong, so each split config must be right alone,
    at the query-row tile :data:`attention_decode.MIN_ROWS` (triton 3.6 miscompiled 16-wide tiles of
    other kernels on the H200): ragged lengths, GQA, RoPE, several new tokens; a failure names the config."""
    from flashsvd.kernels import attention_decode

    B, L, T, Hq, Hkv, r, D, use_rope, lens = case
    t = factors(B, L, Hq, Hkv, r, D, seed=L + 1)
    rope = rope_table(L + 8, D) if use_rope else None
    lens_t = torch.tensor(lens, dtype=torch.int32)
    slots = lens_t.long()[:, None] - T + torch.arange(T)
    pq = t[0][torch.arange(B)[:, None], slots]
    dev = [x.to(dtype).to(DEV) for x in (pq, *t[1:])]
    refs = [
        lowrank_attention_reference(
            pq[b : b + 1], t[1][b : b + 1, : lens[b]], t[2][b : b + 1, : lens[b]], *t[3:], causal=True,
            rope=tuple(x.double() for x in rope) if rope else None,
        )
        for b in range(B)
    ]  # fmt: skip
    for cfg in attention_decode._decode_split_kernel.configs:

        def one_config(kernel, key, grid, *args, cfg=cfg, **kwargs):
            kernel.fn[grid(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs())

        monkeypatch.setattr(attention_decode, "launch_tuned", one_config)
        out = torch.full((B, T, Hq, D), float("nan"), dtype=dtype, device=DEV)
        lowrank_attention_decode(
            dev[0], (dev[1], dev[2]), *dev[3:], lengths=lens_t.to(DEV),
            rope=tuple(x.to(dtype).to(DEV) for x in rope) if rope else None, backend="triton", out=out,
        )  # fmt: skip
        for b in range(B):
            assert rel(out[b : b + 1].float().cpu(), refs[b]) <= TOL[dtype], (cfg, attention_decode.MIN_ROWS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_decode_real_size_gpu():
    """LLaMA-7B shape: 32 heads × 128, rank 64, 8K cache, batch 4 with ragged lengths, RoPE, fp16."""
    B, L, H, r, D = 4, 8192, 32, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    rn = lambda *s, sc=1.0: (torch.randn(*s, device="cuda", generator=g) * sc).half()  # noqa: E731
    pk, pv = rn(B, L, H, r), rn(B, L, H, r)
    vq, vk, vv = (rn(H, r, D, sc=r**-0.5) for _ in range(3))
    cache = RankSpaceKVCache(B, L, H, r, device="cuda")
    cache.append(pk, pv)
    lens = torch.tensor([L, L - 5, 4000, 129], device="cuda", dtype=torch.int32)
    cache.lengths.copy_(lens)
    pq = rn(B, 1, H, r)
    rope = rope_table(L, D, dtype=torch.float16, device="cuda")
    out = lowrank_attention_decode(pq, cache, vq, vk, vv, rope=rope)
    for b in range(B):
        n = int(lens[b])
        ref = lowrank_attention_reference(
            pq[b : b + 1].float(), pk[b : b + 1, :n].float(), pv[b : b + 1, :n].float(), vq.float(), vk.float(),
            vv.float(), causal=True, rope=tuple(x.float() for x in rope),
        )  # fmt: skip
        assert rel(out[b : b + 1], ref) <= 1e-2
