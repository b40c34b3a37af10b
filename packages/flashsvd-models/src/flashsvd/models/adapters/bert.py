"""BERT-style encoders (BERT, RoBERTa): ``encoder.layer[i].attention.self.{query,key,value}``,
``attention.output.dense`` (O), ``intermediate.dense`` (up) and ``output.dense`` (down).

The FFN spans two HF modules (``intermediate`` and ``output``); on the flash backend
``intermediate`` becomes one fused FFN call and ``output`` only adds dropout, residual and LayerNorm.
Both ``*Output`` modules run their residual add and LayerNorm as one kernel.
"""

from __future__ import annotations

from torch import nn

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.lowrank import LowRankLinear
from flashsvd.models.runtime import FlashAttention, FlashFFN, ResidualNormOutput, ffn_activation, swap_in

__all__ = ["BertAdapter"]


class BertAdapter(Adapter):
    model_types = ("bert", "roberta", "xlm-roberta", "camembert")

    def targets(self, model: nn.Module) -> list[Target]:
        base, pre = base_prefix(model)
        h = model.config.num_attention_heads
        out: list[Target] = []
        for i in range(len(base.encoder.layer)):
            p = f"{pre}encoder.layer.{i}"
            out += [
                Target(f"{p}.attention.self.query", f"{p}.attention.self.query", "q", i, h),
                Target(f"{p}.attention.self.key", f"{p}.attention.self.key", "k", i, h),
                Target(f"{p}.attention.self.value", f"{p}.attention.self.value", "v", i, h),
                Target(f"{p}.attention.output.dense", f"{p}.attention.output.dense", "o", i),
                Target(f"{p}.intermediate.dense", f"{p}.intermediate.dense", "up", i),
                Target(f"{p}.output.dense", f"{p}.output.dense", "down", i),
            ]
        return out

    def install_flash(self, model: nn.Module, backend: str = "auto") -> list[str]:
        base, pre = base_prefix(model)
        cfg = model.config
        notes: list[str] = []
        if cfg.is_decoder:
            return ["BERT used as a decoder: flash runtime not supported, everything runs on the torch path"]
        for i, layer in enumerate(base.encoder.layer):
            p = f"{pre}encoder.layer.{i}"
            sa = layer.attention.self
            if all(isinstance(getattr(sa, n), LowRankLinear) for n in ("query", "key", "value")):
                block = FlashAttention(sa, q="query", k="key", v="value", o=None,
                                       arg_names=("attention_mask",), scale=sa.scaling, backend=backend)  # fmt: skip
                swap_in(model, f"{p}.attention.self", block)
            else:
                notes.append(f"layer {i} attention: q/k/v not all low-rank, runs on the torch path")
            swap_in(
                model, f"{p}.attention.output", ResidualNormOutput(layer.attention.output, backend=backend)
            )
            up, down = layer.intermediate.dense, layer.output.dense
            act = ffn_activation(cfg.hidden_act)
            fused = bool(act) and isinstance(up, LowRankLinear) and isinstance(down, LowRankLinear)
            if fused:
                ffn = FlashFFN(
                    layer.intermediate, linears={"up": up, "down": down}, activation=act, backend=backend
                )
                swap_in(model, f"{p}.intermediate", ffn)
            else:
                notes.append(
                    f"layer {i} FFN: dense part or activation {cfg.hidden_act!r}, runs on the torch path"
                )
            # after the fused FFN, ``output.dense`` already ran inside its kernel
            swap_in(
                model, f"{p}.output", ResidualNormOutput(layer.output, project=not fused, backend=backend)
            )
        return notes
