"""Update directions: Gram / Woodbury forms vs dense P x P solves, and their limits.

:ref:`conv-updates` (the two damping spaces and their identities); the closed forms
(:ref:`conv-curvature`, :ref:`conv-toys`) are in tests/ngdref/test_updates_closed_forms.py.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import ngdref
from tests.cases import (
    CASES,
    DAMPINGS,
    EPS,
    SAFETY,
    TALL,
    WIDE,
    ProductsOnlyRows,
    assert_close_norm,
    gram_rtol,
    ids,
    np_fisher,
    np_psd_sqrt,
    np_sum_outer,
    solve_rtol,
)


def _sampled_rows(pr, num_samples: int, seed: int = 0) -> np.ndarray:
    """Gradients of -log p_n at labels drawn with NumPy (any rows do for the identities)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(num_samples):
        if pr.kind == "ce":
            probs = np.exp(pr.logits - np.logaddexp.reduce(pr.logits, axis=1)[:, None])
            y = np.array([rng.choice(pr.c, p=q) for q in probs])
            e = probs - np.eye(pr.c)[y]
        else:  # a stand-in with the right shape and scale
            e = rng.standard_normal((pr.n, pr.c))
        rows.append(np.einsum("ncp,nc->np", pr.jacobians, e))
    return np.concatenate(rows, axis=0)


def _check_result(backend, update, p: int, dtype: str = "float64") -> np.ndarray:
    assert tuple(update.shape) == (p,)
    out = backend.to_numpy(update)
    assert out.dtype == np.dtype(dtype)
    return out


# ---- 1. Gram / Woodbury form == dense P x P form ------------------------------
@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ef_update_equals_dense_parameter_space_form(case, damping, backend):
    """Sample-space damping = parameter-space damping for EF (push-through identity)."""
    pr = case.build()
    a = pr.on(backend)
    g_rows = pr.per_sample_grads
    dense = np_sum_outer(g_rows) + damping * np.eye(pr.p)
    expected = np.linalg.solve(dense, pr.grad)
    gram = g_rows @ g_rows.T + damping * np.eye(pr.n)
    c = np.linalg.solve(gram, np.ones(pr.n))
    # push-through: both NumPy routes agree within the sum of their bounds
    rtol = solve_rtol(dense) + gram_rtol(g_rows, gram, c)
    assert_close_norm(g_rows.T @ c, expected, rtol)
    d = ngdref.ef_update(a.per_sample_grads, damping=damping)
    assert_close_norm(_check_result(backend, d, pr.p), expected, rtol)


def _damping_mode_systems(gram: np.ndarray, lam: float) -> dict[str, np.ndarray]:
    """The damped N x N matrix of each damping mode, written out densely."""
    diag = np.diag(gram.diagonal())
    return {
        "absolute": gram + lam * np.eye(len(gram)),
        "relative": gram + lam * gram.diagonal().max() * np.eye(len(gram)),
        "diagonal_only": diag,  # the authors' damping == 1: diag(K) alone, no lambda
        "levenberg_marquardt": gram + lam * diag,
    }


