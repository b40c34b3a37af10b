"""BERT-style encoders (BERT, RoBERTa): ``encoder.layer[i].attention.self.{query,key,value}``,
``attention.output.dense`` (O), ``intermediate.dense`` (up) and ``output.dense`` (down).

On the flash backend the attention block (``attention.self``) also runs ``attention.output``'s
projection, dropout, residual add and LayerNorm, and ``intermediate`` runs the whole FFN and
``output``'s dropout, residual and LayerNorm: both ``*Output`` modules become pass-throughs
(:class:`~flashsvd.models.runtime.AppliedOutput`).  Each block owns its temporaries, so it can
normalize in place and free the attention heads as soon as they are projected: a layer holds at
most three hidden states' worth of activations.  Where a block stays on the torch path, its
``*Output`` still runs the add and LayerNorm as one kernel.  BERT's embeddings (not RoBERTa's, whose
position ids differ) sum and normalize in place too (:class:`~flashsvd.models.runtime.FlashEmbeddings`).
A layer whose attention and FFN are both runtime blocks calls them directly, without HF's per-layer
wrappers (:func:`~flashsvd.models.runtime.call_blocks_directly`).
"""

from __future__ import annotations

from torch import nn

from flashsvd.models.adapters.base import Adapter, Target, base_prefix
from flashsvd.models.lowrank import LowRankLinear
from flashsvd.models.runtime import (
    AppliedOutput,
    FlashAttention,
    FlashEmbeddings,
    FlashFFN,
    ResidualNormOutput,
    call_blocks_directly,
    ffn_activation,
    swap_in,
)

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
        if cfg.model_type == "bert" and getattr(cfg, "position_embedding_type", "absolute") == "absolute":
            swap_in(model, f"{pre}embeddings", FlashEmbeddings(base.embeddings, backend=backend))
        for i, layer in enumerate(base.encoder.layer):
            p = f"{pre}encoder.layer.{i}"
            sa, so = layer.attention.self, layer.attention.output
            if all(isinstance(getattr(sa, n), LowRankLinear) for n in ("query", "key", "value")):
                block = FlashAttention(sa, q="query", k="key", v="value", o=so.dense, residual=so,
                                       arg_names=("attention_mask",), scale=sa.scaling, backend=backend)  # fmt: skip
                swap_in(model, f"{p}.attention.self", block)
                swap_in(model, f"{p}.attention.output", AppliedOutput(so))
            else:
                notes.append(f"layer {i} attention: q/k/v not all low-rank, runs on the torch path")
                swap_in(model, f"{p}.attention.output", ResidualNormOutput(so, backend=backend))
            up, down = layer.intermediate.dense, layer.output.dense
            act = ffn_activation(cfg.hidden_act)
            if act and isinstance(up, LowRankLinear) and isinstance(down, LowRankLinear):
                ffn = FlashFFN(layer.intermediate, linears={"up": up, "down": down}, activation=act,
                               backend=backend, residual=layer.output, producer=layer.attention)  # fmt: skip
                swap_in(model, f"{p}.intermediate", ffn)
                swap_in(model, f"{p}.output", AppliedOutput(layer.output))
            else:
                notes.append(
                    f"layer {i} FFN: dense part or activation {cfg.hidden_act!r}, runs on the torch path"
                )
                swap_in(model, f"{p}.output", ResidualNormOutput(layer.output, backend=backend))
            if (isinstance(layer.attention.self, FlashAttention) and isinstance(layer.intermediate, FlashFFN)
                    and not getattr(layer, "chunk_size_feed_forward", 0)):  # fmt: skip
                call_blocks_directly(layer)
        return notes
