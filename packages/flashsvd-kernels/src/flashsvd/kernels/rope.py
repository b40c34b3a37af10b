"""Rotary position embedding tables and the reference rotation, in Hugging Face's convention.

Why a module of its own: the attention kernels rotate Q and K tiles on chip, and every caller
(reference, tests, model adapters) must build the *same* tables.  We follow ``transformers``'
``LlamaRotaryEmbedding`` + ``rotate_half``: ``inv_freq[j] = base^(-2j/d)``, the table row for position
``p`` is ``cat(p·inv_freq, p·inv_freq)`` and ``x_rot = x·cos + rotate_half(x)·sin`` with
``rotate_half(x) = cat(-x[d/2:], x[:d/2])``.

The kernels take *tables* ``cos, sin: [P, d_head]`` (row ``p`` = position ``p``) plus integer positions,
so left padding and cache offsets are expressed by positions, not by re-slicing tables.  They read only
the first ``d_head/2`` columns (HF tables repeat them), and so does the attention reference.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "rope_cos_sin", "rope_table", "rotate_half"]


def rope_cos_sin(
    positions: torch.Tensor, d_head: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of shape ``positions.shape + (d_head,)`` (HF ``LlamaRotaryEmbedding`` values).

    Angles are computed in float32 like ``transformers`` does, then cast to ``dtype``.
    """
    if d_head <= 0 or d_head % 2:
        raise ValueError(f"RoPE needs an even, positive d_head; got {d_head}")
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    device = positions.device
    inv_freq = 1.0 / (base ** (torch.arange(0, d_head, 2, dtype=torch.int64, device=device).float() / d_head))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_table(
    max_positions: int,
    d_head: int,
    base: float = 10000.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables ``cos, sin: [max_positions, d_head]`` for positions ``0 .. max_positions-1``."""
    if max_positions <= 0:
        raise ValueError(f"max_positions must be positive, got {max_positions}")
    return rope_cos_sin(torch.arange(max_positions, device=device), d_head, base, dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF ``rotate_half``: ``cat(-x2, x1)`` over the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x·cos + rotate_half(x)·sin`` (cos/sin broadcast against ``x``)."""
    return x * cos + rotate_half(x) * sin