@pytest.mark.parametrize("mode", ngdref.linalg.DAMPING_MODES)
@pytest.mark.parametrize("case", WIDE[:3], ids=ids(WIDE[:3]))
def test_ef_and_ief_damping_modes(case, mode, backend):
    pr = case.build()
    a = pr.on(backend)
    g_rows, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    lam = 0.05
    matrix = _damping_mode_systems(g_rows @ g_rows.T, lam)[mode]
    for rhs, got in (
        (np.ones(pr.n), ngdref.ef_update(a.per_sample_grads, damping=lam, damping_mode=mode)),
        (s, ngdref.ief_update(a.per_sample_grads, a.logit_grad_sq_norms, damping=lam,
                              damping_mode=mode)),
    ):
        c = np.linalg.solve(matrix, rhs)
        expected = g_rows.T @ c
        assert_close_norm(backend.to_numpy(got), expected, gram_rtol(g_rows, matrix, c))


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ief_update_sample_and_parameter_forms(case, damping, backend):
    pr = case.build()
    a = pr.on(backend)
    g_rows, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    # sample space, the paper's Eq. 8: G^T (G G^T + lambda I_N)^-1 s
    gram = g_rows @ g_rows.T + damping * np.eye(pr.n)
    c = np.linalg.solve(gram, s)
    d = ngdref.ief_update(a.per_sample_grads, a.logit_grad_sq_norms, damping=damping)
    assert_close_norm(_check_result(backend, d, pr.p), g_rows.T @ c, gram_rtol(g_rows, gram, c))
    # parameter space: (F_iEF + lambda I_P)^-1 g with F_iEF summed explicitly
    dense = np_sum_outer(g_rows, 1.0 / s) + damping * np.eye(pr.p)
    d = ngdref.ief_update(
        a.per_sample_grads, a.logit_grad_sq_norms, damping=damping, damping_space="parameter"
    )
    weighted_gram = g_rows @ g_rows.T + damping * np.diag(s)
    cw = np.linalg.solve(weighted_gram, s)
    expected = np.linalg.solve(dense, pr.grad)
    rtol = solve_rtol(dense) + gram_rtol(g_rows, weighted_gram, cw)
    assert_close_norm(g_rows.T @ cw, expected, rtol)  # the updates' identity, in NumPy
    assert_close_norm(_check_result(backend, d, pr.p), expected, rtol)


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_sf_update_equals_dense(case, num_samples, backend):
    pr = case.build()
    rows = _sampled_rows(pr, num_samples)
    f_sf = np_sum_outer(rows) / num_samples
    dampings = DAMPINGS + ([0.0] if case in TALL and num_samples == 3 else [])
    for damping in dampings:
        d = ngdref.sf_update(
            backend.asarray(rows),
            backend.asarray(pr.grad),
            damping=damping,
            num_samples=num_samples,
        )
        dense = f_sf + damping * np.eye(pr.p)
        assert_close_norm(
            _check_result(backend, d, pr.p), np.linalg.solve(dense, pr.grad), solve_rtol(dense)
        )


@pytest.mark.parametrize("products_only", [False, True])
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_sf_update_from_true_rows_equals_dense(case, num_samples, products_only, backend):
    """per_sample_grads=G instead of grad=G^T 1: A g from the cross-Gram, d from [G; A]^T w.

    The same Woodbury algebra as the grad route in float64, with A g = (A G^T) 1 summed from
    the cross-Gram instead of A (G^T 1): both perturb A g by O(P eps ||A|| ||G||_F sqrt(N)),
    which the Woodbury solve carries like the grad route's rounding, so the grad route's
    bound, 2 * 10 * P * cond(F_SF + lambda I) * eps (tests/cases.py), holds for both. The
    P x P route (tall, dense) forms g and is the grad route itself.
    """
    pr = case.build()
    rows = _sampled_rows(pr, num_samples)
    f_sf = np_sum_outer(rows) / num_samples
    wrap = ProductsOnlyRows if products_only else (lambda x: x)
    tall = case in TALL and num_samples == 3 and not products_only  # the P x P route
    for damping in DAMPINGS + ([0.0] if tall else []):
        d = ngdref.sf_update(
            wrap(backend.asarray(rows)),
            None,
            damping=damping,
            num_samples=num_samples,
            per_sample_grads=wrap(backend.asarray(pr.per_sample_grads)),
        )
        dense = f_sf + damping * np.eye(pr.p)
        assert_close_norm(
            _check_result(backend, d, pr.p), np.linalg.solve(dense, pr.grad), solve_rtol(dense)
        )


@pytest.mark.parametrize("case", WIDE, ids=ids(WIDE))
def test_sf_update_from_true_rows_reuses_a_damped_gram(case, backend):
    """A DampedGram of the sampled rows with per_sample_grads: the grad route's step (same
    Gram, same factorisation; A g by the cross-Gram), within the bound of the test above."""
    pr = case.build()
    rows = _sampled_rows(pr, 2)
    solver = ngdref.DampedGram(backend.asarray(rows))
    dense = np_sum_outer(rows) / 2 + 0.1 * np.eye(pr.p)
    d = ngdref.sf_update(
        solver, None, damping=0.1, num_samples=2,
        per_sample_grads=backend.asarray(pr.per_sample_grads),
    )
    assert_close_norm(
        _check_result(backend, d, pr.p), np.linalg.solve(dense, pr.grad), solve_rtol(dense)
    )


