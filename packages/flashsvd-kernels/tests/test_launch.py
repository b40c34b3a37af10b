"""The cached launch path (``flashsvd.kernels._launch``): which calls reuse a compiled kernel, and with
exactly which launcher arguments; on CUDA, that cached launches compute what Triton's path computes."""

from __future__ import annotations

import inspect

import pytest
import torch

from flashsvd.kernels import _launch


class FakeCompiled:
    """What ``fn[grid](...)`` returns: a launcher (``run``), a function handle, packed metadata."""

    def __init__(self, calls):
        self.function, self.packed_metadata = "function-handle", "packed"
        self.run = lambda *a: calls.append(("cached", a))


class FakeJit:
    """A ``@triton.jit`` function with parameters ``(X, Y, n, scale, BLOCK)``."""

    def __init__(self):
        def kernel(X, Y, n, scale, BLOCK=64):
            pass

        self.signature = inspect.signature(kernel)
        self.arg_names = list(self.signature.parameters)
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.calls)

        return run


@pytest.fixture
def fake_device(monkeypatch):
    monkeypatch.setattr(_launch, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(_launch, "_DRIVER", [lambda: 0, lambda dev: 1234])
    monkeypatch.setattr(_launch, "_COMPILED", {})
    monkeypatch.setattr(_launch, "_N_TENSORS", {})


def test_second_call_with_one_signature_is_cached_with_its_constexpr_tail(fake_device):
    fn = FakeJit()
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(4):
        _launch.launch(fn, (3,), x, y, 8, 0.5, BLOCK=32)
    kinds = [c[0] for c in fn.calls]
    assert kinds == ["triton", "triton", "cached", "cached"]  # 1st learns the layout, 2nd compiles
    args = fn.calls[-1][1]
    # grid padded to 3 dims, the current stream, handle, metadata, no launch metadata nor hooks,
    # then every kernel argument in parameter order (the constexpr BLOCK taken from the keywords)
    assert args[:9] == (3, 1, 1, 1234, "function-handle", "packed", None, None, None)
    assert args[9] is x and args[10] is y and args[11:] == (8, 0.5, 32)


@pytest.mark.parametrize(
    "change",
    ["scalar", "dtype", "alignment", "constexpr", "grid"],
)
def test_anything_triton_specializes_on_misses_the_cache(fake_device, change):
    fn = FakeJit()
    x, y = torch.zeros(16), torch.zeros(16)
    for _ in range(2):
        _launch.launch(fn, (3,), x, y, 8, 0.5, BLOCK=32)
    call = {
        "scalar": lambda: _launch.launch(fn, (3,), x, y, 16, 0.5, BLOCK=32),
        "dtype": lambda: _launch.launch(fn, (3,), x.half(), y, 8, 0.5, BLOCK=32),
        "alignment": lambda: _launch.launch(fn, (3,), x[1:], y, 8, 0.5, BLOCK=32),
        "constexpr": lambda: _launch.launch(fn, (3,), x, y, 8, 0.5, BLOCK=64),
        "grid": lambda: _launch.launch(fn, (4,), x, y, 8, 0.5, BLOCK=32),
    }[change]
    call()
    assert fn.calls[-1][0] == "triton"
    call()  # and the new signature is remembered in turn
    assert fn.calls[-1][0] == "cached"


def test_scalar_where_a_tensor_was_takes_tritons_path(fake_device):
    fn = FakeJit()
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        _launch.launch(fn, (1,), x, y, 8, 0.5)
    _launch.launch(fn, (1,), x, 7, 8, 0.5)
    assert fn.calls[-1][0] == "triton"


def test_a_kernel_without_the_tensors_first_layout_always_takes_tritons_path(fake_device):
    fn = FakeJit()
    x = torch.zeros(8)
    for _ in range(4):
        _launch.launch(fn, (1,), x, 8, x, 0.5)
    assert [c[0] for c in fn.calls] == ["triton"] * 4


def test_launch_hooks_take_tritons_path(fake_device, monkeypatch):
    fn = FakeJit()
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(3):
        _launch.launch(fn, (1,), x, y, 8, 0.5)
    assert fn.calls[-1][0] == "cached"
    monkeypatch.setattr(_launch, "_hooks_installed", lambda: True)
    _launch.launch(fn, (1,), x, y, 8, 0.5)
    assert fn.calls[-1][0] == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cached_launches_match_the_reference_on_cuda():
    """Repeated calls (cached launches), then views that break alignment and shapes that change the
    scalars: every result equals the float64 reference."""
    from flashsvd.kernels import add_layer_norm

    torch.manual_seed(0)
    buf = torch.randn(64 * 768 + 8, device="cuda", dtype=torch.float16)
    res = torch.randn(64, 768, device="cuda", dtype=torch.float16)
    w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    w, b = w.half(), b.half()
    for offset, rows in [(0, 64)] * 4 + [(1, 64), (1, 64), (0, 33), (0, 33), (0, 64)]:
        x = buf[offset : offset + rows * 768].view(rows, 768)
        out = add_layer_norm(x, res[:rows], w, b, eps=1e-5)
        ref = torch.nn.functional.layer_norm(
            (x.double() + res[:rows].double()), (768,), w.double(), b.double(), 1e-5
        )
        torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=1e-2)
    assert _launch._COMPILED, "no launch was cached"


