"""Every adapter on a random tiny config: full-rank parity with HF, backend agreement, checkpoints."""

import copy
import itertools

import pytest
import torch
import transformers as T

import flashsvd.models as fm
from flashsvd.models.lowrank import FusedLinear, LowRankLinear
from flashsvd.models.recipe import Recipe

DECODERS = ("llama", "mistral", "qwen2", "gpt2")
ENCODERS = ("bert", "roberta", "distilbert", "modernbert")
ALL = DECODERS + ENCODERS


def _valid(out, mask):
    return out[mask.bool()] if out.dim() == 3 and out.shape[:2] == mask.shape else out


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind", ALL)
def test_full_rank_matches_hf_on_both_backends(tiny, make_inputs, kind):
    model = tiny(kind)
    ids, mask = make_inputs(kind)
    ref = _logits(model, ids, mask)
    cls = type(model)
    model, report = fm.compress(model, rank="full")
    assert type(model) is cls
    assert not report.dense and report.params_after > 0
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    out_torch = _logits(model, ids, mask)
    fm.set_backend(model, "flash")
    out_flash = _logits(model, ids, mask)
    torch.testing.assert_close(_valid(out_torch, mask), _valid(ref, mask), atol=1e-5, rtol=0)
    torch.testing.assert_close(_valid(out_flash, mask), _valid(ref, mask), atol=1e-5, rtol=0)


#: architectures whose dense form has no place (nor a config switch) for the biases of a centered fit
NO_ADDED_BIAS = ("mistral", "qwen2")


@pytest.mark.parametrize("centered", [False, True], ids=["svd", "centered"])
@pytest.mark.parametrize("kind", ALL)
def test_compressed_backends_agree_and_checkpoint_round_trips(tiny, make_inputs, kind, tmp_path, centered):
    model = tiny(kind)
    ids, mask = make_inputs(kind)
    before = fm.count_parameters(model)
    # a centered fit folds the input mean into biases, also where the architecture has none (LLaMA)
    kw = {"recipe": Recipe(name="c", method="whiten", center=True),
          "calibration": [{"input_ids": ids, "attention_mask": mask}]} if centered else {}  # fmt: skip
    model, report = fm.compress(model, keep_ratio=0.5, **kw)
    assert report.params_before == before and report.params_after == fm.count_parameters(model)
    assert report.params_after < before and 0.45 < report.kept_fraction <= 0.5
    out_torch = _logits(model, ids, mask)
    sd_torch = {k: v.clone() for k, v in model.state_dict().items()}
    fm.set_backend(model, "flash")
    assert model.state_dict().keys() == sd_torch.keys()
    out_flash = _logits(model, ids, mask)
    torch.testing.assert_close(_valid(out_flash, mask), _valid(out_torch, mask), atol=1e-5, rtol=1e-4)

    folder = fm.save_compressed(model, tmp_path / "ck")
    assert {"config.json", "flashsvd.safetensors", "flashsvd_auto.py"} <= {p.name for p in folder.iterdir()}
    loaded = fm.load(folder)
    sd = loaded.state_dict()
    assert sd.keys() == sd_torch.keys()
    assert all(torch.equal(sd[k], sd_torch[k]) for k in sd)
    assert torch.equal(_logits(loaded, ids, mask), out_torch)
    auto = getattr(T, "AutoModelForCausalLM" if kind in DECODERS else "AutoModelForSequenceClassification")
    again = auto.from_pretrained(folder)
    assert type(again) is type(model)
    assert all(torch.equal(again.state_dict()[k], sd_torch[k]) for k in sd_torch)
    assert torch.equal(_logits(again, ids, mask), out_torch)

    if centered and kind in NO_ADDED_BIAS:
        with pytest.raises(fm.CheckpointError, match="no bias at"):
            fm.merge_to_dense(copy.deepcopy(loaded))
        return
    merged = fm.merge_to_dense(copy.deepcopy(loaded))
    assert not any(isinstance(m, (LowRankLinear, FusedLinear)) for m in merged.modules())
    torch.testing.assert_close(
        _valid(_logits(merged, ids, mask), mask), _valid(out_torch, mask), atol=1e-5, rtol=1e-4
    )
    dense_dir = tmp_path / "dense"
    merged.save_pretrained(dense_dir)
    plain = type(model).from_pretrained(dense_dir)
    torch.testing.assert_close(
        _valid(_logits(plain, ids, mask), mask), _valid(out_torch, mask), atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("kind", DECODERS)
def test_generate_same_tokens_on_both_backends(tiny, make_inputs, kind):
    model, _ = fm.compress(tiny(kind), keep_ratio=0.6)
    ids, mask = make_inputs(kind, seq=7)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    greedy_torch = model.generate(ids, **kw)
    fm.set_backend(model, "flash")
    greedy_flash = model.generate(ids, **kw)
    assert torch.equal(greedy_torch, greedy_flash)
    torch.manual_seed(0)
    sampled = model.generate(
        ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0
    )
    assert sampled.shape == (2, 11)


@pytest.mark.parametrize("kind", ("llama", "gpt2"))
def test_cached_steps_run_on_the_decode_kernel(tiny, make_inputs, kind, monkeypatch):
    """Cached steps of 6, 1 and 3 new tokens run on the decode kernel; their logits
    equal a single uncached forward over the whole (left-padded) sequence on the torch backend."""
    import flashsvd.models.runtime as rt

    model, _ = fm.compress(tiny(kind), keep_ratio=0.6)
    ids, mask = make_inputs(kind, seq=10)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    fm.set_backend(model, "flash")
    calls = []
    real = rt.lowrank_attention_decode
    monkeypatch.setattr(
        rt, "lowrank_attention_decode", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k)
    )
    with torch.no_grad():
        cut = (6, 7, 10)
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True, position_ids=pos[:, :6])
        parts, cache = [out.logits], out.past_key_values
        for a, b in itertools.pairwise(cut):
            out = model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache, use_cache=True,
                        position_ids=pos[:, a:b])  # fmt: skip
            parts.append(out.logits)
    n_layers = model.config.num_hidden_layers
    assert calls == [t for t in (6, 1, 3) for _ in range(n_layers)]  # every step, every layer
    got = torch.cat(parts, dim=1)
    torch.testing.assert_close(_valid(got, mask), _valid(ref, mask), atol=1e-4, rtol=1e-4)


