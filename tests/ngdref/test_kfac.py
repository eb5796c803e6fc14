"""ngdref.kfac on every array backend: factors, dense blocks and damped inverses.

Expected values come from other routes: Python loops of outer products (np.outer,
np.kron) and dense solves (np.linalg.solve) in float64 NumPy. Tolerances are
norm-wise: a factor sums m rounded products, so it agrees to 8 m eps relative; a
solve with the damped block of condition number kappa and size d agrees to
32 d eps kappa (backward-stable solve and eigendecomposition, both sides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest

import ngdref
from ngdref import kfac as K

EPS = 2.0**-52


@dataclass(frozen=True)
class Layer:
    """A layer's per-sample inputs and output gradients as data."""

    name: str
    n: int
    t: int
    d_in: int
    d_out: int
    seed: int

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        a = rng.standard_normal((self.n, self.t, self.d_in))
        b = rng.standard_normal((self.n, self.t, self.d_out))
        s = rng.uniform(0.1, 2.0, self.n)
        return a, b, s


LAYERS = (
    Layer("mlp", n=6, t=1, d_in=4, d_out=3, seed=0),
    Layer("sequence", n=4, t=5, d_in=3, d_out=4, seed=1),
    Layer("wide", n=3, t=2, d_in=7, d_out=2, seed=2),  # rank-deficient A (6 terms, d_in 7)
)


def _loop_factors(layer: Layer, convention: str, method: str) -> tuple[np.ndarray, np.ndarray]:
    """A (mean normalisation) and B by explicit loops over samples and positions."""
    a, b, s = layer.arrays()
    weights = 1.0 / s if method == "iekfac" else np.ones(layer.n)
    fa, fb = np.zeros((layer.d_in,) * 2), np.zeros((layer.d_out,) * 2)
    if convention == "expand":
        for n in range(layer.n):
            for t in range(layer.t):
                fa += np.outer(a[n, t], a[n, t]) / (layer.n * layer.t)
                fb += weights[n] * np.outer(b[n, t], b[n, t])
    else:
        for n in range(layer.n):
            mean_a, sum_b = a[n].mean(axis=0), b[n].sum(axis=0)
            fa += np.outer(mean_a, mean_a) / layer.n
            fb += weights[n] * np.outer(sum_b, sum_b)
    return fa, fb


def _relative(x: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def _factors(backend, layer: Layer, convention: str, method: str, normalisation: str = "mean"):
    a, b, s = layer.arrays()
    return K.kfac_factors(
        backend.asarray(a), backend.asarray(b), method=method,
        logit_grad_sq_norms=backend.asarray(s), convention=convention,
        normalisation=normalisation,
    )


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.name)
@pytest.mark.parametrize("convention", K.CONVENTIONS)
@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_factors_match_loops(backend, layer: Layer, convention: str, method: str) -> None:
    factors = _factors(backend, layer, convention, method)
    fa, fb = _loop_factors(layer, convention, method)
    m = layer.n * layer.t
    assert _relative(backend.to_numpy(factors.input_factor), fa) <= 8 * m * EPS
    assert _relative(backend.to_numpy(factors.grad_factor), fb) <= 8 * m * EPS
    # the block acts on the row-major vec(W): (B (x) A) vec(G) = vec(B G A), np.kron's layout
    block = backend.to_numpy(K.kfac_block_matrix(factors))
    assert _relative(block, np.kron(fb, fa)) <= 16 * m * EPS


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.name)
def test_iekfac_is_ekfac_of_rescaled_rows(backend, layer: Layer) -> None:
    """Eq. 43: ieKFAC's B is eKFAC's B of the rows b_n / sqrt(s_n); kfac and ekfac agree."""
    a, b, s = layer.arrays()
    ief = K.kfac_factors(
        backend.asarray(a), backend.asarray(b), method="iekfac",
        logit_grad_sq_norms=backend.asarray(s),
    )
    rescaled = K.kfac_factors(
        backend.asarray(a), backend.asarray(b / np.sqrt(s)[:, None, None]), method="ekfac"
    )
    sampled = K.kfac_factors(backend.asarray(a), backend.asarray(b), method="kfac")
    m = layer.n * layer.t
    expected = backend.to_numpy(rescaled.grad_factor)
    assert _relative(backend.to_numpy(ief.grad_factor), expected) <= 8 * m * EPS
    assert _relative(
        backend.to_numpy(sampled.grad_factor),
        backend.to_numpy(_factors(backend, layer, "expand", "ekfac").grad_factor),
    ) == 0.0