# ---- prepared launches ---------------------------------------------------------------------------
class FakeLauncher:
    """Triton's ``CudaLauncher``: a C ``launch`` taking the scratch buffers, called by ``__call__``."""

    def __init__(self, calls, scratch=0):
        self.calls, self.global_scratch_size, self.profile_scratch_size = calls, scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, False

    def launch(self, *a):
        self.calls.append(("c", a))

    def __call__(self, *a):
        self.calls.append(("call", a))


def test_prepared_launch_passes_only_the_live_pointers(fake_device, monkeypatch):
    monkeypatch.setattr(_launch, "_DIRECT_C_LAUNCH", True)  # (the Triton versions it was tested with)
    fn = FakeJit()
    x, y = torch.zeros(8), torch.zeros(8)
    assert _launch.prepare(fn, (3,), (x, y, 8, 0.5), {"BLOCK": 32}, live=(x, y)) is None  # never launched
    for _ in range(2):
        _launch.launch(fn, (3,), x, y, 8, 0.5, BLOCK=32)
    calls = []
    key = next(iter(_launch._COMPILED))
    _launch._COMPILED[key] = (FakeLauncher(calls), "function-handle", "packed", (32,))
    prepared = _launch.prepare(fn, (3,), (x, y, 8, 0.5), {"BLOCK": 32}, live=(x, y))
    x2, y2 = torch.zeros(8), torch.zeros(8)
    prepared(x2, 4096)  # a tensor, or a raw device address
    kind, args = calls[-1]
    # the C launcher directly: grid, stream, handle, cooperative/PDL flags, no scratch, metadata, no hooks
    assert kind == "c" and args[:13] == (3, 1, 1, 1234, "function-handle", False, False, None, None, "packed",
                                         None, None, None)  # fmt: skip
    assert args[13] is x2 and args[14:] == (4096, 8, 0.5, 32)
    assert (
        prepared._args[0] is None and prepared._args[1] is None
    )  # the preparing call's tensors are not held
    _launch._COMPILED[key] = (FakeLauncher(calls, scratch=64), "function-handle", "packed", (32,))
    _launch.prepare(fn, (3,), (x, y, 8, 0.5), {"BLOCK": 32}, live=(x, y))(x2, y2)
    assert calls[-1][0] == "call"  # a kernel with scratch memory: the launcher allocates it
    monkeypatch.setattr(_launch, "_DIRECT_C_LAUNCH", False)  # another Triton: its launcher's own call
    _launch._COMPILED[key] = (FakeLauncher(calls), "function-handle", "packed", (32,))
    _launch.prepare(fn, (3,), (x, y, 8, 0.5), {"BLOCK": 32}, live=(x, y))(x2, y2)
    kind, args = calls[-1]
    assert kind == "call" and args[:9] == (3, 1, 1, 1234, "function-handle", "packed", None, None, None)


