from __future__ import annotations

import math

import pytest
import torch

from flashsvd.methods import (
    METHODS,
    FlashSVDMethodError,
    InvalidKeepRatioError,
    LayerShape,
    RankPolicy,
    UnknownMethodError,
    allocate_by_curves,
    allocate_by_sensitivity,
    allocate_ranks,
    ars_select_ranks,
    get_method,
    load_ranks,
    register_method,
    save_ranks,
    unified_ranks,
    uniform_keep_ratio,
)

SHAPES = [
    LayerShape("0.q", 64, 64, 4, "attn"),
    LayerShape("0.k", 64, 32, 2, "attn"),
    LayerShape("0.o", 64, 64, None, "wo"),
    LayerShape("0.up", 64, 160, None, "ffn"),
    LayerShape("0.down", 160, 64, None, "ffn"),
    LayerShape("1.up", 64, 170, None, "ffn"),
]


def test_registry_and_alias():
    assert set(METHODS) >= {"svd", "fwsvd", "whiten", "svdllm", "asvd", "ars"}
    assert get_method("adasvd").name == "ars"
    assert get_method("SVD").name == "svd"
    with pytest.raises(UnknownMethodError, match="Available"):
        get_method("nope")

    @register_method("test-identity-xyz")
    def ident(w, r, *, stats=None, n_heads=None):
        return w.T[:, :r], torch.eye(r, w.shape[0], dtype=w.dtype), {}

    try:
        assert get_method("test-identity-xyz").fn is ident
        with pytest.raises(FlashSVDMethodError, match="already registered"):
            register_method("svd", ident)
    finally:
        METHODS.pop("test-identity-xyz")


@pytest.mark.parametrize("keep", [0.9, 0.75, 0.5, 0.3, 0.123])
def test_keep_ratio_budget_exact(keep):
    a = uniform_keep_ratio(SHAPES, keep)
    total = sum(s.dense_params for s in SHAPES)
    budget = math.floor(keep * total)
    assert a.dense_params == total
    assert a.kept_params <= budget
    # no further rank step fits: the budget is used up to less than one step
    assert budget - a.kept_params < max(s.params_per_rank for s in SHAPES)
    assert a.kept_params == sum(s.params(a.ranks[s.name]) for s in SHAPES)


def test_keep_ratio_validation():
    for bad in [0, -0.1, 1.5, float("nan"), "0.5"]:
        with pytest.raises(InvalidKeepRatioError):
            uniform_keep_ratio(SHAPES, bad)
    a = uniform_keep_ratio(SHAPES, 1.0)
    assert all(r is None for r in a.ranks.values()) and a.keep_fraction == 1.0


def test_breakeven_keeps_dense_and_says_so():
    s = LayerShape("x", 64, 64)
    assert s.breakeven_rank == 32
    a = allocate_ranks([s], ranks={"x": 32})
    assert a.ranks["x"] is None and "break-even" in a.reasons["x"]
    assert allocate_ranks([s], ranks={"x": 31}).ranks["x"] == 31


def test_unified_rank_scaling():
    shapes = [
        LayerShape("q", 768, 768, None, "attn"),
        LayerShape("o", 768, 768, None, "wo"),
        LayerShape("up", 768, 3072, None, "ffn"),
    ]
    a = unified_ranks(shapes, 64)
    assert a.ranks == {"q": 64, "o": None, "up": 384}  # wo 384 ≥ break-even 384 → dense
    assert "break-even" in a.reasons["o"]
    b = allocate_ranks(shapes, ranks_by_kind={"attn": 8, "ffn": 16})
    assert b.ranks == {"q": 8, "o": None, "up": 16}


def test_ranks_json_roundtrip(tmp_path):
    a = uniform_keep_ratio(SHAPES, 0.5)
    p = tmp_path / "ranks.json"
    save_ranks(p, a, method="whiten")
    assert load_ranks(p) == a.ranks
    assert allocate_ranks(SHAPES, RankPolicy(ranks=p)).ranks == a.ranks
    with pytest.raises(FlashSVDMethodError):
        RankPolicy(keep_ratio=0.5, rank=3)


def test_curves_allocation_respects_budget_and_prefers_sensitive():
    curves = {}
    for _i, s in enumerate(SHAPES):
        w = 100.0 if s.name == "0.o" else 1.0
        curves[s.name] = w * torch.linspace(1, 0, s.max_rank + 1) ** 2
    for keep in (0.9, 0.5, 0.3):
        a = allocate_by_curves(SHAPES, curves, keep)
        assert a.kept_params <= math.floor(keep * a.dense_params)
        assert math.floor(keep * a.dense_params) - a.kept_params < max(s.params_per_rank for s in SHAPES)
    a = allocate_by_curves(SHAPES, curves, 0.6)
    assert a.ranks["0.o"] is None  # the very sensitive layer stays dense


def test_curves_allocation_keep_dense_spends_the_rest_of_the_budget():
    curves = {s.name: torch.linspace(1, 0, s.max_rank + 1) ** 2 for s in SHAPES}
    forced = {"0.up"}
    a = allocate_by_curves(SHAPES, curves, 0.6, keep_dense=forced)
    assert all(a.ranks[n] is None for n in forced)
    assert all("on request" in a.reasons[n] for n in forced)
    budget = math.floor(0.6 * a.dense_params)
    assert a.kept_params <= budget  # the forced layers count against the one keep_ratio budget
    assert budget - a.kept_params < max(s.params_per_rank for s in SHAPES)
    free = allocate_by_curves(SHAPES, curves, 0.6)
    assert free.ranks["0.up"] is not None  # left to the curves, the layer would have been factored
    assert a.ranks["0.down"] < free.ranks["0.down"] and a.ranks["1.up"] < free.ranks["1.up"]
    with pytest.raises(FlashSVDMethodError, match="not being allocated"):
        allocate_by_curves(SHAPES, curves, 0.6, keep_dense={"9.nope"})
    with pytest.raises(InvalidKeepRatioError, match="keep_dense alone"):
        allocate_by_curves(SHAPES, curves, 0.05, keep_dense={s.name for s in SHAPES[3:]})


def test_asvd_sensitivity_allocation():
    table = {s.name: [(r, 1.0 / r) for r in (1, 4, 8, 12) if s.saves(r)] for s in SHAPES}
    a = allocate_by_sensitivity(SHAPES, table, 0.4)
    assert a.kept_params <= math.floor(0.4 * a.dense_params)


def test_ars_within_budget():
    gen = torch.Generator().manual_seed(0)
    spectra = {
        s.name: [torch.rand(s.max_rank, generator=gen).sort(descending=True).values for _ in range(s.heads)]
        for s in SHAPES
    }
    for keep in (0.7, 0.4):
        res = ars_select_ranks(SHAPES, spectra, keep, steps=25, hidden=16)
        a = res.allocation
        assert a.kept_params <= math.floor(keep * a.dense_params)
        assert set(a.ranks) == {s.name for s in SHAPES}
