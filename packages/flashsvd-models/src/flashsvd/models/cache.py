"""Rank-space KV cache plugged into Hugging Face's ``Cache`` objects.

Why a cache *layer* and not a new ``Cache``: ``generate()`` and the HF model forwards create a
``DynamicCache`` themselves and pass it to every attention module.  On the flash backend our
attention swaps that cache's per-layer storage for a :class:`RankSpaceCacheLayer` the first time it
sees it, so the same ``DynamicCache`` object (sequence length, masks, cropping, beam reordering)
keeps working while it stores ``pk = x·u_k`` and ``pv = x·u_v`` (``[B, N, Hkv, r]``) instead of
full-width K and V, plus the integer RoPE position of every cached key (RoPE is applied on the fly
by the kernel, after rebuilding K from its factors).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

__all__ = ["RankSpaceCacheLayer", "rank_space_layer"]


class RankSpaceCacheLayer(DynamicLayer):
    """``DynamicLayer`` whose ``keys``/``values`` are rank-space projections ``[B, N, H, r]``.

    ``positions`` (``[B, N]`` int64) are the RoPE positions of the cached keys.  The sequence axis is
    dim 1 (HF's dense layers use dim -2), so every method that slices it is overridden.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((key_states.shape[0], 0, *key_states.shape[2:]))
        self.values = value_states.new_zeros((value_states.shape[0], 0, *value_states.shape[2:]))
        self.positions = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, positions: torch.Tensor | None = None, **kwargs):
        """Append ``[B, T, H, r]`` projections (and their ``[B, T]`` positions); return everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if positions is None:
            start = self.keys.shape[1]
            positions = torch.arange(start, start + key_states.shape[1], device=key_states.device)
        positions = positions.to(torch.long).expand(key_states.shape[0], key_states.shape[1])
        self.keys = torch.cat([self.keys, key_states], dim=1)
        self.values = torch.cat([self.values, value_states], dim=1)
        self.positions = torch.cat([self.positions, positions], dim=1)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        return int(self.keys.shape[1])

    def reset(self) -> None:
        self.positions = None
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = self.keys.shape[1] + tokens_to_remove
        self.keys, self.values = self.keys[:, :keep], self.values[:, :keep]
        self.positions = self.positions[:, :keep]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() > 0:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            self.batch_select_indices(beam_idx.to(self.keys.device))

    @property
    def nbytes(self) -> int:
        """Bytes held by the rank-space keys and values."""
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes


def rank_space_layer(cache: Cache, layer_idx: int) -> RankSpaceCacheLayer:
    """The rank-space layer ``layer_idx`` of ``cache``, installing one in place of an empty dense layer.

    Raises ``ValueError`` if that layer already holds dense keys (a cache filled by the torch backend
    cannot be continued on the flash backend: start a new cache after ``set_backend``).
    """
    self_cache = getattr(cache, "self_attention_cache", cache)
    layers = getattr(self_cache, "layers", None)
    if layers is None:
        raise TypeError(
            f"unsupported cache type {type(cache).__name__}: pass a transformers DynamicCache or None"
        )
    while len(layers) <= layer_idx:
        layers.append(RankSpaceCacheLayer())
    layer = layers[layer_idx]
    if isinstance(layer, RankSpaceCacheLayer):
        return layer
    if type(layer) is not DynamicLayer or layer.get_seq_length() > 0:
        raise ValueError(
            f"cache layer {layer_idx} is a {type(layer).__name__} holding dense keys; the flash backend stores "
            "rank-space keys: use a fresh DynamicCache (or none) after switching backends"
        )
    layers[layer_idx] = RankSpaceCacheLayer()
    return layers[layer_idx]