needs_kernel = pytest.mark.skipif(
    not torch.cuda.is_available() and not _launch.interpreter_enabled(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)


@needs_kernel
def test_prepared_kernels_compute_what_the_public_functions_compute():
    """``prepare_attention`` / ``prepare_add_norm`` / ``prepare_ffn`` (a runtime block's launch plan)
    on new inputs of the prepared layout give the public functions' outputs exactly."""
    from flashsvd.kernels import FFNFactors, add_layer_norm, lowrank_attention, lowrank_ffn
    from flashsvd.kernels.attention import prepare_attention
    from flashsvd.kernels.ffn import prepare_ffn
    from flashsvd.kernels.norm import prepare_add_norm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    B, M, H, r, D = 2, 19, 2, 16, 32
    vq, vk, vv = (rnd(H, r, D, scale=r**-0.5) for _ in range(3))
    bq, bk, bv = (rnd(H, D) for _ in range(3))

    def inputs():
        p = rnd(B, M, 3 * H * r)  # one fused projection, split like a runtime block does
        pq, pk, pv = (t.unflatten(-1, (H, r)) for t in p.split(H * r, -1))
        mask = torch.rand(B, M, generator=g).to(dev) > 0.3
        return pq, pk, pv, mask

    pq, pk, pv, mask = inputs()
    out = torch.empty(B, M, H, D, device=dev)
    backend = "auto" if dev == "cuda" else "triton"  # (the interpreter on the CPU)
    kw = dict(key_padding_mask=mask, q_offset=0)
    for _ in range(3):  # compiled, tuned and remembered
        lowrank_attention(pq, pk, pv, vq, vk, vv, bq, bk, bv, out=out, backend=backend, **kw)
    attend = prepare_attention(pq, pk, pv, vq, vk, vv, bq, bk, bv, out=out, **kw)
    pq, pk, pv, mask = inputs()
    got = torch.full_like(out, float("nan"))
    attend(pq, pk, pv, mask.view(torch.uint8), got)
    want = lowrank_attention(
        pq, pk, pv, vq, vk, vv, bq, bk, bv, backend=backend, key_padding_mask=mask, q_offset=0
    )
    assert torch.equal(got, want)

    x, res, w, b = rnd(37, 96), rnd(37, 96), rnd(96), rnd(96)
    for _ in range(3):
        add_layer_norm(x.clone(), res, w, b, 1e-5, out=x.clone(), backend=backend)
    y = torch.empty_like(x)
    norm = prepare_add_norm(y, res, w, b, 1e-5, y)
    y.copy_(x)
    norm(y, res, y)  # in place, as the plans call it
    assert torch.equal(y, add_layer_norm(x, res, w, b, 1e-5, backend=backend))

    f = FFNFactors(rnd(96, 16), rnd(16, 64), rnd(64), rnd(64, 24), rnd(24, 96), rnd(96))
    run = prepare_ffn(x, f, "gelu", backend=backend, policy="fastest")
    torch.testing.assert_close(run(res), lowrank_ffn(res, f, "gelu", backend=backend, policy="fastest"),
                               rtol=0, atol=0)  # fmt: skip


@needs_kernel
def test_prepared_decode_step_computes_what_the_public_functions_compute():
    """A decoder's prepared step (``RankSpaceKVCache.prepare_append`` + ``advance``, ``prepare_decode``
    over the whole buffers, ``prepare_add_norm(rms=True)``) gives :meth:`~RankSpaceKVCache.append`'s cache and
    :func:`lowrank_attention_decode`'s / :func:`rms_norm`'s outputs exactly, step after step."""
    from flashsvd.kernels import RankSpaceKVCache, lowrank_attention_decode, rms_norm, rope_table
    from flashsvd.kernels.attention_decode import decode_layout, prepare_decode
    from flashsvd.kernels.norm import prepare_add_norm

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "auto" if dev == "cuda" else "triton"
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev)

    B, P, Hq, Hkv, r, D, cap = 2, 21, 4, 2, 16, 32, 64
    vq, vk, vv = rnd(Hq, r, D, scale=r**-0.5), rnd(Hkv, r, D, scale=r**-0.5), rnd(Hkv, r, D, scale=r**-0.5)
    rope = tuple(t.to(dev) for t in rope_table(cap, D))
    caches = [RankSpaceKVCache(B, cap, Hkv, r, dtype=torch.float32, device=dev) for _ in range(2)]
    for c in caches:  # the same prompt in both
        g.manual_seed(1)
        c.append(rnd(B, P, Hkv, r), rnd(B, P, Hkv, r), positions=torch.arange(P, device=dev)[None])

    def step(pos):
        p = rnd(B, 1, (Hq + 2 * Hkv) * r)  # one fused projection, split like a runtime block does
        pq, pk, pv = (
            t.unflatten(-1, (h, r)) for t, h in zip(p.split([Hq * r, Hkv * r, Hkv * r], -1), (Hq, Hkv, Hkv))
        )
        return pq, pk, pv, torch.full((1, 1), pos, device=dev).expand(B, 1)  # as the runtime passes them

    ref, mine = caches
    run = write = None
    for pos in range(P, P + 4):
        pq, pk, pv, positions = step(pos)
        ref.append(pk, pv, positions=positions)
        for _ in range(1 if run else 2):  # a layout is tuned by its first launch, remembered by its second
            want = lowrank_attention_decode(pq, ref, vq, vk, vv, rope=rope, positions=positions,
                                            key_positions=ref.positions, backend=backend)  # fmt: skip
        n = mine.max_length + 1
        if run is None:  # after the public call launched (and tuned) this layout
            assert decode_layout(mine.pk, n) == decode_layout(ref.pk, n)
            write = mine.prepare_append(pk, pv, positions)
            out = torch.empty_like(want)
            run = prepare_decode(pq, mine.pk, mine.pv, vq, vk, vv, lengths=mine.lengths, n_hint=n, rope=rope,
                                 positions=positions, key_positions=mine.positions, out=out)  # fmt: skip
            assert run is not None
        if write is None:  # off CUDA the append is tensor ops: the public path
            mine.append(pk, pv, positions=positions)
        else:
            write(pk, pv, positions)
            mine.advance(1)
        got = torch.full_like(want, float("nan"))
        run(pq, positions, got)
        assert torch.equal(got, want)
    assert torch.equal(mine.pk, ref.pk) and torch.equal(mine.positions, ref.positions)
    assert torch.equal(mine.lengths, ref.lengths) and mine.max_length == ref.max_length

    x, w = rnd(5, 96), rnd(96)
    for _ in range(2):
        want = rms_norm(x, w, 1e-6, backend=backend)
    norm = prepare_add_norm(x, None, w, None, 1e-6, torch.empty_like(x), rms=True)
    got = torch.empty_like(x)
    norm(x, None, got)
    assert torch.equal(got, want)
