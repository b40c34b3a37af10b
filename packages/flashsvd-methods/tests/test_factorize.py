from __future__ import annotations

import pytest
import torch

from flashsvd.methods import (
    CalibrationMissingError,
    InvalidRankError,
    LayerStatistics,
    NonFiniteStatisticsError,
    ShapeError,
    UnknownMethodError,
    factorize,
)


def lowrank_plus_noise(
    out: int, inp: int, rank: int, gen: torch.Generator, noise: float = 0.1
) -> torch.Tensor:
    a = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    b = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
    return a @ b / rank**0.5 + noise * torch.randn(out, inp, generator=gen, dtype=torch.float64)


def anisotropic_inputs(n: int, inp: int, gen: torch.Generator) -> torch.Tensor:
    scales = torch.logspace(1, -2, inp, dtype=torch.float64)
    mix = torch.linalg.qr(torch.randn(inp, inp, generator=gen, dtype=torch.float64))[0]
    return (torch.randn(n, inp, generator=gen, dtype=torch.float64) * scales) @ mix.T


ALL = ["svd", "fwsvd", "whiten", "svdllm", "asvd", "ars"]


def make_stats(w: torch.Tensor, x: torch.Tensor, gen: torch.Generator) -> LayerStatistics:
    st = LayerStatistics(w.shape[1])
    st.update(x)
    st.update_weight_grad(torch.randn(w.shape, generator=gen, dtype=torch.float64))
    return st


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("n_heads", [None, 3])
def test_full_rank_is_exact(method, n_heads, gen):
    w = torch.randn(12, 10, generator=gen, dtype=torch.float64)
    x = anisotropic_inputs(64, 10, gen)
    full = min(10, 12 // (n_heads or 1))
    f = factorize(w, full, method, stats=make_stats(w, x, gen), n_heads=n_heads)
    assert torch.allclose(f.merged_weight(), w, atol=1e-8)
    assert f.error < 1e-10


def test_svd_eckart_young(gen):
    w = torch.randn(20, 14, generator=gen, dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    r = 5
    f = factorize(w, r, "svd")
    err = torch.linalg.norm(w - f.merged_weight())
    assert torch.isclose(err, s[r:].square().sum().sqrt(), rtol=1e-10)
    assert f.u.shape == (14, r) and f.v.shape == (r, 20)
    # √Σ split: both factors carry the same singular values
    assert torch.allclose(torch.linalg.svdvals(f.u), torch.linalg.svdvals(f.v), rtol=1e-8)
    for _ in range(20):
        a = torch.randn(20, r, generator=gen, dtype=torch.float64)
        b = torch.linalg.lstsq(a, w).solution  # best B for a random A
        assert torch.linalg.norm(w - a @ b) >= err - 1e-9


@pytest.mark.parametrize("method", ["whiten", "svdllm"])
def test_data_aware_beats_svd_on_data_error(method, gen):
    w = lowrank_plus_noise(24, 32, 6, gen, noise=0.3)
    x = anisotropic_inputs(400, 32, gen)
    st = LayerStatistics(32)
    st.update(x[:150])
    st.update(x[150:])
    r = 6
    e_svd = torch.linalg.norm((w - factorize(w, r, "svd").merged_weight()) @ x.T)
    f = factorize(w, r, method, stats=st)
    e_m = torch.linalg.norm((w - f.merged_weight()) @ x.T)
    assert e_m < 0.9 * e_svd
    assert f.data_error is not None and f.data_error < 1


def test_fwsvd_uniform_fisher_equals_svd(gen):
    w = torch.randn(16, 12, generator=gen, dtype=torch.float64)
    a = factorize(w, 4, "fwsvd", fisher=torch.full((12,), 3.0, dtype=torch.float64)).merged_weight()
    b = factorize(w, 4, "svd").merged_weight()
    assert torch.allclose(a, b, atol=1e-10)


def test_svdllm_update_targets_dense_outputs(gen):
    w = lowrank_plus_noise(16, 20, 4, gen, noise=0.3)
    x_ref = anisotropic_inputs(300, 20, gen)
    x_act = x_ref + 0.3 * torch.randn(x_ref.shape, generator=gen, dtype=torch.float64)  # drifted inputs
    st = LayerStatistics(20)
    st.update(x_act)
    st.update_cross(x_act, x_ref)
    plain = factorize(w, 4, "svdllm", stats=st).merged_weight()
    upd = factorize(w, 4, "svdllm", stats=st, update="v").merged_weight()
    rrr = factorize(w, 4, "whiten", stats=st).merged_weight()
    target = x_ref @ w.T

    def err(m):
        return torch.linalg.norm(target - x_act @ m.T)

    assert err(upd) < err(plain)
    assert err(rrr) <= err(upd) + 1e-9  # reduced-rank regression is the optimum


def test_per_head_shapes_and_merge(gen):
    w = torch.randn(4 * 8, 20, generator=gen, dtype=torch.float64)
    f = factorize(w, 3, "svd", n_heads=4, bias=torch.zeros(32, dtype=torch.float64))
    assert f.u.shape == (20, 12) and f.v.shape == (4, 3, 8)
    assert f.per_head and f.n_heads == 4 and f.out_features == 32
    assert f.num_parameters == 20 * 12 + 4 * 3 * 8
    x = torch.randn(5, 20, generator=gen, dtype=torch.float64)
    p = x @ f.u
    heads = [p[:, h * 3 : (h + 1) * 3] @ f.v[h] for h in range(4)]
    assert torch.allclose(torch.cat(heads, 1), x @ f.merged_weight().T, atol=1e-10)
    # each head is the best rank-3 approximation of its own row block
    for h in range(4):
        wh = w[h * 8 : (h + 1) * 8]
        s = torch.linalg.svdvals(wh)
        assert torch.isclose(torch.linalg.norm(wh - f.merged_weight()[h * 8 : (h + 1) * 8]), s[3:].norm())


def test_dtype_preserved(gen):
    w = torch.randn(8, 6, generator=gen).to(torch.bfloat16)
    f = factorize(w, 2)
    assert f.u.dtype == torch.bfloat16 and f.v.dtype == torch.bfloat16


def test_errors(gen):
    w = torch.randn(8, 6, generator=gen)
    with pytest.raises(InvalidRankError, match="≥ 1"):
        factorize(w, 0)
    with pytest.raises(InvalidRankError, match="maximum is 6"):
        factorize(w, 7)
    with pytest.raises(InvalidRankError, match="maximum is 2"):
        factorize(w, 3, n_heads=4)
    with pytest.raises(InvalidRankError, match="positive integer"):
        factorize(w, 2.5)
    with pytest.raises(ShapeError):
        factorize(w, 2, n_heads=3)
    with pytest.raises(UnknownMethodError, match="Available: ars, asvd, fwsvd, svd, svdllm, whiten"):
        factorize(w, 2, "bogus")
    for m in ["whiten", "svdllm", "asvd", "fwsvd"]:
        with pytest.raises(CalibrationMissingError, match=m):
            factorize(w, 2, m)
    st = LayerStatistics(6)
    st.gram = torch.full((6, 6), float("nan"), dtype=torch.float64)
    with pytest.raises(NonFiniteStatisticsError, match="non-finite"):
        factorize(w, 2, "whiten", stats=st)
    st.gram = torch.zeros(6, 6, dtype=torch.float64)
    with pytest.raises(NonFiniteStatisticsError, match="zero"):
        factorize(w, 2, "whiten", stats=st)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteStatisticsError):
        factorize(bad, 2)
    assert issubclass(InvalidRankError, ValueError)


def test_singular_gram_is_handled(gen):
    # inputs live in a 3-dim subspace of 10: Gram has rank 3
    w = torch.randn(8, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(50, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 10, generator=gen, dtype=torch.float64
    )
    st = LayerStatistics(10)
    st.update(x)
    f = factorize(w, 3, "whiten", stats=st)
    assert torch.isfinite(f.merged_weight()).all()
    # rank 3 is enough to reproduce W on the data subspace
    rel = torch.linalg.norm((w - f.merged_weight()) @ x.T) / torch.linalg.norm(w @ x.T)
    assert rel < 1e-3


# ---- centering: the best affine fit on the calibration data -----------------------------------------
def _affine_error(w, b, f, x) -> float:
    y = x @ w.T + b
    return float((x @ f.merged_weight().T + f.bias - y).norm() / y.norm())


@pytest.mark.parametrize("method", ["whiten", "svdllm"])
@pytest.mark.parametrize("n_heads", [None, 4])
def test_center_folds_the_mean_into_the_bias(method, n_heads, gen):
    w = lowrank_plus_noise(32, 24, 6, gen)
    b = torch.randn(32, generator=gen, dtype=torch.float64)
    offset = 3.0 * torch.randn(24, generator=gen, dtype=torch.float64)  # LayerNorm-like mean shift
    x = anisotropic_inputs(600, 24, gen) + offset
    st = make_stats(w, x, gen)
    plain = factorize(w, 3, method, stats=st, bias=b, n_heads=n_heads)
    centered = factorize(w, 3, method, stats=st, bias=b, n_heads=n_heads, center=True)
    assert centered.info["centered"] and centered.bias is not None
    assert _affine_error(w, b, centered, x) < 0.9 * _affine_error(w, b, plain, x)
    full = factorize(w, 8 if n_heads else 24, method, stats=st, bias=b, n_heads=n_heads, center=True)
    torch.testing.assert_close(full.merged_weight(), w, atol=1e-8, rtol=0)
    torch.testing.assert_close(full.bias, b, atol=1e-8, rtol=0)  # exact weight: nothing to fold
    no_bias = factorize(w, 3, method, stats=st, n_heads=n_heads, center=True)
    torch.testing.assert_close(no_bias.bias, centered.bias - b)


def test_center_with_paired_statistics_is_affine_regression(gen):
    """At full rank with ``cross``: ``Ŵ, b'`` = least squares of the dense outputs on ``[X̃, 1]``."""
    w = lowrank_plus_noise(10, 8, 3, gen)
    b = torch.randn(10, generator=gen, dtype=torch.float64)
    x_ref = anisotropic_inputs(400, 8, gen) + 2.0
    x_act = x_ref + 0.1 * torch.randn(400, 8, generator=gen, dtype=torch.float64) + 0.3
    st = LayerStatistics(8)
    st.update(x_act)
    st.update_cross(x_act, x_ref)
    f = factorize(w, 8, "whiten", stats=st, bias=b, center=True)
    design = torch.cat([x_act, torch.ones(400, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, x_ref @ w.T + b).solution  # [9, 10]
    torch.testing.assert_close(f.merged_weight(), sol[:8].T, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(f.bias, sol[8], atol=1e-7, rtol=1e-7)


def test_center_needs_an_output_fitting_method(gen):
    w = lowrank_plus_noise(8, 8, 2, gen)
    st = make_stats(w, anisotropic_inputs(50, 8, gen), gen)
    with pytest.raises(ValueError, match="center=True needs"):
        factorize(w, 2, "svd", stats=st, center=True)
    with pytest.raises(ValueError, match="needs calibration statistics"):
        factorize(w, 2, "whiten", center=True)


def test_output_fisher_whitening_minimizes_the_weighted_error(gen):
    """``output_fisher=True`` optimizes ``‖diag(f)(W − Ŵ)Xᵀ‖`` with ``f = √grad_out_sq``: lower there than plain."""
    w = lowrank_plus_noise(24, 16, 5, gen)
    x = anisotropic_inputs(300, 16, gen)
    st = make_stats(w, x, gen)
    st.update_output_grad(
        torch.randn(300, 24, generator=gen, dtype=torch.float64) * torch.logspace(1, -1, 24)
    )
    f = st.grad_out_sq.sqrt()

    def weighted(fac):
        return float((f[:, None] * (w - fac.merged_weight()) @ x.T).norm())

    plain = factorize(w, 3, "whiten", stats=st)
    fisher = factorize(w, 3, "whiten", stats=st, output_fisher=True)
    assert fisher.info["output_fisher"] and weighted(fisher) < 0.95 * weighted(plain)
    assert fisher.data_error >= plain.data_error - 1e-12  # plain whitening stays optimal unweighted
    exact = factorize(w, 16, "whiten", stats=st, output_fisher=True)
    torch.testing.assert_close(exact.merged_weight(), w, atol=1e-8, rtol=0)
    with pytest.raises(CalibrationMissingError, match="grad_out_sq"):
        factorize(w, 3, "whiten", stats=make_stats(w, x, gen), output_fisher=True)


# ---- the SVD routes (the Gram/eigen route is what CUDA runs; CPU tests both) ----------------------
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (32, 32)])
def test_gram_route_equals_lapack_svd(shape):
    from flashsvd.methods.linalg import truncated_svd

    g = torch.Generator().manual_seed(3)
    m = torch.randn(*shape, generator=g, dtype=torch.float64)
    r = 7
    p1, s1, q1, all1 = truncated_svd(m, r, driver="svd")
    p2, s2, q2, all2 = truncated_svd(m, r, driver="gram")
    assert torch.allclose(s1, s2, rtol=1e-10, atol=1e-12)
    assert torch.allclose(all1, all2, rtol=1e-8, atol=1e-10)
    # same signs by construction, so the factors themselves agree, not only their product
    assert torch.allclose(p1, p2, atol=1e-9) and torch.allclose(q1, q2, atol=1e-9)
    assert torch.allclose((p2 * s2) @ q2.T, (p1 * s1) @ q1.T, atol=1e-10)


def test_svd_signs_are_canonical():
    """A sign-flipped or round-off-perturbed input gives the same factors (no arbitrary sign flips)."""
    from flashsvd.methods.linalg import truncated_svd

    g = torch.Generator().manual_seed(4)
    m = torch.randn(30, 20, generator=g, dtype=torch.float64)
    for driver in ("svd", "gram"):
        p, _s, q, _ = truncated_svd(m, 5, driver=driver)
        pp, _sp, qp, _ = truncated_svd(
            m * (1 + 1e-15 * torch.randn(m.shape, generator=g, dtype=torch.float64)), 5, driver=driver
        )
        assert torch.allclose(p, pp, atol=1e-10) and torch.allclose(q, qp, atol=1e-10)
        assert bool((p.gather(0, p.abs().argmax(0)[None]) > 0).all())


def test_gram_route_rank_deficient_is_finite():
    """Kept pairs beyond the numerical rank come out finite (zero), not NaN from a 0/0."""
    from flashsvd.methods.linalg import truncated_svd

    g = torch.Generator().manual_seed(5)
    m = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(
        3, 16, generator=g, dtype=torch.float64
    )
    p, s, q, _ = truncated_svd(m, 8, driver="gram")
    assert torch.isfinite(p).all() and torch.isfinite(q).all()
    assert torch.allclose((p * s) @ q.T, m, atol=1e-8)


def test_whitening_transform_leaves_the_gram_untouched():
    from flashsvd.methods.linalg import whitening_transform

    g = torch.Generator().manual_seed(6)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    gram = x.T @ x
    # float64 already, so no copy is made on the way in: the transform must not modify it in place
    before = gram.clone()
    t = whitening_transform(gram, damping=0.1)
    assert torch.equal(gram, before)
    damped = gram + 0.1 * gram.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    assert torch.allclose(t.forward @ t.forward.T, damped, atol=1e-9)
    assert torch.allclose(t.forward @ t.inverse, torch.eye(12, dtype=torch.float64), atol=1e-9)


@pytest.mark.parametrize("with_scale", [False, True])
def test_projection_route_equals_cholesky_route(with_scale):
    """Wide matrices skip the Cholesky factor: same factors as ``trunc_r(L W S) S⁻¹`` (float64)."""
    from flashsvd.methods.linalg import projected_lowrank, weighted_lowrank, whitening_transform

    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64) * torch.linspace(
        0.1, 3, 24, dtype=torch.float64
    )
    gram = x.T @ x
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    scale = torch.rand(10, generator=g, dtype=torch.float64) + 0.5 if with_scale else None
    u1, v1, s1 = weighted_lowrank(w, 4, whitening_transform(gram), scale)
    u2, v2, s2 = projected_lowrank(w, 4, gram, scale)
    assert torch.allclose(s1, s2, rtol=1e-9, atol=1e-9)
    assert torch.allclose(u1, u2, atol=1e-9) and torch.allclose(v1, v2, atol=1e-9)


def test_whiten_with_singular_gram_is_optimal_and_finite():
    """Fewer tokens than inputs: no jitter needed; the fit is exact on the data it saw."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64)  # rank-5 Gram of a 16-wide input
    w = torch.randn(8, 16, generator=g, dtype=torch.float64)
    st = LayerStatistics(in_features=16)
    st.update(x)
    f = factorize(w, 5, "whiten", stats=st)
    merged = f.merged_weight().to(torch.float64)
    assert torch.isfinite(merged).all()
    assert torch.allclose(x @ merged.T, x @ w.T, atol=1e-8)  # rank 5 reproduces every seen output


def test_check_finite_counts_bad_values_and_tolerates_an_overflowing_sum():
    from flashsvd.methods.errors import NonFiniteStatisticsError
    from flashsvd.methods.linalg import check_finite

    big = torch.full((3, 4), 1e308, dtype=torch.float64)  # finite, but its sum overflows
    check_finite(big, "big")
    check_finite(torch.randn(5, 5, dtype=torch.bfloat16), "bf16")
    check_finite(torch.arange(6), "ints")
    check_finite(torch.empty(0, 3), "empty")
    for bad, count in ((float("nan"), 1), (float("inf"), 1)):
        t = torch.randn(7, 9)
        t[2, 3] = bad
        with pytest.raises(NonFiniteStatisticsError, match=f"contains {count} non-finite"):
            check_finite(t, "weight")
    t = big.clone()
    t[0, 0], t[1, 1] = float("inf"), float("-inf")  # the sum is NaN, the count exact
    with pytest.raises(NonFiniteStatisticsError, match="contains 2 non-finite"):
        check_finite(t, "gram")
