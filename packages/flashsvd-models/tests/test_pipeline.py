"""The one pipeline: recipes, default recipes, allocation + rounding, block-by-block with resume."""

from __future__ import annotations

import json

import pytest
import torch

import flashsvd.models as fm
from flashsvd.methods import FlashSVDMethodError
from flashsvd.models.pipeline import unpad
from flashsvd.models.recipe import RECIPES, Recipe, RecipeError, default_recipe, load_recipe


def test_recipe_json_yaml_roundtrip(tmp_path):
    r = RECIPES["encoder"].with_(rank_multiple=16)
    for name in ("r.json", "r.yaml"):
        r.save(tmp_path / name)
        assert load_recipe(tmp_path / name) == r
    assert load_recipe("decoder") is RECIPES["decoder"]


def test_recipe_errors_name_the_field(tmp_path):
    with pytest.raises(RecipeError, match="allocation"):
        Recipe(allocation="magic")
    with pytest.raises(RecipeError, match="output_fisher"):
        Recipe(method="svd", output_fisher=True)
    with pytest.raises(RecipeError, match="sequential"):  # used to fail deep inside compress()
        RECIPES["encoder"].with_(sequential=True)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "whiten", "rank_multipel": 8}))
    with pytest.raises(RecipeError, match="rank_multipel"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="neither a file"):
        load_recipe(tmp_path / "missing.yaml")


def test_sequential_on_the_encoder_default_turns_output_fisher_off(tiny):
    from flashsvd.models.compress import resolve_recipe

    r, notes = resolve_recipe(tiny("bert"), sequential=True)
    assert r.sequential and not r.output_fisher and any("output_fisher" in n for n in notes)


def test_default_recipe_by_family(tiny):
    assert default_recipe(tiny("bert")).name == "encoder"
    assert default_recipe(tiny("llama")).name == "decoder"


def test_default_recipe_by_budget(tiny):
    """Encoders below keep 0.75 get the recipe that measured better there; decoders have one default."""
    bert, llama = tiny("bert"), tiny("llama")
    assert [default_recipe(bert, k).name for k in (0.5, 0.6, 0.74, 0.75, 0.9, None)] == [
        "encoder-lean", "encoder-lean", "encoder-lean", "encoder", "encoder", "encoder",
    ]  # fmt: skip
    assert default_recipe(llama, 0.5).name == "decoder"
    lean = RECIPES["encoder-lean"]
    assert (lean.method, lean.allocation, lean.sequential, lean.update) == ("svdllm", "asvd", True, "v")


def test_unpad_drops_padding_tokens(calib_batches):
    batches = calib_batches(n=1, pad="right")
    out = unpad(batches)
    assert sorted(b["input_ids"].shape[1] for b in out) == [7, 10]
    assert sum(int(b["attention_mask"].sum()) for b in out) == int(batches[0]["attention_mask"].sum())


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_default_recipe_compresses_within_budget(tiny, kind, calib_batches):
    model = tiny(kind)
    recipe = default_recipe(model).with_(gradients="lm" if kind != "bert" else "labels")
    batches = calib_batches(pad="right")
    if kind == "bert":
        for b in batches:
            b["labels"] = torch.tensor([0, 1, 0, 1])
    _, rep = fm.compress(model, keep_ratio=0.6, calibration=batches, recipe=recipe)
    assert rep.kept_fraction <= 0.6
    assert rep.recipe["name"] == recipe.name
    assert rep.allocation["allocation"] == "loss_curve"
    assert rep.allocation["rank_multiple"] == 8
    unrounded = set(rep.allocation["unrounded"])
    assert all(r % 8 == 0 for n, r in rep.ranks.items() if r is not None and n not in unrounded)
    assert model.config.quantization_config["recipe"]["name"] == recipe.name


@pytest.mark.parametrize("allocation", ["loss_curve", "uniform", "asvd", "ars"])
def test_keep_dense_roles_stay_dense_and_count(tiny, allocation, calib_batches):
    """Every allocation honours keep_dense (ASVD's and ARS's once compressed Q/K silently)."""
    model = tiny("bert")
    recipe = RECIPES["encoder"].with_(
        gradients="none", center=True, output_fisher=False, allocation=allocation
    )
    _, rep = fm.compress(model, keep_ratio=0.7, calibration=calib_batches(), recipe=recipe)
    qk = [n for n in rep.ranks if n.endswith((".query", ".key"))]
    assert qk and all(rep.ranks[n] is None for n in qk)
    assert any(r is not None for r in rep.ranks.values())
    assert 0.69 <= rep.kept_fraction <= 0.7


def test_keep_dense_beyond_the_budget_is_an_error(tiny, calib_batches):
    recipe = RECIPES["encoder"].with_(
        gradients="none", allocation="asvd", keep_dense=("q", "k", "v", "o", "up")
    )
    with pytest.raises(ValueError, match=r"kept dense .* more than keep_ratio=0\.3"):
        fm.compress(tiny("bert"), keep_ratio=0.3, calibration=calib_batches(), recipe=recipe)


def test_ars_is_not_silently_svd(tiny, calib_batches):
    _, rep = fm.compress(tiny("bert"), method="ars", keep_ratio=0.6, calibration=calib_batches())
    assert rep.recipe["allocation"] == "ars" and rep.method == "whiten"
    with pytest.raises(ValueError, match="data-aware"):
        fm.compress(tiny("bert"), method="ars", keep_ratio=0.6)