def test_flash_cache_is_rank_space(tiny, make_inputs):
    model, _ = fm.compress(tiny("llama"), keep_ratio=0.5, backend="flash")
    ids, mask = make_inputs("llama", seq=7)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    layer = out.past_key_values.layers[0]
    assert isinstance(layer, fm.RankSpaceCacheLayer)
    k = model.model.layers[0].self_attn.k_proj
    assert layer.keys.shape == (2, 7, k.n_heads, k.rank) and k.rank < 16
    assert layer.positions.shape == (2, 7)


def test_report_and_config_block(tiny, tmp_path):
    model, report = fm.compress(tiny("bert"), keep_ratio=0.5)
    block = model.config.quantization_config
    assert block["quant_method"] == "flashsvd" and block["ranks"] == report.ranks
    assert set(report.ranks) == {t.name for t in fm.get_adapter(model).targets(model)}
    assert all(e["error"] is not None for e in report.errors.values())
    for key in ("params_before", "params_after", "versions", "calibration", "keep_ratio"):
        assert key in block
    with pytest.raises(ValueError, match="already compressed"):
        fm.compress(model, keep_ratio=0.5)


def test_calibrated_method_and_sequential(tiny):
    model = tiny("llama")
    batches = [{"input_ids": torch.randint(1, 100, (2, 10))} for _ in range(2)]
    _, rep = fm.compress(model, method="whiten", keep_ratio=0.5, calibration=batches, sequential=True)
    assert rep.calibration["batches"] == 2 and rep.calibration["sequential"]
    assert all(e["data_error"] is not None for e in rep.errors.values())
    with pytest.raises(ValueError, match="data-aware"):
        fm.compress(tiny("llama"), method="whiten", keep_ratio=0.5)


