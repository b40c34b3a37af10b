"""Fused low-rank feed-forward blocks: ``lowrank_ffn`` (GELU/ReLU/SiLU) and ``lowrank_gated_ffn``
(SwiGLU/GEGLU), their PyTorch references and backend dispatch.

Why: a factored FFN run as a chain of matmuls (``x·u1``, ``·v1``, act, ``·u2``, ``·v2``) writes the
``[tokens, d_ff]`` hidden activation to memory and back, so it is often *slower* than the dense layer
and uses as much activation memory.  The Triton path (see :mod:`flashsvd.kernels._ffn_kernel`)
materializes only the rank-space projections ``P = x·u`` and keeps the ``d_ff`` loop on chip.

Factor layout follows docs/architecture.md: a dense ``Linear`` with ``W [out, in]`` becomes
``(x·u)·v + b`` with ``u [in, r]`` and ``v [r, out]``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from flashsvd.kernels import ffn_policy, norm
from flashsvd.kernels._ffn_kernel import ffn_forward_triton
from flashsvd.kernels._launch import next_power_of_2
from flashsvd.kernels._triton_compat import resolve_backend

__all__ = [
    "FFN_ACTIVATIONS",
    "FFNFactors",
    "GATED_ACTIVATIONS",
    "GatedFFNFactors",
    "lowrank_ffn",
    "lowrank_ffn_add_norm_",
    "lowrank_ffn_reference",
    "lowrank_gated_ffn",
    "lowrank_gated_ffn_reference",
    "prepare_ffn",
]

FFN_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
# Gated activation name -> activation applied to the gate branch.
GATED_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# float64 is accepted by the references (the test oracle) only.
_DTYPES = (*_KERNEL_DTYPES, torch.float64)


@dataclass
class FFNFactors:
    """Factors of ``act(x·u1·v1 + b1)·u2·v2 + b2``.

    ``u1 [d_model, r1]``, ``v1 [r1, d_ff]``, ``b1 [d_ff] | None``, ``u2 [d_ff, r2]``,
    ``v2 [r2, d_out]``, ``b2 [d_out] | None`` (``d_out`` is normally ``d_model``).
    """

    u1: torch.Tensor
    v1: torch.Tensor
    b1: torch.Tensor | None
    u2: torch.Tensor
    v2: torch.Tensor
    b2: torch.Tensor | None


@dataclass
class GatedFFNFactors:
    """Factors of ``(act(x·u_gate·v_gate + b_gate) * (x·u_up·v_up + b_up))·u_down·v_down + b_down``.

    Gate and up have their own bases and ranks (no shared-basis approximation):
    ``u_gate [d_model, r_gate]``, ``v_gate [r_gate, d_ff]``, ``u_up [d_model, r_up]``,
    ``v_up [r_up, d_ff]``, ``u_down [d_ff, r_down]``, ``v_down [r_down, d_out]``; biases optional.
    """

    u_gate: torch.Tensor
    v_gate: torch.Tensor
    b_gate: torch.Tensor | None
    u_up: torch.Tensor
    v_up: torch.Tensor
    b_up: torch.Tensor | None
    u_down: torch.Tensor
    v_down: torch.Tensor
    b_down: torch.Tensor | None


# ---------------------------------------------------------------------------------------------
# validation


def _check_tensor(name: str, t: torch.Tensor | None, ndim: int, ref: torch.Tensor, optional: bool) -> None:
    if t is None:
        if not optional:
            raise TypeError(f"{name} is required but got None")
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {ref.dtype}: cast the factors to x's dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}: move them to one device")


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"x has dtype {x.dtype}; supported: float16, bfloat16, float32 (float64: backend='torch')"
        )
    if x.dim() < 1:
        raise ValueError("x must have shape [..., d_model], got a 0-D tensor")


def _check_linear_pair(x, u_name, u, v_name, v, b_name, b, d_in, d_out_expected=None) -> int:
    """Check ``u [d_in, r]``, ``v [r, d_out]``, ``b [d_out]``; return d_out."""
    _check_tensor(u_name, u, 2, x, optional=False)
    _check_tensor(v_name, v, 2, x, optional=False)
    _check_tensor(b_name, b, 1, x, optional=True)
    if u.shape[0] != d_in:
        raise ValueError(f"{u_name} must have shape [{d_in}, r], got {tuple(u.shape)}")
    if u.shape[1] < 1:
        raise ValueError(f"{u_name} has rank 0; ranks must be >= 1")
    if v.shape[0] != u.shape[1]:
        raise ValueError(
            f"{v_name} must have shape [r, out] with r = {u_name}.shape[1] = {u.shape[1]}, got {tuple(v.shape)}"
        )
    d_out = v.shape[1]
    if d_out_expected is not None and d_out != d_out_expected:
        raise ValueError(f"{v_name} must have {d_out_expected} columns (d_ff), got {tuple(v.shape)}")
    if b is not None and b.shape[0] != d_out:
        raise ValueError(f"{b_name} must have shape [{d_out}], got {tuple(b.shape)}")
    return d_out


def _check_ffn(x: torch.Tensor, f: FFNFactors, activation: str) -> None:
    if not isinstance(f, FFNFactors):
        raise TypeError(f"factors must be FFNFactors, got {type(f).__name__}")
    if activation not in FFN_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(FFN_ACTIVATIONS)}")
    _check_x(x)
    d_ff = _check_linear_pair(x, "u1", f.u1, "v1", f.v1, "b1", f.b1, x.shape[-1])
    _check_linear_pair(x, "u2", f.u2, "v2", f.v2, "b2", f.b2, d_ff)


def _check_gated(x: torch.Tensor, f: GatedFFNFactors, activation: str) -> None:
    if not isinstance(f, GatedFFNFactors):
        raise TypeError(f"factors must be GatedFFNFactors, got {type(f).__name__}")
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(
            f"unknown gated activation {activation!r}: choose one of {', '.join(GATED_ACTIVATIONS)}"
        )
    _check_x(x)
    d_model = x.shape[-1]
    d_ff = _check_linear_pair(x, "u_gate", f.u_gate, "v_gate", f.v_gate, "b_gate", f.b_gate, d_model)
    _check_linear_pair(x, "u_up", f.u_up, "v_up", f.v_up, "b_up", f.b_up, d_model, d_ff)
    _check_linear_pair(x, "u_down", f.u_down, "v_down", f.v_down, "b_down", f.b_down, d_ff)


# ---------------------------------------------------------------------------------------------
# references


def _act(s: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(s)
    if activation == "gelu_tanh":
        return F.gelu(s, approximate="tanh")
    if activation == "relu":
        return F.relu(s)
    return F.silu(s)


def _lowrank_linear(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None):
    y = (x @ u) @ v
    return y if b is None else y + b


def lowrank_ffn_reference(x: torch.Tensor, factors: FFNFactors, activation: str = "gelu") -> torch.Tensor:
    """Plain PyTorch ``act(x·u1·v1 + b1)·u2·v2 + b2`` (the oracle, and the CPU path)."""
    _check_ffn(x, factors, activation)
    f = factors
    h = _act(_lowrank_linear(x, f.u1, f.v1, f.b1), activation)
    return _lowrank_linear(h, f.u2, f.v2, f.b2)


def lowrank_gated_ffn_reference(
    x: torch.Tensor, factors: GatedFFNFactors, activation: str = "swiglu"
) -> torch.Tensor:
    """Plain PyTorch ``(act(x·ug·vg + bg) * (x·uu·vu + bu))·ud·vd + bd``."""
    _check_gated(x, factors, activation)
    f = factors
    gate = _act(_lowrank_linear(x, f.u_gate, f.v_gate, f.b_gate), GATED_ACTIVATIONS[activation])
    h = gate * _lowrank_linear(x, f.u_up, f.v_up, f.b_up)
    return _lowrank_linear(h, f.u_down, f.v_down, f.b_down)


# ---------------------------------------------------------------------------------------------
# Triton path


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _triton_forward(x2d: torch.Tensor, tensors: tuple, activation: str, gated: bool) -> torch.Tensor:
    """``x2d [T, d_model]``; ``tensors`` are the factors in dataclass field order."""
    t = [_contig(a) for a in tensors]
    if gated:
        ug, vg, bg, uu, vu, bu, ud, vd, bd = t
        # Two small cuBLAS projections; P never exceeds [T, r] and h never reaches memory.
        return ffn_forward_triton(x2d @ ug, x2d @ uu, vg, vu, bg, bu, ud, vd, bd, activation, True)
    u1, v1, b1, u2, v2, b2 = t
    return ffn_forward_triton(x2d @ u1, None, v1, None, b1, None, u2, v2, b2, activation, False)


@torch.library.custom_op("flashsvd::lowrank_ffn_fused", mutates_args=())
def _fused_op(
    x2d: torch.Tensor, u_a: torch.Tensor, v_a: torch.Tensor, b_a: torch.Tensor | None, u_b: torch.Tensor | None,
    v_b: torch.Tensor | None, b_b: torch.Tensor | None, u2: torch.Tensor, v2: torch.Tensor, b2: torch.Tensor | None,
    activation: str, gated: bool,
) -> torch.Tensor:  # fmt: skip
    """The fused kernel as a ``torch.library`` op (``torch.compile`` traces through it, opaque)."""
    tensors = (u_a, v_a, b_a, u_b, v_b, b_b, u2, v2, b2) if gated else (u_a, v_a, b_a, u2, v2, b2)
    return _triton_forward(x2d, tensors, activation, gated)


@_fused_op.register_fake
def _(x2d, u_a, v_a, b_a, u_b, v_b, b_b, u2, v2, b2, activation, gated):
    return x2d.new_empty(x2d.shape[0], v2.shape[1])


def _fused(x2d, tensors, activation, gated) -> torch.Tensor:
    """Direct launch in eager (no dispatcher cost); the registered op under ``torch.compile``."""
    if not torch.compiler.is_compiling():
        return _triton_forward(x2d, tensors, activation, gated)
    if gated:
        return _fused_op(x2d, *tensors, activation, gated)
    u1, v1, b1, u2, v2, b2 = tensors
    return _fused_op(x2d, u1, v1, b1, None, None, None, u2, v2, b2, activation, gated)


def _act_(h: torch.Tensor, activation: str) -> torch.Tensor:
    """In-place activation (the chain keeps one ``[tokens, d_ff]`` buffer, not two)."""
    if activation == "gelu":
        return torch.ops.aten.gelu_(h)
    if activation == "gelu_tanh":
        return torch.ops.aten.gelu_(h, approximate="tanh")
    if activation == "relu":
        return h.relu_()
    return F.silu(h, inplace=True)


def _expand(p: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None, out=None) -> torch.Tensor:
    if b is None:
        return torch.mm(p, v, out=out)
    return torch.addmm(b, p, v, out=out)


def _chain_rows(x2d, tensors, activation, gated, out) -> None:
    """The cuBLAS chain on ``x2d`` rows, written into ``out`` (kernel activation names)."""
    if gated:
        ug, vg, bg, uu, vu, bu, ud, vd, bd = tensors
        h = _act_(_expand(x2d @ ug, vg, bg), activation)
        h.mul_(_expand(x2d @ uu, vu, bu))
        _expand(h @ ud, vd, bd, out=out)
        return
    u1, v1, b1, u2, v2, b2 = tensors
    h = _act_(_expand(x2d @ u1, v1, b1), activation)
    _expand(h @ u2, v2, b2, out=out)


def _chain_forward(x2d, tensors, activation, gated, chunks: int = 1) -> torch.Tensor:
    """Plain (``chunks=1``) or token-chunked chain: transient = one chunk's ``d_ff`` activation."""
    T = x2d.shape[0]
    out = x2d.new_empty(T, tensors[-2].shape[1])
    step = max(1, -(-T // chunks))
    if 0 < T <= step:  # one chunk: the rows themselves (two slicing ops fewer on an eager hot path)
        _chain_rows(x2d, tensors, activation, gated, out)
        return out
    for s in range(0, T, step):
        _chain_rows(x2d[s : s + step], tensors, activation, gated, out[s : s + step])
    return out


def _run_candidate(name, x2d, tensors, activation, gated) -> torch.Tensor:
    if name == "fused":
        return _fused(x2d, tensors, activation, gated)
    return _chain_forward(x2d, tensors, activation, gated, ffn_policy.CHUNKS if name == "chunked" else 1)


def _policy_choice(x2d, tensors, activation, gated, policy) -> str:
    """The candidate ``policy`` picks for ``x2d``'s shape (timed on these inputs the first time)."""
    T, d_ff = x2d.shape[0], tensors[1].shape[1]
    ranks = tuple(t.shape[1] for t in tensors[0::3])
    key = (x2d.dtype, next_power_of_2(T), x2d.shape[1], d_ff, ranks, activation, gated)
    return ffn_policy.choose(
        key, policy, lambda name: _run_candidate(name, x2d, tensors, activation, gated), T, d_ff, x2d, gated
    )


def _policy_forward(x2d, tensors, activation, gated, policy) -> torch.Tensor:
    """Fused kernel, plain chain or chunked chain, whichever ``policy`` picks for this shape."""
    return _run_candidate(
        _policy_choice(x2d, tensors, activation, gated, policy), x2d, tensors, activation, gated
    )


def _reference_2d(x2d, tensors, activation, gated):
    if gated:
        return lowrank_gated_ffn_reference(x2d, GatedFFNFactors(*tensors), activation)
    return lowrank_ffn_reference(x2d, FFNFactors(*tensors), activation)


class _LowRankFFNFunction(torch.autograd.Function):
    """Triton forward; backward recomputes the reference ops under autograd (fine-tuning path)."""

    @staticmethod
    def forward(ctx, x2d, activation, gated, *tensors):
        ctx.activation = activation
        ctx.gated = gated
        ctx.save_for_backward(x2d, *tensors)
        kernel_activation = GATED_ACTIVATIONS[activation] if gated else activation
        return _triton_forward(x2d, tensors, kernel_activation, gated)

    @staticmethod
    def backward(ctx, grad_out):
        x2d, *tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad
        flags = [needs[0], *needs[3:]]
        with torch.enable_grad():
            inputs = [
                None if t is None else t.detach().requires_grad_(flag)
                for t, flag in zip([x2d, *tensors], flags)
            ]
            out = _reference_2d(inputs[0], tuple(inputs[1:]), ctx.activation, ctx.gated)
            wanted = [t for t, flag in zip(inputs, flags) if t is not None and flag]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        result = [next(grads) if t is not None and flag else None for t, flag in zip(inputs, flags)]
        return (result[0], None, None, *result[1:])


def _check_policy(policy: str) -> None:
    if policy not in ffn_policy.POLICIES:
        raise ValueError(f"unknown FFN policy {policy!r}: choose one of {', '.join(ffn_policy.POLICIES)}")


def _checked_factors(x, factors, activation: str, policy: str) -> tuple[bool, tuple]:
    """``(gated, factor tensors in field order)`` once ``x``, ``factors``, ``activation`` and ``policy``
    passed the checks of :func:`lowrank_ffn` / :func:`lowrank_gated_ffn`."""
    gated = isinstance(factors, GatedFFNFactors)
    (_check_gated if gated else _check_ffn)(x, factors, activation)
    _check_policy(policy)
    return gated, tuple(getattr(factors, f.name) for f in fields(factors))


def _dispatch(x, tensors, activation, gated, backend, policy="balanced"):
    _check_policy(policy)
    requested = backend
    backend = resolve_backend(backend, x, *tensors)
    if backend == "triton" and x.dtype not in _KERNEL_DTYPES:
        if requested == "triton":
            raise TypeError(f"backend='triton' supports float16, bfloat16 and float32, not {x.dtype}")
        backend = "torch"
    if backend == "torch":
        return _reference_2d(x, tensors, activation, gated)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    d_out = tensors[-2].shape[1]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))
    if needs_grad:
        out = _LowRankFFNFunction.apply(x2d, activation, gated, *tensors)
    else:
        kernel_activation = GATED_ACTIVATIONS[activation] if gated else activation
        if requested == "auto" and x2d.is_cuda:
            out = _policy_forward(x2d, tensors, kernel_activation, gated, policy)
        else:  # backend="triton": the fused kernel, as asked
            out = _fused(x2d, tensors, kernel_activation, gated)
    return out.reshape(*lead, d_out)


