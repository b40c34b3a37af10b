"""ReproducibleSum: the same bits for any order and grouping of the terms, and close to the exact sum."""

from __future__ import annotations

import math
import random
import shutil

import pytest
import torch

from flashsvd.methods import LayerStatistics
from flashsvd.methods.errors import FlashSVDMethodError, NonFiniteStatisticsError
from flashsvd.methods.reproducible import BIN_BITS, MAX_TERMS, ReproducibleSum, _add_into


def _terms(n: int = 30, shape: tuple[int, int] = (24, 24), seed: int = 0) -> list[torch.Tensor]:
    """Terms with entries spread over 16 decades, some huge, zero and subnormal entries."""
    g = torch.Generator().manual_seed(seed)
    terms = [
        torch.randn(shape, generator=g, dtype=torch.float64)
        * 10.0 ** torch.randint(-8, 8, shape, generator=g)
        for _ in range(n)
    ]
    terms[3][0, 0], terms[4][1, 1], terms[5][2, 2] = 1e30, 0.0, 1e-310
    return terms


def _sum(terms, order=None, rows=None) -> ReproducibleSum:
    acc = ReproducibleSum.zeros(terms[0].shape)
    for i in order if order is not None else range(len(terms)):
        if rows is None:
            acc.add_(terms[i])
        else:
            for r in rows:
                acc.add_(terms[i][r], rows=r)
    return acc


def test_any_order_and_row_blocking_gives_the_same_bits():
    terms = _terms()
    ref = _sum(terms).value()
    for seed in range(5):
        order = list(range(len(terms)))
        random.Random(seed).shuffle(order)
        blocked = _sum(terms, order, rows=[slice(0, 7), slice(7, 24)])
        assert torch.equal(blocked.value(), ref)
        assert blocked.n_terms == len(terms)


@pytest.mark.parametrize("split", [1, 9, 17])
def test_partial_sums_merged_like_the_all_reduce_give_the_same_bits(split):
    """Two shards: bins raised to their MAX, limbs added: what all_reduce_statistics does across ranks."""
    terms = _terms()
    a, b = _sum(terms[:split]), _sum(terms[split:])
    top = torch.maximum(a.bin, b.bin)
    a.align_(top), b.align_(top)
    merged = ReproducibleSum(a.hi + b.hi, a.lo + b.lo, top, a.n_terms + b.n_terms)
    assert torch.equal(merged.value(), _sum(terms).value())


def test_close_to_the_exact_sum():
    """Within 2**-BIN_BITS of each element's largest term (the digits below the two bins are dropped)."""
    terms = _terms()
    got = _sum(terms).value()
    for i in range(24):
        for j in range(24):
            values = [t[i, j].item() for t in terms]
            exact = math.fsum(values)
            bound = len(values) * 2.0**-BIN_BITS * max(abs(v) for v in values) + 1e-300
            assert abs(got[i, j].item() - exact) <= bound, (i, j, got[i, j].item(), exact)


def test_matches_a_plain_float64_sum_on_well_scaled_data():
    g = torch.Generator().manual_seed(1)
    terms = [torch.randn(40, 40, generator=g, dtype=torch.float64) for _ in range(20)]
    plain = torch.stack(terms).sum(0)
    assert torch.allclose(_sum(terms).value(), plain, rtol=0, atol=1e-9)


def test_non_finite_terms_stay_non_finite_and_are_refused_as_statistics():
    acc = ReproducibleSum.of(torch.tensor([float("nan"), float("inf"), 2.0], dtype=torch.float64))
    v = acc.value()
    assert not torch.isfinite(v[0]) and not torch.isfinite(v[1]) and v[2] == 2.0
    st = LayerStatistics(2)
    st.update(torch.tensor([[1.0, float("inf")]], dtype=torch.float64))
    with pytest.raises(NonFiniteStatisticsError):
        st.require("gram", "whiten")


def test_too_many_terms_is_a_clear_error():
    acc = ReproducibleSum.zeros((2,))
    acc.n_terms = MAX_TERMS
    with pytest.raises(FlashSVDMethodError, match="larger"):
        acc.add_(torch.ones(2, dtype=torch.float64))


