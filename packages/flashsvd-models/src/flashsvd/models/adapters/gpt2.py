"""GPT-2: ``transformer.h[i].attn.c_attn`` (fused q|k|v, ``Conv1D`` layout ``[in, out]``),
``attn.c_proj`` (O), ``mlp.c_fc`` (up), ``mlp.c_proj`` (down).

``c_attn`` is split into per-head q/k/v parts (``c_attn.parts.{q,k,v}``); ``Conv1D`` weights are read
transposed into the ``[out, in]`` convention and written back as ``Conv1D`` by ``merge_to_dense``.
"""

from __future__ import annotations

from torch import nn

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.lowrank import FusedLinear, LowRankLinear
from flashsvd.models.runtime import FlashAttention, FlashFFN, ffn_activation, swap_in

__all__ = ["GPT2Adapter"]


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    decoder = True

    def targets(self, model: nn.Module) -> list[Target]:
        base, pre = base_prefix(model)
        cfg = model.config
        d, h = cfg.n_embd, cfg.n_head
        out: list[Target] = []
        for i in range(len(base.h)):
            a, m = f"{pre}h.{i}.attn", f"{pre}h.{i}.mlp"
            out += [
                Target(f"{a}.c_attn.parts.{n}", f"{a}.c_attn", n, i, h, n, (j * d, (j + 1) * d))
                for j, n in enumerate("qkv")
            ]
            out += [
                Target(f"{a}.c_proj", f"{a}.c_proj", "o", i),
                Target(f"{m}.c_fc", f"{m}.c_fc", "up", i),
                Target(f"{m}.c_proj", f"{m}.c_proj", "down", i),
            ]
        return out

    def install_flash(self, model: nn.Module, backend: str = "auto") -> list[str]:
        base, pre = base_prefix(model)
        cfg = model.config
        notes: list[str] = []
        for i, block in enumerate(base.h):
            p = f"{pre}h.{i}"
            at = block.attn
            parts = dict(at.c_attn.parts) if isinstance(at.c_attn, FusedLinear) else {}
            if cfg.reorder_and_upcast_attn and cfg._attn_implementation == "eager":
                notes.append(f"layer {i}: reorder_and_upcast_attn, attention runs on the torch path")
            elif all(isinstance(parts.get(n), LowRankLinear) for n in "qkv"):
                fa = FlashAttention(
                    at, q="c_attn.parts.q", k="c_attn.parts.k", v="c_attn.parts.v", o="c_proj",
                    post=("resid_dropout",), arg_names=("past_key_values", "attention_mask"),
                    causal=True, cache=True, scale=at.scaling, layer_idx=at.layer_idx, backend=backend,
                )  # fmt: skip
                swap_in(model, f"{p}.attn", fa)
            else:
                notes.append(f"layer {i} attention: q/k/v not all low-rank, runs on the torch path")
            mlp = block.mlp
            act = ffn_activation(cfg.activation_function)
            lin = {"up": mlp.c_fc, "down": mlp.c_proj}
            if act and all(isinstance(x, LowRankLinear) for x in lin.values()):
                swap_in(
                    model,
                    f"{p}.mlp",
                    FlashFFN(mlp, linears=lin, activation=act, post=("dropout",), backend=backend),
                )
            else:
                notes.append(
                    f"layer {i} MLP: dense part or activation {cfg.activation_function!r}, torch path"
                )
        return notes
