r"""The checks of :mod:`validation.independent.references`: the reference run's updates against
dense solves.

:func:`independent_checks` is what ``python -m validation`` prints in each
problem's "independent references" section. Every check names its quantity
and the dense route, and carries its own bound (see
:func:`validation.independent.references.update_bound` and the docstrings below); a
check that raises is a failure naming the exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

import ngdref
from backends.arrays.adapters import to_numpy
from validation.independent.references import (
    EPS32,
    EPS64,
    FLOAT32_OPS,
    ROUNDING,
    Dense,
    IndependentCheck,
    Solved,
    damped_solve,
    error_message,
    guarded,
    logit_terms,
    relative,
    sampled_logit_grads,
    sf_key,
    sf_uniforms,
    update_bound,
)

__all__ = ["ReferenceRun", "independent_checks"]

#: lambda of the lambda -> 0 limits, relative to lambda_max(G G^T)
LIMIT_DAMPING = 1e-10


@dataclass(frozen=True)
class ReferenceRun:
    """The reference run of one problem: its provider and the values it produced.

    ``values`` is :func:`validation.crosscheck.quantities`' output (NumPy);
    ``theta`` is given for the toy problems (their closed forms need it).
    """

    name: str
    provider: Any
    loss: Any
    targets: Any
    values: dict[str, Any]
    damping: float
    cg_tol: float = 0.0
    large_output: bool = False
    float32_internals: bool = False
    theta: np.ndarray | None = None


def dense_problem(run: ReferenceRun) -> Dense:
    """The dense quantities of ``run``'s model on its batch."""
    z = to_numpy(run.provider.logits()).astype(np.float64)
    y = to_numpy(run.targets)
    e, hessians = logit_terms(run.loss, z, y)
    u = sf_uniforms(run.loss, *z.shape)
    return Dense(
        jacobians=to_numpy(run.provider.jacobian()).astype(np.float64),
        logit_grads=e,
        hessians=hessians,
        sampled=sampled_logit_grads(run.loss, z, y, u),
        eps_model=EPS32 if run.float32_internals else EPS64,
    )


def _matrix_error(rows: np.ndarray, weights: np.ndarray, accuracy: float, a_norm: float) -> float:
    """||dM|| / ||A|| for M = R^T diag(w) R with R of relative accuracy ``accuracy``."""
    return 2 * accuracy * float(
        np.linalg.norm(rows) * np.linalg.norm(weights[:, None] * rows) / a_norm
    )


def _s_accuracy(dense: Dense) -> float:
    """Relative accuracy of s between two routes from the same logits.

    Each e_nc is p - onehot with p <= 1 computed to a few eps (absolute), or
    z - y rounded once (relative): |de_nc| <= c eps m with m = max(1, max |e|),
    so |ds_n| <= 2 ||e_n|| sqrt(C) c eps m.
    """
    c = dense.logit_grads.shape[1]
    m = max(1.0, float(np.abs(dense.logit_grads).max()))
    norms = np.linalg.norm(dense.logit_grads, axis=1)
    s_norm = float(np.linalg.norm(dense.s))
    return 2 * math.sqrt(c) * ROUNDING * EPS64 * m * float(np.linalg.norm(norms)) / s_norm


def _update_check(
    name: str, route: str, value: np.ndarray, solved: Solved, size: int, input_error: float,
    cg_tol: float = 0.0,
) -> IndependentCheck:
    return IndependentCheck(
        name, route, relative(value, solved.update),
        update_bound(solved, size, input_error, cg_tol),
    )


