"""``add_layer_norm`` (residual add + LayerNorm in one kernel) and ``rms_norm`` against float64 oracles.

The Triton kernel runs on CUDA or through the interpreter (``TRITON_INTERPRET=1``); the PyTorch
path (CPU, autograd) is tested everywhere.
"""

from __future__ import annotations

import pytest
import torch

from flashsvd.kernels import add_layer_norm, add_layer_norm_reference, rms_norm, rms_norm_reference
from flashsvd.kernels._triton_compat import interpreter_enabled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    DEVICE == "cpu" and not interpreter_enabled(), reason="needs CUDA or TRITON_INTERPRET=1"
)
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _oracle(x, r, w, b, eps):
    dd = torch.float64
    return add_layer_norm_reference(
        x.to(dd),
        None if r is None else r.to(dd),
        None if w is None else w.to(dd),
        None if b is None else b.to(dd),
        eps,
    )


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "d"), [(1, 32), (37, 96), (19, 768), (5, 1000)])
@pytest.mark.parametrize("parts", ["all", "no-residual", "no-affine"])
def test_kernel_matches_float64(dtype, rows, d, parts):
    torch.manual_seed(rows * d)
    x = (torch.randn(rows, d) * 3 + 1).to(DEVICE, dtype)
    r = None if parts == "no-residual" else torch.randn(rows, d).to(DEVICE, dtype)
    w = None if parts == "no-affine" else (torch.rand(d) + 0.5).to(DEVICE, dtype)
    b = None if parts == "no-affine" else torch.randn(d).to(DEVICE, dtype)
    y = add_layer_norm(x, r, w, b, 1e-12, backend="triton")
    assert y.dtype == dtype and y.shape == x.shape
    ref = _oracle(x, r, w, b, 1e-12)
    assert torch.isfinite(y).all()
    assert (y.double() - ref).abs().max().item() <= TOL[dtype] * (1 + ref.abs().max().item())


@needs_kernel
def test_batched_strided_and_constant_rows():
    """``[B, S, d]`` input whose rows are a strided slice; a constant row normalizes to the bias."""
    torch.manual_seed(0)
    big = torch.randn(3, 7, 80, device=DEVICE)
    x = big[..., :64]  # row stride 80, last dim contiguous
    x[1, 2] = 5.0  # zero variance
    r = torch.randn(3, 7, 64, device=DEVICE)
    r[1, 2] = 0.0
    w, b = torch.rand(64, device=DEVICE) + 0.5, torch.randn(64, device=DEVICE)
    y = add_layer_norm(x, r, w, b, 1e-5, backend="triton")
    ref = _oracle(x, r, w, b, 1e-5)
    assert torch.allclose(y.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(y[1, 2], b, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "d"), [(1, 64), (23, 576), (3, 1000)])
def test_rms_norm_matches_float64(dtype, rows, d):
    torch.manual_seed(rows + d)
    x = (torch.randn(rows, 2, d) * 4).to(DEVICE, dtype)
    x[0, 0] = 0.0  # all-zero row: eps keeps it finite, output 0
    w = (torch.rand(d) + 0.5).to(DEVICE, dtype)
    y = rms_norm(x, w, 1e-6, backend="triton")
    ref = rms_norm_reference(x.double(), w.double(), 1e-6)
    assert y.dtype == dtype and torch.isfinite(y).all() and (y[0, 0] == 0).all()
    assert (y.double() - ref).abs().max().item() <= TOL[dtype] * (1 + ref.abs().max().item())
    # HF's rounding (x̂ rounded before the weight) is within one rounding step of the kernel's
    hf = rms_norm_reference(x, w, 1e-6)
    assert (y.double() - hf.double()).abs().max().item() <= 2 * TOL[dtype] * (1 + ref.abs().max().item())


def test_rms_norm_matches_transformers():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48)
    with torch.no_grad():
        assert torch.allclose(rms_norm(x, norm.weight, 1e-5), norm(x), atol=1e-6)


def test_torch_path_and_autograd_fallback():
    """CPU ``auto`` and any input requiring grad run PyTorch's ops, so gradients flow."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    r = torch.randn(4, 16)
    w, b = torch.ones(16, requires_grad=True), torch.zeros(16)
    y = add_layer_norm(x, r, w, b)
    y.square().sum().backward()
    assert x.grad is not None and w.grad is not None
    assert torch.allclose(y.detach().double(), _oracle(x.detach(), r, w.detach(), b, 1e-5), atol=1e-6)


def test_bad_inputs():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="residual must match"):
        add_layer_norm(x, torch.randn(2, 4), None, None)
    with pytest.raises(ValueError, match="weight must have shape"):
        add_layer_norm(x, None, torch.ones(4), None)
    with pytest.raises(ValueError, match="unknown backend"):
        add_layer_norm(x, None, None, None, backend="cuda")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_kernel)])
def test_out_may_be_x_or_a_strided_view(backend):
    """``out=x`` normalizes in place (rows are read before written); a strided ``out`` gets a copy."""
    torch.manual_seed(0)
    x, r = torch.randn(2, 7, 48, device=DEVICE), torch.randn(2, 7, 48, device=DEVICE)
    w, b = torch.randn(48, device=DEVICE), torch.randn(48, device=DEVICE)
    want = _oracle(x, r, w, b, 1e-5)
    inplace = x.clone()
    got = add_layer_norm(inplace, r, w, b, backend=backend, out=inplace)
    assert got.data_ptr() == inplace.data_ptr()
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    into_residual = r.clone()  # the FFN block's case: the result overwrites the residual rows
    add_layer_norm(x, into_residual, w, b, backend=backend, out=into_residual)
    torch.testing.assert_close(into_residual.double(), want, atol=2e-5, rtol=0)
    wide = torch.zeros(2, 7, 96, device=DEVICE)
    add_layer_norm(x, r, w, b, backend=backend, out=wide[..., :48])
    torch.testing.assert_close(wide[..., :48].double(), want, atol=2e-5, rtol=0)
    assert not wide[..., 48:].any()
    with pytest.raises(ValueError, match="out must be"):
        add_layer_norm(x, r, w, b, backend=backend, out=torch.empty(2, 7, 47, device=DEVICE))
