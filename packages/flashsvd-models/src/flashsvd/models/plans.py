"""Launch plans: a runtime block's inference forward with every decision made once per input layout.

Why: an eager forward pays host time for every kernel it launches, and on the H200's server CPU a
flash-backend BERT-base layer spent 996 µs of it (``fastest`` policy, B64 × 128 tokens) where HF's
dense layer spends 522 µs and the GPU needs about 270 µs: the compressed model was slower than the
dense one only because of Python (``benchmarks/models/profile_step.py --only host-layer``).  Most of
that time re-derived the same things on every call: argument checks, the fused ``u`` view, head
biases, the FFN policy's choice, ~70 kernel arguments and their launch signature, module calls of
dropouts that are identities in eval.

A plan is made for one input layout (shape, strides, dtype, device and 16-byte alignment of the
input and of the key mask, if any) and the block's settings (policy, activation, scale, causal), after the general path has run that layout (its kernels compiled, tuned
and its checks passed); it holds the block's parameters and :class:`~flashsvd.kernels._launch.Prepared`
launches, and a call is the GEMMs and launches alone.  It serves inference only: no autograd, eval
mode, CUDA (or ``kernel_backend="triton"`` under the interpreter), outside ``torch.compile`` and
Triton launch hooks.  Each call first checks that the modules and parameters are the very objects at
the very addresses the plan holds (so ``.to()``, a load with ``assign=True`` or a replaced module
rebuild it), and that the dropouts it skips are in eval mode without hooks.

Four plans: cache-less attention without RoPE (encoders), the FFN, RMSNorm, and a decoder's cached
step (:func:`decode_forward`: few new tokens over the rank-space KV cache, RoPE or none, no key mask;
it runs over the cache's whole buffers with device lengths, as a static cache's graphed step does,
and is kept for the cache layer, whose buffers it holds).  Plans are kept beside their block or cache
layer, never in it (:func:`plans_of`).  Eager LLaMA ``generate()`` went from 0.83–0.88× to 1.23–1.27×
dense tokens/s at B=1 with the last two (H200, ``profile_step.py --only llama-ab``).  Prefill with RoPE
and calls with a key mask take the general path.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch import nn

from flashsvd.kernels._launch import prepared_launches
from flashsvd.kernels._triton_compat import interpreter_enabled
from flashsvd.kernels.attention import prepare_attention
from flashsvd.kernels.attention_decode import decode_layout, prepare_decode
from flashsvd.kernels.ffn import prepare_ffn
from flashsvd.kernels.norm import prepare_add_norm
from flashsvd.models.cache import rank_space_layer
from flashsvd.models.inplace import mark_owned, observed
from flashsvd.models.lowrank import LowRankLinear

__all__ = ["attention_forward", "decode_forward", "eligible", "ffn_forward", "plans_of", "rms_norm_forward"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRIES = 8  # builds tried in a row per layout before the general path keeps it ...
_RETRY_EVERY = 256  # ... trying again once in this many calls


def eligible(block: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``block``'s call on ``x`` may take a plan (inference on the Triton path, see the module doc)."""
    if block.training or torch.is_grad_enabled() or block.kernel_backend == "torch":
        return False
    if not (x.is_cuda or (block.kernel_backend == "triton" and interpreter_enabled())):
        return False
    return not torch.compiler.is_compiling() and prepared_launches()


def _quiet(m: nn.Module) -> bool:
    """A dropout a plan may skip: eval mode and no hook (its own or a global one) to see it."""
    return isinstance(m, nn.Dropout) and not m.training and not observed(m, subtrees=False)


class _Held:
    """The modules and parameters a plan was made from, checked by identity and address per call."""

    def __init__(self) -> None:
        self.slots: list[tuple[dict, str, object]] = []  # (a module's _modules/_parameters, name, object)
        self.params: list[torch.Tensor] = []
        self.ptrs: list[int] = []
        self.dropouts: list[nn.Module] = []

    def module(self, root: nn.Module, path: str) -> nn.Module:
        """``root``'s submodule at ``path`` (``LookupError`` when missing: no plan)."""
        m = root
        for part in path.split(".") if path else ():
            nxt = m._modules.get(part)
            if nxt is None:
                raise LookupError(path)
            self.slots.append((m._modules, part, nxt))
            m = nxt
        return m

    def param(self, m: nn.Module, name: str) -> torch.Tensor | None:
        p = m._parameters.get(name)
        self.slots.append((m._parameters, name, p))
        if p is not None:
            self.params.append(p)
        return p

    def attr(self, obj: object, name: str) -> object:
        """``obj.name``, held: a plan made from it is stale once the attribute is another object."""
        value = obj.__dict__[name]
        self.slots.append((obj.__dict__, name, value))
        return value

    def linear(self, lin: LowRankLinear) -> None:
        for name in ("u", "v", "bias"):
            self.param(lin, name)

    def dropout(self, m: nn.Module) -> bool:
        self.dropouts.append(m)
        return _quiet(m)

    def seal(self) -> None:
        self.containers = [c for c, _, _ in self.slots]
        self.names = [n for _, n, _ in self.slots]
        self.objects = [o for _, _, o in self.slots]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.params))

    def valid(self) -> bool:
        # map() over C functions: a few microseconds for ~20 lookups and ~14 addresses per call
        return (
            all(map(operator.is_, map(dict.get, self.containers, self.names), self.objects))
            and list(map(torch.Tensor.data_ptr, self.params)) == self.ptrs
            and all(map(_quiet, self.dropouts))
        )