def lowrank_ffn(
    x: torch.Tensor,
    factors: FFNFactors,
    activation: str = "gelu",
    backend: str = "auto",
    policy: str = "balanced",
) -> torch.Tensor:
    """``act(x·u1·v1 + b1)·u2·v2 + b2`` for ``x [..., d_model]``; returns ``[..., d_out]``.

    ``activation``: ``gelu`` (erf), ``gelu_tanh``, ``relu`` or ``silu``.  ``backend``: ``"auto"``
    (on CUDA the fused kernel or the cuBLAS chain, per ``policy``; the reference elsewhere),
    ``"triton"`` (always the fused kernel) or ``"torch"``.  ``policy``: ``"balanced"``,
    ``"fastest"`` or ``"leanest"`` (:mod:`flashsvd.kernels.ffn_policy`).  fp16/bf16/fp32 inputs,
    fp32 accumulation in the kernel; differentiable w.r.t. ``x``, all factors and biases.
    """
    _check_ffn(x, factors, activation)
    f = factors
    return _dispatch(x, (f.u1, f.v1, f.b1, f.u2, f.v2, f.b2), activation, False, backend, policy)


def lowrank_gated_ffn(
    x: torch.Tensor,
    factors: GatedFFNFactors,
    activation: str = "swiglu",
    backend: str = "auto",
    policy: str = "balanced",
) -> torch.Tensor:
    """``(act(x·ug·vg + bg) * (x·uu·vu + bu))·ud·vd + bd`` for ``x [..., d_model]``.

    ``activation``: ``swiglu`` (SiLU gate) or ``geglu`` (erf-GELU gate).  Gate, up and down ranks are
    independent.  Same dtypes, backends, policies and autograd support as :func:`lowrank_ffn`.
    """
    _check_gated(x, factors, activation)
    f = factors
    tensors = (f.u_gate, f.v_gate, f.b_gate, f.u_up, f.v_up, f.b_up, f.u_down, f.v_down, f.b_down)
    return _dispatch(x, tensors, activation, True, backend, policy)