def _damped_solve(block: np.ndarray, g: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    damped = block + damping * np.eye(block.shape[0])
    return np.linalg.solve(damped, g.ravel()).reshape(g.shape), float(np.linalg.cond(damped))


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.name)
@pytest.mark.parametrize("convention", K.CONVENTIONS)
@pytest.mark.parametrize("damping", [1e-6, 1e-2, 10.0])
def test_exact_inverse_matches_dense_solve(backend, layer, convention, damping) -> None:
    factors = _factors(backend, layer, convention, "iekfac")
    g = np.random.default_rng(7).standard_normal((layer.d_out, layer.d_in))
    result = K.kfac_inverse_apply(factors, backend.asarray(g), damping=damping)
    expected, kappa = _damped_solve(backend.to_numpy(K.kfac_block_matrix(factors)), g, damping)
    assert _relative(backend.to_numpy(result), expected) <= 32 * g.size * EPS * kappa


@pytest.mark.parametrize("layer", LAYERS, ids=lambda c: c.name)
@pytest.mark.parametrize("damping", [1e-4, 1.0])
def test_pi_inverse_matches_factored_solve(backend, layer: Layer, damping: float) -> None:
    """pi damping: (B + sqrt(lambda)/pi I)^-1 G (A + pi sqrt(lambda) I)^-1, pi from traces."""
    factors = _factors(backend, layer, "expand", "ekfac")
    fa, fb = (backend.to_numpy(f) for f in (factors.input_factor, factors.grad_factor))
    pi = np.sqrt((np.trace(fa) / layer.d_in) / (np.trace(fb) / layer.d_out))
    damped_a = fa + pi * np.sqrt(damping) * np.eye(layer.d_in)
    damped_b = fb + np.sqrt(damping) / pi * np.eye(layer.d_out)
    g = np.random.default_rng(8).standard_normal((layer.d_out, layer.d_in))
    expected = np.linalg.solve(damped_b, np.linalg.solve(damped_a, g.T).T)
    kappa = np.linalg.cond(damped_a) * np.linalg.cond(damped_b)
    result = K.kfac_inverse_apply(factors, backend.asarray(g), damping=damping, damped_inverse="pi")
    assert _relative(backend.to_numpy(result), expected) <= 32 * g.size * EPS * kappa


@pytest.mark.parametrize("convention", K.CONVENTIONS)
def test_sum_normalisation_is_mean_with_rescaled_damping(backend, convention: str) -> None:
    """(c K + lambda I)^-1 = (K + lambda/c I)^-1 / c with c = N T (expand) or N (reduce)."""
    layer = LAYERS[1]
    c = layer.n * (layer.t if convention == "expand" else 1)
    mean = _factors(backend, layer, convention, "ekfac", "mean")
    total = _factors(backend, layer, convention, "ekfac", "sum")
    g = np.random.default_rng(9).standard_normal((layer.d_out, layer.d_in))
    lhs = backend.to_numpy(K.kfac_inverse_apply(total, backend.asarray(g), damping=0.3))
    rhs = backend.to_numpy(K.kfac_inverse_apply(mean, backend.asarray(g), damping=0.3 / c)) / c
    kappa = np.linalg.cond(backend.to_numpy(K.kfac_block_matrix(total)) + 0.3 * np.eye(g.size))
    assert _relative(lhs, rhs) <= 32 * g.size * EPS * kappa


def test_bias_block_without_input_factor(backend) -> None:
    """A bias block is B alone: (B + lambda I)^-1 g, in both damped forms."""
    layer = LAYERS[0]
    factors = _factors(backend, layer, "expand", "ekfac")
    bias = K.KroneckerFactors(None, factors.grad_factor)
    g = np.random.default_rng(10).standard_normal(layer.d_out)
    expected, kappa = _damped_solve(backend.to_numpy(factors.grad_factor), g, 0.5)
    for form in K.DAMPED_INVERSES:
        result = K.kfac_inverse_apply(bias, backend.asarray(g), damping=0.5, damped_inverse=form)
        assert _relative(backend.to_numpy(result), expected) <= 32 * g.size * EPS * kappa


