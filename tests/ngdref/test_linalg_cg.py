"""Conjugate gradient: convergence judged on the true residual, and messages that say
which stop happened (tolerance reached with an inaccurate matvec, maxiter, breakdown)."""

from __future__ import annotations

import numpy as np
import pytest

import ngdref


def _spd(p: int, condition: float, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((p, p)))
    return (q * np.logspace(0, -np.log10(condition), p)) @ q.T


def test_cg_reports_the_true_residual_of_an_inexact_matvec() -> None:
    """A float32 matvec cannot support tol=1e-12: CG's recursive residual still falls below
    it, so convergence must be judged on the recomputed true residual (independent check:
    the residual computed here with the exact float64 matrix is of the same size)."""
    a = _spd(60, 1e3, 0)
    a32 = a.astype(np.float32)
    b = np.random.default_rng(2).standard_normal(60)

    def matvec32(v: np.ndarray) -> np.ndarray:
        return (a32 @ v.astype(np.float32)).astype(np.float64)

    result = ngdref.conjugate_gradient(matvec32, b, tol=1e-12, maxiter=10_000)
    assert not result.converged
    exact_residual = np.linalg.norm(b - a @ result.x)
    assert result.residual_norm > 1e-12 * np.linalg.norm(b)
    assert 0.1 < result.residual_norm / exact_residual < 10
    with pytest.raises(ngdref.NotConvergedError, match="true relative residual"):
        ngdref.ngd_update_cg(matvec32, b, damping=0.0, tol=1e-12, maxiter=10_000)
    # a tolerance the float32 matvec supports is met
    loose = ngdref.conjugate_gradient(matvec32, b, tol=1e-4, maxiter=10_000)
    assert loose.converged
    assert np.linalg.norm(b - a @ loose.x) <= 3e-4 * np.linalg.norm(b)


def test_cg_converges_on_an_exact_ill_conditioned_system() -> None:
    a = _spd(200, 1e6, 3)
    b = np.random.default_rng(4).standard_normal(200)
    result = ngdref.conjugate_gradient(lambda v: a @ v, b, tol=1e-8, maxiter=20_000)
    assert result.converged
    np.testing.assert_allclose(a @ result.x, b, atol=2e-8 * np.linalg.norm(b))


def test_cg_says_it_hit_maxiter_with_the_numbers():
    rng = np.random.default_rng(5)
    q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    a = (q * np.logspace(0, -6, 50)) @ q.T
    b = rng.standard_normal(50)
    with pytest.raises(ngdref.NotConvergedError, match=r"hit maxiter=3 \(3 iterations\)"):
        ngdref.ngd_update_cg(lambda v: a @ v, b, damping=0.0, maxiter=3)


def test_cg_says_the_matvec_is_too_inaccurate_when_it_stopped_on_tolerance():
    """A float32 matvec with a float64 tolerance: the recursive residual meets tol, the true
    one cannot (issue 9's case): the message must say so, not blame maxiter."""
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    a32 = ((q * np.logspace(0, -3, 60)) @ q.T).astype(np.float32)
    b = rng.standard_normal(60)

    def matvec(v):
        return (a32 @ v.astype(np.float32)).astype(np.float64)

    with pytest.raises(ngdref.NotConvergedError) as caught:
        ngdref.ngd_update_cg(matvec, b, damping=0.0, tol=1e-12, maxiter=10_000)
    message = str(caught.value)
    assert "recursive residual reached tol=1e-12" in message
    assert "not accurate enough" in message and "maxiter" not in message
