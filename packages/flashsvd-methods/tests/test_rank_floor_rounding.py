"""The keep_ratio floor (true minimum quoted, every feasible ratio accepted) and rank rounding."""

from __future__ import annotations

import math
import re

import pytest
import torch

from flashsvd.methods import (
    InvalidKeepRatioError,
    LayerShape,
    allocate_by_curves,
    minimum_keep_fraction,
    round_ranks,
    uniform_keep_ratio,
)


def minilm_shapes(layers: int = 6) -> list[LayerShape]:
    """all-MiniLM-L6-v2's targets: Q/K/V per head (12 × 32), O 384², FFN 384↔1536."""
    out = []
    for i in range(layers):
        out += [LayerShape(f"{i}.{n}", 384, 384, 12, "attn") for n in "qkv"]
        out += [
            LayerShape(f"{i}.o", 384, 384, None, "wo"),
            LayerShape(f"{i}.up", 384, 1536, None, "ffn"),
            LayerShape(f"{i}.down", 1536, 384, None, "ffn"),
        ]
    return out


def test_minimum_is_rank_one_everywhere():
    shapes = minilm_shapes()
    expected = sum(s.params(1) for s in shapes) / sum(s.dense_params for s in shapes)
    assert minimum_keep_fraction(shapes) == pytest.approx(expected)
    assert round(expected, 4) == 0.0111


@pytest.mark.parametrize("keep", [0.0111, 0.012, 0.015, 0.02, 0.0228, 0.025, 0.03])
def test_every_feasible_ratio_is_accepted(keep):
    shapes = minilm_shapes()
    if keep < minimum_keep_fraction(shapes):
        keep = math.ceil(minimum_keep_fraction(shapes) * 1e4) / 1e4
    a = uniform_keep_ratio(shapes, keep)
    budget = math.floor(keep * a.dense_params)
    assert a.kept_params <= budget
    assert budget - a.kept_params < max(s.params_per_rank for s in shapes)
    assert all(r is not None and r >= 1 for r in a.ranks.values())


def test_floor_message_quotes_the_true_minimum():
    shapes = minilm_shapes()
    with pytest.raises(InvalidKeepRatioError, match=r"0\.0111") as err:
        uniform_keep_ratio(shapes, 0.011)
    quoted = float(re.search(r"at least (\d\.\d+)", str(err.value)).group(1))
    uniform_keep_ratio(shapes, quoted)  # the ratio the message suggests works


def test_curves_floor_message_counts_keep_dense():
    shapes = minilm_shapes(1)
    curves = {s.name: torch.linspace(1.0, 0.0, s.max_rank + 1) for s in shapes}
    qk = {"0.q", "0.k"}
    floor = minimum_keep_fraction(shapes, keep_dense=qk)
    with pytest.raises(InvalidKeepRatioError, match=re.escape(f"{floor:.4f}")):
        allocate_by_curves(shapes, curves, floor * 0.99, keep_dense=qk)
    allocate_by_curves(shapes, curves, math.ceil(floor * 1e4) / 1e4, keep_dense=qk)


@pytest.mark.parametrize("multiple", [8, 16, 32, 64])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.75, 0.9])
def test_rounded_ranks_are_multiples_within_budget(multiple, keep):
    shapes = [
        LayerShape("a", 768, 768, None, "wo"),
        LayerShape("b", 768, 3072, None, "ffn"),
        LayerShape("c", 3072, 768, None, "ffn"),
        LayerShape("d", 4096, 11008, None, "ffn"),
    ]
    base = uniform_keep_ratio(shapes, keep)
    a = round_ranks(shapes, base, multiple, keep)
    budget = math.floor(keep * a.dense_params)
    assert a.multiple == multiple
    assert a.kept_params <= budget
    assert a.kept_params >= (1 - 0.005) * budget or budget - a.kept_params < multiple * max(
        s.params_per_rank for s in shapes
    )
    for name, r in a.ranks.items():
        assert r is None or r % multiple == 0, (name, r)


def test_rounding_follows_the_curves():
    shapes = [LayerShape("x", 512, 512), LayerShape("y", 512, 512)]
    # x's loss falls steeply with rank, y's is flat: spare steps must go to x
    curves = {
        "x": torch.linspace(10.0, 0.0, 513),
        "y": torch.linspace(0.1, 0.0, 513),
    }
    alloc = allocate_by_curves(shapes, curves, 0.5)
    a = round_ranks(shapes, alloc, 32, 0.5, curves=curves)
    assert all(r % 32 == 0 for r in a.ranks.values() if r is not None)
    assert a.kept_params <= math.floor(0.5 * a.dense_params)
    assert (a.ranks["x"] or 512) >= (a.ranks["y"] or 0)


def test_small_per_head_layers_stay_unrounded():
    shapes = [LayerShape("v", 64, 64, 8, "attn"), LayerShape("o", 64, 64)]
    base = uniform_keep_ratio(shapes, 0.5)
    a = round_ranks(shapes, base, 16, 0.5)
    assert "v" in a.unrounded
    assert a.ranks["v"] == base.ranks["v"]
    assert a.kept_params <= math.floor(0.5 * a.dense_params)
