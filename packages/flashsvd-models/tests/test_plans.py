"""Launch plans (``flashsvd.models.plans``): the inference hot path of the flash backend's blocks gives
the general path's outputs bit for bit, and steps aside when it must (a new parameter, a hook on a
module it skips, autograd).  On the CPU the kernels run through Triton's interpreter in a child
process (``plans_interpreted.py``); on a GPU the compiled launches run, eagerly and in a CUDA graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashsvd.models as fm
from flashsvd.models import plans

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled launches run (tests below)")
def test_plans_match_the_general_path_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = Path(__file__).with_name("plans_interpreted.py")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    # fastest: every call after the first (which compiles and tunes) takes the plan, same bits
    assert found["fastest"] == {"used": {"attention": 5, "ffn": 6}, "equal": [True, True, True]}
    # balanced: the attention plan marks its output, and the FFN then writes into it (not a plan)
    assert found["balanced"] == {"used": {"attention": 6, "ffn": 0}, "equal": [True, True, True]}
    assert found["new_bias"] == {"used": {"attention": 2, "ffn": 0}, "equal": True, "changed": True}
    # a hook on a dropout a plan would skip: that layer's attention takes the general path, the hook fires
    assert found["hooked_dropout"] == {"used": {"attention": 1, "ffn": 1}, "fired": 1}
    # a global hook sees every module call: no plan skips a dropout under it
    assert found["global_hook"] == {"used": {"attention": 0, "ffn": 0}, "dropouts_seen": True}
    assert found["grad"] == {"used": {"attention": 0, "ffn": 0}}
    distil = found["distilbert"]  # (its attention signature may already be tuned by BERT's calls)
    assert distil["used"]["attention"] >= 5 and distil["used"]["ffn"] == 6 and all(distil["equal"])
    # LLaMA decoding, HF generate() (a dynamic cache) and generate_greedy (a static one), 2 runs each of 6
    # new tokens: every RMSNorm and every decode step takes its plan, except a new length bucket's first
    # step (the general path tunes it) -- same tokens and logits as without plans
    llama = found["llama"]
    assert llama["generate"]["used"]["norm"] == llama["static"]["used"]["norm"] == 60
    assert llama["generate"]["used"]["decode"] >= 18 and llama["static"]["used"]["decode"] >= 18
    assert llama["generate"]["equal"] == llama["static"]["equal"] == [True, True]
    assert llama["plans_on_cache_layers"]  # a decode plan holds the cache's buffers: it lives there
    # a deep copy makes its own plans (the original's are bound to the original's tensors); plans are
    # kept beside the model, so pickling it never meets their launches and closures
    assert found["deepcopy"] == {"copy_equal": True, "differs": True}
    assert found["pickled"] is True


def test_no_plan_on_cpu_reference_kernels(tiny, make_inputs, monkeypatch):
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.6, backend="flash")
    block = model.bert.encoder.layer[0].attention.self
    x = torch.zeros(2, 4, model.config.hidden_size)
    with torch.no_grad():
        assert not plans.eligible(block, x)  # kernel_backend="auto" on CPU: the reference ops


def test_bert_layers_call_their_blocks_directly_unless_a_skipped_module_is_hooked(
    tiny, make_inputs, monkeypatch
):
    import copy

    from flashsvd.models import runtime

    model, _ = fm.compress(tiny("bert"), keep_ratio=0.6, backend="flash")
    layers = model.bert.encoder.layer
    assert all(
        type(m).__name__ == "BertLayer" and m.forward.__func__ is runtime._direct_forward for m in layers
    )
    ids, mask = make_inputs("bert")
    wrapper = type(layers[0].attention)  # BertAttention: called on HF's path only
    calls = []
    hf_forward = wrapper.forward
    monkeypatch.setattr(
        wrapper, "forward", lambda self, *a, **k: calls.append(1) or hf_forward(self, *a, **k)
    )

    def forward(m=model, **kw):
        with torch.no_grad():
            return m(input_ids=ids, attention_mask=mask, **kw)

    direct = forward().logits
    assert calls == []
    # HF's hidden-state capture hooks (matched by class) still see every layer
    states = forward(output_hidden_states=True).hidden_states
    assert len(states) == model.config.num_hidden_layers + 1
    seen = []
    hook = layers[0].attention.register_forward_hook(lambda *a: seen.append(1))
    hooked = forward().logits  # layer 0 runs HF's forward: the hook fires, the outputs agree
    hook.remove()
    assert seen == [1] and len(calls) == 1 and torch.equal(hooked, direct)
    model.train()  # training: HF's forward in every layer (dropout, gradient checkpointing)
    model(input_ids=ids, attention_mask=mask)
    model.eval()
    assert len(calls) == 1 + len(layers)
    twin = copy.deepcopy(model)  # the copy's layers call the copy's blocks
    assert all(m.forward.__self__ is m for m in twin.bert.encoder.layer)
    assert torch.equal(forward(twin).logits, direct)
    keys = set(model.state_dict())
    fm.set_backend(model, "torch")
    assert all("forward" not in m.__dict__ for m in layers) and set(model.state_dict()) == keys
    torch.testing.assert_close(forward().logits, direct, atol=1e-5, rtol=1e-5)


def _plan_counts(monkeypatch) -> dict:
    used = {"attention": 0, "ffn": 0, "decode": 0, "norm": 0}
    for name, attr in (("attention", "attention_forward"), ("ffn", "ffn_forward"), ("decode", "decode_forward"),
                       ("norm", "rms_norm_forward")):  # fmt: skip
        fn = getattr(plans, attr)

        def run(*args, fn=fn, name=name):
            out = fn(*args)
            used[name] += out is not None
            return out

        monkeypatch.setattr(plans, attr, run)
    return used


@gpu
@needs_cuda
@pytest.mark.parametrize("policy", ["fastest", "balanced"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_plans_match_the_general_path_on_cuda(tiny, make_inputs, monkeypatch, policy, dtype):
    model, _ = fm.compress(tiny("bert").cuda().to(dtype), keep_ratio=0.6, backend="flash")
    fm.set_backend(model, "flash", policy=policy)
    ids, mask = (t.cuda() for t in make_inputs("bert", seq=16))
    used = _plan_counts(monkeypatch)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask)[0]

    outs = [forward() for _ in range(4)]  # the first calls compile and tune; plans follow
    assert used["attention"] >= 2 and (policy == "balanced" or used["ffn"] >= 2)
    with monkeypatch.context() as m:
        m.setattr(plans, "eligible", lambda *a: False)
        ref = forward()
    assert all(torch.equal(o, ref) for o in outs)
    model.to(torch.bfloat16)  # new parameter storage: every plan is rebuilt for the new layout
    with monkeypatch.context() as m:
        m.setattr(plans, "eligible", lambda *a: False)
        ref = forward()
    assert all(torch.equal(forward(), ref) for _ in range(4))
    fwd = fm.GraphedForward(model, input_ids=ids, attention_mask=mask)  # plans inside a capture
    assert torch.equal(fwd(input_ids=ids, attention_mask=mask)[0], ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_plans_match_the_general_path_on_cuda(tiny, monkeypatch, dtype):
    from flashsvd.models.graphs import generate_greedy

    model, _ = fm.compress(tiny("llama").cuda().to(dtype), keep_ratio=0.6, backend="flash")
    fm.set_backend(model, "flash", policy="fastest")
    ids = torch.randint(1, 100, (3, 37), device="cuda")
    used = _plan_counts(monkeypatch)

    def hf():
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
        return torch.cat([out.sequences.float().flatten(), torch.stack(out.logits).float().flatten()])

    def static():
        return generate_greedy(model, ids, 12, graph=False)

    for fn in (hf, static):
        runs = [fn() for _ in range(3)]  # the first steps of a length bucket compile and tune
        with monkeypatch.context() as m:
            m.setattr(plans, "eligible", lambda *a: False)
            ref = fn()
        assert all(torch.equal(r, ref) for r in runs)
    assert used["decode"] >= 40 and used["norm"] >= 100
    graphed = generate_greedy(model, ids, 12)  # plans inside the captured decode step
    assert torch.equal(graphed, ref)


def test_a_layout_without_a_plan_is_tried_again_now_and_then():
    """Eight failed builds in a row leave a layout to the general path, but not for good: whatever made
    the build fail (a hook on a dropout it would skip, say) may be gone later."""
    block = torch.nn.Module()
    builds = []
    for _ in range(300):
        assert plans._run(block, ("layout",), lambda block, x: builds.append(x), 0) is None
    assert len(builds) == plans._TRIES + 1  # the 8 in a row, then once at the 256th skipped call


class _Plan:
    ok = True

    class held:  # what _run checks: the plan's modules and parameters
        @staticmethod
        def valid():
            return True

    def __call__(self, x):
        return x + 1


def test_a_built_plan_runs_and_resets_the_count():
    block = torch.nn.Module()
    assert plans._run(block, ("layout",), lambda block, x: None, 0) is None
    assert plans._run(block, ("layout",), lambda block, x: _Plan(), 1) == 2
    assert plans._run(block, ("layout",), lambda block, x: None, 5) == 6  # no rebuild while valid
    assert plans.plans_of(block)[1] == {}