def test_lowrank_linear_roundtrip():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 8)
    from flashsvd.methods import factorize

    lr = LowRankLinear.from_factorization(factorize(lin.weight, 8, bias=lin.bias))
    x = torch.randn(3, 12)
    torch.testing.assert_close(lr(x), lin(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(lr.to_dense().weight, lin.weight, atol=1e-5, rtol=0)
    heads = LowRankLinear.from_factorization(factorize(lin.weight, 3, n_heads=2, bias=lin.bias))
    torch.testing.assert_close(heads(x), heads.to_dense()(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError):
        LowRankLinear(torch.zeros(4, 3), torch.zeros(2, 5))


def test_unknown_architecture_and_bad_backend(tiny):
    cfg = T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.model_type = "nope"
    with pytest.raises(ValueError, match="no flashsvd adapter"):
        fm.get_adapter(cfg)
    model, _ = fm.compress(tiny("bert"), keep_ratio=0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        fm.set_backend(model, "fast")


@pytest.mark.parametrize("backend", ["torch", "flash"])
def test_static_cache_greedy_matches_generate(tiny, make_inputs, backend):
    """Greedy decoding over a StaticCache (the graph-ready path) gives generate()'s tokens; on the
    flash backend the static cache layers become preallocated rank-space layers."""
    model, _ = fm.compress(tiny("llama"), keep_ratio=0.6)
    ids, _ = make_inputs("llama", seq=6)
    with torch.no_grad():
        ref = model.generate(ids, do_sample=False, max_new_tokens=5, min_new_tokens=5, pad_token_id=0)
    fm.set_backend(model, backend)
    got = fm.generate_greedy(model, ids, max_new_tokens=5, graph=False)
    assert torch.equal(got, ref)


def test_rank_space_layer_grows_and_crops():
    from flashsvd.models.cache import RankSpaceCacheLayer

    layer = RankSpaceCacheLayer()
    pk, pv = torch.randn(2, 200, 3, 4), torch.randn(2, 200, 3, 5)
    layer.update(pk, pv)
    keys, _ = layer.update(pk[:, :100], pv[:, :100])  # past the first capacity (256): doubles
    assert keys.shape == (2, 300, 3, 4) and torch.equal(keys[:, 200:], pk[:, :100])
    assert torch.equal(layer.positions[0], torch.arange(300))
    layer.crop(-50)
    assert layer.get_seq_length() == 250 and layer.values.shape == (2, 250, 3, 5)
    static = RankSpaceCacheLayer(max_cache_len=8)
    static.update(pk[:, :6], pv[:, :6])
    with pytest.raises(ValueError, match="static cache full"):
        static.update(pk[:, :3], pv[:, :3])


def test_key_mask_is_converted_once_per_hf_mask():
    """Every layer gets HF's one mask: the key mask is derived once, and never from a stale source."""
    from flashsvd.models.runtime import key_valid_from_hf_mask

    add = torch.zeros(2, 1, 1, 5)
    add[1, ..., :2] = torch.finfo(torch.float32).min  # left padding in row 1
    first = key_valid_from_hf_mask(add, 2, 5)
    assert first.tolist() == [[True] * 5, [False, False, True, True, True]]
    assert key_valid_from_hf_mask(add, 2, 5) is first  # the next layer reuses it
    add[0, ..., 4] = torch.finfo(torch.float32).min  # changed in place: converted again
    again = key_valid_from_hf_mask(add, 2, 5)
    assert again is not first and again[0].tolist() == [True, True, True, True, False]
    same_values = add.clone()  # another tensor, even with equal values, is converted afresh
    assert key_valid_from_hf_mask(same_values, 2, 5) is not again
    assert key_valid_from_hf_mask(add[..., 1:], 2, 4).tolist() == [
        [True, True, True, False],
        [False, True, True, True],
    ]
    with torch.inference_mode():
        inf = torch.ones(2, 5, dtype=torch.bool)
        a, b = key_valid_from_hf_mask(inf, 2, 5), key_valid_from_hf_mask(inf, 2, 5)
        assert a is not b and a.all()  # no version counter: never reused
