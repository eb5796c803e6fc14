"""Update directions in closed form: iEF = GN for scalar outputs and F = GN = iEF for scalar
least squares (:ref:`conv-curvature`), and the toy problems (:ref:`conv-toys`) against their
exact solutions.
"""

from __future__ import annotations

import numpy as np
import pytest

import ngdref
from tests.cases import (
    DAMPINGS,
    EPS,
    SAFETY,
    WIDE,
    Case,
    assert_close_norm,
    ids,
    solve_rtol,
    sum_rtol,
)

# ---- 6. iEF = GN for scalar outputs; = NGD for scalar least squares ---------------
SCALAR = [
    Case("bce_scalar", "bce", n=5, c=1, p=9, seed=14),
    Case("mse_scalar", "mse", n=4, c=1, p=10, seed=31),
]


@pytest.mark.parametrize("case", SCALAR, ids=ids(SCALAR))
def test_ief_equals_gn_for_scalar_outputs(case, backend):
    pr = case.build()
    a = pr.on(backend)
    gn = sum(jn.T @ jn for jn in pr.jacobians)
    # F_iEF = sum_n g_n g_n^T / s_n, g_n = J_n^T e_n: rounding relative to sum ||J_n||^2
    # (the 1/s_n and e_n e_n^T cancel exactly in C = 1 but not in floating point)
    rtol = sum_rtol(float((pr.jacobians**2).sum()), gn, 4 * pr.n)
    assert_close_norm(
        backend.to_numpy(ngdref.ief_matrix(a.per_sample_grads, a.logit_grad_sq_norms)), gn, rtol
    )
    assert_close_norm(backend.to_numpy(ngdref.gn_matrix(a.jacobians)), gn, rtol)
    for damping in DAMPINGS:
        dense = gn + damping * np.eye(pr.p)
        expected = np.linalg.solve(dense, pr.grad)
        rtol_solve = solve_rtol(dense) + rtol * np.linalg.cond(dense)
        routes = [
            ngdref.ief_update(
                a.per_sample_grads, a.logit_grad_sq_norms, damping=damping,
                damping_space="parameter",
            ),
            ngdref.gn_update(a.jacobians, a.grad, damping=damping),
        ]
        if case.kind == "mse":  # H_n = 1: NGD is GN as well
            routes.append(ngdref.ngd_update(
                a.jacobians, pr.loss.hessian_sqrt(a.logits, a.targets), a.grad, damping=damping
            ))
        for d in routes:
            assert_close_norm(backend.to_numpy(d), expected, rtol_solve)
    if case.kind == "mse":
        fisher = ngdref.fisher_matrix(a.jacobians, pr.loss.hessian(a.logits, a.targets))
        assert_close_norm(backend.to_numpy(fisher), gn, rtol)


def test_ief_matrix_is_not_gn_for_vector_least_squares(backend):
    """For C > 1 the rank-one projector u u^T is not H = I: F = G_hat but F_iEF differs."""
    pr = WIDE[2].build()  # mse_wide, C = 2
    a = pr.on(backend)
    fisher = backend.to_numpy(ngdref.fisher_matrix(a.jacobians, a.logit_hessians))
    gn = backend.to_numpy(ngdref.gn_matrix(a.jacobians))
    ief = backend.to_numpy(ngdref.ief_matrix(a.per_sample_grads, a.logit_grad_sq_norms))
    assert_close_norm(fisher, gn, sum_rtol(float((pr.jacobians**2).sum()), gn, pr.n * pr.c))
    assert np.linalg.norm(ief - gn) > 0.1 * np.linalg.norm(gn)


# ---- the toys (conventions page, The toy problems in closed form) --------------------------
TOY_X = np.array([0.0, 1.0])


def _toy_least_squares(backend, theta):
    jac = np.stack([np.ones(2), TOY_X], axis=1)[:, None, :]  # J_n = [1, x_n], (2, 1, 2)
    r = np.array([theta[0], theta[0] + theta[1]])  # residuals, targets 0
    loss = ngdref.SquaredError()
    z, y = backend.asarray(r[:, None]), backend.asarray(np.zeros((2, 1)))
    e = loss.grad(z, y)
    j = backend.asarray(jac)
    g_rows = backend.to_numpy(e)[:, :1] * jac[:, 0, :]
    xp = backend.xp
    s = xp.sum(e * e, axis=1)
    out = {
        "ngd": ngdref.ngd_update(
            j, loss.hessian_sqrt(z, y), backend.asarray(g_rows.sum(0)), damping=0.0
        ),
        "ief": ngdref.ief_update(backend.asarray(g_rows), s, damping=0.0),
        "ief_param": ngdref.ief_update(
            backend.asarray(g_rows), s, damping=0.0, damping_space="parameter"
        ),
        "ef": ngdref.ef_update(backend.asarray(g_rows), damping=0.0),
        "fisher": ngdref.fisher_matrix(j, loss.hessian(z, y)),
        "ief_matrix": ngdref.ief_matrix(backend.asarray(g_rows), s),
    }
    return {k: backend.to_numpy(v) for k, v in out.items()}, g_rows, r


