"""Tests of the fused low-rank FFN kernels (flashsvd.kernels.ffn) against a float64 oracle.

The Triton tests run compiled on CUDA or through Triton's CPU interpreter (``TRITON_INTERPRET=1``,
the ``kernels_interpret`` nox session); with neither available they skip.  Shapes are ragged (no
multiple of a tile), small enough that the interpreter run stays fast; real sizes are ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import (
    FFNFactors,
    GatedFFNFactors,
    _ffn_kernel,
    ffn,
    lowrank_ffn,
    lowrank_ffn_reference,
    lowrank_gated_ffn,
    lowrank_gated_ffn_reference,
)
from flashsvd.kernels._triton_compat import interpreter_enabled

HAS_CUDA = torch.cuda.is_available()
TRITON_OK = HAS_CUDA or interpreter_enabled()
DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# The bf16 reference rounds four intermediates (P, pre-activation, h, Q) to 8-bit mantissas; on a
# single token (few outputs) that alone reaches ~1e-2, so the reference path gets twice the budget.
# The Triton path keeps the pre-activation in fp32 and meets TOL.
REF_TOL = {**TOL, torch.bfloat16: 2e-2}


def _rand(gen, *shape, dtype, device=DEVICE, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float64) * (scale / shape[0] ** 0.5)
    return t.to(device=device, dtype=dtype)


def make_ffn(d_model, d_ff, r1, r2, dtype, bias=True, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return _rand(g, *s, dtype=dtype, device=device, scale=scale)

    return FFNFactors(
        r(d_model, r1),
        r(r1, d_ff),
        r(d_ff, scale=3.0) if bias else None,
        r(d_ff, r2),
        r(r2, d_model),
        r(d_model, scale=3.0) if bias else None,
    )


def make_gated(d_model, d_ff, rg, ru, rd, dtype, bias=False, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return _rand(g, *s, dtype=dtype, device=device, scale=scale)

    def b(n):
        return r(n, scale=3.0) if bias else None

    return GatedFFNFactors(
        r(d_model, rg), r(rg, d_ff), b(d_ff), r(d_model, ru), r(ru, d_ff), b(d_ff),
        r(d_ff, rd), r(rd, d_model), b(d_model),
    )  # fmt: skip


def _f64(factors):
    return type(factors)(*[None if t is None else t.detach().cpu().double() for t in vars(factors).values()])


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or overflowed elements)"
    out = out.detach().cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.fixture
def poison(monkeypatch):
    """Every buffer the launcher allocates starts as NaN: any element the kernel skips shows up."""

    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(_ffn_kernel, "_alloc", alloc)


def _x(tokens, d_model, dtype, seed=1, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, d_model) if lead else (tokens, d_model)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# reference path: broad coverage (cheap)


@pytest.mark.parametrize("activation", ffn.FFN_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48, 100, 5, 24), (37, 64, 192, 33, 5), (130, 48, 100, 24, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_float64(activation, dtype, shape, bias):
    tokens, d_model, d_ff, r1, r2 = shape
    f = make_ffn(d_model, d_ff, r1, r2, dtype, bias, device="cpu")
    x = _x(tokens, d_model, dtype).cpu()
    ref = lowrank_ffn_reference(x.double(), _f64(f), activation)
    assert rel_err(lowrank_ffn(x, f, activation, backend="torch"), ref) <= REF_TOL[dtype]


@pytest.mark.parametrize("activation", list(ffn.GATED_ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gated_reference_matches_float64(activation, dtype, bias):
    f = make_gated(48, 100, 5, 24, 33, dtype, bias, device="cpu")
    x = _x(37, 48, dtype).cpu()
    ref = lowrank_gated_ffn_reference(x.double(), _f64(f), activation)
    assert rel_err(lowrank_gated_ffn(x, f, activation, backend="torch"), ref) <= REF_TOL[dtype]


def test_gated_reference_formula():
    f = make_gated(16, 24, 3, 4, 5, torch.float64, bias=True, device="cpu")
    x = _x(7, 16, torch.float64).cpu()
    gate = torch.nn.functional.silu(x @ f.u_gate @ f.v_gate + f.b_gate)
    up = x @ f.u_up @ f.v_up + f.b_up
    expected = (gate * up) @ f.u_down @ f.v_down + f.b_down
    torch.testing.assert_close(lowrank_gated_ffn_reference(x, f, "swiglu"), expected)


# ---------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU): every activation and dtype, ragged shapes, poisoned outputs

TRITON_SHAPES = [(1, 48, 100, 5, 24), (37, 64, 192, 33, 5), (130, 48, 100, 24, 33)]


@needs_triton
@pytest.mark.parametrize("activation", ffn.FFN_ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_ffn_activations(activation, dtype, poison):
    tokens, d_model, d_ff, r1, r2 = TRITON_SHAPES[1]
    f = make_ffn(d_model, d_ff, r1, r2, dtype, bias=True)
    x = _x(tokens, d_model, dtype)
    ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), activation)
    assert rel_err(lowrank_ffn(x, f, activation, backend="triton"), ref) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_ffn_shapes_and_biases(shape, bias, dtype, poison):
    tokens, d_model, d_ff, r1, r2 = shape
    f = make_ffn(d_model, d_ff, r1, r2, dtype, bias=bias, seed=tokens)
    x = _x(tokens, d_model, dtype, seed=tokens + 1)
    ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), "gelu")
    assert rel_err(lowrank_ffn(x, f, "gelu", backend="triton"), ref) <= TOL[dtype]


@needs_triton
def test_triton_ffn_leading_dims(poison):
    f = make_ffn(48, 100, 24, 33, torch.float16)
    x = _x(0, 48, torch.float16, lead=(2, 3, 5))
    out = lowrank_ffn(x, f, "gelu_tanh", backend="triton")
    assert out.shape == (2, 3, 5, 48)
    ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), "gelu_tanh")
    assert rel_err(out, ref) <= 1e-2


@needs_triton
@pytest.mark.parametrize("activation", list(ffn.GATED_ACTIVATIONS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_gated(activation, dtype, poison):
    f = make_gated(48, 100, 5, 33, 24, dtype, bias=dtype == torch.float32)
    x = _x(37, 48, dtype)
    ref = lowrank_gated_ffn_reference(x.cpu().double(), _f64(f), activation)
    assert rel_err(lowrank_gated_ffn(x, f, activation, backend="triton"), ref) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("mode", ["split_r2", "store_h"])
@pytest.mark.parametrize("gated", [False, True])
def test_triton_wide_rank_modes(mode, gated, monkeypatch, poison):
    """Force the two wide-r2 modes on small shapes by shrinking the register-accumulator limit."""
    monkeypatch.setattr(_ffn_kernel, "MAX_R2_CHUNK", 16)
    monkeypatch.setattr(_ffn_kernel, "STORE_H_COST_FLOPS", 1e9 if mode == "split_r2" else 0.0)
    monkeypatch.setattr(_ffn_kernel, "H_CHUNK_BYTES", 64 * 100 * 4)  # several token chunks
    monkeypatch.setattr(_ffn_kernel, "H_CHUNK_MIN_TOKENS", 1)
    expected = _ffn_kernel.MODE_SPLIT_R2 if mode == "split_r2" else _ffn_kernel.MODE_STORE_H
    assert _ffn_kernel.plan_ffn((24,), 37).mode == expected
    dtype = torch.float32
    x = _x(130, 48, dtype, lead=(2, 65))
    if gated:
        f = make_gated(48, 100, 24, 5, 37, dtype, bias=True)
        out = lowrank_gated_ffn(x, f, "geglu", backend="triton")
        ref = lowrank_gated_ffn_reference(x.cpu().double(), _f64(f), "geglu")
    else:
        f = make_ffn(48, 100, 24, 37, dtype)
        out = lowrank_ffn(x, f, "silu", backend="triton")
        ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), "silu")
    assert rel_err(out, ref) <= TOL[dtype]


@needs_triton
def test_triton_large_rank_loops_over_rank_blocks(poison):
    """r1 > 256 takes the in-kernel loop over rank blocks instead of one hoisted block."""
    f = make_ffn(32, 48, 300, 20, torch.float32, bias=False)
    assert _ffn_kernel.plan_ffn((300,), 20, 4).block_ka == _ffn_kernel.RANK_BLOCK_LOOP
    x = _x(9, 32, torch.float32)
    ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), "relu")
    assert rel_err(lowrank_ffn(x, f, "relu", backend="triton"), ref) <= 1e-4


@needs_triton
@pytest.mark.parametrize("gated", [False, True])
def test_triton_gradients_match_reference(gated):
    dtype = torch.float32
    if gated:
        f = make_gated(16, 40, 5, 6, 7, dtype, bias=True)
        fn, ref_fn, act = lowrank_gated_ffn, lowrank_gated_ffn_reference, "swiglu"
    else:
        f = make_ffn(16, 40, 5, 7, dtype, bias=True)
        fn, ref_fn, act = lowrank_ffn, lowrank_ffn_reference, "gelu"
    x = _x(0, 16, dtype, lead=(3, 5))
    leaves = [x, *[t for t in vars(f).values() if t is not None]]
    for t in leaves:
        t.requires_grad_(True)
    grad_out = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad(fn(x, f, act, backend="triton"), leaves, grad_out)
    ref_grads = torch.autograd.grad(ref_fn(x, f, act), leaves, grad_out)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


@needs_triton
def test_triton_zero_tokens():
    f = make_ffn(48, 100, 5, 24, torch.float16)
    out = lowrank_ffn(torch.empty(0, 48, dtype=torch.float16, device=DEVICE), f, backend="triton")
    assert out.shape == (0, 48)


# ---------------------------------------------------------------------------------------------
# validation and dispatch


def test_bad_shapes_raise_clear_errors():
    f = make_ffn(48, 100, 5, 24, torch.float32, device="cpu")
    x = torch.randn(3, 48)
    with pytest.raises(ValueError, match=r"u1 must have shape \[40, r\]"):
        lowrank_ffn(torch.randn(3, 40), f)
    bad = FFNFactors(f.u1, f.v1[:4], f.b1, f.u2, f.v2, f.b2)
    with pytest.raises(ValueError, match="v1 must have shape"):
        lowrank_ffn(x, bad)
    bad = FFNFactors(f.u1, f.v1, f.b1[:7], f.u2, f.v2, f.b2)
    with pytest.raises(ValueError, match=r"b1 must have shape \[100\]"):
        lowrank_ffn(x, bad)
    bad = FFNFactors(f.u1, f.v1, f.b1, f.u2[:50], f.v2, f.b2)
    with pytest.raises(ValueError, match=r"u2 must have shape \[100, r\]"):
        lowrank_ffn(x, bad)
    with pytest.raises(TypeError, match="dtype"):
        lowrank_ffn(x.half(), f)
    with pytest.raises(ValueError, match="unknown activation"):
        lowrank_ffn(x, f, "tanh")
    with pytest.raises(ValueError, match="unknown backend"):
        lowrank_ffn(x, f, backend="cuda")
    with pytest.raises(TypeError, match="FFNFactors"):
        lowrank_ffn(x, (f.u1, f.v1))
    g = make_gated(48, 100, 5, 6, 7, torch.float32, device="cpu")
    bad = GatedFFNFactors(g.u_gate, g.v_gate, None, g.u_up, g.v_up[:, :90], None, g.u_down, g.v_down, None)
    with pytest.raises(ValueError, match="v_up must have 100 columns"):
        lowrank_gated_ffn(x, bad)
    with pytest.raises(ValueError, match="unknown gated activation"):
        lowrank_gated_ffn(x, g, "gelu")


def test_auto_dispatch_uses_reference_on_cpu(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not run for CPU tensors with backend='auto'")

    monkeypatch.setattr(ffn, "_triton_forward", boom)
    f = make_ffn(48, 100, 5, 24, torch.float32, device="cpu")
    x = torch.randn(4, 48)
    torch.testing.assert_close(lowrank_ffn(x, f), lowrank_ffn_reference(x, f))
    g = make_gated(48, 100, 5, 6, 7, torch.float32, device="cpu")
    torch.testing.assert_close(lowrank_gated_ffn(x, g), lowrank_gated_ffn_reference(x, g))


@pytest.mark.skipif(interpreter_enabled(), reason="the interpreter allows backend='triton' on CPU")
def test_triton_backend_on_cpu_without_interpreter_is_an_error():
    f = make_ffn(48, 100, 5, 24, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lowrank_ffn(torch.randn(4, 48), f, backend="triton")


def test_plan_modes():
    plan = _ffn_kernel.plan_ffn
    assert plan((240,), 240).mode == _ffn_kernel.MODE_FUSED
    assert plan((240,), 240).r2_chunk == 256
    assert plan((200,), 300).mode == _ffn_kernel.MODE_SPLIT_R2
    assert plan((768,), 768).mode == _ffn_kernel.MODE_STORE_H
    assert plan((1492, 1492), 1492).mode == _ffn_kernel.MODE_STORE_H
    assert plan((240,), 240, 4).mode == _ffn_kernel.MODE_SPLIT_R2  # fp32 tiles are twice as large
    assert plan((200, 180), 240).block_ka == 64  # gated: two P blocks share the shared memory


# ---------------------------------------------------------------------------------------------
# real sizes on a GPU


# Each (dtype, activation, mode) is a fresh compile + autotune, so the GPU matrix samples it.
GPU_BERT_CASES = [
    *[(dtype, "gelu", (240, 240)) for dtype in DTYPES],
    (torch.float16, "gelu_tanh", (37, 201)),
    (torch.bfloat16, "gelu", (300, 400)),  # split-r2 mode
    (torch.float16, "silu", (768, 768)),  # store-h mode
]


@gpu
@needs_cuda
@pytest.mark.parametrize(("dtype", "activation", "ranks"), GPU_BERT_CASES)
def test_gpu_bert_sizes(dtype, activation, ranks, poison):
    f = make_ffn(768, 3072, *ranks, dtype, seed=sum(ranks))
    x = _x(0, 768, dtype, lead=(3, 1111))
    ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), activation)
    assert rel_err(lowrank_ffn(x, f, activation), ref) <= TOL[dtype]


@gpu
@needs_cuda
@pytest.mark.parametrize(
    ("dtype", "activation", "ranks"),
    [(torch.float16, "swiglu", (1492, 1492, 1492)), (torch.bfloat16, "geglu", (200, 180, 240))],
)
def test_gpu_llama_sizes(dtype, activation, ranks, poison):
    f = make_gated(4096, 11008, *ranks, dtype, seed=1)
    x = _x(1000, 4096, dtype)
    ref = lowrank_gated_ffn_reference(x.cpu().double(), _f64(f), activation)
    assert rel_err(lowrank_gated_ffn(x, f, activation), ref) <= TOL[dtype]


class _NotACandidate(Exception):
    """Raised by the one-config launcher when the mode's pruning would never pick that config."""


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("mode", ["fused", "split_r2", "store_h"])
def test_every_ffn_config_matches_float64(mode, gated, dtype, monkeypatch):
    """The autotuner keeps the fastest config, right or wrong, so each candidate must be right alone.

    On triton 3.6 / H200, 4-warp 64×64 and 128-row tiles gave relative errors of 0.5–6 (or an illegal
    address) on these ragged shapes (37 tokens, d_ff 100, ranks 5–40): a failure here names the config.
    """
    if mode != "fused":  # 32-wide r2 chunks force the wide-rank modes on small shapes
        monkeypatch.setattr(_ffn_kernel, "MAX_R2_CHUNK", 32)
        monkeypatch.setattr(_ffn_kernel, "STORE_H_COST_FLOPS", 1e9 if mode == "split_r2" else 0.0)
    r2 = 24 if mode == "fused" else 40
    x = _x(37, 48, dtype)
    if gated:
        f = make_gated(48, 100, 5, 33, r2, dtype, bias=True)
        ref = lowrank_gated_ffn_reference(x.cpu().double(), _f64(f), "swiglu")
    else:
        f = make_ffn(48, 100, 5, r2, dtype, bias=True)
        ref = lowrank_ffn_reference(x.cpu().double(), _f64(f), "gelu")
    assert _ffn_kernel.plan_ffn((5, 33) if gated else (5,), r2).mode == getattr(
        _ffn_kernel, f"MODE_{mode.upper()}"
    )
    checked = []
    for cfg in _ffn_kernel._lowrank_ffn_kernel.configs:

        def one_config(kernel, key, grid, *args, cfg=cfg, **kwargs):
            if str(cfg) not in map(str, _ffn_kernel._prune(kernel.configs, {}, **kwargs)):
                raise _NotACandidate
            kernel.fn[grid(cfg.kwargs)](*args, **kwargs, **cfg.all_kwargs())

        monkeypatch.setattr(_ffn_kernel, "launch_tuned", one_config)
        try:
            out = (
                lowrank_gated_ffn(x, f, "swiglu", backend="triton")
                if gated
                else lowrank_ffn(x, f, "gelu", backend="triton")
            )
        except _NotACandidate:
            continue
        assert rel_err(out, ref) <= TOL[dtype], cfg
        checked.append(cfg)
    assert checked


