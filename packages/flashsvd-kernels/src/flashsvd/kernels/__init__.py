"""flashsvd.kernels — see docs/architecture.md for what this package owns."""

from flashsvd.kernels.__about__ import __version__
from flashsvd.kernels.attention import lowrank_attention, lowrank_attention_reference
from flashsvd.kernels.attention_decode import lowrank_attention_decode, lowrank_attention_decode_reference
from flashsvd.kernels.ffn import (
    FFNFactors,
    GatedFFNFactors,
    lowrank_ffn,
    lowrank_ffn_add_norm_,
    lowrank_ffn_reference,
    lowrank_gated_ffn,
    lowrank_gated_ffn_reference,
)
from flashsvd.kernels.kv_cache import RankSpaceKVCache
from flashsvd.kernels.norm import add_layer_norm, add_layer_norm_reference, rms_norm, rms_norm_reference
from flashsvd.kernels.rope import apply_rope, rope_cos_sin, rope_table

__all__ = [
    "__version__",
    "RankSpaceKVCache",
    "add_layer_norm",
    "add_layer_norm_reference",
    "rms_norm",
    "rms_norm_reference",
    "apply_rope",
    "lowrank_attention",
    "lowrank_attention_decode",
    "lowrank_attention_decode_reference",
    "lowrank_attention_reference",
    "rope_cos_sin",
    "rope_table",
    "FFNFactors",
    "GatedFFNFactors",
    "lowrank_ffn",
    "lowrank_ffn_add_norm_",
    "lowrank_ffn_reference",
    "lowrank_gated_ffn",
    "lowrank_gated_ffn_reference",
]
