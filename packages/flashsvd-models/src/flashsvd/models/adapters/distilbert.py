"""DistilBERT: ``transformer.layer[i].attention.{q,k,v,out}_lin`` and ``ffn.lin1``/``ffn.lin2``."""

from __future__ import annotations

from torch import nn

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.lowrank import LowRankLinear
from flashsvd.models.runtime import FlashAttention, FlashFFN, ffn_activation, swap_in

__all__ = ["DistilBertAdapter"]


class DistilBertAdapter(Adapter):
    model_types = ("distilbert",)

    def num_layers(self, model: nn.Module) -> int:
        return int(model.config.n_layers)

    def targets(self, model: nn.Module) -> list[Target]:
        base, pre = base_prefix(model)
        h = model.config.n_heads
        out: list[Target] = []
        for i in range(len(base.transformer.layer)):
            a, f = f"{pre}transformer.layer.{i}.attention", f"{pre}transformer.layer.{i}.ffn"
            out += [
                Target(f"{a}.q_lin", f"{a}.q_lin", "q", i, h),
                Target(f"{a}.k_lin", f"{a}.k_lin", "k", i, h),
                Target(f"{a}.v_lin", f"{a}.v_lin", "v", i, h),
                Target(f"{a}.out_lin", f"{a}.out_lin", "o", i),
                Target(f"{f}.lin1", f"{f}.lin1", "up", i),
                Target(f"{f}.lin2", f"{f}.lin2", "down", i),
            ]
        return out

    def install_flash(self, model: nn.Module, backend: str = "auto") -> list[str]:
        base, pre = base_prefix(model)
        notes: list[str] = []
        for i, layer in enumerate(base.transformer.layer):
            p = f"{pre}transformer.layer.{i}"
            at = layer.attention
            if all(isinstance(getattr(at, n), LowRankLinear) for n in ("q_lin", "k_lin", "v_lin")):
                block = FlashAttention(at, q="q_lin", k="k_lin", v="v_lin", o="out_lin",
                                       arg_names=("attention_mask",), scale=at.scaling, backend=backend)  # fmt: skip
                swap_in(model, f"{p}.attention", block)
            else:
                notes.append(f"layer {i} attention: q/k/v not all low-rank, runs on the torch path")
            ffn = layer.ffn
            act = ffn_activation(model.config.activation)
            lin = {"up": ffn.lin1, "down": ffn.lin2}
            if act and all(isinstance(x, LowRankLinear) for x in lin.values()):
                swap_in(
                    model,
                    f"{p}.ffn",
                    FlashFFN(ffn, linears=lin, activation=act, post=("dropout",), backend=backend),
                )
            else:
                notes.append(f"layer {i} FFN: dense part or activation, runs on the torch path")
        return notes
