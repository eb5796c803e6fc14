"""directions(): every method from one provider against dense NumPy formulas.

The inputs of the expected values (G, s, g, the sampled-label gradients, the
Jacobians and a Hessian factor) are computed in NumPy from the closed forms in
tests/cases.py, not by batch_quantities / sampled_grads, and the expected updates are
dense NumPy solves, not ngdref's update functions. Tolerances are norm-wise bounds from
tests/cases.py (solve_rtol, gram_rtol, sum_rtol), each explained there.
"""

from __future__ import annotations

import numpy as np
import pytest

import ngdref
from tests.cases import (
    CASES,
    EPS,
    ONE_PER_KIND,
    SAFETY,
    assert_close_norm,
    gram_rtol,
    ids,
    np_fisher,
    np_logit_grads,
    np_sum_outer,
    solve_rtol,
)

DAMPING = 0.5
KEY = 7


def _np_sampled_rows(pr, backend, num_samples: int, key=KEY) -> np.ndarray:
    """(N*K, P) rows J_n^T e_n(yhat_nk), draw k in rows k*N .. (k+1)*N - 1 (sum convention).

    The labels come from loss.sample (tested on its own in test_losses.py); the
    gradients at those labels are NumPy closed forms.
    """
    a = pr.on(backend)
    drawn = backend.to_numpy(
        pr.loss.sample(a.logits, key, num_samples=num_samples, targets=a.targets)
    )
    rows = [
        np.einsum("ncp,nc->np", pr.jacobians, np_logit_grads(pr.kind, pr.logits, y, pr.vocab))
        for y in drawn
    ]
    return np.concatenate(rows, axis=0)


