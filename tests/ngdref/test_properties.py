"""Property-based versions of the update identities over random N, C, P, lambda.

The identities are those of the conventions page, :ref:`conv-updates`.

NumPy backend only: the backend matrix is covered by the parametrised tests.
Every draw has N < P (G of full row rank); about half also have N*C >= P.

Tolerances: the dense P x P reference solves (M + lambda I) x = g, which a
backward-stable solver gets right to about P eps cond(M + lambda I) relative;
random draws reach cond ~ 1e5 at lambda = 1e-3, so each comparison here is
norm-wise with the bound of tests/cases.py's solve_rtol from the draw's own
condition number and size.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ngdref
from tests.cases import (
    EPS,
    SAFETY,
    Case,
    assert_close_norm,
    np_damped_solve,
    np_fisher,
    np_psd_sqrt,
    np_sum_outer,
    solve_rtol,
    sum_rtol,
)

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(["ce", "mse", "bce"]))
    n = draw(st.integers(1, 5))
    c = draw(st.integers(2 if kind == "ce" else 1, 4))
    p = n + draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    pr = Case("hypothesis", kind, n=n, c=c, p=p, seed=seed).build()
    # keep the draws where the per-sample quantities are not (numerically) degenerate
    assume(np.all(pr.logit_grad_sq_norms > 1e-6))
    return pr


dampings = st.floats(-3.0, 1.0).map(lambda x: 10.0**x)


def _rtol(matrix: np.ndarray) -> float:
    return solve_rtol(matrix)


@SETTINGS
@given(pr=problems(), damping=dampings)
def test_gram_forms_equal_dense_forms(pr, damping):
    g_rows, s, g = pr.per_sample_grads, pr.logit_grad_sq_norms, pr.grad
    eye = np.eye(pr.p)
    # EF: its sample-space damping equals (G^T G + lambda I)^-1 g (push-through)
    m = np_sum_outer(g_rows) + damping * eye
    expected = np.linalg.solve(m, g)
    assert_close_norm(ngdref.ef_update(g_rows, damping=damping), expected, _rtol(m))
    # iEF parameter space: (F_iEF + lambda I)^-1 g
    m = np_sum_outer(g_rows, 1 / s) + damping * eye
    assert_close_norm(
        ngdref.ief_update(g_rows, s, damping=damping, damping_space="parameter"),
        np.linalg.solve(m, g),
        _rtol(m),
    )
    # iEF sample space: the paper's Gram form
    k = g_rows @ g_rows.T + damping * np.eye(pr.n)
    assert_close_norm(
        ngdref.ief_update(g_rows, s, damping=damping),
        g_rows.T @ np.linalg.solve(k, s),
        _rtol(k),
    )
    # GN and NGD by Woodbury (or the P x P system when P <= N*C)
    m = sum(jn.T @ jn for jn in pr.jacobians) + damping * eye
    assert_close_norm(
        ngdref.gn_update(pr.jacobians, g, damping=damping), np.linalg.solve(m, g), _rtol(m)
    )
    m = np_fisher(pr.jacobians, pr.logit_hessians) + damping * eye
    assert_close_norm(
        ngdref.ngd_update(pr.jacobians, np_psd_sqrt(pr.logit_hessians), g, damping=damping),
        np.linalg.solve(m, g),
        _rtol(m),
    )
    # SF with K = 2 random sampled-gradient rows per sample
    rows = np.random.default_rng(0).standard_normal((2 * pr.n, pr.p))
    m = np_sum_outer(rows) / 2 + damping * eye
    assert_close_norm(
        ngdref.sf_update(rows, g, damping=damping, num_samples=2),
        np.linalg.solve(m, g),
        _rtol(m),
    )


@SETTINGS
@given(pr=problems(), damping=dampings)
def test_ief_with_unit_s_is_ef_in_both_spaces(pr, damping):
    """With s = 1 the two iEF damping spaces coincide, and iEF is EF."""
    g_rows = pr.per_sample_grads
    ones = np.ones(pr.n)
    ef = ngdref.ef_update(g_rows, damping=damping)
    m = np_sum_outer(g_rows) + damping * np.eye(pr.p)
    for space in ("sample", "parameter"):
        assert_close_norm(
            ngdref.ief_update(g_rows, ones, damping=damping, damping_space=space), ef, _rtol(m)
        )


@SETTINGS
@given(pr=problems(), damping=dampings)
def test_ief_damping_spaces_converge_as_damping_vanishes(pr, damping):
    """d_sample - d_parameter = G^T [(K + t I)^-1 - (K + t D)^-1] s, with D = diag(s),
    = G^T (K + t I)^-1 t (D - I) (K + t D)^-1 s, so its norm is at most
    t ||G|| max|s_n - 1| ||(K + t D)^-1 s|| / mu_min(K): linear in t."""
    g_rows, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    k = g_rows @ g_rows.T
    mu = np.linalg.eigvalsh(k)
    assume(mu[0] > 1e-8 * mu[-1])
    for t in (damping, damping * 1e-4 * mu[0]):
        sample = ngdref.ief_update(g_rows, s, damping=t)
        parameter = ngdref.ief_update(g_rows, s, damping=t, damping_space="parameter")
        bound = (
            t
            * np.linalg.norm(g_rows, 2)
            * np.abs(s - 1).max()
            * np.linalg.norm(np.linalg.solve(k + t * np.diag(s), s))
            / mu[0]
        )
        rounding = 100 * EPS * (mu[-1] / mu[0]) * np.linalg.norm(parameter)
        assert np.linalg.norm(sample - parameter) <= bound * (1 + 1e-6) + rounding


@SETTINGS
@given(pr=problems(), damping=dampings)
def test_limits_ef_ones_ief_s(pr, damping):
    """G d = b - t (K + t I)^-1 b for d = G^T (K + t I)^-1 b: exact at t = 0, and
    ||G d - b|| <= t ||b|| / mu_min(K) otherwise. Rounding ~ eps * cond(K) * ||b||."""
    g_rows, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    mu = np.linalg.eigvalsh(g_rows @ g_rows.T)
    assume(mu[0] > 1e-8 * mu[-1])
    rounding = SAFETY * (pr.n + pr.p) * EPS * mu[-1] / mu[0]
    for t in (0.0, damping * 1e-6, damping):
        for d, b in (
            (ngdref.ef_update(g_rows, damping=t), np.ones(pr.n)),
            (ngdref.ief_update(g_rows, s, damping=t), s),
        ):
            err = np.linalg.norm(g_rows @ d - b)
            assert err <= (t / mu[0] + rounding) * np.linalg.norm(b) * (1 + 1e-6)


@SETTINGS
@given(pr=problems(), damping=dampings)
def test_dense_matrices_equal_loops(pr, damping):
    g_rows, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    # sums of products, norm-wise within terms * eps * sum of the absolute products
    jac_sq = (pr.jacobians**2).sum(axis=(1, 2))
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    scale = float(jac_sq @ np.linalg.norm(pr.logit_hessians, axis=(1, 2)))
    assert_close_norm(
        ngdref.fisher_matrix(pr.jacobians, pr.logit_hessians), fisher,
        sum_rtol(scale, fisher, pr.n * pr.c**2),
    )
    ef = np_sum_outer(g_rows)
    assert_close_norm(ngdref.ef_matrix(g_rows), ef, sum_rtol(float((g_rows**2).sum()), ef, pr.n))
    ief = np_sum_outer(g_rows, 1 / s)
    rtol = sum_rtol(float((g_rows**2).sum(axis=1) @ (1 / s)), ief, pr.n * (pr.c**2 + pr.c))
    assert_close_norm(ngdref.ief_matrix(g_rows, s), ief, rtol)
    # the logit view: u u^T of unit norm, so relative to sum_n ||J_n||^2
    rtol_logit = sum_rtol(float(jac_sq.sum()), ief, pr.n * (pr.c**2 + pr.c)) + rtol
    assert_close_norm(ngdref.ief_matrix_logit(pr.jacobians, pr.logit_grads), ief, rtol_logit)
    # and the dense matrices give the same damped solves as the Gram forms
    m = np.asarray(ngdref.ief_matrix(g_rows, s))
    assert_close_norm(
        np_damped_solve(m, pr.grad, damping),
        ngdref.ief_update(g_rows, s, damping=damping, damping_space="parameter"),
        _rtol(m + damping * np.eye(pr.p)),
    )