def test_diagonal_fallback(backend) -> None:
    rng = np.random.default_rng(11)
    g, w, v = rng.standard_normal((5, 4)), rng.uniform(0.5, 2, 5), rng.standard_normal(4)
    diagonal = K.diagonal_factor(backend.asarray(g), weights=backend.asarray(w))
    expected = sum(w[n] * g[n] ** 2 for n in range(5))
    assert _relative(backend.to_numpy(diagonal), expected) <= 8 * 5 * EPS
    result = K.diagonal_inverse_apply(diagonal, backend.asarray(v), damping=0.1)
    assert _relative(backend.to_numpy(result), v / (expected + 0.1)) <= 16 * EPS


@pytest.mark.parametrize("layer", LAYERS[:2], ids=lambda c: c.name)
@pytest.mark.parametrize("convention", K.CONVENTIONS)
def test_eigenvalue_correction_is_the_kfe_diagonal(backend, layer: Layer, convention) -> None:
    """E_ij = sum_n w_n (u_i^T G_n v_j)^2: the diagonal of Q^T F Q, F = sum_n w_n g_n g_n^T.

    F from per-sample gradients G_n = sum_t outer(b_nt, a_nt) built by loops, Q = U (x) V from
    NumPy's eigh (eigenvalues are distinct here, so Q is the backend's up to signs). The
    corrected block then acts as Q diag(E) Q^T, and its damped inverse is a dense solve.
    """
    a, b, s = layer.arrays()
    factors = _factors(backend, layer, convention, "iekfac")
    corrected = K.eigenvalue_correction(
        factors, backend.asarray(a), backend.asarray(b), weights=backend.asarray(1.0 / s)
    )
    grads = [sum(np.outer(b[n, t], a[n, t]) for t in range(layer.t)).ravel()
             for n in range(layer.n)]
    fisher = sum(g[:, None] * g[None, :] / s_n for g, s_n in zip(grads, s, strict=True))
    u = np.linalg.eigh(backend.to_numpy(factors.grad_factor))[1]
    v = np.linalg.eigh(backend.to_numpy(factors.input_factor))[1]
    q = np.kron(u, v)
    expected = np.diag(q.T @ fisher @ q).reshape(layer.d_out, layer.d_in)
    # products of rotations of m = N T terms; the eigenvectors are exact to d eps / rel. gap
    gaps = [np.diff(np.linalg.eigvalsh(backend.to_numpy(f))) for f in
            (factors.grad_factor, factors.input_factor)]
    spread = max(np.max(np.abs(np.linalg.eigvalsh(backend.to_numpy(f)))) / g.min()
                 for f, g in zip((factors.grad_factor, factors.input_factor), gaps, strict=True))
    tol = 64 * (layer.n * layer.t + layer.d_in + layer.d_out) * EPS * spread
    got = backend.to_numpy(corrected.corrected_eigenvalues)
    assert _relative(got, expected) <= tol
    block = backend.to_numpy(K.kfac_block_matrix(corrected))
    assert _relative(block, q @ np.diag(expected.ravel()) @ q.T) <= tol
    g = np.random.default_rng(13).standard_normal((layer.d_out, layer.d_in))
    solved, kappa = _damped_solve(block, g, 0.1)
    result = backend.to_numpy(K.kfac_inverse_apply(corrected, backend.asarray(g), damping=0.1))
    assert _relative(result, solved) <= 32 * g.size * EPS * kappa


# ---- bad input: the exception type and the argument it names -----------------------------
def _good(backend):
    return _factors(backend, LAYERS[0], "expand", "ekfac")


def _singular(backend):
    return _factors(backend, LAYERS[2], "expand", "ekfac")  # A has rank 6 < d_in = 7


