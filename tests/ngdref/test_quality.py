"""The quality indicator gamma (Eq. 15), Fisher-vector products, CG and diagnostics
(:ref:`conv-gamma`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import ngdref
from tests.cases import (
    CASES,
    EPS,
    SAFETY,
    TALL,
    WIDE,
    assert_close_norm,
    ids,
    np_fisher,
    solve_rtol,
    sum_rtol,
)


def _np_gamma(d: np.ndarray, fisher: np.ndarray, g: np.ndarray) -> float:
    return float(np.sqrt(d @ fisher @ d) / abs(d @ g))


def _gamma(backend, d, fisher, g) -> float:
    out = ngdref.gamma(backend.asarray(d), backend.asarray(g), fisher=backend.asarray(fisher))
    assert type(out) is float  # the scalar convention of the ngdref module docstring
    return out


def _gamma_rtol(d: np.ndarray, m: np.ndarray, g: np.ndarray, terms: int) -> float:
    """Relative bound for two routes to gamma = sqrt(d^T M d) / |d^T g|.

    d^T M d and d^T g are sums of ``terms`` products; each is accurate to terms * eps
    times the sum of its absolute products, relative to its value (which may cancel):
    |d|^T |M| |d| / d^T M d and |d|^T |g| / |d^T g|; the square root halves the first.
    """
    quad = float(np.abs(d) @ np.abs(m) @ np.abs(d)) / abs(float(d @ m @ d))
    lin = float(np.abs(d) @ np.abs(g)) / abs(float(d @ g))
    return 2 * SAFETY * terms * EPS * (quad / 2 + lin)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_gamma_matches_formula_and_is_scale_invariant(case, backend):
    pr = case.build()
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    d = np.random.default_rng(1).standard_normal(pr.p)
    base = _gamma(backend, d, fisher, pr.grad)
    rtol = _gamma_rtol(d, fisher, pr.grad, pr.p)
    assert base == pytest.approx(_np_gamma(d, fisher, pr.grad), rel=rtol)
    for c in (3.0, -0.5, -2.0, 1e3, -1e-3):
        assert _gamma(backend, c * d, fisher, pr.grad) == pytest.approx(base, rel=2 * rtol)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ngd_direction_minimises_gamma(case, backend):
    """Cauchy-Schwarz: gamma(d) >= 1/sqrt(g^T M^-1 g) with equality at d = M^-1 g.

    M = F + lambda I (F itself is singular when N*C < P; for the tall cases also M = F).
    """
    pr = case.build()
    a = pr.on(backend)
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    factors = pr.loss.hessian_sqrt(a.logits, a.targets)
    rng = np.random.default_rng(2)
    for damping in [0.1] + ([0.0] if case in TALL else []):
        m = fisher + damping * np.eye(pr.p)
        minimum = 1 / np.sqrt(pr.grad @ np.linalg.solve(m, pr.grad))
        d = backend.to_numpy(ngdref.ngd_update(a.jacobians, factors, a.grad, damping=damping))
        # gamma is stationary at its minimiser: d's relative error e (solve_rtol) moves it by
        # O(cond e^2) only; the evaluation itself rounds as _gamma_rtol says
        rtol = _gamma_rtol(d, m, pr.grad, pr.p) + np.linalg.cond(m) * solve_rtol(m) ** 2
        assert _gamma(backend, d, m, pr.grad) == pytest.approx(minimum, rel=rtol)
        others = [pr.grad, *rng.standard_normal((20, pr.p)), d + 0.1 * rng.standard_normal(pr.p)]
        for other in others:
            assert _gamma(backend, other, m, pr.grad) > minimum * (1 + 1e-9)


@pytest.mark.parametrize("case", WIDE[:2], ids=ids(WIDE[:2]))
def test_gamma_with_callable_fisher_equals_matrix(case, backend):
    pr = case.build()
    a = pr.on(backend)
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    f = backend.asarray(fisher)
    xp = backend.xp

    def matvec(v):
        return xp.matmul(f, v[:, None])[:, 0]

    d = backend.asarray(np.random.default_rng(3).standard_normal(pr.p))
    with_matrix = ngdref.gamma(d, a.grad, fisher=f)
    with_callable = ngdref.gamma(d, a.grad, fisher_vp=matvec)
    d_np = backend.to_numpy(d)
    rtol = _gamma_rtol(d_np, fisher, pr.grad, pr.p)
    assert with_callable == pytest.approx(with_matrix, rel=rtol)
    # the matrix-free Fisher-vector product and the jvp-only quadratic form: products through
    # J (C P terms) and H (C terms) instead of the P x P matrix
    abs_form = sum(
        np.abs(jn) @ np.abs(d_np) @ np.abs(hn) @ np.abs(jn) @ np.abs(d_np)
        for jn, hn in zip(pr.jacobians, pr.logit_hessians, strict=True)
    )
    rtol_free = rtol + 2 * SAFETY * pr.c * (pr.p + pr.c) * EPS * abs_form / (d_np @ fisher @ d_np)
    fvp = ngdref.fisher_vp(pr.provider(backend), pr.loss, a.targets)
    assert ngdref.gamma(d, a.grad, fisher_vp=fvp) == pytest.approx(with_matrix, rel=rtol_free)
    form = ngdref.fisher_quadratic_form(pr.provider(backend), pr.loss, a.targets)
    assert ngdref.gamma(d, a.grad, quadratic_form=form) == pytest.approx(with_matrix, rel=rtol_free)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_fisher_vp_equals_dense_fisher(case, backend):
    pr = case.build()
    a = pr.on(backend)
    provider = pr.provider(backend)
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    v = np.random.default_rng(4).standard_normal(pr.p)
    for reduction, factor in (("sum", 1.0), ("mean", 1.0 / pr.n), (0.3, 0.3)):
        fvp = ngdref.fisher_vp(provider, pr.loss, a.targets, reduction=reduction)
        expected = factor * fisher @ v
        # F v through J (P terms), H (C) and J^T (N C): within terms eps sum |J|^T |H| |J| |v|
        abs_fv = factor * sum(
            np.abs(jn).T @ np.abs(hn) @ np.abs(jn) @ np.abs(v)
            for jn, hn in zip(pr.jacobians, pr.logit_hessians, strict=True)
        )
        terms = pr.p + pr.c + pr.n * pr.c
        assert_close_norm(
            backend.to_numpy(fvp(backend.asarray(v))), expected,
            sum_rtol(float(np.linalg.norm(abs_fv)), expected, terms),
        )
        form = ngdref.fisher_quadratic_form(provider, pr.loss, a.targets, reduction=reduction)
        quad = factor * v @ fisher @ v
        assert float(form(backend.asarray(v))) == pytest.approx(
            quad, rel=2 * SAFETY * (terms + pr.p) * EPS * float(np.abs(v) @ abs_fv) / quad
        )


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_gamma_ratio(case, backend):
    pr = case.build()
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    d = np.random.default_rng(5).standard_normal(pr.p)
    ratio = ngdref.gamma_ratio(
        backend.asarray(d), backend.asarray(pr.grad), fisher=backend.asarray(fisher)
    )
    assert type(ratio) is float
    expected = _np_gamma(d, fisher, pr.grad) / _np_gamma(pr.grad, fisher, pr.grad)
    rtol = _gamma_rtol(d, fisher, pr.grad, pr.p) + _gamma_rtol(pr.grad, fisher, pr.grad, pr.p)
    assert float(ratio) == pytest.approx(expected, rel=rtol)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_cg_solves_and_its_iterates_improve_gamma(case, backend):
    """CG's k-th iterate minimises the quadratic over the k-th Krylov space, hence
    (scale invariance) also gamma_M over it, M = F + lambda I: nested spaces make
    gamma_M(d_k) non-increasing (App. F.2)."""
    pr = case.build()
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    f = backend.asarray(fisher)
    xp = backend.xp

    def matvec(v):
        return xp.matmul(f, v[:, None])[:, 0]

    for damping in [0.1] + ([0.0] if case in TALL else []):
        m = fisher + damping * np.eye(pr.p)
        iterates: list[np.ndarray] = []

        def record(x, iterates=iterates):
            iterates.append(backend.to_numpy(x))

        d = ngdref.ngd_update_cg(
            matvec, backend.asarray(pr.grad), damping=damping, tol=1e-12, callback=record
        )
        expected = np.linalg.solve(m, pr.grad)
        # CG's true residual is <= 2e-12 ||g||: error <= 2e-12 cond(M) relative, norm-wise
        assert_close_norm(
            backend.to_numpy(d), expected, 2e-12 * np.linalg.cond(m) + solve_rtol(m)
        )
        assert len(iterates) >= 2
        gammas = [_np_gamma(x, m, pr.grad) for x in iterates]
        assert all(b <= a * (1 + 1e-9) for a, b in itertools.pairwise(gammas)), gammas
        # at the minimiser gamma is stationary: an O(e) error in d moves it by O(cond e^2)
        e = 2e-12 * np.linalg.cond(m) + solve_rtol(m)
        rtol = _gamma_rtol(iterates[-1], m, pr.grad, pr.p) + np.linalg.cond(m) * e**2
        assert gammas[-1] == pytest.approx(1 / np.sqrt(pr.grad @ expected), rel=rtol)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_diagnostics_match_numpy(case, backend):
    pr = case.build()
    a = pr.on(backend)
    g_rows = pr.per_sample_grads
    d = np.random.default_rng(6).standard_normal(pr.p)
    norms = np.linalg.norm(g_rows, axis=1)
    # G d: products of P terms, rounding P eps ||G|| ||d|| (norm-wise: entries may cancel)
    rtol = 2 * SAFETY * pr.p * EPS * np.linalg.norm(g_rows) * np.linalg.norm(d)
    reductions = ngdref.loss_reductions(a.per_sample_grads, backend.asarray(d))
    assert_close_norm(backend.to_numpy(reductions), g_rows @ d, rtol / np.linalg.norm(g_rows @ d))
    kappa = ngdref.projections(a.per_sample_grads, backend.asarray(d))
    expected = (g_rows @ d) / norms
    assert_close_norm(
        backend.to_numpy(kappa), expected, rtol / norms.min() / np.linalg.norm(expected)
    )


def _np_tail_ratio(norms: np.ndarray, fraction: float = 0.1) -> float:
    """The authors' optimiser log: mean of the top int(0.1 N) norms over the bottom ones."""
    k = max(1, int(len(norms) * fraction))
    ordered = sorted(norms)
    return float(np.mean(ordered[-k:]) / np.mean(ordered[:k]))


