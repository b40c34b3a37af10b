"""LLaMA family (LLaMA, Mistral, Qwen2): GQA, SwiGLU, RoPE, optional sliding windows.

Layout: ``model.layers[i].self_attn.{q,k,v,o}_proj`` (Q with ``num_attention_heads``, K/V with
``num_key_value_heads``), ``model.layers[i].mlp.{gate,up,down}_proj``, rotary tables from
``model.rotary_emb``.  ``lm_head`` and embeddings stay dense.  On the flash backend the RMSNorms
(each layer's two and the final one) run as one kernel each.
"""

from __future__ import annotations

from torch import nn

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.lowrank import LowRankLinear
from flashsvd.models.runtime import (
    FlashAttention,
    FlashFFN,
    FlashRMSNorm,
    RopeTables,
    ffn_activation,
    swap_in,
)

__all__ = ["LlamaAdapter"]

_GATED = {"silu": "swiglu", "gelu": "geglu"}


class LlamaAdapter(Adapter):
    model_types = ("llama", "mistral", "qwen2")
    decoder = True

    def targets(self, model: nn.Module) -> list[Target]:
        base, pre = base_prefix(model)
        cfg = model.config
        hq, hkv = (
            cfg.num_attention_heads,
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        )
        out: list[Target] = []
        for i in range(len(base.layers)):
            a, m = f"{pre}layers.{i}.self_attn", f"{pre}layers.{i}.mlp"
            out += [
                Target(f"{a}.q_proj", f"{a}.q_proj", "q", i, hq),
                Target(f"{a}.k_proj", f"{a}.k_proj", "k", i, hkv),
                Target(f"{a}.v_proj", f"{a}.v_proj", "v", i, hkv),
                Target(f"{a}.o_proj", f"{a}.o_proj", "o", i),
                Target(f"{m}.gate_proj", f"{m}.gate_proj", "gate", i),
                Target(f"{m}.up_proj", f"{m}.up_proj", "up", i),
                Target(f"{m}.down_proj", f"{m}.down_proj", "down", i),
            ]
        return out

    def _window(self, model: nn.Module, attn: nn.Module, i: int) -> int | None:
        cfg = model.config
        if cfg.model_type == "mistral":
            return getattr(cfg, "sliding_window", None)
        return getattr(attn, "sliding_window", None)

    def install_flash(self, model: nn.Module, backend: str = "auto") -> list[str]:
        base, pre = base_prefix(model)
        cfg = model.config
        rope_type = (getattr(cfg, "rope_parameters", None) or {}).get("rope_type", "default")
        rope = RopeTables(
            base.rotary_emb,
            dynamic="dynamic" in str(rope_type),
            min_positions=getattr(cfg, "max_position_embeddings", None) or 256,
        )
        notes: list[str] = []
        for i, layer in enumerate(base.layers):
            attn = layer.self_attn
            if all(isinstance(getattr(attn, n), LowRankLinear) for n in ("q_proj", "k_proj", "v_proj")):
                block = FlashAttention(
                    attn, q="q_proj", k="k_proj", v="v_proj", o="o_proj",
                    arg_names=("position_embeddings", "attention_mask", "past_key_values"),
                    causal=True, cache=True, rope=rope, scale=attn.scaling, layer_idx=attn.layer_idx,
                    window=self._window(model, attn, i), backend=backend,
                )  # fmt: skip
                swap_in(model, f"{pre}layers.{i}.self_attn", block)
            else:
                notes.append(f"layer {i} attention: q/k/v not all low-rank, runs on the torch path")
            mlp = layer.mlp
            act = _GATED.get(ffn_activation(cfg.hidden_act) or "")
            lin = {r: getattr(mlp, f"{r}_proj") for r in ("gate", "up", "down")}
            if act and all(isinstance(x, LowRankLinear) for x in lin.values()):
                swap_in(
                    model, f"{pre}layers.{i}.mlp", FlashFFN(mlp, linears=lin, activation=act, backend=backend)
                )
            else:
                notes.append(
                    f"layer {i} MLP: dense part or activation {cfg.hidden_act!r}, runs on the torch path"
                )
            for name in ("input_layernorm", "post_attention_layernorm"):
                _swap_rms_norm(model, f"{pre}layers.{i}.{name}", getattr(layer, name), backend)
        _swap_rms_norm(model, f"{pre}norm", base.norm, backend)
        return notes


def _swap_rms_norm(model: nn.Module, path: str, norm: nn.Module, backend: str) -> None:
    """HF's RMSNorm classes (``LlamaRMSNorm``, ``Qwen2RMSNorm``, …) only; anything else stays."""
    if type(norm).__name__.endswith("RMSNorm") and isinstance(getattr(norm, "weight", None), nn.Parameter):
        swap_in(model, path, FlashRMSNorm(norm, backend=backend))
