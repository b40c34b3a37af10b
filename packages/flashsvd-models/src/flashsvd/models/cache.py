"""Rank-space KV cache plugged into Hugging Face's ``Cache`` objects.

Why a cache *layer* and not a new ``Cache``: ``generate()`` and the HF model forwards create a
``DynamicCache`` (or, asked, a ``StaticCache``) themselves and pass it to every attention module.  On
the flash backend our attention swaps that cache's per-layer storage for a
:class:`RankSpaceCacheLayer` the first time it sees it, so the same HF object (sequence length,
masks, cropping, beam reordering) keeps working while it stores ``pk = x·u_k`` and ``pv = x·u_v``
(``[B, N, Hkv, r]``) instead of full-width K and V, plus the integer RoPE position of every cached
key (RoPE is applied on the fly by the kernel, after rebuilding K from its factors).

The storage is the kernels' preallocated :class:`flashsvd.kernels.RankSpaceKVCache` (one cache class):

* in a ``DynamicCache`` it starts small and doubles when full (amortized, no ``torch.cat`` per step);
* in a ``StaticCache`` it is allocated once at the cache's ``max_cache_len`` and never moves: a decode
  step writes at device-side lengths and reads with a fixed launch size, so it can be captured in a
  CUDA graph and replayed (:func:`flashsvd.models.graphs.capture_decode_step`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from flashsvd.kernels.kv_cache import RankSpaceKVCache

__all__ = ["RankSpaceCacheLayer", "past_tokens", "rank_space_layer"]

_FIRST_CAPACITY = 256


class RankSpaceCacheLayer(DynamicLayer):
    """HF cache layer whose ``keys``/``values`` are rank-space projections ``[B, N, H, r]``.

    ``max_cache_len``: fixed capacity (static, graph-safe) or ``None`` (grows by doubling).
    ``positions`` (``[B, N]`` int64) are the RoPE positions of the cached keys.  The sequence axis
    is dim 1 (HF's dense layers use dim -2), so every method that slices it is overridden.

    Sequence length, two ways: :meth:`past_tokens` is the host-side count (our own code sizes launches
    and checks windows with it); :meth:`get_seq_length` is what HF reads, and for a static layer it is a
    0-d device tensor advanced in place, as HF's own ``StaticLayer`` does.  HF builds the causal mask's
    query offset from it, and only while a CUDA graph is being captured (eagerly a one-token step
    needs no mask).  A host int there is frozen into the graph: every replay after the first then
    masked out the newest key (H200, 2026-11-30: graphed decoding left eager at the 2nd replay).
    """

    is_compileable = False

    def __init__(self, max_cache_len: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_cache_len = max_cache_len
        self.store: RankSpaceKVCache | None = None
        self.cumulative_length: torch.Tensor | None = None  # static layers: tokens written, on the device

    @property
    def static(self) -> bool:
        return self.max_cache_len is not None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, T, H, rk = key_states.shape
        cap = self.max_cache_len or max(_FIRST_CAPACITY, 1 << (T - 1).bit_length())
        self.dtype, self.device = key_states.dtype, key_states.device
        self.store = RankSpaceKVCache(B, cap, H, rk, value_states.shape[-1], dtype=key_states.dtype,
                                      device=key_states.device)  # fmt: skip
        if self.static:
            self.cumulative_length = torch.zeros((), dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    # HF's DynamicLayer keeps plain attributes; ours are views of the preallocated store.
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.store is None else self.store.pk[:, : self.store.max_length]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.__init__/reset assign None
        if value is not None:
            raise AttributeError("RankSpaceCacheLayer.keys is a view of its store; use update()")

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.store is None else self.store.pv[:, : self.store.max_length]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("RankSpaceCacheLayer.values is a view of its store; use update()")

    @property
    def positions(self) -> torch.Tensor | None:
        return None if self.store is None else self.store.positions[:, : self.store.max_length]

    def update(self, key_states, value_states, *args, positions: torch.Tensor | None = None, **kwargs):
        """Append ``[B, T, H, r]`` projections (and their ``[B, T]`` positions); return everything cached."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store, T = self.store, key_states.shape[1]
        if store.max_length + T > store.max_len:
            if self.static:
                raise ValueError(
                    f"static cache full: {store.max_length} + {T} tokens > max_cache_len {store.max_len}; "
                    "allocate the StaticCache with a larger max_cache_len"
                )
            store.grow(max(2 * store.max_len, store.max_length + T))
        if positions is not None:
            positions = positions.to(torch.long).expand(key_states.shape[0], T)
        store.append(key_states, value_states, positions=positions)
        if self.cumulative_length is not None:
            self.cumulative_length.add_(T)
        return self.keys, self.values

    def has_room(self, T: int) -> bool:
        """Whether ``T`` more tokens fit without growing (or, static, overflowing) the store."""
        return self.store is not None and self.store.max_length + T <= self.store.max_len

    def prepare_update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, positions: torch.Tensor | None
    ):
        """:meth:`update`'s write of tokens laid out like these (``positions``: int64 ``[B, T]`` or
        ``None``) as one call ``(key_states, value_states, positions)``: the store's prepared append
        launch and the counts, without checks (the projections may come flat, ``[B, T, H·r]``); the
        caller checks :meth:`has_room` first.  For a
        decoder block's launch plan; ``None`` before the store exists."""
        store, static = self.store, self.cumulative_length
        if store is None:
            return None
        T, k_heads, v_heads = key_states.shape[1], key_states.shape[2:], value_states.shape[2:]
        write = store.prepare_append(key_states, value_states, positions)

        def run(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> None:
            if write is None:  # off CUDA: the store's own append (tensor ops), on ``[B, T, H, r]`` views
                store.append(k.unflatten(-1, k_heads), v.unflatten(-1, v_heads), positions=pos)
            else:
                write(k, v, pos)
                store.advance(T)
            if static is not None:
                static.add_(T)

        return run

    def past_tokens(self) -> int:
        """Cache slots written so far, counted on the host (a launch-size bound; never a device sync)."""
        return 0 if self.store is None else self.store.max_length

    def get_seq_length(self) -> int | torch.Tensor:
        """HF's sequence length: a 0-d device tensor for a static layer (graph-safe), else an int."""
        if self.cumulative_length is not None:
            return self.cumulative_length
        return self.past_tokens()

    def get_mask_sizes(self, query, *args) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of HF's mask: the capacity when static, else past + new tokens."""
        if self.static:
            return self.max_cache_len, 0
        q = int(query.shape[0]) if isinstance(query, torch.Tensor) else int(query)
        return self.past_tokens() + q, 0

    def get_max_length(self) -> int:
        return self.max_cache_len if self.static else -1

    get_max_cache_shape = get_max_length

    def reset(self) -> None:
        if self.store is not None:
            self.store.reset()
        if self.cumulative_length is not None:
            self.cumulative_length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0 or self.store is None:
            return
        self.store.truncate(self.store.max_length + tokens_to_remove)
        if self.cumulative_length is not None:
            self.cumulative_length.fill_(self.store.max_length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.store is not None:
            self.store.select_rows(torch.arange(self.store.batch).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.store is not None:
            self.store.select_rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def offload(self) -> None:  # the store stays where it is (no CPU offloading of rank-space caches)
        return None

    prefetch = offload

    @property
    def nbytes(self) -> int:
        """Bytes held by the rank-space keys and values (the whole preallocated buffers)."""
        if self.store is None:
            return 0
        return self.store.pk.nbytes + self.store.pv.nbytes


def _attention_layers(cache: Cache) -> list | None:
    """The per-layer list of ``cache``'s self-attention part (an encoder-decoder cache holds two caches)."""
    return getattr(getattr(cache, "self_attention_cache", cache), "layers", None)


def rank_space_layer(cache: Cache, layer_idx: int) -> RankSpaceCacheLayer:
    """The rank-space layer ``layer_idx`` of ``cache``, installing one in place of an empty HF layer.

    An empty dynamic layer becomes a growing rank-space layer; a ``StaticCache`` layer becomes a
    static one of the same capacity.  Raises ``ValueError`` if the layer already holds dense keys (a
    cache filled by the torch backend cannot be continued on the flash backend: start a new cache).
    """
    layers = _attention_layers(cache)
    if layers is None:
        raise TypeError(
            f"unsupported cache type {type(cache).__name__}: pass a transformers DynamicCache, StaticCache or None"
        )
    while len(layers) <= layer_idx:
        layers.append(RankSpaceCacheLayer())
    layer = layers[layer_idx]
    if isinstance(layer, RankSpaceCacheLayer):
        return layer
    capacity = getattr(layer, "max_cache_len", None)
    empty = not getattr(layer, "is_initialized", False)
    if type(layer) is DynamicLayer and not empty:
        empty = layer.get_seq_length() == 0
    if getattr(layer, "is_sliding", False) or not empty:
        raise ValueError(
            f"cache layer {layer_idx} is a {type(layer).__name__} holding dense keys; the flash backend stores "
            "rank-space keys: use a fresh DynamicCache or StaticCache (or none) after switching backends"
        )
    layers[layer_idx] = RankSpaceCacheLayer(capacity)
    return layers[layer_idx]


def past_tokens(cache: Cache, layer_idx: int) -> int:
    """Tokens already cached in layer ``layer_idx``, as a host int (0 for a layer not created yet).

    Our attention reads this rather than ``get_seq_length``, which is a device tensor for static
    layers (ours and HF's): turning that into an int would be a device sync, and inside a CUDA-graph
    capture an error.
    """
    layers = _attention_layers(cache)
    if layers is not None and layer_idx < len(layers) and isinstance(layers[layer_idx], RankSpaceCacheLayer):
        return layers[layer_idx].past_tokens()
    return int(cache.get_seq_length(layer_idx))
