"""``calib_source: model``: calibration windows sampled from the model, prompted by the given text."""

import pytest
import torch

import flashsvd.models as fm
from flashsvd.models.recipe import RECIPES, RecipeError
from flashsvd.models.self_calibration import sampled_windows

SHAPE = {"rows": 2, "seq": 12, "seed": 4}  # calibration batches of two 12-token rows


def test_sampled_windows_continue_their_prompts_and_are_seeded(tiny, calib_batches):
    model = tiny("llama")
    batches = calib_batches(**SHAPE, pad="left")
    state = torch.get_rng_state()
    a, as_given = sampled_windows(model, batches, prompt_tokens=5, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    b, _ = sampled_windows(model, batches, prompt_tokens=5, seed=3)
    c, _ = sampled_windows(model, batches, prompt_tokens=5, seed=4)
    assert as_given == 0
    # one window per row, as long as the row without its padding, starting with the row's first tokens
    assert [w.shape for w in a] == [(1, 9), (1, 12)] * 3
    rows = [r for batch in batches for r in (batch["input_ids"][0, 3:], batch["input_ids"][1])]
    for w, row in zip(a, rows):
        assert torch.equal(w[0, :5], row[:5])
        assert not torch.equal(w[0], row)  # the rest is sampled
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_sampled_windows_refuse_what_cannot_generate_and_keep_short_rows(tiny, calib_batches):
    with pytest.raises(ValueError, match="generate"):
        sampled_windows(tiny("bert"), calib_batches(**SHAPE))
    short = torch.tensor([[1, 2, 3]])
    out, as_given = sampled_windows(tiny("llama"), [short, torch.arange(1, 13)], prompt_tokens=8)
    assert as_given == 1 and torch.equal(out[0], short)  # nothing to sample after the prompt: kept
    assert out[1].shape == (1, 12) and torch.equal(out[1][0, :8], torch.arange(1, 9))


def test_recipe_calib_source_fields_are_checked():
    with pytest.raises(RecipeError, match="calib_source"):
        RECIPES["decoder"].with_(calib_source="web")
    with pytest.raises(RecipeError, match="calib_prompt_tokens"):
        RECIPES["decoder"].with_(calib_source="model", calib_window=8, calib_prompt_tokens=8)


def test_compress_calibrates_on_the_models_samples(tiny, calib_batches):
    recipe = RECIPES["decoder"].with_(gradients="lm")
    assert recipe.calib_source == "model"  # the decoder default
    model = tiny("llama")
    _, rep = fm.compress(model, keep_ratio=0.6, calibration=calib_batches(**SHAPE), recipe=recipe)
    assert rep.kept_fraction <= 0.6
    assert any("sampled from the model" in n for n in rep.notes)
    assert rep.recipe["calib_source"] == "model"
    same, _ = fm.compress(tiny("llama"), keep_ratio=0.6, calibration=calib_batches(**SHAPE), recipe=recipe)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, same(ids).logits)  # seeded: the same model twice
    with pytest.raises(ValueError, match="calib_source 'model'"):
        fm.compress(tiny("bert"), keep_ratio=0.6, calibration=calib_batches(**SHAPE), recipe=recipe)