@pytest.mark.parametrize("n", [3, 10, 25, 64])
def test_grad_norm_imbalance_statistics_equal_direct_computations(n, backend):
    """Norms of P-term sums, each accurate to P eps relative: ratios to 4 P eps (SAFETY x)."""
    rng = np.random.default_rng(n)
    rows = rng.standard_normal((n, 30)) * np.logspace(0, 3, n)[rng.permutation(n)][:, None]
    norms = np.sqrt([sum(v * v for v in row) for row in rows])  # a Python loop
    kept = np.ones(n, dtype=bool)
    kept[0] = False
    rtol = SAFETY * 4 * 30 * EPS
    for statistic, expected, kept_expected in (
        ("max_min", norms.max() / norms.min(), norms[1:].max() / norms[1:].min()),
        ("tail_10", _np_tail_ratio(norms), _np_tail_ratio(norms[1:])),
    ):
        got = ngdref.grad_norm_imbalance(backend.asarray(rows), statistic=statistic)
        assert isinstance(got, float)
        assert got == pytest.approx(expected, rel=rtol)
        got = ngdref.grad_norm_imbalance(
            ngdref.as_rows(backend.asarray(rows)), statistic=statistic,
            kept=backend.asarray(kept),
        )
        assert got == pytest.approx(kept_expected, rel=rtol)
    if n >= 20:  # the two statistics differ once the tails hold more than one row
        assert _np_tail_ratio(norms) < norms.max() / norms.min()