def test_sf_update_takes_one_of_grad_and_true_rows():
    rows = np.ones((2, 3))
    with pytest.raises(TypeError, match="exactly one of grad and per_sample_grads"):
        ngdref.sf_update(rows, None, damping=0.1)
    with pytest.raises(TypeError, match="exactly one of grad and per_sample_grads"):
        ngdref.sf_update(rows, np.ones(3), damping=0.1, per_sample_grads=rows)
    with pytest.raises(ValueError, match="per_sample_grads has 4 columns"):
        ngdref.sf_update(rows, None, damping=0.1, per_sample_grads=np.ones((2, 4)))
    with pytest.raises(TypeError, match="per_sample_grads has dtype"):
        ngdref.sf_update(rows, None, damping=0.1, per_sample_grads=np.ones((2, 3), np.float32))
    with pytest.raises(ngdref.NonFiniteError, match="per_sample_grads"):
        ngdref.sf_update(rows, None, damping=0.1, per_sample_grads=np.full((2, 3), np.nan))


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_gn_and_ngd_updates_equal_dense(case, backend):
    pr = case.build()
    a = pr.on(backend)
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    gn = sum(jn.T @ jn for jn in pr.jacobians)
    factors = backend.asarray(np_psd_sqrt(pr.logit_hessians))
    dampings = DAMPINGS + ([0.0] if case in TALL else [])
    for damping in dampings:
        # Woodbury and the dense P x P solve are both backward stable for M + lambda I:
        # compared norm-wise within 2 * 10 * P * cond(M + lambda I) * eps (tests/cases.py)
        for matrix, d in (
            (gn, ngdref.gn_update(a.jacobians, a.grad, damping=damping)),
            (fisher, ngdref.ngd_update(a.jacobians, factors, a.grad, damping=damping)),
        ):
            dense = matrix + damping * np.eye(pr.p)
            assert_close_norm(
                _check_result(backend, d, pr.p), np.linalg.solve(dense, pr.grad), solve_rtol(dense)
            )


@pytest.mark.parametrize("case", WIDE[:3], ids=ids(WIDE[:3]))
def test_woodbury_at_tiny_damping(case, backend):
    """NGD by Woodbury at lambda -> 0 against a reference that splits g exactly.

    With A the stacked rows Q_n^T J_n (F = A^T A) and A = W S V^T, the reference is
    V (S^2 + lambda)^-1 V^T g + (g - V V^T g) / lambda: no subtraction of O(1/lambda)
    terms. The Woodbury form (1/lambda)[g - A^T (A A^T + lambda I)^-1 A g] cancels the
    range part of g in float64 and divides the rounding left over by lambda, so its
    relative error is about M eps ||F|| / lambda, M = N*C the size of the small system (the
    rounding of the M-term products and of its solve, each relative to ||F||): the bound
    below is SAFETY times that, compared norm-wise, since entries are not individually
    accurate. (A dense P x P solve is no better a reference here: its condition number is
    ||F|| / lambda too.)
    """
    pr = case.build()
    a = pr.on(backend)
    q = np_psd_sqrt(pr.logit_hessians)
    rows = np.einsum("nij,nip->njp", q, pr.jacobians).reshape(-1, pr.p)
    _, sv, vt = np.linalg.svd(rows, full_matrices=False)
    v = vt.T
    g = pr.grad
    norm_f = sv[0] ** 2
    for damping in (1e-6, 1e-9):
        d = ngdref.ngd_update(a.jacobians, backend.asarray(q), a.grad, damping=damping)
        expected = v @ ((v.T @ g) / (sv**2 + damping)) + (g - v @ (v.T @ g)) / damping
        rtol = SAFETY * rows.shape[0] * EPS * norm_f / damping
        assert_close_norm(backend.to_numpy(d), expected, rtol=rtol)


