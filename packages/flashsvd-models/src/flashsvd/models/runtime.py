"""Runtime blocks of the "flash" backend: attention and FFN modules that call ``flashsvd.kernels``.

Why replacement modules (peft-style) rather than patched classes: a runtime block *replaces* one HF
submodule (an attention or MLP module), keeps HF's forward signature and return convention, and
registers the very same children under the same names — so the state dict is identical on both
backends and switching is just putting the original module back (:func:`swap_in` / :func:`swap_out`).
The original HF module is remembered outside the module tree (``_flashsvd_original``).

On the "torch" backend no runtime block is installed: the HF modules run unchanged with their
linear layers replaced by :class:`~flashsvd.models.lowrank.LowRankLinear` (plain low-rank matmuls).
"""

from __future__ import annotations

import inspect
import itertools
import types
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from flashsvd.kernels.attention import lowrank_attention
from flashsvd.kernels.attention_decode import lowrank_attention_decode
from flashsvd.kernels.ffn import (
    FFNFactors,
    GatedFFNFactors,
    lowrank_ffn,
    lowrank_ffn_add_norm_,
    lowrank_gated_ffn,
)
from flashsvd.kernels.ffn_policy import SMALL_TRANSIENT_BYTES
from flashsvd.kernels.norm import add_layer_norm, rms_norm
from flashsvd.models import plans
from flashsvd.models.cache import past_tokens, rank_space_layer
from flashsvd.models.inplace import inference, mark_owned, may_overwrite, observed, post_norm
from flashsvd.models.lowrank import LowRankLinear

__all__ = [
    "AppliedOutput",
    "FlashAttention",
    "FlashBlock",
    "FlashEmbeddings",
    "FlashFFN",
    "RopeTables",
    "call_blocks_directly",
    "get_module",
    "key_valid_from_hf_mask",
    "set_module",
    "swap_in",
    "swap_out",
]

# Cached steps with at most this many new tokens (a generate() step, speculative drafts) run on the
# split-K decode kernel; longer chunks (prefill) run on the prefill kernel.
DECODE_MAX_NEW_TOKENS = 16

# HF activation names → kernel activation names.
FFN_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                   "silu": "silu", "swish": "silu", "gelu_python": "gelu"}  # fmt: skip


# ---- module tree helpers ---------------------------------------------------------------------------
def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent), name, module)


class FlashBlock(nn.Module):
    """Base of runtime blocks: registers the original's children under their names, remembers it."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_flashsvd_original", original)
        for name, child in original.named_children():
            self.add_module(name, child)
        self.train(original.training)

    @property
    def original(self) -> nn.Module:
        return self._flashsvd_original


def swap_in(root: nn.Module, path: str, block: FlashBlock) -> None:
    set_module(root, path, block)


def swap_out(root: nn.Module) -> int:
    """Put every runtime block's original HF module back (children re-attached); return how many."""
    for m in root.modules():  # layers that call their blocks directly (call_blocks_directly)
        if getattr(m.__dict__.get("forward"), "__func__", None) is _direct_forward:
            del m.__dict__["forward"]
    blocks = [(n, m) for n, m in root.named_modules() if isinstance(m, FlashBlock)]
    for path, block in blocks:
        original = block.original
        for name, child in block.named_children():
            setattr(original, name, child)
        for name, param in block.named_parameters(recurse=False):  # e.g. FlashRMSNorm's weight
            setattr(original, name, param)
        for name, buf in block.named_buffers(recurse=False):  # e.g. FlashEmbeddings' position ids
            setattr(original, name, buf)
        original.train(block.training)
        set_module(root, path, original)
    return len(blocks)


