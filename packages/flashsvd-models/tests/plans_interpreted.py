"""Run by ``test_plans.py`` in a process with ``TRITON_INTERPRET=1`` (Triton decides interpreting at
import): a flash BERT on the CPU through the kernels' interpreter, with and without launch plans.
Prints one JSON object of findings."""

from __future__ import annotations

import copy
import json
import pickle

import torch
import transformers as T
from torch import nn

import flashsvd.models as fm
from flashsvd.models import plans


def count_plan_use(used: dict, **functions: str) -> None:
    """Wrap ``plans.<function>`` for each ``key=function``: ``used[key]`` counts the calls a plan served."""
    for key, name in functions.items():
        wrapped = getattr(plans, name)

        def run(*args, fn=wrapped, key=key):
            out = fn(*args)
            used[key] += out is not None
            return out

        setattr(plans, name, run)


def main() -> None:
    torch.manual_seed(0)
    cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       vocab_size=100)  # fmt: skip
    model, _ = fm.compress(T.BertModel(cfg).eval(), keep_ratio=0.75, calibration=None)
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    used = {"attention": 0, "ffn": 0}
    count_plan_use(used, attention="attention_forward", ffn="ffn_forward")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).last_hidden_state

    def general() -> torch.Tensor:
        eligible, plans.eligible = plans.eligible, lambda *a: False
        try:
            return forward()
        finally:
            plans.eligible = eligible

    found: dict = {}
    for policy in ("fastest", "balanced"):
        fm.set_backend(model, "flash", kernel_backend="triton", policy=policy)
        outs = [forward() for _ in range(3)]
        found[policy] = {"used": dict(used), "equal": [torch.equal(o, general()) for o in outs]}
        used.update(attention=0, ffn=0)

    twin = copy.deepcopy(model)  # after its original ran plans under "balanced" and "fastest"
    twin.encoder.layer[0].intermediate.dense.v.data.mul_(1.5)  # in place: same objects and addresses
    with torch.no_grad():
        mine = twin(input_ids=ids, attention_mask=mask).last_hidden_state
    eligible, plans.eligible = plans.eligible, lambda *a: False
    with torch.no_grad():
        ref = twin(input_ids=ids, attention_mask=mask).last_hidden_state
    plans.eligible = eligible
    found["deepcopy"] = {"copy_equal": torch.equal(mine, ref), "differs": not torch.equal(mine, forward())}
    try:  # plans are kept beside the model: pickling it (torch.save of a whole module) never meets them
        found["pickled"] = len(pickle.dumps(model)) > 0
    except Exception as exc:
        found["pickled"] = repr(exc)[:200]
    used.update(attention=0, ffn=0)

    layer = model.encoder.layer[0]
    query = layer.attention.self.query
    query.bias = nn.Parameter(query.bias.detach() + 1.0)  # a new parameter object: the plan rebuilds
    after = forward()
    found["new_bias"] = {"used": dict(used), "equal": torch.equal(after, general()),
                         "changed": not torch.equal(after, outs[-1])}  # fmt: skip
    used.update(attention=0, ffn=0)

    fired = []
    hook = layer.attention.output.dropout.register_forward_hook(lambda *a: fired.append(1))
    forward()
    hook.remove()
    found["hooked_dropout"] = {"used": dict(used), "fired": len(fired)}
    used.update(attention=0, ffn=0)

    dropouts = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, *a: dropouts.append(1) if isinstance(m, nn.Dropout) else None
    )
    forward()
    hook.remove()
    found["global_hook"] = {"used": dict(used), "dropouts_seen": len(dropouts) > 0}
    used.update(attention=0, ffn=0)

    with torch.enable_grad():
        model(input_ids=ids, attention_mask=mask)
    found["grad"] = {"used": dict(used)}
    used.update(attention=0, ffn=0)

    # DistilBERT: the output projection inside the attention block, a dropout after the FFN
    cfg = T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=100)
    model, _ = fm.compress(T.DistilBertModel(cfg).eval(), keep_ratio=0.75, calibration=None)
    fm.set_backend(model, "flash", kernel_backend="triton", policy="fastest")
    outs = [forward() for _ in range(3)]
    found["distilbert"] = {"used": dict(used), "equal": [torch.equal(o, general()) for o in outs]}
    found["llama"] = llama_decode()
    print(json.dumps(found))


def llama_decode() -> dict:
    """A flash LLaMA decoding through HF's ``generate()`` (a dynamic cache) and ``generate_greedy``
    (a static one): decode steps and RMSNorms take their plans and give the general path's tokens
    and logits bit for bit."""
    from flashsvd.models.graphs import generate_greedy

    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=96, vocab_size=100, max_position_embeddings=64)  # fmt: skip
    model, _ = fm.compress(T.LlamaForCausalLM(cfg).eval(), keep_ratio=0.75, calibration=None)
    fm.set_backend(model, "flash", kernel_backend="triton", policy="fastest")
    ids = torch.randint(0, 100, (2, 5))
    used = {"decode": 0, "norm": 0}
    count_plan_use(used, decode="decode_forward", norm="rms_norm_forward")

    def hf() -> tuple:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        return out.sequences, torch.stack(out.logits)

    def static() -> torch.Tensor:
        return generate_greedy(model, ids, 6, graph=False)

    def general(fn):
        eligible, plans.eligible = plans.eligible, lambda *a: False
        try:
            return fn()
        finally:
            plans.eligible = eligible

    found = {}
    for name, fn in (("generate", hf), ("static", static)):
        runs = [fn() for _ in range(2)]
        ref = general(fn)
        equal = [all(map(torch.equal, r, ref)) if isinstance(r, tuple) else torch.equal(r, ref) for r in runs]
        found[name] = {"used": dict(used), "equal": equal}
        used.update(decode=0, norm=0)
    block = model.model.layers[0].self_attn
    found["plans_on_cache_layers"] = not any(
        isinstance(p, plans._DecodePlan) for p in plans.plans_of(block)[0].values()
    )
    return found


if __name__ == "__main__":
    main()
