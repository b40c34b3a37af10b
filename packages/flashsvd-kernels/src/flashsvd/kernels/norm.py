"""Residual add + LayerNorm (or RMSNorm) in one pass: ``LayerNorm(x + residual)``, ``RMSNorm(x)``.

Why it exists: after a low-rank projection or a fused FFN, a post-norm encoder block (BERT) ends with
``LayerNorm(dropout(h) + input)``; PyTorch runs that as two kernels (the add, then LayerNorm), each
reading and writing the ``[tokens, d]`` activation, and on the H200 the pair costs about 27 µs per call
at 8,192 × 768 fp16 where one pass over the data needs under 10 µs (``benchmarks/models/profile_step.py``).
Decoders (LLaMA) normalize with RMSNorm, which HF writes as five elementwise/reduction kernels per call;
in a graphed decode step of a few tokens each kernel costs its launch latency, not its bytes.
Here one program normalizes a few rows held in registers; statistics in float32 (as PyTorch's
LayerNorm), the sum ``x + residual`` is not rounded to the input dtype before normalizing.  The two
norms are one kernel (``RMS`` constexpr: no mean, no bias).

Inference only: with autograd on (any input requiring grad), both functions run the PyTorch ops
instead, so training through a flash-backend block keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flashsvd.kernels._attention_checks import check_out
from flashsvd.kernels._launch import Prepared, cdiv, launch, next_power_of_2, prepare
from flashsvd.kernels._triton_compat import resolve_backend

__all__ = ["add_layer_norm", "add_layer_norm_reference", "prepare_add_norm", "rms_norm", "rms_norm_reference"]


@triton.jit
def _norm_kernel(
    X, R, W, B, Y, n_rows, D, s_x, s_r, s_y, eps,
    HAS_R: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, RMS: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    ok = (rows < n_rows)[:, None] & c_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * s_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_R:
        x += tl.load(R + r64 * s_r + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    if RMS:
        xc = x
    else:
        xc = tl.where(ok, x - (tl.sum(x, axis=1) / D)[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + r64 * s_y + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def _norm_call(x2d, r2d, weight, bias, eps: float, rms: bool, y) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of the kernel launch for non-empty ``[n, d]`` rows."""
    n, d = x2d.shape
    block_d = next_power_of_2(d)
    rows = max(1, min(16, 4096 // block_d))  # a few rows per program: enough work per launch slot
    dummy = y
    args = (
        x2d, r2d if r2d is not None else dummy, weight if weight is not None else dummy,
        bias if bias is not None else dummy, y, n, d, x2d.stride(0),
        r2d.stride(0) if r2d is not None else 0, y.stride(0), float(eps),
    )  # fmt: skip
    kwargs = dict(
        HAS_R=r2d is not None, HAS_W=weight is not None, HAS_B=bias is not None, RMS=rms, ROWS=rows,
        BLOCK_D=block_d, num_warps=4 if rows * block_d <= 4096 else 8,
    )  # fmt: skip
    return (cdiv(n, rows),), args, kwargs


def _launch(x2d: torch.Tensor, r2d: torch.Tensor | None, weight, bias, eps: float, rms: bool,
            y: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``y`` may be ``x2d`` itself: each program loads its rows whole before it stores them."""
    y = torch.empty_like(x2d) if y is None else y
    if x2d.shape[0] == 0:
        return y
    grid, args, kwargs = _norm_call(x2d, r2d, weight, bias, eps, rms, y)
    launch(_norm_kernel, grid, *args, **kwargs)
    return y


def prepare_add_norm(x2d: torch.Tensor, r2d: torch.Tensor | None, weight: torch.Tensor | None,
                     bias: torch.Tensor | None, eps: float, y: torch.Tensor, *, rms: bool = False) -> Prepared | None:  # fmt: skip
    """``y ← LayerNorm(x2d + r2d)`` (``rms``: ``RMSNorm(x2d)``, no ``r2d`` or ``bias``) on ``[n, d]``
    rows (unit column stride) as a :class:`Prepared` launch, called with ``(x2d, r2d, y)``; ``y`` may be
    ``x2d``.  No checks: a runtime block's launch plan calls it with the inputs :func:`add_layer_norm`
    (:func:`rms_norm`) accepted.  ``None`` until launched once."""
    if x2d.shape[0] == 0:
        return None
    grid, args, kwargs = _norm_call(x2d, r2d, weight, bias, eps, rms, y)
    return prepare(_norm_kernel, grid, args, kwargs, live=(x2d, r2d, y))


@torch.library.custom_op("flashsvd::add_norm", mutates_args=())
def _add_norm_op(
    x2d: torch.Tensor, r2d: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    eps: float, rms: bool,
) -> torch.Tensor:  # fmt: skip
    """The kernel as a ``torch.library`` op (``torch.compile`` traces through it)."""
    return _launch(x2d, r2d, weight, bias, eps, rms)


@_add_norm_op.register_fake
def _(x2d, r2d, weight, bias, eps, rms):
    return torch.empty_like(x2d)


def add_layer_norm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """PyTorch reference: ``layer_norm(x + residual)`` over the last dimension, in ``x``'s dtype."""
    s = x if residual is None else x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, eps)


def _check(x, residual, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError("x must be a tensor [..., d] with d >= 1")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x: got {tuple(residual.shape)} {residual.dtype} for {tuple(x.shape)} {x.dtype}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != x.shape[-1:]:
            raise ValueError(f"{name} must have shape [{x.shape[-1]}], got {tuple(t.shape)}")
    devices = {t.device for t in (x, residual, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"inputs are on several devices ({sorted(map(str, devices))}); move them to one")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, d]`` with unit column stride (the kernel's layout; row strides may vary)."""
    t2d = t.reshape(-1, t.shape[-1])
    return t2d if t2d.stride(-1) == 1 else t2d.contiguous()


def _dispatch(x, residual, weight, bias, eps, rms, backend, reference, out=None):
    _check(x, residual, weight, bias)
    check_out(out, tuple(x.shape), x)
    tensors = [t for t in (x, residual, weight, bias) if t is not None]
    chosen = resolve_backend(backend, *tensors)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if chosen == "torch" or needs_grad or x.dtype == torch.float64:
        y = reference()
        return y if out is None else out.copy_(y)
    shape = x.shape
    x2d = _rows(x)
    r2d = None if residual is None else _rows(residual)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if torch.compiler.is_compiling():
        y = _add_norm_op(x2d, r2d, weight, bias, float(eps), rms).view(shape)
        return y if out is None else out.copy_(y)
    # A contiguous ``out`` is written directly (also when it is ``x``: rows are read before written).
    y2d = out.view(-1, shape[-1]) if out is not None and out.is_contiguous() else None
    y = _launch(x2d, r2d, weight, bias, eps, rms, y2d).view(shape)
    return y if out is None or y2d is not None else out.copy_(y)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dimension (``residual`` may be ``None``).

    ``backend``: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"triton"`` or ``"torch"``.  With
    autograd on, the PyTorch ops run (the kernel has no backward).  ``out``: where to write the result
    (same shape and dtype as ``x``); it may be ``x`` itself, which spares a ``[tokens, d]`` buffer (a
    post-LN encoder block's peak activation memory).
    """
    return _dispatch(x, residual, weight, bias, eps, False, backend,
                     lambda: add_layer_norm_reference(x, residual, weight, bias, eps), out)  # fmt: skip


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch reference, as HF's ``LlamaRMSNorm``: float32 statistics, ``weight · x̂`` in ``x``'s dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return h if weight is None else weight * h


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, backend: str = "auto"
) -> torch.Tensor:
    """``x / sqrt(mean(x²) + eps) · weight`` over the last dimension (LLaMA's RMSNorm), one kernel.

    The kernel multiplies by ``weight`` before rounding to ``x``'s dtype (HF rounds first): results
    differ from HF by at most one rounding step.  ``backend`` and autograd as :func:`add_layer_norm`.
    """
    return _dispatch(x, None, weight, None, eps, True, backend, lambda: rms_norm_reference(x, weight, eps))