def _dense(matrix: np.ndarray, grad: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """(M + lambda I)^-1 g by a dense solve, and the bound for comparing another route."""
    m = matrix + damping * np.eye(len(matrix))
    return np.linalg.solve(m, grad), solve_rtol(m)


def _gram(rows: np.ndarray, rhs: np.ndarray, damping: float) -> tuple[np.ndarray, float]:
    """A^T (A A^T + lambda I)^-1 b, and its bound."""
    m = rows @ rows.T + damping * np.eye(len(rows))
    c = np.linalg.solve(m, rhs)
    return rows.T @ c, gram_rtol(rows, m, c)


def _expected(pr, backend, *, damping, num_samples=1):
    """Every update (sum convention) by dense NumPy formulas: name -> (update, rtol)."""
    g_rows, s, g = pr.per_sample_grads, pr.logit_grad_sq_norms, pr.grad
    rows = _np_sampled_rows(pr, backend, num_samples)
    return {
        "sgd": (g, SAFETY * pr.n * EPS * np.abs(g_rows).sum() / np.linalg.norm(g)),
        "ef": _gram(g_rows, np.ones(pr.n), damping),
        "ief": _gram(g_rows, s, damping),
        "sf": _dense(np_sum_outer(rows) / num_samples, g, damping),
        "gn": _dense(sum(jn.T @ jn for jn in pr.jacobians), g, damping),
        "ngd": _dense(np_fisher(pr.jacobians, pr.logit_hessians), g, damping),
    }


@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_directions_equal_dense_formulas(case, num_samples, backend):
    pr = case.build()
    a = pr.on(backend)
    out = ngdref.directions(
        pr.provider(backend),
        pr.loss,
        a.targets,
        damping=DAMPING,
        key=KEY,
        num_samples=num_samples,
    )
    assert set(out) == set(ngdref.METHODS)
    for name, (expected, rtol) in _expected(
        pr, backend, damping=DAMPING, num_samples=num_samples
    ).items():
        assert tuple(out[name].shape) == (pr.p,)
        assert_close_norm(backend.to_numpy(out[name]), expected, rtol)


@pytest.mark.parametrize("case", ONE_PER_KIND, ids=ids(ONE_PER_KIND))
def test_batch_quantities_and_sampled_grads_match_numpy(case, backend):
    """Products of C terms (G = sum_c J e) compared norm-wise within C eps |J| |e|."""
    pr = case.build()
    a = pr.on(backend)
    provider = pr.provider(backend)
    q = ngdref.batch_quantities(provider, pr.loss, a.targets)
    abs_rows = np.einsum("ncp,nc->np", np.abs(pr.jacobians), np.abs(pr.logit_grads))
    rtol_rows = 2 * SAFETY * pr.c * EPS * np.linalg.norm(abs_rows) / np.linalg.norm(
        pr.per_sample_grads
    )
    # the closed-form e of tests/cases.py and the loss's own: a few eps per entry
    assert_close_norm(backend.to_numpy(q.logit_grads), pr.logit_grads, SAFETY * pr.c * EPS)
    assert_close_norm(
        backend.to_numpy(q.logit_grad_sq_norms), pr.logit_grad_sq_norms, SAFETY * pr.c * EPS
    )
    assert_close_norm(backend.to_numpy(q.per_sample_grads), pr.per_sample_grads, rtol_rows)
    rtol_grad = rtol_rows * np.abs(pr.per_sample_grads).sum(0).sum() / np.linalg.norm(pr.grad)
    assert_close_norm(backend.to_numpy(q.grad), pr.grad, rtol_grad)
    assert q.factor == 1.0
    rows = ngdref.sampled_grads(provider, pr.loss, a.targets, KEY, num_samples=3)
    expected = _np_sampled_rows(pr, backend, 3)
    assert_close_norm(backend.to_numpy(rows), expected, 4 * rtol_rows)


def _authors(pr, backend, lam: float, r: float) -> dict[str, np.ndarray]:
    """EF, iEF and SF as the authors' code computes them (iEFOptimizer_GP.py), in NumPy.

    Rows are gradients of the mean loss: J = R G, s = R^2 ||e||^2, g = R G^T 1, sampled rows
    J_hat = R G_hat; one lambda: iEF/EF solve (J J^T + lambda I) w = s or 1 and return J^T w;
    SF returns (1/lambda) (g - J_hat^T (J_hat J_hat^T + K lambda I)^-1 J_hat g) (K = 1 here).
    """
    j = r * pr.per_sample_grads
    s = r**2 * pr.logit_grad_sq_norms
    g = j.sum(axis=0)
    j_hat = r * _np_sampled_rows(pr, backend, 1)
    c = j @ j.T + lam * np.eye(pr.n)
    c_hat = j_hat @ j_hat.T + lam * np.eye(len(j_hat))
    return {
        "ief": j.T @ np.linalg.solve(c, s),
        "ef": j.T @ np.linalg.solve(c, np.ones(pr.n)),
        "sf": (g - j_hat.T @ np.linalg.solve(c_hat, j_hat @ g)) / lam,
    }


@pytest.mark.parametrize("case", ONE_PER_KIND, ids=ids(ONE_PER_KIND))
def test_mean_reduction_one_damping_damps_ef_ief_and_sf_alike(case, backend):
    """:ref:`conv-damping-reduction`: under a mean (R = 1/N) with one lambda, as the paper and
    the authors' code,

        iEF(lambda) = R iEF_sum(lambda / R^2),  EF(lambda) = EF_sum(lambda / R^2) / R,
        SF(lambda) = SF_sum(lambda / R^2) / R;  GN, NGD(lambda) = GN, NGD_sum(lambda / R).

    directions(reduction="mean") is checked against the authors' formulas written out in
    NumPy (not against ngdref), and the authors' formulas against the sum-convention dense
    solves at the converted damping (the identities themselves). lambda is chosen small
    enough that the SF lambda / R^2 vs lambda / R confusion of issue 8 changes SF by > 1%.
    """
    pr = case.build()
    a = pr.on(backend)
    provider = pr.provider(backend)
    r = 1.0 / pr.n
    lam = 1e-2
    mean = ngdref.directions(provider, pr.loss, a.targets, damping=lam, key=KEY, reduction="mean")
    authors = _authors(pr, backend, lam, r)
    g_rows, s, g = pr.per_sample_grads, pr.logit_grad_sq_norms, pr.grad
    rows = _np_sampled_rows(pr, backend, 1)
    mu = lam / r**2  # the sum-convention damping of all three
    ief_sum, rtol_ief = _gram(g_rows, s, mu)
    ef_sum, rtol_ef = _gram(g_rows, np.ones(pr.n), mu)
    sf_sum, rtol_sf = _dense(np_sum_outer(rows), g, mu)
    sf_sum_wrong, _ = _dense(np_sum_outer(rows), g, lam / r)  # the sqrt(R) convention
    # the authors' SF subtracts O(1/lambda) terms: its rounding is eps ||F_SF|| / lambda
    rtol_sf_authors = rtol_sf + SAFETY * pr.n * EPS * np.linalg.norm(r**2 * rows, 2) ** 2 / lam
    assert_close_norm(authors["ief"], r * ief_sum, rtol_ief)
    assert_close_norm(authors["ef"], ef_sum / r, rtol_ef)
    assert_close_norm(authors["sf"], sf_sum / r, rtol_sf_authors)
    assert np.linalg.norm(sf_sum - sf_sum_wrong) > 0.01 * np.linalg.norm(sf_sum)
    assert_close_norm(backend.to_numpy(mean["ief"]), authors["ief"], rtol_ief)
    assert_close_norm(backend.to_numpy(mean["ef"]), authors["ef"], rtol_ef)
    assert_close_norm(backend.to_numpy(mean["sf"]), authors["sf"], rtol_sf_authors)
    assert_close_norm(backend.to_numpy(mean["sgd"]), r * g, SAFETY * pr.n * EPS)
    for name, matrix in (
        ("gn", sum(jn.T @ jn for jn in pr.jacobians)),
        ("ngd", np_fisher(pr.jacobians, pr.logit_hessians)),
    ):
        expected, rtol = _dense(matrix, g, lam / r)
        assert_close_norm(backend.to_numpy(mean[name]), expected, rtol)
    # iEF in parameter space: F_iEF is the same in both conventions, g scales by R
    param = ngdref.directions(
        provider,
        pr.loss,
        a.targets,
        damping=lam,
        methods=("ief",),
        reduction="mean",
        damping_space="parameter",
    )["ief"]
    expected, rtol = _dense(np_sum_outer(g_rows, 1 / s), g, lam)
    assert_close_norm(backend.to_numpy(param), r * expected, rtol)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ngd_cg_solver_equals_a_dense_solve(case, backend):
    """CG stops at a true relative residual <= 2 cg_tol, so its relative error is at most
    2 cg_tol cond(M) (plus the dense reference's own solve_rtol)."""
    pr = case.build()
    a = pr.on(backend)
    provider = pr.provider(backend)
    cg_tol = 1e-13
    cg = ngdref.directions(
        provider, pr.loss, a.targets, damping=DAMPING, methods=("ngd",), ngd_solver="cg",
        cg_tol=cg_tol,
    )["ngd"]
    m = np_fisher(pr.jacobians, pr.logit_hessians) + DAMPING * np.eye(pr.p)
    expected = np.linalg.solve(m, pr.grad)
    assert_close_norm(
        backend.to_numpy(cg), expected, 2 * cg_tol * np.linalg.cond(m) + solve_rtol(m)
    )


def test_directions_subset_of_methods(backend):
    pr = CASES[0].build()
    a = pr.on(backend)
    out = ngdref.directions(
        pr.provider(backend), pr.loss, a.targets, damping=0.1, methods=("ief", "sgd")
    )
    assert set(out) == {"ief", "sgd"}


def test_directions_with_uniforms_equal_directions_with_the_key(backend):
    """An explicit array of uniforms is the same randomness as the key that produced it:
    the same labels, hence bitwise the same computation."""
    import math
    import random

    pr = CASES[0].build()
    a = pr.on(backend)
    rng = random.Random(KEY)
    uniforms = np.array([rng.random() for _ in range(math.prod((2, pr.n)))]).reshape(2, pr.n)
    provider = pr.provider(backend)
    kwargs = {"damping": 0.2, "methods": ("sf",), "num_samples": 2}
    with_key = ngdref.directions(provider, pr.loss, a.targets, key=KEY, **kwargs)["sf"]
    with_uniforms = ngdref.directions(
        provider, pr.loss, a.targets, key=backend.asarray(uniforms), **kwargs
    )["sf"]
    np.testing.assert_array_equal(backend.to_numpy(with_uniforms), backend.to_numpy(with_key))


def test_readme_torch_cg_example_runs_on_a_float32_tiny_mlp():
    """The optimisers guide's provider example, directions(..., damping=1e-7, ngd_solver="cg"),
    on a float32 model: the default tolerance follows the dtype (sqrt(eps32)), so it returns.
    Checked against the float64 Fisher of the same weights: the true relative residual is at
    most 2 tol (CG's stop) plus the float32 Fisher-vector products' rounding, P eps32 ||F||
    ||d|| / ||g||."""
    torch = pytest.importorskip("torch")
    import copy

    from backends import TorchProvider

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    loss = ngdref.SoftmaxCrossEntropy()
    with torch.no_grad():
        provider = TorchProvider(model, x)
        d = ngdref.directions(provider, loss, y, damping=1e-7, key=0, ngd_solver="cg")["ngd"]
        assert d.dtype == torch.float32
        exact = TorchProvider(copy.deepcopy(model).double(), x.double())
        jac = exact.jacobian().numpy()
        h = loss.hessian(exact.logits(), y).numpy()
        g = ngdref.batch_quantities(exact, loss, y).grad.numpy()
    fisher = np.einsum("ncp,ncd,ndq->pq", jac, h, jac)
    d64 = d.double().numpy()
    residual = np.linalg.norm(fisher @ d64 + 1e-7 * d64 - g) / np.linalg.norm(g)
    eps32 = float(np.finfo(np.float32).eps)
    tol = ngdref.cg.default_cg_tol(np, np.float32)
    bound = 2 * tol + SAFETY * g.size * eps32 * np.linalg.norm(fisher, 2) * np.linalg.norm(
        d64
    ) / np.linalg.norm(g)
    assert residual <= bound
    # a float64 tolerance on the float32 model: refused, saying why and with the numbers
    with torch.no_grad(), pytest.raises(ngdref.NotConvergedError, match="not accurate enough"):
        ngdref.directions(
            provider, loss, y, damping=1e-7, methods=("ngd",), ngd_solver="cg", cg_tol=1e-10
        )