def update_checks(run: ReferenceRun, dense: Dense) -> list[IndependentCheck]:
    """SGD, EF, iEF (both dampings), SF, GN, NGD and NGD-CG against dense solves."""
    values, lam, n = run.values, run.damping, dense.size
    g, rows, s = dense.grad, dense.per_sample_grads, dense.s
    ones = np.ones(rows.shape[0])
    d_rows, d_g = dense.rows_accuracy(), dense.rows_accuracy(ones)
    d_s = _s_accuracy(dense)
    checks = [
        IndependentCheck("per_sample_grads", "G = [J_n^T e_n], dense J, NumPy e",
                         relative(values["per_sample_grads"], rows), d_rows),
        IndependentCheck("s", "s_n = ||e_n||^2, NumPy e", relative(values["s"], s), d_s),
        IndependentCheck("sgd", "g = G^T 1", relative(values["sgd"], g), d_g),
    ]
    ef = rows.T @ rows
    solved = damped_solve(ef, g, lam)
    a_norm = solved.kappa * solved.lambda_min
    ef_error = _matrix_error(rows, ones, d_rows, a_norm)
    checks.append(_update_check("ef", "(G^T G + lambda I_P)^-1 g, Cholesky", values["ef"],
                                solved, n, ef_error + d_g))
    solved = damped_solve(ef, rows.T @ s, lam)
    checks.append(_update_check("ief", "(G^T G + lambda I_P)^-1 G^T s, Cholesky", values["ief"],
                                solved, n, ef_error + dense.rows_accuracy(s) + d_s))
    inverse_s = 1.0 / s
    solved = damped_solve(rows.T @ (inverse_s[:, None] * rows), g, lam)
    a_norm = solved.kappa * solved.lambda_min
    param_error = _matrix_error(rows, inverse_s, d_rows + d_s, a_norm)
    checks.append(_update_check(
        "ief-param", "(G^T diag(s)^-1 G + lambda I_P)^-1 g, Cholesky", values["ief-param"],
        solved, n, param_error + d_g,
    ))
    sampled = dense.sampled_grads
    solved = damped_solve(sampled.T @ sampled, g, lam)
    a_norm = solved.kappa * solved.lambda_min
    sampled_error = _matrix_error(sampled, np.ones(sampled.shape[0]), d_rows, a_norm)
    checks.append(_update_check(
        "sf", "(Ghat^T Ghat + lambda I_P)^-1 g, labels drawn in NumPy, Cholesky",
        values["sf"], solved, n, sampled_error + d_g,
    ))
    return checks + _output_space_checks(run, dense, d_g)


def _output_space_checks(run: ReferenceRun, dense: Dense, d_g: float) -> list[IndependentCheck]:
    """GN and NGD (Woodbury or CG) against (sum_n J_n^T Q J_n + lambda I_P)^-1 g."""
    values, lam, n = run.values, run.damping, dense.size
    # same J on both sides; H and the Fisher-vector products round at the model's precision
    model_error = 2 * FLOAT32_OPS * dense.eps_model + d_g
    gn_cg = run.cg_tol if run.large_output else 0.0
    gn = damped_solve(dense.gauss_newton, dense.grad, lam)
    ngd = damped_solve(dense.fisher, dense.grad, lam)
    checks = [
        _update_check("gn", "(sum_n J_n^T J_n + lambda I_P)^-1 g, Cholesky", values["gn"], gn, n,
                      model_error, gn_cg),
        _update_check("ngd-cg", "(sum_n J_n^T H_n J_n + lambda I_P)^-1 g, Cholesky",
                      values["ngd-cg"], ngd, n, model_error, run.cg_tol),
    ]
    if "ngd" in values:
        checks.insert(1, _update_check(
            "ngd", "(sum_n J_n^T H_n J_n + lambda I_P)^-1 g, Cholesky", values["ngd"], ngd, n,
            model_error,
        ))
    return checks


def _solve_check(
    name: str, route: str, value: Any, matrix: np.ndarray, rhs: np.ndarray, damping: float,
    size: int, input_error: float,
) -> IndependentCheck:
    """``value`` against the Cholesky solve of (matrix + damping I) d = rhs."""
    solved = damped_solve(matrix, rhs, damping)
    return _update_check(name, route, to_numpy(value), solved, size, input_error)


def gamma_checks(run: ReferenceRun, dense: Dense) -> list[IndependentCheck]:
    r"""gamma(d) / gamma(g) of ngdref's own updates, through the dense F and g.

    The relative rounding of d^T F d is <= (c n eps + model terms) |d|^T |F| |d| / d^T F d and
    of d^T g <= (c n eps + input) |d|^T |g| / |d^T g|; gamma takes half the first and
    all of the second, and the ratio adds the errors of its two gammas.
    """
    fisher, g, n = dense.fisher, dense.grad, dense.size
    unit = ROUNDING * n * EPS64
    d_g = dense.rows_accuracy(np.ones(dense.per_sample_grads.shape[0]))

    def gamma_with_error(d: np.ndarray) -> tuple[float, float]:
        quad, dot = float(d @ fisher @ d), float(d @ g)
        q_cond = float(np.abs(d) @ np.abs(fisher) @ np.abs(d)) / quad
        d_cond = float(np.abs(d) @ np.abs(g)) / abs(dot)
        error = 0.5 * (unit + 2 * FLOAT32_OPS * dense.eps_model) * q_cond + (unit + d_g) * d_cond
        return math.sqrt(quad) / abs(dot), error

    base, base_error = gamma_with_error(run.values["sgd"])
    checks = []
    for method, reported in run.values["gamma_ratio"].items():
        name = "ngd-cg" if method == "ngd" and run.large_output else method
        gamma, error = gamma_with_error(run.values[name])
        checks.append(IndependentCheck(
            f"gamma_ratio {method}", "sqrt(d^T F d) / |d^T g| over SGD's, dense F",
            abs(reported - gamma / base) / (gamma / base), error + base_error,
        ))
    return checks


