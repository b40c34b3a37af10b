"""ModernBERT: fused ``attn.Wqkv`` (q|k|v), ``attn.Wo``, GEGLU MLP with fused ``mlp.Wi``
(input|gate halves) and ``mlp.Wo``; RoPE with separate tables for global and local layers;
alternating global / sliding-window (local) attention.

Local layers run on the flash kernels while the sequence fits in the window (then the window
masks nothing); longer inputs fall back to HF's attention for those layers (the kernels have no
windowed mask).
"""

from __future__ import annotations

from torch import nn

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.lowrank import FusedLinear, LowRankLinear
from flashsvd.models.runtime import FlashAttention, FlashFFN, RopeTables, ffn_activation, swap_in

__all__ = ["ModernBertAdapter"]

_GATED = {"gelu": "geglu", "silu": "swiglu"}


class ModernBertAdapter(Adapter):
    model_types = ("modernbert",)

    def targets(self, model: nn.Module) -> list[Target]:
        base, pre = base_prefix(model)
        cfg = model.config
        d, h, ff = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size
        out: list[Target] = []
        for i in range(len(base.layers)):
            a, m = f"{pre}layers.{i}.attn", f"{pre}layers.{i}.mlp"
            out += [
                Target(f"{a}.Wqkv.parts.{n}", f"{a}.Wqkv", n, i, h, n, (j * d, (j + 1) * d))
                for j, n in enumerate("qkv")
            ]
            out += [
                Target(f"{a}.Wo", f"{a}.Wo", "o", i),
                Target(f"{m}.Wi.parts.input", f"{m}.Wi", "gate", i, None, "input", (0, ff)),
                Target(f"{m}.Wi.parts.gate", f"{m}.Wi", "up", i, None, "gate", (ff, 2 * ff)),
                Target(f"{m}.Wo", f"{m}.Wo", "down", i),
            ]
        return out

    def install_flash(self, model: nn.Module, backend: str = "auto") -> list[str]:
        base, pre = base_prefix(model)
        cfg = model.config
        n_pos = getattr(cfg, "max_position_embeddings", None) or 256
        ropes = {
            t: RopeTables(base.rotary_emb, layer_type=t, min_positions=n_pos) for t in set(cfg.layer_types)
        }
        notes: list[str] = []
        for i, layer in enumerate(base.layers):
            p = f"{pre}layers.{i}"
            at = layer.attn
            parts = dict(at.Wqkv.parts) if isinstance(at.Wqkv, FusedLinear) else {}
            kind = cfg.layer_types[i]
            if all(isinstance(parts.get(n), LowRankLinear) for n in "qkv"):
                window = cfg.sliding_window if kind == "sliding_attention" else None
                fa = FlashAttention(
                    at, q="Wqkv.parts.q", k="Wqkv.parts.k", v="Wqkv.parts.v", o="Wo", post=("out_drop",),
                    arg_names=("position_embeddings", "attention_mask"), rope=ropes[kind],
                    scale=at.head_dim**-0.5, window=window, backend=backend,
                )  # fmt: skip
                swap_in(model, f"{p}.attn", fa)
            else:
                notes.append(f"layer {i} attention: q/k/v not all low-rank, runs on the torch path")
            mlp = layer.mlp
            wi = dict(mlp.Wi.parts) if isinstance(mlp.Wi, FusedLinear) else {}
            act = _GATED.get(ffn_activation(cfg.hidden_activation) or "")
            lin = {"gate": wi.get("input"), "up": wi.get("gate"), "down": mlp.Wo}
            if act and cfg.mlp_dropout == 0 and all(isinstance(x, LowRankLinear) for x in lin.values()):
                swap_in(model, f"{p}.mlp", FlashFFN(mlp, linears=lin, activation=act, backend=backend))
            else:
                notes.append(f"layer {i} MLP: dense part, dropout or activation, runs on the torch path")
        return notes