def test_grad_norm_imbalance_of_float32_rows_does_not_underflow(backend):
    """Squares of 1e-23 underflow in float32; the norms are accumulated in float64."""
    if backend.name not in ("numpy", "torch"):
        pytest.skip("float32 variant on numpy and torch")
    rows = np.ones((4, 8)) * np.array([1e-23, 1e-22, 1.0, 2.0])[:, None]
    got = ngdref.grad_norm_imbalance(backend.asarray(rows.astype(np.float32)))
    expected = 2.0 / float(np.float32(1e-23))
    assert got == pytest.approx(expected, rel=SAFETY * 8 * float(np.finfo(np.float32).eps))


def test_ef_projections_are_inversely_scaled(backend):
    """Eq. 6: with lambda -> 0, EF gives kappa_n = 1 / ||grad l_n||."""
    pr = WIDE[0].build()
    a = pr.on(backend)
    ef = ngdref.ef_update(a.per_sample_grads, damping=0.0)
    kappa = backend.to_numpy(ngdref.projections(a.per_sample_grads, ef))
    g_rows = pr.per_sample_grads
    norms = np.linalg.norm(g_rows, axis=1)
    expected = 1 / norms
    # G d - 1 is the undamped solve's residual: (n + 2 p) eps ||G||^2 ||c|| (backward stable
    # solve of K c = 1, K and G^T c, G d each formed with p-term products); divided by ||g_n||
    g_norm = np.linalg.norm(g_rows, 2)
    c = np.linalg.solve(g_rows @ g_rows.T, np.ones(pr.n))
    residual = SAFETY * (pr.n + 2 * pr.p) * EPS * g_norm**2 * np.linalg.norm(c)
    assert_close_norm(kappa, expected, residual / norms.min() / np.linalg.norm(expected))


def test_grad_norm_imbalance_with_a_zero_gradient_is_refused_or_an_asked_for_inf(backend):
    """No silent inf: a zero row names itself, unless the caller asks for +inf."""
    rows = np.random.default_rng(7).standard_normal((3, 5))
    rows[1] = 0.0
    for statistic in ("max_min", "tail_10"):
        with pytest.raises(ValueError, match=r"rows \[1\] are all zero"):
            ngdref.grad_norm_imbalance(backend.asarray(rows), statistic=statistic)
        got = ngdref.grad_norm_imbalance(
            backend.asarray(rows), statistic=statistic, zero_rows="inf"
        )
        assert got == float("inf")
    with pytest.raises(ValueError, match="statistic must be one of"):
        ngdref.grad_norm_imbalance(backend.asarray(rows), statistic="max/min")


def test_gamma_is_infinite_for_a_direction_orthogonal_to_the_gradient(backend):
    """d^T g = 0: the direction is useless to first order, gamma = +inf (documented)."""
    fisher = backend.asarray(np.eye(3))
    d = backend.asarray(np.array([1.0, 0.0, 0.0]))
    g = backend.asarray(np.array([0.0, 1.0, 2.0]))
    assert ngdref.gamma(d, g, fisher=fisher) == float("inf")