def test_layer_statistics_read_and_assign_sums():
    x = torch.randn(50, 6, dtype=torch.float64)
    st = LayerStatistics(6)
    st.update(x[:20])
    st.update(x[20:])
    assert isinstance(st.sums["gram"], ReproducibleSum)
    assert st.has("gram") and st.has("x_sum") and not st.has("cross")
    # at least BIN_BITS (36) bits of each element's largest term: ~1.5e-11 relative
    assert torch.allclose(st.gram, x.T @ x, rtol=1e-10, atol=0)
    assert torch.allclose(st.x_sum, x.sum(0), rtol=1e-10, atol=1e-12)
    fixed = LayerStatistics(6, gram=torch.eye(6, dtype=torch.float64))
    assert torch.equal(fixed.gram, torch.eye(6, dtype=torch.float64)) and fixed.x_sum is None
    centered = st.centered()
    assert st.sums["gram"] is not centered.sums["gram"] and isinstance(st.sums["gram"], ReproducibleSum)
    with pytest.raises(TypeError, match="no statistic"):
        LayerStatistics(6, gramm=torch.eye(6))


def test_settle_reads_the_value_out_in_place_and_drops_the_limbs():
    terms = _terms()
    acc = _sum(terms)
    expected = acc.value()
    hi = acc.hi
    out = acc.settle_()
    assert out is hi and torch.equal(out, expected)  # same bits, no new matrix
    assert acc.settled and acc.lo is None and acc.bin is None and torch.equal(acc.value(), expected)
    assert acc.settle_() is hi  # idempotent
    with pytest.raises(FlashSVDMethodError, match="settled"):
        acc.add_(terms[0])
    with pytest.raises(FlashSVDMethodError, match="settled"):
        acc.align_(torch.zeros_like(hi, dtype=torch.int8))

    x = torch.randn(40, 5, dtype=torch.float64)
    st = LayerStatistics(5)
    st.update(x[:13])
    st.update(x[13:])
    gram, x_sum = st.gram, st.x_sum
    assert st.settle_() is st
    assert not any(isinstance(v, ReproducibleSum) for v in st.sums.values())
    assert torch.equal(st.gram, gram) and torch.equal(st.x_sum, x_sum)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_cuda_sum_equals_the_cpu_sum():
    """On CUDA the update is one compiled kernel; it must give the bits of the eager CPU path."""
    terms = _terms()
    cpu = _sum(terms, rows=[slice(0, 10), slice(10, 24)])
    gpu = ReproducibleSum.zeros(terms[0].shape, "cuda")
    for t in terms:
        gpu.add_(t[:10].cuda(), rows=slice(0, 10))
        gpu.add_(t[10:].cuda(), rows=slice(10, 24))
    assert torch.equal(gpu.value().cpu(), cpu.value())
    assert torch.equal(gpu.bin.cpu(), cpu.bin)


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor's CPU backend needs a C++ compiler",
)
def test_compiled_update_equals_the_eager_one_on_cpu():
    """The function CUDA compiles, compiled here by inductor's CPU backend: same bits as eager."""
    fused = torch.compile(_add_into, dynamic=True, fullgraph=True)
    terms = _terms(n=6, shape=(8, 8))
    acc = ReproducibleSum.zeros((8, 8))
    for t in terms:
        fused(t[:3].contiguous(), acc.hi[:3], acc.lo[:3], acc.bin[:3])
        fused(t[3:].contiguous(), acc.hi[3:], acc.lo[3:], acc.bin[3:])
    assert torch.equal(acc.value(), _sum(terms).value())


@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="inductor's CPU backend needs a C++ compiler",
)
def test_large_cpu_sums_run_compiled_with_the_eager_bits(monkeypatch):
    """A CPU sum of ``CPU_FUSED_MIN_ELEMENTS`` or more runs the compiled update (one pass, not ~30):
    whole and by row blocks, the same bits as the eager update of the same terms."""
    from flashsvd.methods import reproducible

    calls = []
    compiled = reproducible._fused_add_into()
    assert compiled is not None
    monkeypatch.setitem(reproducible._FUSED, "fn", lambda *a: (calls.append(1), compiled(*a))[1])
    shape = (512, reproducible.CPU_FUSED_MIN_ELEMENTS // 512)
    g = torch.Generator().manual_seed(3)
    terms = [torch.randn(shape, generator=g, dtype=torch.float64) * 10.0 ** (k - 2) for k in range(4)]
    whole = ReproducibleSum.zeros(shape)
    for t in terms:
        whole.add_(t)
    assert len(calls) == 4
    eager = ReproducibleSum.zeros(shape)
    for t in terms:
        _add_into(t, eager.hi, eager.lo, eager.bin)
    assert (
        torch.equal(whole.hi, eager.hi)
        and torch.equal(whole.lo, eager.lo)
        and torch.equal(whole.bin, eager.bin)
    )
    small = ReproducibleSum.zeros((8, 8))
    small.add_(torch.ones(8, 8, dtype=torch.float64))
    assert len(calls) == 4  # small sums stay eager
