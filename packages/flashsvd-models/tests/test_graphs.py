"""The flash backend is traceable and graph-safe: ``torch.compile(fullgraph=True)`` traces whole
compressed models (CPU, reference kernels), and on a GPU a whole flash model captures in one CUDA
graph and replays with eager's outputs (forward, and static-cache greedy decoding)."""

from __future__ import annotations

import pytest
import torch

import flashsvd.models as fm

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_flash_model_compiles_fullgraph(tiny, make_inputs, kind):
    model, _ = fm.compress(tiny(kind), keep_ratio=0.6, backend="flash")
    ids, mask = make_inputs(kind, seq=8)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)[0]
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _greedy_steps(model, ids, n: int, traced: bool) -> list[torch.Tensor]:
    """Last-position logits of ``n`` static-cache decode steps, eagerly or as replays of one trace.

    ``traced``: after one eager warm-up step, the step is traced once with ``make_fx`` while HF
    believes a CUDA graph is being captured, then the trace is replayed.  Like a CUDA graph, the trace
    keeps every tensor by reference and freezes every host value read while tracing, so a host int
    that should have been a device tensor shows up on CPU.  Tracing runs the step once (a capture
    does not), so the eager list skips that step when compared.
    """
    from unittest import mock

    import transformers.utils.import_utils as hf_import_utils
    from torch.fx.experimental.proxy_tensor import make_fx
    from transformers import StaticCache

    B, P = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=P + n + 1)
    kw = {"past_key_values": cache, "use_cache": True}
    with torch.no_grad():
        logits = model(input_ids=ids, logits_to_keep=1, cache_position=torch.arange(P), **kw).logits
        tok = logits[:, -1:].argmax(-1)
        pos = torch.full((1,), P, dtype=torch.long)

        def step():
            out = model(input_ids=tok, position_ids=pos[None].expand(B, 1), cache_position=pos, **kw).logits
            tok.copy_(out[:, -1:].argmax(-1))
            pos.add_(1)
            return out[:, -1].clone()

        if not traced:
            return [step() for _ in range(n)]
        steps = [step()]
        with mock.patch.object(hf_import_utils, "is_cuda_stream_capturing", lambda: True):
            replay = make_fx(step)()
        return steps + [replay() for _ in range(n - 2)]


def test_static_decode_step_replays_like_a_cuda_graph(tiny, make_inputs):
    """Regression (H200, transformers 5.17): graphed static-cache decoding left eager at the 2nd
    replay.  While capturing, HF builds the causal mask from ``get_seq_length()``; ours returned a
    host int, frozen into the graph, so later replays masked out the newest key.  It is now a device
    tensor advanced in place, as in HF's ``StaticLayer``."""
    model, _ = fm.compress(tiny("llama"), keep_ratio=0.6, backend="flash")
    ids = make_inputs("llama", seq=9)[0]
    eager = _greedy_steps(model, ids, 5, traced=False)
    replayed = _greedy_steps(model, ids, 5, traced=True)
    for want, got in zip([eager[0], *eager[2:]], replayed, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_static_rank_space_layer_counts_on_the_device():
    """A static layer's ``get_seq_length()`` is one 0-d tensor, advanced in place by every update,
    zeroed by ``reset`` and set by ``crop``; a growing layer's is a host int."""
    from flashsvd.models.cache import RankSpaceCacheLayer

    static, growing = RankSpaceCacheLayer(max_cache_len=8), RankSpaceCacheLayer()
    kv = torch.zeros(1, 3, 2, 4)
    for layer in (static, growing):
        layer.update(kv, kv)
    length = static.get_seq_length()
    assert isinstance(length, torch.Tensor) and length.dim() == 0 and int(length) == 3
    static.update(kv[:, :1], kv[:, :1])
    assert static.get_seq_length() is length and int(length) == 4 and static.past_tokens() == 4
    static.crop(-1)
    assert int(length) == 3 and static.past_tokens() == 3
    static.reset()
    assert int(length) == 0 and static.get_seq_length() is length
    assert growing.get_seq_length() == 3 and isinstance(growing.get_seq_length(), int)


def test_graphed_forward_rejects_cpu_inputs(tiny, make_inputs):
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.6, backend="flash")
    ids, mask = make_inputs("bert")
    with pytest.raises(ValueError, match="CUDA"):
        fm.GraphedForward(model, input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="graph=False"):
        fm.generate_greedy(model, ids, 2)


@gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_flash_model_captures_in_one_cuda_graph(tiny, make_inputs, kind):
    model, _ = fm.compress(tiny(kind).cuda().half(), keep_ratio=0.6, backend="flash")
    ids, mask = (t.cuda() for t in make_inputs(kind, seq=16))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)[0].float()
    fwd = fm.GraphedForward(model, input_ids=ids, attention_mask=mask)
    got = fwd(input_ids=ids, attention_mask=mask)[0].float()
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


@gpu
@needs_cuda
@pytest.mark.parametrize("lean", [False, True], ids=["small", "as-if-large"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_flash_kernels_match_torch_backend_on_cuda(tiny, make_inputs, kind, lean, monkeypatch):
    """On CUDA fp32 every runtime block's Triton kernel (attention, FFN, BERT's fused residual add +
    LayerNorm, LLaMA's RMSNorm) gives the torch backend's outputs at the valid positions; also on
    the paths of large calls (attention in head groups, BERT's FFN written into its input)."""
    from flashsvd.models import runtime
    from flashsvd.models.runtime import AppliedOutput, FlashEmbeddings, FlashRMSNorm

    if lean:
        from flashsvd.kernels import ffn_policy

        monkeypatch.setattr(runtime, "SMALL_TRANSIENT_BYTES", 0)
        monkeypatch.setattr(ffn_policy, "SMALL_TRANSIENT_BYTES", 0)

    model, _ = fm.compress(tiny(kind).cuda(), rank="full")  # full rank: wider than a hidden state
    ids, mask = (t.cuda() for t in make_inputs(kind, seq=16))
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    fm.set_backend(model, "flash")
    norm = FlashRMSNorm if kind == "llama" else AppliedOutput  # BERT: the blocks before it normalize
    assert sum(isinstance(m, norm) for m in model.modules()) >= 2
    assert kind == "llama" or any(isinstance(m, FlashEmbeddings) for m in model.modules())
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    if got.dim() == 3:
        got, ref = got[mask.bool()], ref[mask.bool()]
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)


@gpu
@needs_cuda
def test_graphed_static_decoding_matches_eager(tiny, make_inputs):
    model, _ = fm.compress(tiny("llama").cuda(), keep_ratio=0.6, backend="flash")
    ids = make_inputs("llama", seq=9)[0].cuda()
    eager = fm.generate_greedy(model, ids, 6, graph=False)
    graphed = fm.generate_greedy(model, ids, 6, graph=True)
    assert torch.equal(graphed, eager)


def test_fused_qkv_shares_storage_and_keeps_checkpoints(tiny, make_inputs, tmp_path):
    """The flash backend's one-GEMM Q/K/V projection stores the factors once (column views of one
    matrix): same state-dict keys and values, same parameter bytes, and save/load round-trips."""
    from flashsvd.models.measure import persistent_bytes

    model, _ = fm.compress(tiny("bert"), keep_ratio=0.6, backend="flash")
    before = {k: t.clone() for k, t in model.state_dict().items()}
    n_bytes = persistent_bytes(model)
    ids, mask = make_inputs("bert")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)[0]
    attn = model.bert.encoder.layer[0].attention.self
    q, k, v = attn.query.u, attn.key.u, attn.value.u
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    assert persistent_bytes(model) == n_bytes
    fm.save_compressed(model, tmp_path / "m")
    loaded = fm.load(tmp_path / "m")
    fm.set_backend(loaded, "flash")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask)[0], ref)