def limit_checks(run: ReferenceRun, dense: Dense) -> list[IndependentCheck]:
    r"""G d = 1 (EF) and G d = s (iEF) at lambda = 1e-10 lambda_max(G G^T) (:ref:`conv-updates`).

    Exactly, G d - b = -lambda (G G^T + lambda I)^-1 b, at most lambda / lambda_min(G G^T)
    relative; the computed coefficients carry kappa N eps relative error, which
    G G^T amplifies by up to kappa again (c N eps kappa^2); the two routes' G
    differ by their accuracy times ||G|| ||d|| / ||b|| <= sqrt(N kappa).
    """
    rows, s = dense.per_sample_grads, dense.s
    n, p = rows.shape
    w = np.linalg.eigvalsh(rows @ rows.T)
    kappa = float(w[-1] / w[0]) if w[0] > 0 else math.inf
    rounding = ROUNDING * n * EPS64 * kappa**2
    routes = {"ef": "G d = 1 as lambda -> 0 (Eq. 6)", "ief": "G d = s as lambda -> 0 (Eq. 7, 10)"}
    if n > p or not rounding < 1e-3:
        reason = f"G G^T is not of resolvable full rank (N = {n}, P = {p}, kappa = {kappa:.2g})"
        return [IndependentCheck(f"{m} limit", r, math.nan, math.nan, skipped=reason)
                for m, r in routes.items()]
    damping = LIMIT_DAMPING * float(w[-1])
    d = ngdref.directions(run.provider, run.loss, run.targets, damping=damping,
                          methods=("ef", "ief"))
    input_term = dense.rows_accuracy() * math.sqrt(n * kappa)
    bound = damping / float(w[0]) + rounding + input_term
    return [
        IndependentCheck("ef limit", routes["ef"], relative(rows @ to_numpy(d["ef"]), np.ones(n)),
                         bound),
        IndependentCheck("ief limit", routes["ief"], relative(rows @ to_numpy(d["ief"]), s),
                         bound + _s_accuracy(dense)),
    ]


def mean_checks(run: ReferenceRun, dense: Dense) -> list[IndependentCheck]:
    r"""EF, iEF and SF under ``reduction="mean"`` (R = 1/N) (:ref:`conv-damping-reduction`).

    Rows R G, s -> R^2 s, g -> R g and SF's sampled rows R Ghat, one lambda for all:
    EF = (R^2 G^T G + lambda I)^-1 R g, iEF = (R^2 G^T G + lambda I)^-1 R^3 G^T s,
    SF = (R^2 Ghat^T Ghat + lambda I)^-1 R g. Bounds as for the sum convention.
    """
    rows, sampled, g, s = dense.per_sample_grads, dense.sampled_grads, dense.grad, dense.s
    n, lam, size = rows.shape[0], run.damping, dense.size
    r = 1.0 / n
    d = ngdref.directions(run.provider, run.loss, run.targets, damping=lam, reduction="mean",
                          methods=("ef", "ief", "sf"), key=sf_key(run.provider, run.loss))
    d_rows, d_g, d_s = dense.rows_accuracy(), dense.rows_accuracy(np.ones(n)), _s_accuracy(dense)
    ef = r * r * (rows.T @ rows)
    sf = r * r * (sampled.T @ sampled)
    a_ef, a_sf = float(np.linalg.norm(ef, 2)) + lam, float(np.linalg.norm(sf, 2)) + lam
    ef_error = _matrix_error(r * rows, np.ones(n), d_rows, a_ef)
    sf_error = _matrix_error(r * sampled, np.ones(sampled.shape[0]), d_rows, a_sf)
    return [
        _solve_check("ef (mean)", "(R^2 G^T G + lambda I_P)^-1 R g, Cholesky", d["ef"], ef,
                     r * g, lam, size, ef_error + d_g),
        _solve_check("ief (mean)", "(R^2 G^T G + lambda I_P)^-1 R^3 G^T s, Cholesky", d["ief"],
                     ef, r**3 * (rows.T @ s), lam, size,
                     ef_error + dense.rows_accuracy(s) + d_s),
        _solve_check("sf (mean)", "(R^2 Ghat^T Ghat + lambda I_P)^-1 R g (rows R Ghat), Cholesky",
                     d["sf"], sf, r * g, lam, size, sf_error + d_g),
    ]


