"""Input validation shared by the low-rank attention ops (prefill and decode).

Why it exists: both ops take the same factor layout (see ``docs/architecture.md``: per-head
``v: [H, r, d_head]``, rank-space projections ``P = x·u`` viewed as ``[B, L, H, r]``), and a wrong
shape must fail with a message that says what to pass, not deep inside a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttnDims", "check_factors", "check_mask", "check_out", "check_positions", "check_rope"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttnDims:
    """Sizes of one attention call (``B`` batch, ``M`` queries, ``N`` keys, heads, ranks, head dim)."""

    B: int
    M: int
    N: int
    Hq: int
    Hkv: int
    rq: int
    rk: int
    rv: int
    D: int

    @property
    def group(self) -> int:
        return self.Hq // self.Hkv


def _need(t: torch.Tensor, name: str, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(t.shape)}")


_CHECKED: dict[tuple, AttnDims] = {}  # signatures that passed: a hot call re-checks nothing
_MAX_CHECKED = 4096


def check_factors(pq, pk, pv, vq, vk, vv, bq, bk, bv) -> AttnDims:
    """Check the projections/factors/biases; return the sizes.  Shapes are in the messages.

    A signature (shape, dtype, device of every argument) that passed once is remembered, so a model's
    repeated calls cost one tuple and one dict lookup instead of the full check (host time per call).
    """
    tensors = (pq, pk, pv, vq, vk, vv, bq, bk, bv)
    key = None
    if all(t is None or isinstance(t, torch.Tensor) for t in tensors) and not torch.compiler.is_compiling():
        key = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors)
        dims = _CHECKED.get(key)
        if dims is not None:
            return dims
    dims = _check_factors(*tensors)
    if key is not None and len(_CHECKED) < _MAX_CHECKED:
        _CHECKED[key] = dims
    return dims


def _check_factors(pq, pk, pv, vq, vk, vv, bq, bk, bv) -> AttnDims:
    _need(pq, "pq", 4, "[B, M, Hq, rq]")
    _need(pk, "pk", 4, "[B, N, Hkv, rk]")
    _need(pv, "pv", 4, "[B, N, Hkv, rv]")
    _need(vq, "vq", 3, "[Hq, rq, d_head]")
    _need(vk, "vk", 3, "[Hkv, rk, d_head]")
    _need(vv, "vv", 3, "[Hkv, rv, d_head]")
    B, M, Hq, rq = pq.shape
    _, N, Hkv, rk = pk.shape
    rv = pv.shape[3]
    D = vq.shape[2]
    if pk.shape[0] != B or pv.shape[0] != B:
        raise ValueError(f"batch sizes differ: pq {B}, pk {pk.shape[0]}, pv {pv.shape[0]}")
    if pv.shape[1] != N or pv.shape[2] != Hkv:
        raise ValueError(f"pk {tuple(pk.shape)} and pv {tuple(pv.shape)} must agree on [B, N, Hkv]")
    if min(B, M, N, Hq, Hkv, rq, rk, rv, D) == 0:
        raise ValueError("empty dimension in the attention inputs; every size must be positive")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for GQA")
    for name, v, h, r in (("vq", vq, Hq, rq), ("vk", vk, Hkv, rk), ("vv", vv, Hkv, rv)):
        if tuple(v.shape) != (h, r, D):
            raise ValueError(
                f"{name} must have shape [{h}, {r}, {D}] (heads, rank of its projection, d_head), "
                f"got {tuple(v.shape)}"
            )
    dtype = pq.dtype
    if dtype not in _FLOATS:
        raise TypeError(f"attention inputs must be float16/bfloat16/float32/float64, got {dtype}")
    named = dict(pk=pk, pv=pv, vq=vq, vk=vk, vv=vv, bq=bq, bk=bk, bv=bv)
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but pq has {dtype}; cast all inputs to one dtype")
        if t.device != pq.device:
            raise ValueError(f"{name} is on {t.device} but pq is on {pq.device}; move them to one device")
    for name, b, h in (("bq", bq, Hq), ("bk", bk, Hkv), ("bv", bv, Hkv)):
        if b is not None and tuple(b.shape) != (h, D):
            raise ValueError(f"{name} must have shape [{h}, {D}] or be None, got {tuple(b.shape)}")
    return AttnDims(B, M, N, Hq, Hkv, rq, rk, rv, D)


def check_mask(mask, B: int, N: int, device: torch.device, name: str = "key_padding_mask") -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor [B, N] (True = attend), got {getattr(mask, 'dtype', mask)}"
        )
    if tuple(mask.shape) != (B, N):
        raise ValueError(f"{name} must have shape [{B}, {N}] (batch, keys), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device}; move it to {device}")


def check_rope(rope, D: int, device: torch.device) -> None:
    if rope is None:
        return
    if not (isinstance(rope, (tuple, list)) and len(rope) == 2):
        raise TypeError(
            "rope must be a (cos, sin) pair of tables [P, d_head] (see flashsvd.kernels.rope_table)"
        )
    cos, sin = rope
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"rope {name} must be a float tensor [P, d_head]")
        if t.dim() != 2 or t.shape[1] != D:
            raise ValueError(
                f"rope {name} must have shape [P, {D}] (one row per position), got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"rope {name} is on {t.device}; move it to {device}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one shape")
    if D % 2:
        raise ValueError(f"RoPE needs an even d_head, got {D}")


def check_positions(pos, B: int, L: int, name: str, device: torch.device) -> torch.Tensor | None:
    """Positions may be ``[L]`` (shared by the batch) or ``[B, L]``; returns a ``[B, L]`` view."""
    if pos is None:
        return None
    if not isinstance(pos, torch.Tensor) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor [L] or [B, L]")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device}; move it to {device}")
    if pos.dim() == 1 and pos.shape[0] == L:
        return pos[None, :].expand(B, L)
    if pos.dim() == 2 and tuple(pos.shape) == (B, L):
        return pos
    raise ValueError(f"{name} must have shape [{L}] or [{B}, {L}], got {tuple(pos.shape)}")


def check_out(out, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """A caller-provided output buffer must match the result exactly (shape, dtype, device)."""
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != shape or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(
            f"out must be a {list(shape)} {like.dtype} tensor on {like.device}, "
            f"got {list(out.shape)} {out.dtype} on {out.device}"
        )
