"""The flash backend's lean paths (``policy="balanced"``/``"leanest"``): same outputs, fewer live bytes.

``LiveBytes`` adds up the bytes of every storage an operator creates during a forward, until that
storage dies: what a CUDA allocator's peak would count above the weights, measured on the CPU.  On
the CPU the kernels run their PyTorch references, which allocate what the Triton kernels never do;
:func:`kernels_as_on_gpu` runs them unobserved and allocates only what a kernel allocates: its
output, none when given ``out=``.  A threshold of 0 bytes (``SMALL_TRANSIENT_BYTES``) makes the
tiny models take the paths that large calls take: attention in head groups, the FFN written into
its input chunk by chunk.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

import flashsvd.models as fm
from flashsvd.kernels import ffn_policy
from flashsvd.models import inplace, runtime


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created under this mode (existing weights are never counted)."""

    def __init__(self, existing: set[int]) -> None:
        super().__init__()
        self.existing, self.live, self.now, self.peak = existing, set(), 0, 0

    def _free(self, key: int, size: int) -> None:
        self.live.discard(key)
        self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = id(storage), storage.nbytes()
            if key in self.live or size == 0 or storage.data_ptr() in self.existing:
                continue
            self.live.add(key)
            self.now += size
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key, size)
        return out


def _kernel(fn):
    def run(*args, out=None, **kwargs):
        with _disable_current_modes():  # the reference's own temporaries are not the kernel's
            result = fn(*args, **kwargs)
        if out is None:
            out = torch.empty_like(result)
        return out.copy_(result)

    return run


@pytest.fixture
def kernels_as_on_gpu(monkeypatch):
    for module, names in (
        (runtime, ("lowrank_attention", "lowrank_ffn", "lowrank_gated_ffn", "add_layer_norm")),
        (inplace, ("add_layer_norm",)),
    ):
        for name in names:
            monkeypatch.setattr(module, name, _kernel(getattr(module, name)))


def _forward_peak(module, **inputs) -> tuple[torch.Tensor, int]:
    existing = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
    with torch.no_grad():
        module(**inputs)  # warm-up: fused factor views, RoPE tables, policy choices
        with LiveBytes(existing) as live:
            out = module(**inputs).last_hidden_state
    return out, live.peak


@pytest.fixture
def large(monkeypatch):
    """Every call counts as large: head groups and chunks on tiny shapes."""
    monkeypatch.setattr(runtime, "SMALL_TRANSIENT_BYTES", 0)
    monkeypatch.setattr(ffn_policy, "SMALL_TRANSIENT_BYTES", 0)


def _count_calls(monkeypatch, cls, name) -> list:
    calls, original = [], getattr(cls, name)

    def counted(self, *args, **kwargs):
        calls.append(name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counted)
    return calls


def test_bert_layers_hold_three_hidden_states_and_agree(tiny, large, kernels_as_on_gpu, monkeypatch):
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.75)
    ids = torch.randint(1, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    ref, peak_torch = _forward_peak(model.bert, input_ids=ids)
    fm.set_backend(model, "flash", policy="fastest")
    fast, peak_fast = _forward_peak(model.bert, input_ids=ids)
    fm.set_backend(model, "flash")  # balanced
    groups = _count_calls(monkeypatch, runtime.FlashAttention, "_attend_in_groups")
    into = _count_calls(monkeypatch, runtime.FlashFFN, "_into_input")
    lean, peak_lean = _forward_peak(model.bert, input_ids=ids)
    assert len(groups) == len(into) == 2 * 2  # warm-up + measured call, 2 layers each
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lean, ref, atol=1e-5, rtol=1e-4)
    hidden = ids.numel() * model.config.hidden_size * 4  # one fp32 hidden state
    # the embeddings' output (held by HF's BertModel) + a layer's input, its attention output, one head
    # group's rank-space projections (no wider than a hidden state): at most four hidden states
    assert peak_lean <= 4 * hidden < peak_fast < peak_torch


def test_hooked_or_callers_tensors_are_never_overwritten(tiny, large, monkeypatch):
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.75)
    fm.set_backend(model, "flash")
    into = _count_calls(monkeypatch, runtime.FlashFFN, "_into_input")
    ids = torch.randint(1, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    kept = []
    layer = model.bert.encoder.layer[0]
    hook = layer.attention.register_forward_hook(lambda m, a, out: kept.append((out[0], out[0].clone())))
    with torch.no_grad():
        model.bert(input_ids=ids)
    hook.remove()
    held, copy = kept[0]
    assert torch.equal(held, copy)  # the hook's tensor still holds the attention output
    assert len(into) == 1  # layer 1 (unhooked) still wrote into its input
    x = torch.randn(2, 5, model.config.hidden_size)
    before = x.clone()
    with torch.no_grad():
        layer.intermediate(x)  # a caller's own tensor, straight into the FFN block
    assert torch.equal(x, before) and len(into) == 1


def test_gqa_head_groups_without_cache_agree(tiny, large, monkeypatch):
    model, _ = fm.compress(tiny("llama"), rank="full")  # rank 16 per head: groups of one KV head
    ids = torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        fm.set_backend(model, "flash")
        groups = _count_calls(monkeypatch, runtime.FlashAttention, "_attend_in_groups")
        out = model(input_ids=ids, use_cache=False).logits
        attn = model.model.layers[0].self_attn
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        assert attn.head_groups(torch.zeros(2, 12, 64), q, k, v) == [(0, 1), (1, 2)]
        cached = model(input_ids=ids).logits  # with a cache: all heads at once (the cache stores them)
    assert len(groups) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("how", ["default", "token_types", "positions", "past"])
def test_bert_embeddings_match_hf(tiny, how):
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.75)
    fm.set_backend(model, "flash")
    block = model.bert.embeddings
    assert isinstance(block, runtime.FlashEmbeddings)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    kw = {
        "default": {},
        "token_types": {"token_type_ids": torch.randint(0, 2, (2, 9))},
        "positions": {"position_ids": torch.arange(3, 12)[None]},
        "past": {},
    }[how]
    args = (ids, None, None, None, 3) if how == "past" else ()
    with torch.no_grad():
        got = block(*args, **({} if args else {"input_ids": ids, **kw}))
        want = block.original(*args, **({} if args else {"input_ids": ids, **kw}))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_bert_embeddings_fall_back_to_hf_for_inputs_embeds(tiny):
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.75)
    fm.set_backend(model, "flash")
    block = model.bert.embeddings
    block.position_ids = block.position_ids.clone()  # what .to(device) does to the block's buffers
    embeds = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        got = block(inputs_embeds=embeds)  # the caller's tensor: HF's own forward, with our buffers
        assert block.original.position_ids is block.position_ids
        fm.set_backend(model, "torch")
        want = model.bert.embeddings(inputs_embeds=embeds)
    torch.testing.assert_close(got, want)