# ---- per-shape policy (fused kernel vs cuBLAS chain) ------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_chain_and_chunked_chain_match_reference(gated, chunks):
    from flashsvd.kernels import ffn as ffn_mod

    torch.manual_seed(0)
    x = torch.randn(37, 24, dtype=torch.float64)
    if gated:
        f = GatedFFNFactors(*[torch.randn(*s, dtype=torch.float64) * 0.3 for s in
                              [(24, 5), (5, 40), (40,), (24, 6), (6, 40), (40,), (40, 7), (7, 24), (24,)]])  # fmt: skip
        ref = lowrank_gated_ffn_reference(x, f, "geglu")
        tensors, act = tuple(vars(f).values()), "gelu"
    else:
        f = FFNFactors(*[torch.randn(*s, dtype=torch.float64) * 0.3 for s in
                         [(24, 5), (5, 40), (40,), (40, 7), (7, 24), (24,)]])  # fmt: skip
        ref = lowrank_ffn_reference(x, f, "gelu_tanh")
        tensors, act = tuple(vars(f).values()), "gelu_tanh"
    out = ffn_mod._chain_forward(x, tensors, act, gated, chunks)
    assert rel_err(out, ref) < 1e-12


def test_policy_choices_and_cache():
    from flashsvd.kernels import ffn_policy as fp

    fp.clear_cache()
    # A decode-sized call is small enough for every candidate; a large one excludes the plain chain.
    assert fp.allowed("balanced", 1, 11008, 2, True) == fp.CANDIDATES
    assert fp.allowed("balanced", 8192, 3072, 2, False) == ("fused", "chunked")
    assert fp.allowed("leanest", 8192, 3072, 2, False) == ("fused",)
    assert fp.default_choice("fastest", 8192, 3072, 2, False) == "chain"
    calls = []

    def run(name):
        calls.append(name)
        if name == "chunked":
            import time

            time.sleep(0.002)

    x = torch.zeros(4, 4)
    first = fp.choose(("k",), "fastest", run, 8192, 3072, x, False)
    assert first in ("fused", "chain") and set(calls) == set(fp.CANDIDATES)
    calls.clear()
    assert fp.choose(("k",), "fastest", run, 8192, 3072, x, False) == first and not calls  # cached
    with pytest.raises(ValueError, match="unknown FFN policy"):
        fp.choose(("k",), "quick", run, 1, 1, x, False)
    fp.clear_cache()