#: the toy problems' inputs x_n and targets (model z = theta_0 + theta_1 x, C = 1;
#: :ref:`conv-toys`)
TOYS = {"least-squares-toy": ((0.0, 1.0), (0.0, 0.0)), "logistic-toy": ((0.0, 2.0), (1.0, 0.0))}


def toy_closed_forms(name: str, theta: Any) -> dict[str, np.ndarray]:
    r"""Undamped updates of a toy problem (:ref:`conv-toys`) in closed form, and its F.

    N = P = 2 with J = [[1, x_1], [1, x_2]] invertible and G = diag(e) J, so
    EF = G^-1 1 = J^-1 (1 / e), iEF = G^-1 s = J^-1 e = GN, NGD = J^-1 (e / h)
    with h_n the logit curvature (1 for least squares, p_n (1 - p_n) for the
    logistic loss), and F = sum_n h_n [1, x_n][1, x_n]^T.
    """
    (x1, x2), targets = TOYS[name]
    z = [theta[0] + theta[1] * x for x in (x1, x2)]
    if name == "least-squares-toy":
        e = [zn - yn for zn, yn in zip(z, targets, strict=True)]
        h = [1.0, 1.0]
    else:
        p = [1.0 / (1.0 + math.exp(-zn)) for zn in z]
        e = [pn - yn for pn, yn in zip(p, targets, strict=True)]
        h = [pn * (1.0 - pn) for pn in p]

    def j_inverse(v: list[float]) -> np.ndarray:
        return np.array([(x2 * v[0] - x1 * v[1]) / (x2 - x1), (v[1] - v[0]) / (x2 - x1)])

    fisher = sum(hn * np.outer([1.0, x], [1.0, x]) for hn, x in zip(h, (x1, x2), strict=True))
    return {
        "ef": j_inverse([1.0 / en for en in e]),
        "ief": j_inverse(e),
        "gn": j_inverse(e),
        "ngd": j_inverse([en / hn for en, hn in zip(e, h, strict=True)]),
        "fisher": np.asarray(fisher),
    }


def toy_checks(run: ReferenceRun, dense: Dense) -> list[IndependentCheck]:
    """ngdref's undamped EF, iEF, GN and NGD on a toy problem against its closed forms
    (:ref:`conv-toys`).

    Bound: the closed form is exact to a few eps; ngdref solves a 2 x 2 system
    of condition kappa, so :func:`update_bound` with n = 2.
    """
    closed = toy_closed_forms(run.name, run.theta)
    methods = ("ef", "ief", "gn", "ngd")
    d = ngdref.directions(run.provider, run.loss, run.targets, damping=0.0, methods=methods)
    rows = dense.per_sample_grads
    matrices = {"ef": rows.T @ rows, "ief": rows.T @ rows, "gn": dense.gauss_newton,
                "ngd": dense.fisher}
    checks = [IndependentCheck("fisher (toy)", "sum_n h_n [1, x_n][1, x_n]^T (App. B)",
                               relative(dense.fisher, closed["fisher"]), 4 * ROUNDING * EPS64)]
    for m in methods:
        solved = damped_solve(matrices[m], matrices[m] @ closed[m], 0.0)
        checks.append(IndependentCheck(
            f"{m} (toy, lambda = 0)", "closed form J^-1 v (App. B)",
            relative(to_numpy(d[m]), closed[m]), update_bound(solved, 2, ROUNDING * EPS64),
        ))
    return checks


def independent_checks(run: ReferenceRun) -> list[IndependentCheck]:
    """Every independent check of ``run`` (see the module docstring of
    validation.independent.references)."""
    try:
        dense = dense_problem(run)
    except Exception as err:  # the dense reference itself failed: one failing check
        return [IndependentCheck("all", "dense reference", math.nan, math.nan,
                                 error=error_message(err))]
    groups = [
        ("updates", update_checks), ("gamma_ratio", gamma_checks), ("limits", limit_checks),
        ("mean reduction", mean_checks),
    ]
    if run.name in TOYS and run.theta is not None:
        groups.append(("toy closed forms", toy_checks))
    checks: list[IndependentCheck] = []
    for label, fn in groups:
        checks += guarded(label, "raised", lambda fn=fn: fn(run, dense))
    return checks