def _toy_rtol(g_rows: np.ndarray, fisher: np.ndarray) -> float:
    """2 x 2 closed forms: our solves of K = G G^T and of F against exact values."""
    return solve_rtol(g_rows @ g_rows.T) + solve_rtol(fisher)


def test_least_squares_toy_at_the_paper_point(backend):
    out, g_rows, _ = _toy_least_squares(backend, (1.5, -0.7))
    fisher = np.array([[2.0, 1.0], [1.0, 1.0]])
    rtol = _toy_rtol(g_rows, fisher)
    for name in ("ngd", "ief", "ief_param"):
        assert_close_norm(out[name], np.array([1.5, -0.7]), rtol)
    assert_close_norm(out["ef"], np.array([2 / 3, 7 / 12]), rtol)
    assert_close_norm(g_rows @ out["ef"], np.ones(2), rtol)
    assert_close_norm(out["fisher"], fisher, 2 * SAFETY * EPS)  # sums of two exact products
    assert_close_norm(out["ief_matrix"], fisher, 2 * SAFETY * 4 * EPS)


@pytest.mark.parametrize("theta", [(0.4, 1.1), (-2.0, 0.5), (3.0, -5.0), (0.9, 0.9)])
def test_least_squares_toy_closed_forms(theta, backend):
    out, g_rows, r = _toy_least_squares(backend, theta)
    rtol = _toy_rtol(g_rows, np.array([[2.0, 1.0], [1.0, 1.0]]))
    assert_close_norm(out["ngd"], np.array(theta), rtol)  # one unit step to the optimum
    assert_close_norm(out["ief"], np.array(theta), rtol)
    assert_close_norm(out["ef"], np.array([1 / r[0], 1 / r[1] - 1 / r[0]]), rtol)


@pytest.mark.parametrize("theta", [(0.3, -0.4), (-1.0, 0.8), (2.0, 1.5)])
def test_logistic_toy_ief_is_gn_but_not_ngd(theta, backend):
    x = np.array([0.0, 2.0])
    labels = np.array([[1.0], [0.0]])
    jac = np.stack([np.ones(2), x], axis=1)[:, None, :]  # (2, 1, 2)
    z = theta[0] + theta[1] * x
    p = 1 / (1 + np.exp(-z))
    e = p - labels[:, 0]
    # closed forms with J = [[1, 0], [1, 2]] invertible: iEF = GN = J^-1 e,
    # NGD = J^-1 (e_n / (p_n (1 - p_n)))
    jm = jac[:, 0, :]
    gn_expected = np.linalg.solve(jm, e)
    ngd_expected = np.linalg.solve(jm, e / (p * (1 - p)))

    loss = ngdref.SigmoidBinaryCrossEntropy()
    zz, yy, j = backend.asarray(z[:, None]), backend.asarray(labels), backend.asarray(jac)
    g_rows = e[:, None] * jm
    g = backend.asarray(g_rows.sum(0))
    ief = backend.to_numpy(
        ngdref.ief_update(backend.asarray(g_rows), backend.asarray(e**2), damping=0.0)
    )
    gn = backend.to_numpy(ngdref.gn_update(j, g, damping=0.0))
    ngd = backend.to_numpy(ngdref.ngd_update(j, loss.hessian_sqrt(zz, yy), g, damping=0.0))
    fisher = jm.T @ np.diag(p * (1 - p)) @ jm
    rtol = _toy_rtol(g_rows, jm.T @ jm) + solve_rtol(fisher)
    assert_close_norm(ief, gn_expected, rtol)
    assert_close_norm(gn, gn_expected, rtol)
    assert_close_norm(ngd, ngd_expected, rtol)
    assert np.linalg.norm(ief - ngd) > 0.1 * np.linalg.norm(ngd)