# ---- 2. iEF: sample-space damping is not parameter-space damping ------------
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ief_damping_spaces_differ_for_positive_damping(case, backend):
    pr = case.build()
    a = pr.on(backend)
    sample = backend.to_numpy(
        ngdref.ief_update(a.per_sample_grads, a.logit_grad_sq_norms, damping=1.0)
    )
    parameter = backend.to_numpy(
        ngdref.ief_update(
            a.per_sample_grads, a.logit_grad_sq_norms, damping=1.0, damping_space="parameter"
        )
    )
    rel = np.linalg.norm(sample - parameter) / np.linalg.norm(parameter)
    assert rel > 1e-2, rel  # seven orders of magnitude above the float64 tolerance


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ief_damping_spaces_agree_as_damping_vanishes(case, backend):
    pr = case.build()
    a = pr.on(backend)

    def both(damping):
        return [
            backend.to_numpy(
                ngdref.ief_update(
                    a.per_sample_grads, a.logit_grad_sq_norms, damping=damping, damping_space=sp
                )
            )
            for sp in ("sample", "parameter")
        ]

    # The difference is lambda G^T K^-1 (diag(s) - I) K^-1 s + O(lambda^2): linear in
    # lambda, so every decade of lambda must shrink it by about ten.
    diffs = []
    for damping in [1e-2, 1e-4, 1e-6, 1e-8]:
        sample, parameter = both(damping)
        diffs.append(np.linalg.norm(sample - parameter) / np.linalg.norm(parameter))
    assert all(later < 0.05 * earlier for earlier, later in itertools.pairwise(diffs))
    assert diffs[-1] < 1e-6, diffs
    sample, parameter = both(0.0)
    # at lambda = 0 both solve the same system K c = s: the same float64 route, so only the
    # scaling differences of the two calls remain (gram_rtol of K, both routes)
    gram = pr.per_sample_grads @ pr.per_sample_grads.T
    c = np.linalg.solve(gram, pr.logit_grad_sq_norms)
    assert_close_norm(sample, parameter, gram_rtol(pr.per_sample_grads, gram, c))


# ---- 3. limits: G * EF = 1, G * iEF = s -------------------------------------
def _assert_interpolates(g_rows: np.ndarray, d: np.ndarray, b: np.ndarray, eps: float) -> None:
    """||G d - b|| <= bound for d = G^T K^-1 b computed with final product in ``eps``.

    G d - b = K c_hat - b + G (d_hat - G^T c_hat): the solve's residual (backward stable:
    n eps ||K|| ||c||, K formed with p eps ||G||^2), the rounding of d_hat = G^T c_hat
    (p eps ||G|| ||c||, in the result's dtype) and of this check's own product G d (p eps
    ||G|| ||d||, float64).
    """
    n, p = g_rows.shape
    g_norm = np.linalg.norm(g_rows, 2)
    c = np.linalg.solve(g_rows @ g_rows.T, b)
    bound = SAFETY * g_norm * (
        (n + p) * EPS * g_norm * np.linalg.norm(c) + p * eps * g_norm * np.linalg.norm(c)
        + p * EPS * np.linalg.norm(d)
    )
    assert np.linalg.norm(g_rows @ d - b) <= bound, (np.linalg.norm(g_rows @ d - b), bound)

@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_limits_ef_gives_ones_ief_gives_s(case, backend):
    pr = case.build()
    a = pr.on(backend)
    g_rows, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    smallest = np.linalg.eigvalsh(g_rows @ g_rows.T)[0]
    ones = np.ones(pr.n)
    for damping in [0.0, 1e-10, 1e-6, 1e-3]:
        ef = backend.to_numpy(ngdref.ef_update(a.per_sample_grads, damping=damping))
        ief = backend.to_numpy(
            ngdref.ief_update(a.per_sample_grads, a.logit_grad_sq_norms, damping=damping)
        )
        if damping == 0.0:
            for d, b in ((ef, ones), (ief, s)):
                _assert_interpolates(g_rows, d, b, EPS)
        else:
            # G d - b = -lambda (K + lambda I)^-1 b, so ||G d - b|| <= lambda ||b|| / mu_min(K)
            for d, b in ((ef, ones), (ief, s)):
                bound = damping * np.linalg.norm(b) / smallest
                assert np.linalg.norm(g_rows @ d - b) <= bound * (1 + 1e-6) + 1e-12


# ---- float32: items 1 and 3 with the float32 tolerance ------------------------
F32_CASES = [WIDE[0], WIDE[2], TALL[0]]