# ---- masks and RoPE ----------------------------------------------------------------------------------
class _LastMask:
    """The key mask derived from the last HF mask seen, reused while every layer gets the same one.

    Why: HF builds one mask per forward and hands the same tensor to every layer; converting it is
    ~6 small ops, a few hundred microseconds of host time per eager forward at ~25 µs an op.  The
    source is held weakly (a 4K-token decoder mask must not outlive its forward) and must be the very
    same object at the same version, so a freed mask whose id or memory is reused never matches;
    nothing is remembered inside a CUDA-graph capture or a ``torch.compile`` trace, where the
    conversion must be recorded in every layer.
    """

    entry: tuple | None = None  # (weakref to the HF mask, its _version, batch, n_keys, key mask)

    @staticmethod
    def _usable(mask: torch.Tensor) -> bool:
        # A capture must record the conversion (its replays see new mask values), also when an
        # eager warm-up call just remembered it for this very static mask.
        return not (mask.is_inference()  # inference tensors have no version counter
                    or (mask.is_cuda and torch.cuda.is_current_stream_capturing()))  # fmt: skip

    @classmethod
    def get(cls, mask: torch.Tensor, batch: int, n_keys: int) -> torch.Tensor | None:
        e = cls.entry
        if (
            e is not None
            and e[0]() is mask
            and e[1:4] == (mask._version, batch, n_keys)
            and cls._usable(mask)
        ):
            return e[4]
        return None

    @classmethod
    def put(cls, mask: torch.Tensor, batch: int, n_keys: int, keep: torch.Tensor) -> None:
        cls.entry = (weakref.ref(mask), mask._version, batch, n_keys, keep) if cls._usable(mask) else None