def test_no_calibration_falls_back_to_svd_with_a_warning(tiny):
    with pytest.warns(UserWarning, match="no calibration data"):
        _, rep = fm.compress(tiny("bert"), keep_ratio=0.6)
    assert rep.method == "svd" and any("no calibration" in n for n in rep.notes)


def test_zero_input_gram_error_names_the_layer(tiny, calib_batches):
    model = tiny("llama")
    layer = "model.layers.1.mlp.down_proj"
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.zero_()  # down_proj now only sees zeros
    with pytest.raises(FlashSVDMethodError, match=layer.replace(".", r"\.")):
        fm.compress(model, method="whiten", keep_ratio=0.6, calibration=calib_batches())


def test_empty_calibration_batch_is_a_clear_error(tiny, calib_batches):
    batches = [*calib_batches(), torch.zeros(1, 0, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"calibration batches \[\d+\] hold no tokens"):
        fm.compress(tiny("llama"), method="whiten", keep_ratio=0.6, calibration=batches)


def test_sequential_passes_a_block_the_allocation_leaves_dense(tiny, calib_batches):
    """Paired sequential calibration over a block with nothing to compress (it failed with an IndexError:
    SmolLM2, loss-curve allocation, whose budget leaves whole blocks dense)."""
    first = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]  # fmt: skip
    rec = _seq_recipe().with_(keep_dense=tuple(first))
    _, rep = fm.compress(tiny("llama"), keep_ratio=0.8, calibration=calib_batches(), recipe=rec)
    assert all(rep.ranks[n] is None for n in first)
    assert any(r is not None for n, r in rep.ranks.items() if n.startswith("model.layers.1."))


def _seq_recipe():
    return Recipe(name="seq", method="whiten", allocation="uniform", sequential=True, rank_multiple=4)


@pytest.mark.parametrize("center", [False, True])  # a centered fit adds biases LLaMA's projections lack
def test_sequential_resume_matches_an_uninterrupted_run(tiny, tmp_path, calib_batches, center):
    batches = calib_batches()
    recipe = _seq_recipe().with_(center=center)
    ref, _ = fm.compress(tiny("llama"), keep_ratio=0.6, calibration=batches, recipe=recipe)

    class Interrupt(Exception):
        pass

    seen = []

    def stop_after_first(msg):
        seen.append(msg)
        if msg.startswith("block 0 done"):
            raise Interrupt

    with pytest.raises(Interrupt):
        fm.compress(tiny("llama"), keep_ratio=0.6, calibration=batches, recipe=recipe,
                    state_dir=tmp_path, log=stop_after_first)  # fmt: skip
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 0
    lines = []
    model, rep = fm.compress(tiny("llama"), keep_ratio=0.6, calibration=batches, recipe=recipe,
                             state_dir=tmp_path, log=lines.append)  # fmt: skip
    assert any("resuming after block 0" in x for x in lines)
    assert not any(x.startswith("block 0 done") for x in lines)
    assert rep.calibration["resumed_from_block"] == 1
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_state_of_another_run_is_refused(tiny, tmp_path, calib_batches):
    batches = calib_batches()
    fm.compress(tiny("llama"), keep_ratio=0.6, calibration=batches, recipe=_seq_recipe(), state_dir=tmp_path)
    with pytest.raises(ValueError, match="different run"):
        fm.compress(
            tiny("llama"), keep_ratio=0.5, calibration=batches, recipe=_seq_recipe(), state_dir=tmp_path
        )


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_cached_block_inputs_replay_identically(tiny, kind):
    """No KV cache travels with the cached inputs: replaying a block gives the same output every time."""
    from flashsvd.models.adapters import get_adapter
    from flashsvd.models.pipeline import block_paths, capture_inputs, run_block
    from flashsvd.models.runtime import get_module

    model = tiny(kind)
    targets = get_adapter(model).targets(model)
    block = get_module(model, block_paths(targets)[0])
    (inp,) = capture_inputs(model, block, [torch.randint(1, 100, (2, 9))])
    with torch.no_grad():
        a, b = run_block(block, inp)[0][0], run_block(block, inp)[0][0]
    torch.testing.assert_close(a, b)
    assert a.shape[:2] == (2, 9)


def test_encoder_default_on_a_classifier_without_labels(tiny, calib_batches):
    """SimCSE gradients come from the hidden states of the encoder inside a task model."""
    model = tiny("bert")
    _, rep = fm.compress(model, keep_ratio=0.7, calibration=calib_batches(), recipe=RECIPES["encoder"])
    assert rep.calibration["gradients"] == "simcse"
    assert rep.kept_fraction <= 0.7


@pytest.mark.parametrize("sequential", [False, True])
def test_factorization_sees_settled_statistics(tiny, monkeypatch, sequential, calib_batches):
    """The order-independent sums' limbs (2.1x a Gram) are freed before any factorization starts."""
    import flashsvd.models.pipeline as pipeline
    from flashsvd.methods.reproducible import ReproducibleSum

    seen = []
    real = pipeline.factor_targets

    def spy(model, targets, ranks, method, stats, *args, **kw):
        seen.append([type(v) for st in (stats or {}).values() for v in st.sums.values()])
        return real(model, targets, ranks, method, stats, *args, **kw)

    monkeypatch.setattr(pipeline, "factor_targets", spy)
    recipe = _seq_recipe().with_(sequential=sequential)
    fm.compress(tiny("llama"), keep_ratio=0.6, calibration=calib_batches(), recipe=recipe)
    assert seen and all(kinds for kinds in seen)
    assert not any(k is ReproducibleSum for kinds in seen for k in kinds)