def test_unknown_policy_is_a_clear_error():
    x = torch.randn(3, 8)
    f = FFNFactors(torch.randn(8, 2), torch.randn(2, 16), None, torch.randn(16, 2), torch.randn(2, 8), None)
    with pytest.raises(ValueError, match="unknown FFN policy"):
        lowrank_ffn(x, f, policy="fast")


def _add_norm_oracle(x, f, activation, w, b, gated):
    x64 = x.detach().cpu().double()
    ref = lowrank_gated_ffn_reference if gated else lowrank_ffn_reference
    s = ref(x64, _f64(f), activation) + x64
    return torch.nn.functional.layer_norm(s, s.shape[-1:], w.cpu().double(), b.cpu().double(), 1e-5)


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("policy", ["balanced", "fastest", "leanest"])
def test_ffn_add_norm_in_place_matches_float64(backend, gated, policy, monkeypatch):
    """``x ← LayerNorm(ffn(x) + x)`` chunk by chunk (the threshold 0 makes 37 ragged rows "large")."""
    from flashsvd.kernels import ffn_policy as fp
    from flashsvd.kernels import lowrank_ffn_add_norm_

    monkeypatch.setattr(fp, "SMALL_TRANSIENT_BYTES", 0)
    dtype = torch.float32
    f = make_gated(48, 100, 24, 33, 5, dtype, bias=True) if gated else make_ffn(48, 100, 24, 33, dtype)
    act = "swiglu" if gated else "gelu"
    x = _x(37, 48, dtype, lead=(37,))
    w, b = torch.rand(48, device=DEVICE) + 0.5, torch.randn(48, device=DEVICE)
    want = _add_norm_oracle(x, f, act, w, b, gated)
    y = x.clone()
    with torch.no_grad():
        got = lowrank_ffn_add_norm_(y, f, act, w, b, backend=backend, policy=policy)
    assert got is y
    assert rel_err(y, want) < 1e-5


def test_ffn_add_norm_refuses_autograd_and_strided_inputs():
    from flashsvd.kernels import lowrank_ffn_add_norm_

    f = make_ffn(8, 16, 2, 2, torch.float32, device="cpu")
    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="no_grad"):
        lowrank_ffn_add_norm_(torch.randn(3, 8, requires_grad=True), f, "gelu", w, b)
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous"):
        lowrank_ffn_add_norm_(torch.randn(8, 3).T, f, "gelu", w, b)