BAD_INPUT = [
    ("singular factors, damping 0", lambda be: K.kfac_inverse_apply(
        _singular(be), be.asarray(np.ones((2, 7))), damping=0.0),
     ngdref.SingularMatrixError, "damping=0.0"),
    ("singular factors, pi damping 0", lambda be: K.kfac_inverse_apply(
        _singular(be), be.asarray(np.ones((2, 7))), damping=0.0, damped_inverse="pi"),
     ngdref.SingularMatrixError, "increase damping"),
    ("singular diagonal", lambda be: K.diagonal_inverse_apply(
        be.asarray(np.array([1.0, 0.0])), be.asarray(np.ones(2)), damping=0.0),
     ngdref.SingularMatrixError, "increase damping"),
    ("negative damping", lambda be: K.kfac_inverse_apply(
        _good(be), be.asarray(np.ones((3, 4))), damping=-1.0), ValueError, "damping must be"),
    ("NaN input factor", lambda be: K.kfac_inverse_apply(
        K.KroneckerFactors(be.asarray(np.full((4, 4), np.nan)), _good(be).grad_factor),
        be.asarray(np.ones((3, 4))), damping=1.0),
     ngdref.NonFiniteError, "factors.input_factor contains NaN"),
    ("NaN layer inputs", lambda be: K.input_factor(be.asarray(np.full((2, 3), np.nan))),
     ngdref.NonFiniteError, "layer_inputs contains NaN"),
    ("grad shape", lambda be: K.kfac_inverse_apply(
        _good(be), be.asarray(np.ones((4, 3))), damping=1.0), ValueError, "grad has shape"),
    ("samples mismatch", lambda be: K.kfac_factors(
        be.asarray(np.ones((3, 2))), be.asarray(np.ones((4, 2))), method="ekfac"),
     ValueError, "output_grads has 4 samples"),
    ("iekfac without s", lambda be: K.kfac_factors(
        be.asarray(np.ones((3, 2))), be.asarray(np.ones((3, 2))), method="iekfac"),
     ValueError, "logit_grad_sq_norms (s_n) is required"),
    ("iekfac with s = 0", lambda be: K.kfac_sample_weights("iekfac", be.asarray(np.zeros(3))),
     ValueError, "logit_grad_sq_norms must be > 0"),
    ("unknown method", lambda be: K.kfac_sample_weights("kfac2"), ValueError, "method must be"),
    ("unknown convention", lambda be: K.input_factor(be.asarray(np.ones((2, 3))), convention="x"),
     ValueError, "convention must be"),
    ("unknown normalisation", lambda be: K.input_factor(
        be.asarray(np.ones((2, 3))), normalisation="x"), ValueError, "normalisation must be"),
    ("unknown damped inverse", lambda be: K.kfac_inverse_apply(
        _good(be), be.asarray(np.ones((3, 4))), damping=1.0, damped_inverse="x"),
     ValueError, "damped_inverse must be"),
    ("pi with corrected eigenvalues", lambda be: K.kfac_inverse_apply(
        K.KroneckerFactors(_good(be).input_factor, _good(be).grad_factor,
                           be.asarray(np.ones((3, 4)))),
        be.asarray(np.ones((3, 4))), damping=1.0, damped_inverse="pi"),
     ValueError, 'damped_inverse must be "exact" for eigenvalue-corrected'),
    ("corrected eigenvalues shape", lambda be: K.kfac_inverse_apply(
        K.KroneckerFactors(_good(be).input_factor, _good(be).grad_factor,
                           be.asarray(np.ones((4, 3)))),
        be.asarray(np.ones((3, 4))), damping=1.0),
     ValueError, "factors.corrected_eigenvalues has shape (4, 3)"),
    ("not factors", lambda be: K.kfac_inverse_apply(
        (1, 2), be.asarray(np.ones((3, 4))), damping=1.0), TypeError, "factors must be"),
]


@pytest.mark.parametrize(("call", "error", "message"), [c[1:] for c in BAD_INPUT],
                         ids=[c[0] for c in BAD_INPUT])
def test_bad_input(backend, call, error, message) -> None:
    with pytest.raises(error, match=re.escape(message)):
        call(backend)


def test_float32_in_float64_factors_float32_out(backend) -> None:
    """Factors are accumulated in float64; an applied inverse comes back in the grad's dtype."""
    layer = LAYERS[0]
    a, b, _ = layer.arrays()
    factors = K.kfac_factors(
        backend.asarray(a, "float32"), backend.asarray(b, "float32"), method="ekfac"
    )
    xp = backend.xp
    assert factors.input_factor.dtype == xp.float64 and factors.grad_factor.dtype == xp.float64
    g = np.random.default_rng(12).standard_normal((layer.d_out, layer.d_in))
    result = K.kfac_inverse_apply(factors, backend.asarray(g, "float32"), damping=0.1)
    assert result.dtype == xp.float32
    expected, kappa = _damped_solve(backend.to_numpy(K.kfac_block_matrix(factors)), g, 0.1)
    # float32 rounding of g and of the result: 2 eps_32 kappa
    assert _relative(backend.to_numpy(result), expected) <= 4 * 2.0**-23 * kappa