@pytest.mark.parametrize("case", F32_CASES, ids=ids(F32_CASES))
def test_float32_updates_and_limits(case, backend):
    """Float32 inputs: the small systems are formed and solved in float64 from the exact
    float32 values, so the references are float64 NumPy on the float32-rounded inputs. Gram
    forms return G^T c formed in float32 (bound: gram_rtol with eps32); the Woodbury / P x P
    forms are float64 throughout and rounded once to float32 (solve_rtol + eps32)."""
    if backend.name not in ("numpy", "torch"):
        pytest.skip("the float32 variant runs on numpy and torch")
    pr = case.build()
    a = pr.on(backend, "float32")
    eps32 = float(np.finfo(np.float32).eps)
    g_rows = pr.per_sample_grads.astype(np.float32).astype(np.float64)
    s = pr.logit_grad_sq_norms.astype(np.float32).astype(np.float64)
    g = pr.grad.astype(np.float32).astype(np.float64)
    jac = pr.jacobians.astype(np.float32).astype(np.float64)
    q32 = np_psd_sqrt(pr.logit_hessians).astype(np.float32)
    q = q32.astype(np.float64)
    fisher = np_fisher(jac, q @ np.swapaxes(q, 1, 2))
    rows = _sampled_rows(pr, 2).astype(np.float32)
    rows64 = rows.astype(np.float64)
    for damping in (0.1, 1.0):
        ones = np.ones(pr.n)
        gram = g_rows @ g_rows.T + damping * np.eye(pr.n)
        c = np.linalg.solve(gram, ones)
        d = ngdref.ef_update(a.per_sample_grads, damping=damping)
        got = _check_result(backend, d, pr.p, "float32")
        assert_close_norm(got, g_rows.T @ c, gram_rtol(g_rows, gram, c, eps32))
        for space, weights in (("sample", np.ones(pr.n)), ("parameter", s)):
            d = ngdref.ief_update(
                a.per_sample_grads, a.logit_grad_sq_norms, damping=damping, damping_space=space
            )
            matrix = g_rows @ g_rows.T + damping * np.diag(weights)
            c = np.linalg.solve(matrix, s)
            got = _check_result(backend, d, pr.p, "float32")
            assert_close_norm(got, g_rows.T @ c, gram_rtol(g_rows, matrix, c, eps32))
        for d, matrix in (
            (ngdref.sf_update(backend.asarray(rows), backend.asarray(g, "float32"),
                              damping=damping, num_samples=2), np_sum_outer(rows64) / 2),
            (ngdref.gn_update(a.jacobians, backend.asarray(g, "float32"), damping=damping),
             sum(jn.T @ jn for jn in jac)),
            (ngdref.ngd_update(a.jacobians, backend.asarray(q32), backend.asarray(g, "float32"),
                               damping=damping), fisher),
        ):
            dense = matrix + damping * np.eye(pr.p)
            got = _check_result(backend, d, pr.p, "float32")
            assert_close_norm(got, np.linalg.solve(dense, g), solve_rtol(dense) + SAFETY * eps32)
    # limits at damping 0, checked in float64 from the float32 results
    ef = backend.to_numpy(ngdref.ef_update(a.per_sample_grads, damping=0.0)).astype(np.float64)
    ief = backend.to_numpy(
        ngdref.ief_update(a.per_sample_grads, a.logit_grad_sq_norms, damping=0.0)
    ).astype(np.float64)
    _assert_interpolates(g_rows, ef, np.ones(pr.n), eps32)
    _assert_interpolates(g_rows, ief, s, eps32)