#: home (a block, or a decode plan's cache layer) -> (its plans by key, failed builds by key)
_HOMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plans_of(home: object) -> tuple[dict, dict]:
    """``(plans, failed builds)`` kept for ``home``, by key.  Beside it, not in its ``__dict__``: a copy
    of a block or cache (``copy.deepcopy``, pickling) must not carry plans whose launches and closures
    are bound to the original's tensors; it makes its own.  Entries go with their home."""
    state = _HOMES.get(home)
    if state is None:
        state = _HOMES[home] = ({}, {})
    return state


def _run(block: nn.Module, key: tuple, kind, *args, home: object = None) -> torch.Tensor | None:
    """The plan for ``key`` (``kind(block, *args)``, made when missing or stale) run on ``args``; None:
    take the general path.  Plans are kept for ``home`` (default ``block``): a decode plan holds its KV
    cache's buffers, so it is kept for the cache layer and goes with it."""
    plans, tries = plans_of(block if home is None else home)
    plan = plans.get(key)
    if plan is None or not plan.held.valid():
        n = tries.get(key, 0)
        if n >= _TRIES and n % _RETRY_EVERY:  # given up for now; tried again now and then (a hook may go)
            tries[key] = n + 1
            return None
        try:
            plan = kind(block, *args)
        except LookupError:  # a module the plan needs is not where the block expects it
            plan = None
        if plan is None or not plan.ok:
            tries[key] = n + 1
            return None
        tries.pop(key, None)
        if len(plans) >= 64:  # layouts vary (sequence lengths): keep the newest few
            plans.clear()
        plans[key] = plan
    return plan(*args)


def _residual_norm(held: _Held, res: nn.Module, x2d: torch.Tensor, width: int):
    """``h ← res.LayerNorm(h + x2d)`` for a post-LN encoder's ``*Output`` ``res`` as a prepared launch
    taking ``(h, x2d, h)`` (``h``: ``[rows, width]``), or None (its dropout cannot be skipped, its norm
    is not a LayerNorm, or the launch has not run yet)."""
    ln = held.module(res, "LayerNorm")
    if not held.dropout(held.module(res, "dropout")) or not isinstance(ln, nn.LayerNorm):
        return None
    w, b = held.param(ln, "weight"), held.param(ln, "bias")
    h = torch.empty(x2d.shape[0], width, dtype=x2d.dtype, device=x2d.device)
    return prepare_add_norm(h, x2d, w, b, ln.eps, h)


def _layout(x: torch.Tensor) -> tuple:
    return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15)


# ---- attention -------------------------------------------------------------------------------------
def _attention_parts(held: _Held, block, x: torch.Tensor):
    """``(q, k, v, o)`` of an attention block, held (``o`` may be None), or None when no plan can
    serve ``x``: an output projection other than one low-rank layer, a non-contiguous input, or a
    dropout after ``o`` that something could see."""
    q, k, v = (held.module(block, block._paths[name]) for name in ("q", "k", "v"))
    o = block._o_module if block._paths["o"] is None else held.module(block, block._paths["o"])
    if o is not None and not (isinstance(o, LowRankLinear) and not o.per_head):
        return None
    if not x.is_contiguous() or any(not held.dropout(held.module(block, p)) for p in block._post):
        return None
    for lin in (q, k, v) if o is None else (q, k, v, o):
        held.linear(lin)
    return q, k, v, o