def key_valid_from_hf_mask(mask, batch: int, n_keys: int) -> torch.Tensor | None:
    """``[B, N]`` bool (True = real key) from whatever mask HF built, or ``None`` (no padding).

    HF passes ``None`` (sdpa, no padding), a 4-D bool mask (True = attend), a 4-D additive float mask
    (0 = attend) or a 2-D padding mask.  A key is real iff at least one query may attend it — true for
    causal, bidirectional and windowed masks alike (the structure itself is re-applied by the kernel).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"the flash backend cannot read a {type(mask).__name__} attention mask: load the model with "
            "attn_implementation='sdpa' or 'eager'"
        )
    compiling = torch.compiler.is_compiling()  # first: a trace must not touch the weakref memo
    known = None if compiling else _LastMask.get(mask, batch, n_keys)
    if known is not None:
        return known
    keep = mask if mask.dtype == torch.bool else (mask == 0) if mask.dim() == 4 else mask.to(torch.bool)
    if keep.dim() == 4:
        keep = keep.any(dim=-2).any(dim=1)
    # No "all keys real → None" shortcut: reading the answer back is a host sync (it stalls every
    # eager call and breaks CUDA-graph capture), while the kernels read the mask almost for free.
    keep = keep[:, -n_keys:].expand(batch, n_keys).contiguous()
    if not compiling:
        _LastMask.put(mask, batch, n_keys, keep)
    return keep


#: the keyword under which HF attention modules receive the KV cache, newest first: transformers 5.24
#: renamed ``past_key_values`` to ``cache``; a model calls its attention with exactly one of them.
CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")


def hf_cache(kwargs: dict):
    """The KV cache HF passed to an attention module, whichever keyword this transformers uses."""
    for name in CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


class RopeTables:
    """``(cos, sin)`` tables ``[P, d_head]`` built by the model's own rotary module (any RoPE type).

    One instance is shared by all attention blocks using the same rotary module (and ``layer_type``
    for ModernBERT); tables are cached and grown by doubling, except for dynamic RoPE types whose
    frequencies depend on the sequence length (rebuilt every call).  ``min_positions`` (the model's
    ``max_position_embeddings``) sizes the first table so that a model's positions never need a
    host-side ``positions.max()`` (a device sync) to size it.
    """

    def __init__(
        self,
        rotary: nn.Module,
        layer_type: str | None = None,
        dynamic: bool = False,
        min_positions: int = 256,
    ) -> None:
        self.rotary, self.layer_type, self.dynamic = rotary, layer_type, dynamic
        self.min_positions = int(min_positions)
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, n_positions: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self._table
        if not self.dynamic:
            n_positions = max(n_positions, self.min_positions)
        if (not self.dynamic and t is not None and t[0].shape[0] >= n_positions
                and t[0].device == like.device and t[0].dtype == like.dtype):  # fmt: skip
            return t
        size = n_positions if self.dynamic else 1 << (n_positions - 1).bit_length()
        pos = torch.arange(size, device=like.device)[None]
        args = (like, pos) if self.layer_type is None else (like, pos, self.layer_type)
        cos, sin = self.rotary(*args)
        self._table = (cos[0].contiguous(), sin[0].contiguous())
        return self._table


# ---- attention ---------------------------------------------------------------------------------------
class FlashAttention(FlashBlock):
    """Self-attention on rank-space projections via :func:`flashsvd.kernels.lowrank_attention`.

    Args:
        original: the HF attention module (its children are re-registered under the same names).
        q, k, v: paths (relative to ``original``) of the per-head :class:`LowRankLinear` projections.
        o: path of the output projection, the projection module itself when it lives outside this
            block (BERT's ``SelfOutput.dense``), or ``None`` to return the heads unprojected.
        post: paths of modules applied after ``o`` in order (e.g. dropout).
        residual: a post-LN encoder's ``*Output`` module (``dropout``, ``LayerNorm``): the block then
            returns ``LayerNorm(dropout(o(attn)) + hidden_states)`` itself, in place
            (:func:`~flashsvd.models.inplace.post_norm`).
        arg_names: names of HF's positional arguments after ``hidden_states``.
        causal: decoder self-attention; ``cache``: store rank-space K/V in HF's cache argument
            (``cache`` since transformers 5.24, ``past_key_values`` before: see :func:`hf_cache`).
        rope: tables provider or ``None``; ``scale``: softmax scale; ``layer_idx``: cache index.
        policy: ``"fastest"``, ``"balanced"`` or ``"leanest"`` (``set_backend``): the last two run a
            long cache-less call in head groups (see :meth:`head_groups`).
    """

    def __init__(
        self,
        original: nn.Module,
        *,
        q: str,
        k: str,
        v: str,
        o: str | nn.Module | None,
        post: Sequence[str] = (),
        arg_names: Sequence[str] = (),
        causal: bool = False,
        cache: bool = False,
        rope: RopeTables | None = None,
        scale: float | None = None,
        layer_idx: int | None = None,
        window: int | None = None,
        backend: str = "auto",
        residual: nn.Module | None = None,
        policy: str = "balanced",
    ) -> None:
        super().__init__(original)
        outside = isinstance(o, nn.Module)
        self._paths = {"q": q, "k": k, "v": v, "o": None if outside else o}
        # modules of a sibling HF module: used, not registered (the state dict keeps them where they are)
        object.__setattr__(self, "_o_module", o if outside else None)
        object.__setattr__(self, "_residual", residual)
        for name in ("q", "k", "v"):
            lin = get_module(self, self._paths[name])
            if not isinstance(lin, LowRankLinear) or not lin.per_head:
                raise TypeError(
                    f"{name} projection must be a per-head LowRankLinear, got {type(lin).__name__}"
                )
        self._post = tuple(post)
        self._arg_names = tuple(arg_names)
        self.causal, self.use_cache, self.rope, self.scale = causal, cache, rope, scale
        self.layer_idx, self.kernel_backend = layer_idx, backend
        self.window, self.policy = window, policy

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.window is not None and self._too_long_for_window(hidden_states, kwargs):
            # The kernels have no sliding-window mask: past the window, run HF's own attention.
            return self.original(hidden_states, *args, **kwargs)
        kwargs.update(zip(self._arg_names, args))
        B, M = hidden_states.shape[:2]
        if (
            self.rope is None
            and (not self.use_cache or hf_cache(kwargs) is None)
            and plans.eligible(self, hidden_states)
        ):
            key_valid = key_valid_from_hf_mask(kwargs.get("attention_mask"), B, M)
            out = plans.attention_forward(self, hidden_states, key_valid)  # the inference hot path
            if out is not None:
                return out, None
        if (
            self.use_cache
            and self.causal
            and M <= DECODE_MAX_NEW_TOKENS
            and kwargs.get("attention_mask") is None
            and (cache := hf_cache(kwargs)) is not None
            and plans.eligible(self, hidden_states)
        ):
            out = plans.decode_forward(self, hidden_states, kwargs.get("position_ids"), cache)
            if out is not None:  # the decoding hot path
                return out, None
        q, k, v = (get_module(self, self._paths[n]) for n in ("q", "k", "v"))
        positions = kwargs.get("position_ids")
        cache = hf_cache(kwargs) if self.use_cache else None
        if cache is not None or self.rope is not None:  # an encoder without RoPE needs no positions
            if positions is None:
                # a static cache's length is a device tensor: added, not read back, so a capture replays right
                start = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                positions = (torch.arange(M, device=hidden_states.device) + start)[None]
            positions = positions.to(torch.long).expand(B, M)
        key_positions = positions
        groups = self.head_groups(hidden_states, q, k, v) if cache is None else None
        decode, lengths, mask, N = False, None, kwargs.get("attention_mask"), M
        if groups is None:
            # One GEMM for the three rank-space projections (x·[u_q | u_k | u_v]).
            p = hidden_states @ self._fused_u(q, k, v)
            pq, pk, pv = p.split([q.u.shape[1], k.u.shape[1], v.u.shape[1]], dim=-1)
            del p
            pq = pq.unflatten(-1, (q.n_heads, q.rank))
            pk = pk.unflatten(-1, (k.n_heads, k.rank))
            pv = pv.unflatten(-1, (v.n_heads, v.rank))
            decode = self._use_decode_kernel(cache, M, pq)
            if cache is not None:
                layer = rank_space_layer(cache, self.layer_idx)
                pk, pv = layer.update(pk, pv, positions=positions)
                key_positions = layer.positions
                if layer.static and decode:
                    # Whole buffers, device lengths, fixed launch size: a captured step replays right.
                    store = layer.store
                    pk, pv, key_positions, lengths = store.pk, store.pv, store.positions, store.lengths
                elif layer.static and mask is not None:
                    mask = mask[..., : pk.shape[1]]  # HF's static mask spans the capacity
            N = pk.shape[1]
        key_valid = key_valid_from_hf_mask(mask, B, N)
        rope = None
        if self.rope is not None:
            # HF positions never exceed their cache slot (left padding only lowers them), so the key
            # count bounds them without reading positions back from the device.
            rope = self.rope(N, hidden_states)
        kw = dict(
            key_padding_mask=key_valid, scale=self.scale, backend=self.kernel_backend, rope=rope,
            positions=positions if rope is not None else None,
            key_positions=key_positions if rope is not None else None,
        )  # fmt: skip
        if groups is not None:
            out = self._attend_in_groups(hidden_states, groups, q, k, v, kw)
        elif decode:
            out = lowrank_attention_decode(pq, (pk, pv), q.v, k.v, v.v, q.head_bias(), k.head_bias(), v.head_bias(),
                                           lengths=lengths, **kw)  # fmt: skip
        else:
            out = lowrank_attention(pq, pk, pv, q.v, k.v, v.v, q.head_bias(), k.head_bias(), v.head_bias(),
                                    causal=self.causal, q_offset=N - M, **kw)  # fmt: skip
        if groups is None:
            del pq, pk, pv  # the rank-space projections are dead: the output projection may reuse them
        out = out.reshape(B, M, -1)
        o = self._o_module if self._paths["o"] is None else get_module(self, self._paths["o"])
        if o is not None:
            if isinstance(o, LowRankLinear) and not o.per_head and inference(out, o.u):
                t = o.project(out)
                del out  # the heads are dead once projected: never alive beside the result
                out = o.expand(t)
                del t
            else:
                out = o(out)
        for path in self._post:
            out = get_module(self, path)(out)
        if self._residual is not None:
            out = post_norm(out, hidden_states, self._residual, self.kernel_backend)
            mark_owned(out)
        return out, None

    def head_groups(self, x: torch.Tensor, q: LowRankLinear, k: LowRankLinear, v: LowRankLinear):
        """KV-head ranges ``[(start, stop), ...]`` to attend one at a time, or ``None`` (all at once).

        Why: all heads at once hold the rank-space projections ``[tokens, Hq·rq + Hkv·(rk + rv)]``
        beside the input and the output; at keep 0.75 they are wider than the hidden state (BERT-base:
        1,728 vs 768 columns), which makes attention the peak of a whole encoder layer.  Under the
        ``balanced`` and ``leanest`` policies, an inference call whose projections exceed
        ``SMALL_TRANSIENT_BYTES`` runs in the fewest groups (whole KV heads with their query heads)
        whose projections are no wider than the hidden state: a layer then holds at most three hidden
        states' worth, for three GEMMs and one kernel launch per group instead of one each.
        """
        if self.policy == "fastest" or torch.compiler.is_compiling() or not inference(x, q.u, k.u, v.u):
            return None  # (a compiled graph's memory is the compiler's to plan)
        hkv = k.n_heads
        width = (q.n_heads // hkv * q.rank + k.rank + v.rank) * hkv
        if x.numel() // x.shape[-1] * width * x.element_size() <= SMALL_TRANSIENT_BYTES:
            return None
        n = min(hkv, -(-width // x.shape[-1]))
        if n <= 1:
            return None
        bounds = [i * hkv // n for i in range(n + 1)]
        return list(itertools.pairwise(bounds))

    def _attend_in_groups(self, x, groups, q, k, v, kw) -> torch.Tensor:
        """Attention one KV-head group at a time, each writing its heads of one output buffer."""
        B, M = x.shape[:2]
        (uq, vq, rq, hq), (uk, vk, rk, hk), (uv, vv, rv, _) = (
            (t.u, t.v, t.rank, t.n_heads) for t in (q, k, v)
        )
        gq = hq // hk
        out = x.new_empty(B, M, hq, vq.shape[2])
        for k0, k1 in groups:
            h0, h1 = k0 * gq, k1 * gq
            pq = (x @ uq[:, h0 * rq : h1 * rq]).unflatten(-1, (h1 - h0, rq))
            pk = (x @ uk[:, k0 * rk : k1 * rk]).unflatten(-1, (k1 - k0, rk))
            pv = (x @ uv[:, k0 * rv : k1 * rv]).unflatten(-1, (k1 - k0, rv))
            lowrank_attention(
                pq, pk, pv, vq[h0:h1], vk[k0:k1], vv[k0:k1],
                q.head_bias(h0, h1), k.head_bias(k0, k1), v.head_bias(k0, k1),
                causal=self.causal, q_offset=0, out=out[:, :, h0:h1], **kw,
            )  # fmt: skip
            del pq, pk, pv  # before the next group's projections exist
        return out

    def _fused_u(self, q: LowRankLinear, k: LowRankLinear, v: LowRankLinear) -> torch.Tensor:
        """``[u_q | u_k | u_v]`` for one projection GEMM, without a second copy of the factors.

        Inference: the three ``u`` parameters become column views of one ``[d, Hq·rq + 2·Hkv·r]``
        storage (once; again if ``.to()`` or a load with ``assign=True`` split them), and the fused
        matrix is a view of it.  Training or tracing: a differentiable ``torch.cat``.
        """
        us = (q.u, k.u, v.u)
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(u.requires_grad for u in us)):
            return torch.cat(us, dim=1)
        fused = _shared_columns(us)
        if fused is None:
            with torch.no_grad():
                fused = torch.cat([u.detach() for u in us], dim=1)
                start = 0
                for lin in (q, k, v):
                    n = lin.u.shape[1]
                    lin.u.data = fused[:, start : start + n]
                    start += n
        return fused

    def _use_decode_kernel(self, cache, n_new: int, pq: torch.Tensor) -> bool:
        """A cached causal step of few tokens, without autograd (the decode kernel has no backward)."""
        needs_grad = torch.is_grad_enabled() and pq.requires_grad
        return cache is not None and self.causal and n_new <= DECODE_MAX_NEW_TOKENS and not needs_grad

    def _too_long_for_window(self, hidden_states: torch.Tensor, kwargs) -> bool:
        cache = hf_cache(kwargs) if self.use_cache else None
        past = past_tokens(cache, self.layer_idx) if cache is not None else 0
        if past + hidden_states.shape[1] <= self.window:
            return False
        if cache is not None:
            raise ValueError(
                f"sequence of {past + hidden_states.shape[1]} tokens exceeds the sliding window ({self.window}) of "
                f"layer {self.layer_idx}; the flash kernels have no windowed mask: use set_backend(model, 'torch')"
            )
        return True


def _shared_columns(us: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The ``[d, Σ cols]`` matrix whose consecutive column blocks are ``us``, if they are laid out so."""
    first = us[0].detach()
    width = sum(u.shape[1] for u in us)
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for u in us:
        if (u.untyped_storage().data_ptr() != ptr or u.stride() != (width, 1) or u.storage_offset() != offset
                or u.dtype != first.dtype or u.shape[0] != first.shape[0]):  # fmt: skip
            return None
        offset += u.shape[1]
    return first.as_strided((first.shape[0], width), (width, 1), first.storage_offset())


# ---- FFN ---------------------------------------------------------------------------------------------
class FlashFFN(FlashBlock):
    """Whole FFN (``up → act → down``, or gated) in one call: the fused kernel or the cuBLAS chain, per policy.

    Args:
        original: the HF module replaced (its children are re-registered).
        up / gate / down: paths of the :class:`LowRankLinear` layers, relative to ``owner`` (the module
            holding them, default ``original``; BERT keeps ``down`` in a sibling module).
        activation: kernel activation (``gelu``, ``gelu_tanh``, ``relu``, ``silu`` or, gated,
            ``swiglu``/``geglu``).
        post: paths (relative to this block) applied to the result (dropout).
        linears: ``{role: module}`` when the layers are not children of ``original``.
        policy: fused kernel vs cuBLAS chain per call shape (:mod:`flashsvd.kernels.ffn_policy`):
            ``"balanced"``, ``"fastest"`` or ``"leanest"``.
        residual: a post-LN encoder's ``*Output`` module: the block then returns
            ``LayerNorm(dropout(ffn(x)) + x)`` itself (:func:`~flashsvd.models.inplace.post_norm`).
        producer: the HF module whose output is this block's input (BERT's ``attention``).  Given,
            and under the ``balanced``/``leanest`` policies, the block writes its result into its
            input when :func:`~flashsvd.models.inplace.may_overwrite` allows.
    """

    def __init__(
        self,
        original: nn.Module,
        *,
        linears: Mapping[str, LowRankLinear],
        activation: str,
        post: Sequence[str] = (),
        backend: str = "auto",
        policy: str = "balanced",
        residual: nn.Module | None = None,
        producer: nn.Module | None = None,
    ) -> None:
        super().__init__(original)
        object.__setattr__(self, "_residual", residual)
        object.__setattr__(self, "_producer", producer)
        for role, lin in linears.items():
            if not isinstance(lin, LowRankLinear) or lin.per_head:
                raise TypeError(f"FFN {role} must be a LowRankLinear, got {type(lin).__name__}")
        object.__setattr__(self, "_linears", dict(linears))
        self.kernel_activation, self._post, self.kernel_backend = activation, tuple(post), backend
        self.policy = policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = self._residual
        lean = (
            res is not None
            and self.policy != "fastest"
            and self._producer is not None
            and not (self.training or self._post)
        )
        if lean and may_overwrite(x, self._producer, self):
            return self._into_input(x, res)
        if plans.eligible(self, x):
            out = plans.ffn_forward(self, x)  # the inference hot path
            if out is not None:
                return out
        out = self._ffn(x)
        if res is not None:
            out = post_norm(out, x, res, self.kernel_backend)
        return out

    def _factors(self) -> FFNFactors | GatedFFNFactors:
        li = self._linears
        d, u = li["down"], li["up"]
        if "gate" in li:
            g = li["gate"]
            return GatedFFNFactors(g.u, g.v, g.bias, u.u, u.v, u.bias, d.u, d.v, d.bias)
        return FFNFactors(u.u, u.v, u.bias, d.u, d.v, d.bias)

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        run = lowrank_gated_ffn if "gate" in self._linears else lowrank_ffn
        out = run(x, self._factors(), self.kernel_activation, backend=self.kernel_backend, policy=self.policy)
        for path in self._post:
            out = get_module(self, path)(out)
        return out

    def _into_input(self, x: torch.Tensor, res: nn.Module) -> torch.Tensor:
        """``x ← LayerNorm(ffn(x) + x)`` a token chunk at a time (:func:`flashsvd.kernels.lowrank_ffn_add_norm_`):
        the FFN's output never exists whole, so a layer holds its input, ``x`` and one chunk's temporaries."""
        ln = res.LayerNorm
        return lowrank_ffn_add_norm_(x, self._factors(), self.kernel_activation, ln.weight, ln.bias, ln.eps,
                                     backend=self.kernel_backend, policy=self.policy)  # fmt: skip


class ResidualNormOutput(FlashBlock):
    """BERT's ``*Output``: ``LayerNorm(dropout(dense(h)) + input)``, the add and LayerNorm in one kernel
    (:func:`post_norm`), where the block before it runs on the torch path.
    """

    def __init__(self, original: nn.Module, *, backend: str = "auto") -> None:
        super().__init__(original)
        self.kernel_backend = backend

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        out = post_norm(self.dense(hidden_states), input_tensor, self, self.kernel_backend)
        mark_owned(out)
        return out


class AppliedOutput(FlashBlock):
    """BERT's ``*Output`` after a runtime block that already applied it (``residual=``): returns the
    hidden states unchanged.  Its children stay registered here, so the state dict is the same.
    """

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return hidden_states


def _direct_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
    """A post-LN encoder layer's forward (BERT's) calling its attention and FFN runtime blocks directly
    (installed per instance by :func:`call_blocks_directly`)."""
    attention, ffn = self._modules["attention"], self._modules["intermediate"]
    block = attention._modules.get("self")
    if (
        self.training
        or encoder_hidden_states is not None
        or args
        or not isinstance(block, FlashAttention)
        or not isinstance(ffn, FlashFFN)
        or observed(attention, attention._modules["output"], self._modules["output"], subtrees=False)
    ):
        return type(self).forward(self, hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
    kwargs.pop("encoder_attention_mask", None)  # (no cross-attention here)
    out, _ = block(hidden_states, attention_mask=attention_mask, **kwargs)
    return ffn(out)


def call_blocks_directly(layer: nn.Module) -> None:
    """Make ``layer``, a post-LN encoder layer (BERT's ``attention.{self, output}``, ``intermediate``,
    ``output``) whose attention and FFN are runtime blocks applying their ``*Output`` modules, call the
    two blocks directly.

    Why: HF's layer reaches them through four more module calls (the attention wrapper and two
    pass-through ``*Output`` modules) behind ``deprecate_kwarg`` decorators, and through
    ``apply_chunking_to_forward``, which calls ``inspect.signature`` every time: about 100 µs of host
    time per layer on the H200's CPU, a third of a whole flash layer with launch plans
    (:mod:`flashsvd.models.plans`).  The layer stays HF's own object of HF's class (HF's hidden-state
    capture hooks, matched by class, and gradient checkpointing keep working); only its instance
    ``forward`` changes, and :func:`swap_out` removes it.  HF's forward runs in training, with
    cross-attention inputs, or while a module this path skips is hooked.
    """
    object.__setattr__(layer, "forward", types.MethodType(_direct_forward, layer))


class FlashEmbeddings(FlashBlock):
    """BERT's embeddings, ``LayerNorm(word + token_type + position)``, normalized into the word lookup.

    Why: HF adds the three lookups out of place and normalizes into a fourth buffer, four hidden
    states' worth at once: the activation peak of a whole compressed encoder forward once its layers
    are lean (they hold three).  Here the token-type and position rows are summed into one buffer and
    :func:`~flashsvd.kernels.add_layer_norm` writes the result over the word embeddings: two.
    ``inputs_embeds`` (the caller's tensor) and autograd take HF's own forward.  Registers the
    original's (non-persistent) id buffers under the same names, so ``.to()`` moves them.
    """

    _IDS = ("input_ids", "token_type_ids", "position_ids", "inputs_embeds")

    def __init__(self, original: nn.Module, *, backend: str = "auto") -> None:
        super().__init__(original)
        for name, buf in original.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=False)
        self._signature = inspect.signature(original.forward)
        self.kernel_backend = backend

    def forward(self, *args, **kwargs) -> torch.Tensor:
        a = self._signature.bind(*args, **kwargs).arguments
        ids, word, ln = a.get("input_ids"), self.word_embeddings, self.LayerNorm
        if ids is None or a.get("inputs_embeds") is not None or not inference(word.weight):
            for name, buf in self.named_buffers(recurse=False):  # .to() moved ours, not the original's
                setattr(self.original, name, buf)
            return self.original(*args, **kwargs)
        past = next((v for k, v in a.items() if k not in self._IDS), 0) or 0  # the cache length, any name
        B, S = ids.shape
        pos = a.get("position_ids")
        if pos is None:
            pos = self.position_ids[:, past : past + S]
        types = a.get("token_type_ids")
        if types is None:  # HF's buffered zeros, gathered as HF does
            types = torch.gather(self.token_type_ids.expand(pos.shape[0], -1), 1, pos).expand(B, S)
        rest = self.token_type_embeddings(types)
        rest += self.position_embeddings(pos)
        out = word(ids)
        out = add_layer_norm(out, rest, ln.weight, ln.bias, ln.eps, backend=self.kernel_backend, out=out)
        del rest
        return self.dropout(out)


class FlashRMSNorm(FlashBlock):
    """HF's RMSNorm (LLaMA, Mistral, Qwen2: ``weight · x / sqrt(mean(x²) + eps)``) as one kernel
    (:func:`flashsvd.kernels.rms_norm`) instead of HF's five; in a graphed decode step each kernel costs
    its launch latency.  Registers the original's ``weight`` under the same name (same state dict).
    """

    def __init__(self, original: nn.Module, *, backend: str = "auto") -> None:
        super().__init__(original)
        self.weight = original.weight
        self.eps = float(getattr(original, "variance_epsilon", getattr(original, "eps", 1e-6)))
        self.kernel_backend = backend

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if plans.eligible(self, hidden_states):
            out = plans.rms_norm_forward(self, hidden_states)  # the inference hot path
            if out is not None:
                return out
        return rms_norm(hidden_states, self.weight, self.eps, backend=self.kernel_backend)


def ffn_activation(name: object) -> str | None:
    """Kernel activation for an HF activation name, or ``None`` if the kernels lack it."""
    return FFN_ACTIVATIONS.get(name) if isinstance(name, str) else None


CallableAct = Callable[[torch.Tensor], torch.Tensor]