@pytest.mark.parametrize("case", F32_CASES, ids=ids(F32_CASES))
def test_float32_woodbury_on_product_rows_stays_in_float32(case, backend):
    """SF on float32 rows that only offer products (as the torch optimisers' rows do): A g and
    A^T c come in float32, the M x M solve in float64, g - A^T c and the division in float32.

    Error analysis (eps = float32 unit roundoff, A (M, P), M = A A^T + lambda I, c = M^-1 A g,
    d = (g - A^T c) / lambda the exact (A^T A + lambda I)^-1 g): the float32 A g is off by
    e1 <= p eps || |A| |g| ||, which moves A^T c by ||A^T M^-1|| e1; the float32 A^T c adds
    e2 <= p eps || |A|^T |c| ||; the difference and the division round twice (2 eps ||d||).
    So ||dd|| <= (||A^T M^-1|| e1 + e2) / lambda + 2 eps ||d||, times SAFETY.
    """
    if backend.name not in ("numpy", "torch"):
        pytest.skip("the float32 variant runs on numpy and torch")
    pr = case.build()
    eps32 = float(np.finfo(np.float32).eps)
    rows = _sampled_rows(pr, 1).astype(np.float32)
    a = rows.astype(np.float64)
    g = pr.grad.astype(np.float32).astype(np.float64)
    for damping in (1e-3, 0.1, 1.0):
        matrix = a @ a.T + damping * np.eye(a.shape[0])
        c = np.linalg.solve(matrix, a @ g)
        expected = np.linalg.solve(a.T @ a + damping * np.eye(pr.p), g)
        d = ngdref.sf_update(
            ProductsOnlyRows(backend.asarray(rows)), backend.asarray(g, "float32"), damping=damping
        )
        got = _check_result(backend, d, pr.p, "float32").astype(np.float64)
        e1 = pr.p * eps32 * np.linalg.norm(np.abs(a) @ np.abs(g))
        e2 = pr.p * eps32 * np.linalg.norm(np.abs(a).T @ np.abs(c))
        spread = np.linalg.norm(a.T @ np.linalg.inv(matrix), 2) * e1 + e2
        bound = SAFETY * (spread / damping + 2 * eps32 * np.linalg.norm(expected))
        assert np.linalg.norm(got - expected) <= bound


def test_float32_gram_with_tiny_damping_is_solved_but_undamped_is_refused() -> None:
    """The paper's near-zero damping on float32 gradients must work (the solve is float64).

    Rows with singular values 1 .. 1e-4 give a Gram condition number of 1e8, far past
    float32 precision: undamped, the small eigenvalues are rounding noise and the solve is
    refused; with damping 1e-7 the damped system is well defined in float64 and the result
    equals a float64 dense solve of the same (float32-rounded) data.
    """
    rng = np.random.default_rng(0)
    n, p = 6, 40
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((p, n)))
    g32 = ((u * np.logspace(0, -4, n)) @ v.T).astype(np.float32)
    s32 = rng.uniform(0.5, 1.0, n).astype(np.float32)
    with pytest.raises(ngdref.SingularMatrixError, match="damp"):
        ngdref.ief_update(g32, s32, damping=0.0)
    damping = 1e-7
    got = ngdref.ief_update(g32, s32, damping=damping)
    g64 = g32.astype(np.float64)
    coefficients = np.linalg.solve(g64 @ g64.T + damping * np.eye(n), s32.astype(np.float64))
    expected = g64.T @ coefficients
    # G^T c is formed in float32 (the input dtype): the standard summation bound, with c
    # rounded to float32 as well, is (n + 1) eps32 sum_i |c_i| |g_i| entrywise; here c is
    # large and cancels, so the bound is stated explicitly rather than as an rtol.
    bound = (n + 1) * np.finfo(np.float32).eps * (np.abs(g64).T @ np.abs(coefficients))
    assert np.all(np.abs(got - expected) <= bound)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_check_finite_flags_any_nan_or_infinity_and_passes_finite_extremes(dtype, backend):
    """The torch route sums x - x (0 exactly at finite entries, NaN at NaN and +-inf), the
    others use isfinite; both must pass the largest finite values (whose squares or sum
    overflow, so a norm-based check would fail there) and refuse a single bad entry anywhere."""
    info = np.finfo(dtype)
    finite = np.array([info.max, -info.max, info.max, info.tiny, 0.0, -0.0, 1.0], dtype=dtype)
    xp = ngdref.rows.rows_namespace(ngdref.as_rows(backend.asarray(finite[None, :])), "x")
    ngdref.checks.check_finite(xp, backend.asarray(finite), "x")
    for bad, where in itertools.product([np.nan, np.inf, -np.inf], [0, 3, finite.size - 1]):
        x = finite.copy()
        x[where] = bad
        with pytest.raises(ngdref.NonFiniteError, match="x contains NaN or infinite values"):
            ngdref.checks.check_finite(xp, backend.asarray(x), "x")
    # past the torch route's first block of 2**20 entries, in a transposed (strided) matrix
    long = np.zeros((2**11, 2**9 + 1), dtype=dtype)
    ngdref.checks.check_finite(xp, backend.asarray(long).T, "x")
    long[-1, -1] = np.inf
    with pytest.raises(ngdref.NonFiniteError, match="x contains NaN or infinite values"):
        ngdref.checks.check_finite(xp, backend.asarray(long).T, "x")