def prepare_ffn(
    x2d: torch.Tensor,
    factors: FFNFactors | GatedFFNFactors,
    activation: str,
    *,
    backend: str = "auto",
    policy: str = "balanced",
):
    """The inference path :func:`lowrank_ffn` (or :func:`lowrank_gated_ffn`) takes for ``[T, d]`` rows
    like ``x2d`` on the Triton backend, decided once: a function ``run(rows) -> [T, d_out]`` for rows
    of that shape, dtype and device (no checks per call; with ``backend="auto"`` the policy's choice for
    this shape, timed now if it is new).  Used by a runtime block's launch plan; raises what the
    public functions raise on bad arguments."""
    gated, tensors = _checked_factors(x2d, factors, activation, policy)
    act = GATED_ACTIVATIONS[activation] if gated else activation
    name = _policy_choice(x2d, tensors, act, gated, policy) if backend == "auto" and x2d.is_cuda else "fused"
    return lambda rows: _run_candidate(name, rows, tensors, act, gated)


def lowrank_ffn_add_norm_(
    x: torch.Tensor,
    factors: FFNFactors | GatedFFNFactors,
    activation: str,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str = "auto",
    policy: str = "balanced",
) -> torch.Tensor:
    """``x ← LayerNorm(ffn(x) + x)`` in place: a post-LN encoder's whole FFN sublayer (BERT's).

    Why: out of place the sublayer holds its input, the FFN's ``[tokens, d]`` output and the
    normalized result at once.  Here the FFN runs a token chunk at a time (``ffn_policy.CHUNKS``
    chunks when its chain activation exceeds ``SMALL_TRANSIENT_BYTES``; one under ``"fastest"``)
    and each chunk's output is normalized straight into its rows of ``x``: beside ``x`` only one
    chunk's temporaries exist.  Each chunk runs the fastest implementation (the fused kernel under
    ``"leanest"``), checked once for the whole call.  ``factors``: :class:`FFNFactors` or
    :class:`GatedFFNFactors` (gated ``activation``).  Inference only: ``x`` is overwritten, so it
    must be contiguous and outside any autograd graph.  Returns ``x``.
    """
    gated, tensors = _checked_factors(x, factors, activation, policy)
    norm._check(x, None, weight, bias)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *tensors, weight, bias)
    ):
        raise ValueError("lowrank_ffn_add_norm_ overwrites x: run it under torch.no_grad() (inference only)")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous: lowrank_ffn_add_norm_ overwrites it row by row")
    run_ffn = lowrank_gated_ffn if gated else lowrank_ffn
    if torch.compiler.is_compiling():  # traced: functional ops (the compiler plans the memory)
        f = run_ffn(x, factors, activation, backend=backend, policy=policy)
        return x.copy_(norm.add_layer_norm(f, x, weight, bias, eps, backend=backend))
    rows = x.view(-1, x.shape[-1])
    T, d_ff = rows.shape[0], tensors[1].shape[1]
    if T == 0:
        return x
    large = ffn_policy.chain_transient(T, d_ff, x.element_size(), gated) > ffn_policy.SMALL_TRANSIENT_BYTES
    step = -(-T // (ffn_policy.CHUNKS if policy != "fastest" and large else 1))
    chosen = resolve_backend(backend, x, *[t for t in tensors if t is not None])
    if chosen != "triton" or x.dtype not in _KERNEL_DTYPES:
        for start in range(0, T, step):
            part = rows[start : start + step]
            f = _reference_2d(part, tensors, activation, gated)
            norm.add_layer_norm(f, part, weight, bias, eps, backend="torch", out=part)
        return x
    kernel_activation = GATED_ACTIVATIONS[activation] if gated else activation
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if backend == "auto" and x.is_cuda:  # one choice for the chunk shape, made (or looked up) once
        per_chunk = "leanest" if policy == "leanest" else "fastest"
        first = rows[:step]
        name = _policy_choice(first, tensors, kernel_activation, gated, per_chunk)
    else:  # backend="triton": the fused kernel, as asked
        name = "fused"
    # The chain (also where "chunked" won: a chunk is already a chunk) writes into one reused buffer.
    buf = None if name == "fused" else x.new_empty(step, tensors[-2].shape[1])  # one chunk's output, reused
    for start in range(0, T, step):
        part = rows[start : start + step]
        if buf is None:
            f = _fused(part, tensors, kernel_activation, gated)
        else:
            f = buf[: part.shape[0]]
            _chain_rows(part, tensors, kernel_activation, gated, f)
        norm._launch(f, part, weight, bias, eps, False, part)
    return x
