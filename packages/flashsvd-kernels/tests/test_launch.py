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