def _rank_space(plan, block, q, k, v, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sets ``plan.fused`` (``[u_q | u_k | u_v]``) and ``plan.widths``; returns ``pq, pk, pv`` views
    ``[B, M, H, r]`` of one new projection buffer, laid out as ``x @ plan.fused`` split per call."""
    plan.fused = block._fused_u(q, k, v)
    plan.widths = [q.u.shape[1], k.u.shape[1], v.u.shape[1]]
    p = torch.empty(*x.shape[:2], plan.fused.shape[1], dtype=x.dtype, device=x.device)
    return tuple(
        t.unflatten(-1, (lin.n_heads, lin.rank)) for t, lin in zip(p.split(plan.widths, -1), (q, k, v))
    )


class _AttentionPlan:
    """``FlashAttention`` without cache or RoPE: one GEMM into rank space, the prepared attention
    launch, the low-rank output projection, then (post-LN encoders) the prepared residual LayerNorm."""

    def __init__(self, block, x: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        self.ok = False
        held = self.held = _Held()
        parts = _attention_parts(held, block, x)
        if parts is None or x.dtype not in _KERNEL_DTYPES:
            return
        q, k, v, o = parts
        if block.policy != "fastest" and block.head_groups(x, q, k, v) is not None:
            return  # head groups: the general path's memory-bounded loop
        B, M, d = x.shape
        pq, pk, pv = _rank_space(self, block, q, k, v, x)
        self.heads_width = q.n_heads * q.v.shape[2]
        heads = torch.empty(B * M, self.heads_width, dtype=x.dtype, device=x.device)
        biases = [lin.head_bias() for lin in (q, k, v)]
        self.attend = prepare_attention(
            pq, pk, pv, q.v, k.v, v.v, *biases, key_padding_mask=key_valid, causal=block.causal,
            q_offset=0, scale=block.scale, out=heads.view(B, M, q.n_heads, -1),
        )  # fmt: skip
        if self.attend is None:
            return
        self.o = None if o is None else (o.u, o.v, o.bias)
        self.shape = (B, M, d)
        self.norm = None
        if block._residual is not None:
            self.norm = _residual_norm(held, block._residual, x.view(-1, d), d)
            if self.norm is None:
                return
        held.seal()
        self.ok = True

    def __call__(self, x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor:
        p = x @ self.fused
        pq, pk, pv = p.split_with_sizes(self.widths, -1)
        B, M, d = self.shape
        out = x.new_empty(B * M, self.heads_width)
        self.attend(pq, pk, pv, None if key_valid is None else key_valid.view(torch.uint8), out)
        del p, pq, pk, pv
        if self.o is not None:
            u, v, bias = self.o
            t = out @ u
            del out  # the heads are dead once projected
            out = t @ v if bias is None else torch.addmm(bias, t, v)
            del t
        if self.norm is not None:
            self.norm(out, x.view(-1, d), out)
            out = out.view(B, M, d)
            mark_owned(out)
            return out
        return out.view(B, M, -1)


def attention_forward(block, x: torch.Tensor, key_valid: torch.Tensor | None) -> torch.Tensor | None:
    """``block``'s (a cache-less ``FlashAttention`` without RoPE) output on ``x`` through its plan,
    or None (take the general path)."""
    # the mask's alignment too: a caller's own bool mask may be an offset view (compiled kernels assume it)
    mask = None if key_valid is None else (key_valid.shape, key_valid.stride(), key_valid.data_ptr() & 15)
    key = (*_layout(x), mask, block.policy, block.causal, block.scale, block.kernel_backend)
    return _run(block, key, _AttentionPlan, x, key_valid)


# ---- FFN ---------------------------------------------------------------------------------------------
class _FFNPlan:
    """``FlashFFN`` out of place: the FFN as :func:`~flashsvd.kernels.ffn.prepare_ffn` decided it
    (the policy's choice made once), then the prepared residual LayerNorm of a post-LN encoder."""

    def __init__(self, block, x: torch.Tensor) -> None:
        self.ok = False
        held = self.held = _Held()
        if x.dtype not in _KERNEL_DTYPES or not x.is_contiguous():
            return
        if any(not held.dropout(held.module(block, p)) for p in block._post):
            return
        li = block._linears
        for role in ("gate", "up", "down"):
            if role in li:
                held.linear(li[role])
        d = x.shape[-1]
        x2d = x.view(-1, d)
        self.ffn = prepare_ffn(x2d, block._factors(), block.kernel_activation, backend=block.kernel_backend,
                               policy=block.policy)  # fmt: skip
        d_out = li["down"].out_features
        self.lead = x.shape[:-1]
        self.norm = None
        if block._residual is not None:
            self.norm = _residual_norm(held, block._residual, x2d, d_out)
            if self.norm is None:
                return
        held.seal()
        self.ok = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.view(-1, x.shape[-1])
        out = self.ffn(x2d)
        if self.norm is not None:
            self.norm(out, x2d, out)
        return out.view(*self.lead, -1)


def ffn_forward(block, x: torch.Tensor) -> torch.Tensor | None:
    """``block``'s (``FlashFFN``, out of place) output on ``x`` through its plan, or None."""
    key = (*_layout(x), block.policy, block.kernel_activation, block.kernel_backend)
    return _run(block, key, _FFNPlan, x)


# ---- decode ------------------------------------------------------------------------------------------
class _DecodePlan:
    """A cached causal step of ``FlashAttention`` (few new tokens, no key mask, RoPE or none): one GEMM
    into rank space, the cache layer's prepared append, the two prepared decode launches over the
    whole cache buffers (device lengths, as a static cache's graphed step runs), the low-rank output
    projection.  It holds the cache's buffers, so it is kept for the cache layer (:func:`plans_of`)."""

    def __init__(self, block, x: torch.Tensor, positions: torch.Tensor | None, layer, n: int) -> None:
        self.ok = False
        held = self.held = _Held()
        parts = _attention_parts(held, block, x)
        if parts is None or block._residual is not None or x.dtype not in _KERNEL_DTYPES:
            return
        q, k, v, o = parts
        store = held.attr(layer, "store")
        pk_all, pv_all, key_pos, lengths = (
            held.attr(store, name) for name in ("pk", "pv", "positions", "lengths")
        )
        rope = None
        if block.rope is not None:
            rope = block.rope(n, x)
            held.attr(block.rope, "_table")
        self.rows = n if rope is None else rope[0].shape[0]  # the largest key count the tables serve
        B, M = x.shape[:2]
        pq, pk, pv = _rank_space(self, block, q, k, v, x)
        pos = None if positions is None else positions.expand(B, M)
        self.write = layer.prepare_update(pk, pv, pos)
        self.heads = (B, M, q.n_heads, q.v.shape[2])
        heads = torch.empty(self.heads, dtype=x.dtype, device=x.device)
        biases = [lin.head_bias() for lin in (q, k, v)]
        self.attend = prepare_decode(
            pq, pk_all, pv_all, q.v, k.v, v.v, *biases, lengths=lengths, n_hint=n, rope=rope,
            positions=pos if rope is not None else None, key_positions=key_pos if rope is not None else None,
            scale=block.scale, out=heads,
        )  # fmt: skip
        if self.write is None or self.attend is None:
            return
        self.o = None if o is None else (o.u, o.v, o.bias)
        self.rope = rope is not None
        held.seal()
        self.ok = True

    def __call__(self, x: torch.Tensor, positions: torch.Tensor | None, layer, n: int) -> torch.Tensor | None:
        M = x.shape[1]
        if n > self.rows or not layer.has_room(M):
            return None  # the general path grows the tables or the cache (and this plan is then stale)
        p = x @ self.fused
        pq, pk, pv = p.split_with_sizes(self.widths, -1)
        self.write(pk, pv, positions)
        out = x.new_empty(self.heads)
        self.attend(pq, positions if self.rope else None, out)
        del p, pq, pk, pv
        B = x.shape[0]
        out = out.view(B * M, -1)
        if self.o is not None:
            u, v, bias = self.o
            t = out @ u
            del out
            out = t @ v if bias is None else torch.addmm(bias, t, v)
            del t
        return out.view(B, M, -1)


def decode_forward(block, x: torch.Tensor, positions: torch.Tensor | None, cache) -> torch.Tensor | None:
    """``block``'s (a causal ``FlashAttention`` with a KV cache) output for new tokens ``x`` without a
    key mask through its decode plan, or None (take the general path)."""
    rope = block.rope
    if rope is not None and (rope.dynamic or positions is None or positions.dtype != torch.long):
        return None  # (dynamic RoPE tables change every call)
    layer = rank_space_layer(cache, block.layer_idx)
    store = layer.store
    if store is None or not layer.has_room(x.shape[1]):
        return None  # the first (prefill) call creates the store; the general path grows it
    n = store.max_len if layer.static else store.max_length + x.shape[1]
    pos = None if positions is None else _layout(positions)
    key = (id(block), *_layout(x), pos, store.max_len, layer.static, decode_layout(store.pk, n), block.scale,
           block.kernel_backend)  # fmt: skip
    return _run(block, key, _DecodePlan, x, positions, layer, n, home=layer)


# ---- RMSNorm -----------------------------------------------------------------------------------------
class _NormPlan:
    """``FlashRMSNorm``: the prepared norm launch into a fresh output."""

    def __init__(self, block, x: torch.Tensor) -> None:
        self.ok = False
        held = self.held = _Held()
        if x.dtype not in _KERNEL_DTYPES or not x.is_contiguous() or x.numel() == 0:
            return
        weight = held.param(block, "weight")
        if weight is not None and (weight.dtype != x.dtype or not weight.is_contiguous()):
            return
        x2d = x.view(-1, x.shape[-1])
        self.norm = prepare_add_norm(x2d, None, weight, None, block.eps, torch.empty_like(x2d), rms=True)
        if self.norm is None:
            return
        held.seal()
        self.ok = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        self.norm(x.view(-1, x.shape[-1]), None, y)
        return y


def rms_norm_forward(block, x: torch.Tensor) -> torch.Tensor | None:
    """``block``'s (``FlashRMSNorm``) output on ``x`` through its plan, or None."""
    return _run(block, (*_layout(x), block.eps, block.kernel_backend), _NormPlan, x)
