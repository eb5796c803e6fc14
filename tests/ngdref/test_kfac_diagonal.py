"""ngdref.kfac with diagonal factors (ngdref.kfac_diagonal) on every array backend.

A factor given as its diagonal f (d,) stands for diag(f). Expected values come from dense
NumPy float64: np.kron of np.diag(f) and the other factor, np.linalg.solve for the damped
inverses (pi damping: the two shifted factors solved one after the other), and the second
moments of loop-built per-sample gradients for the eigenvalue correction. Tolerances: a
solve with a damped block of condition number kappa and size m agrees to 32 m eps kappa
(backward-stable solves and eigendecompositions on both sides).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from ngdref import kfac as K

EPS = 2.0**-52
DAMPING = 0.3


def _factors(seed: int, rows: int, cols: int, diagonal_side: str) -> tuple[np.ndarray, ...]:
    """(B, A) with one of them diagonal (as (d,)), dense SPD otherwise, and G (rows, cols)."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((rows, rows + 2))
    a = rng.standard_normal((cols, cols + 2))
    b, a = b @ b.T, a @ a.T
    if diagonal_side == "input":
        a = rng.uniform(0.0, 3.0, cols)
        a[0] = 0.0  # an unused row of a lookup table: count 0
    else:
        b = rng.uniform(0.0, 3.0, rows)
    return b, a, rng.standard_normal((rows, cols))


def _dense(f: np.ndarray) -> np.ndarray:
    return np.diag(f) if f.ndim == 1 else f


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


SIDES = ("input", "grad")


@pytest.mark.parametrize("side", SIDES)
def test_block_matrix_is_the_kronecker_product_of_the_diagonal(backend, side) -> None:
    b, a, _ = _factors(1, 3, 4, side)
    block = K.kfac_block_matrix(K.KroneckerFactors(backend.asarray(a), backend.asarray(b)))
    expected = np.kron(_dense(b), _dense(a))
    assert _relative(backend.to_numpy(block), expected) <= 8 * EPS


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("form", K.DAMPED_INVERSES)
def test_damped_inverse_with_a_diagonal_factor(backend, side, form) -> None:
    b, a, g = _factors(2, 3, 5, side)
    factors = K.KroneckerFactors(backend.asarray(a), backend.asarray(b))
    got = K.kfac_inverse_apply(factors, backend.asarray(g), damping=DAMPING,
                               damped_inverse=form)
    db, da = _dense(b), _dense(a)
    if form == "exact":
        matrix = np.kron(db, da) + DAMPING * np.eye(g.size)
        expected = np.linalg.solve(matrix, g.ravel()).reshape(g.shape)
    else:
        pi = np.sqrt((np.trace(da) / da.shape[0]) / (np.trace(db) / db.shape[0]))
        left = db + np.sqrt(DAMPING) / pi * np.eye(db.shape[0])
        right = da + np.sqrt(DAMPING) * pi * np.eye(da.shape[0])
        matrix = np.kron(left, right)
        expected = np.linalg.solve(left, np.linalg.solve(right, g.T).T)
    kappa = np.linalg.cond(matrix)
    assert _relative(backend.to_numpy(got), expected) <= 32 * g.size * EPS * kappa


def test_eigenvalue_correction_with_a_diagonal_input_factor(backend) -> None:
    """E = sum_n w_n (U^T G_n)^2 in the identity basis of diag(a): the corrected block is
    (U (x) I) diag(E) (U (x) I)^T, and its damped inverse a dense solve."""
    rng = np.random.default_rng(3)
    n, t, rows, cols = 4, 3, 3, 5
    x, y, w = rng.standard_normal((n, t, cols)), rng.standard_normal((n, t, rows)), \
        rng.uniform(0.5, 2.0, n)
    a = np.einsum("nti,nti->i", x, x) / (n * t)  # a diagonal stand-in for A
    b = np.einsum("n,nti,ntj->ij", w, y, y)
    factors = K.KroneckerFactors(backend.asarray(a), backend.asarray(b))
    corrected = K.eigenvalue_correction(factors, backend.asarray(x), backend.asarray(y),
                                        weights=backend.asarray(w))
    u = np.linalg.eigh(b)[1]
    grads = [sum(np.outer(y[i, s], x[i, s]) for s in range(t)) for i in range(n)]
    e = sum(w[i] * (u.T @ grads[i]) ** 2 for i in range(n))
    assert _relative(backend.to_numpy(corrected.corrected_eigenvalues), e) <= 64 * n * t * EPS
    q = np.kron(u, np.eye(cols))
    block = q @ np.diag(e.ravel()) @ q.T
    assert _relative(backend.to_numpy(K.kfac_block_matrix(corrected)), block) <= 64 * EPS * \
        rows * cols
    g = rng.standard_normal((rows, cols))
    got = K.kfac_inverse_apply(corrected, backend.asarray(g), damping=DAMPING)
    matrix = block + DAMPING * np.eye(g.size)
    expected = np.linalg.solve(matrix, g.ravel()).reshape(g.shape)
    assert _relative(backend.to_numpy(got), expected) <= 32 * g.size * EPS * np.linalg.cond(
        matrix)


@pytest.mark.parametrize(("factor", "message"), [
    (np.ones((2, 3, 3)), "factors.input_factor must be (d, d) or its diagonal (d,)"),
    (np.ones((3, 4)), "factors.input_factor must be square"),
    (np.array([1.0, np.nan, 2.0]), "factors.input_factor"),
])
def test_bad_factors_are_named(backend, factor, message) -> None:
    factors = K.KroneckerFactors(backend.asarray(factor), backend.asarray(np.eye(2)))
    with pytest.raises(ValueError, match=re.escape(message)):
        K.kfac_inverse_apply(factors, backend.asarray(np.ones((2, 3))), damping=1.0)
