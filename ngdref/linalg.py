r"""Array-API linear algebra for the updates: the damped Gram solve and conjugate gradient.

The Gram (sample-space) matrices here are small, N x N with N the batch size,
so they are always formed and solved in float64 whatever the input dtype (as
the paper's code does); the result is cast back by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ngdref._checks import check_damping, check_finite, check_ndim, namespace
from ngdref.rows import gram_matrix

__all__ = [
    "CGResult",
    "GramSolve",
    "SingularMatrixError",
    "conjugate_gradient",
    "gram_matrix",
    "near_duplicate_mask",
    "singular_rtol",
    "solve_damped_gram",
]

DAMPING_MODES = ("absolute", "relative", "diagonal")


class SingularMatrixError(ValueError):
    """A matrix that must be inverted is singular (to working precision)."""


class NotConvergedError(ArithmeticError):
    """An iterative solver stopped at ``maxiter`` before reaching its tolerance."""


@dataclass(frozen=True)
class GramSolve:
    """The result of :func:`solve_damped_gram`.

    Attributes
    ----------
    coefficients : array, shape (M,), float64
        c with (K_kept + damping term) c_kept = rhs_kept and zeros at dropped rows.
    kept : array of bool, shape (M,)
        Rows used by the solve (all True unless the near-duplicate filter dropped some).
    damping : float
        The absolute damping lambda actually added (after the relative mode's scaling).
    gram : array, shape (M, M), float64
        The undamped Gram matrix of all rows.
    """

    coefficients: Any
    kept: Any
    damping: float
    gram: Any


def near_duplicate_mask(gram: Any, threshold: float) -> Any:
    r"""Rows to keep so that no two kept rows have :math:`|\cos| >` ``threshold``.

    Greedy over rows in decreasing norm: a row is kept unless it is a near
    duplicate of an already kept (hence larger-norm) row, so of a pair the
    larger-norm row survives (the authors' convention). Zero rows are dropped.

    Parameters
    ----------
    gram : array, shape (M, M)
        Gram matrix of the rows, K_ij = a_i . a_j.
    threshold : float in (0, 1]
        0.99 in the paper's training code, 0.95 in its evaluation.

    Returns
    -------
    array of bool, shape (M,)
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"dedup_threshold must be in (0, 1], got {threshold}")
    xp = array_api_compat.array_namespace(gram)
    norms = xp.sqrt(xp.clip(xp.linalg.diagonal(gram), min=0.0))
    order = [int(i) for i in xp.argsort(norms, descending=True)]
    norms_host = [float(v) for v in norms]
    kept: list[int] = []
    for i in order:
        if norms_host[i] == 0.0:
            continue
        duplicate = any(
            abs(float(gram[i, j])) > threshold * norms_host[i] * norms_host[j] for j in kept
        )
        if not duplicate:
            kept.append(i)
    mask = [i in set(kept) for i in range(gram.shape[0])]
    return xp.asarray(mask, device=array_api_compat.device(gram))


def solve_damped_gram(
    rows: Any,
    rhs: Any,
    *,
    damping: float,
    damping_mode: str = "absolute",
    sample_weights: Any = None,
    dedup_threshold: float | None = None,
    rtol: float | None = None,
    rows_name: str = "rows",
) -> GramSolve:
    r"""Solve :math:`(A A^\top + \lambda W) c = b` in float64 for the sample-space updates.

    Parameters
    ----------
    rows : array, shape (M, P)
        A, one row per sample (per-sample gradients).
    rhs : array, shape (M,)
        b.
    damping : float >= 0
        lambda, interpreted by ``damping_mode``.
    damping_mode : {"absolute", "relative", "diagonal"}
        "absolute": lambda as given. "relative": lambda * max_n K_nn (the
        authors' relative damping, scale-free). "diagonal": W = diag(K), i.e.
        Levenberg-Marquardt-style damping proportional to each sample's squared
        gradient norm (our reading of the authors' "diagonal only" mode).
    sample_weights : array, shape (M,), optional
        W = diag(sample_weights) instead of the identity ("absolute" and
        "relative" modes); iEF's parameter-space damping uses W = diag(s).
    dedup_threshold : float, optional
        Drop near-duplicate rows first (see :func:`near_duplicate_mask`).
    rtol : float, optional
        Relative eigenvalue threshold below which the damped matrix counts as
        singular; default :func:`singular_rtol`.
    rows_name : str
        The caller's name for ``rows`` in error messages. A NaN or infinity in
        ``rows`` is detected in the N x N Gram matrix (N/P of the cost of
        scanning ``rows``) and reported under this name.

    Returns
    -------
    GramSolve

    Raises
    ------
    SingularMatrixError
        If the damped matrix is singular, e.g. ``damping=0`` with linearly
        dependent rows or more rows than parameters.
    """
    xp = namespace(rows=rows, rhs=rhs, sample_weights=sample_weights)
    damping = check_damping(damping)
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}")
    if sample_weights is not None and damping_mode == "diagonal":
        raise ValueError("sample_weights cannot be combined with damping_mode='diagonal'")
    gram = gram_matrix(rows)
    check_finite(xp, gram, rows_name)
    m = gram.shape[0]
    dev = array_api_compat.device(rows)
    if dedup_threshold is None:
        kept = xp.ones(m, dtype=xp.bool, device=dev)
        idx = None
    else:
        kept = near_duplicate_mask(gram, dedup_threshold)
        idx = xp.nonzero(kept)[0]
    k = gram if idx is None else xp.take(xp.take(gram, idx, axis=0), idx, axis=1)
    b = xp.astype(rhs, xp.float64)
    if idx is not None:
        b = xp.take(b, idx)
    diag = xp.linalg.diagonal(k)
    if damping_mode == "relative":
        damping = damping * float(xp.max(diag))
    if damping_mode == "diagonal":
        weights = diag
    elif sample_weights is None:
        weights = xp.ones(k.shape[0], dtype=xp.float64, device=dev)
    else:
        weights = xp.astype(sample_weights, xp.float64)
        if idx is not None:
            weights = xp.take(weights, idx)
    eye = xp.eye(k.shape[0], dtype=xp.float64, device=dev)
    if rtol is None:
        rtol = singular_rtol(xp, m, rows.dtype, damping)
    c_kept = _spd_solve(xp, k + damping * (weights[:, None] * eye), b, rtol)
    if idx is None:
        coefficients = c_kept
    else:
        # scatter back to all M rows (zeros where dropped) without item assignment
        selection = xp.astype(idx[:, None] == xp.arange(m, device=dev), xp.float64)
        coefficients = xp.matmul(c_kept[None, :], selection)[0, :]
    return GramSolve(coefficients=coefficients, kept=kept, damping=damping, gram=gram)


def singular_rtol(xp: Any, size: int, dtype: Any, damping: float) -> float:
    """Relative eigenvalue threshold below which a (size x size) system counts as singular.

    Undamped (``damping == 0``): size * eps of the *input* dtype (NumPy's
    ``matrix_rank`` rule): a Gram matrix of float32 gradients is only
    float32-accurate even when accumulated in float64, so smaller eigenvalues
    are rounding noise and the undamped inverse does not exist. Damped: the
    user chose the regularisation (the paper uses lambda down to 1e-12), so
    only a matrix singular in the float64 solve itself is refused.
    """
    dtype = dtype if damping == 0 else xp.float64
    return size * float(xp.finfo(dtype).eps)


def _spd_solve(xp: Any, matrix: Any, rhs: Any, rtol: float) -> Any:
    """Solve a symmetric positive semi-definite system by eigendecomposition.

    The eigenvalues give the singularity check for free: the system is
    refused when the smallest is below ``rtol`` times the largest.
    """
    eigenvalues, eigenvectors = xp.linalg.eigh(matrix)
    largest = float(xp.max(xp.abs(eigenvalues)))
    smallest = float(xp.min(eigenvalues))
    if largest == 0.0 or smallest <= rtol * largest:
        raise SingularMatrixError(
            f"the damped Gram matrix ({matrix.shape[0]} x {matrix.shape[0]}) is singular to "
            f"working precision (eigenvalues in [{smallest:.3g}, {largest:.3g}]): increase "
            "damping, or drop near-duplicate per-sample gradients with dedup_threshold"
        )
    projected = xp.matmul(xp.matrix_transpose(eigenvectors), rhs[:, None])[:, 0]
    return xp.matmul(eigenvectors, (projected / eigenvalues)[:, None])[:, 0]


@dataclass(frozen=True)
class CGResult:
    """The result of :func:`conjugate_gradient`: solution, iterations, residual, converged.

    ``residual_norm`` is the true residual ||b - (A + lambda I) x|| of the returned x,
    recomputed with one extra matvec, not CG's recursively updated one.
    """

    x: Any
    iterations: int
    residual_norm: float
    converged: bool


def conjugate_gradient(
    matvec: Callable[[Any], Any],
    b: Any,
    *,
    damping: float = 0.0,
    tol: float = 1e-10,
    maxiter: int | None = None,
    callback: Callable[[Any], None] | None = None,
) -> CGResult:
    r"""Conjugate gradient for :math:`(A + \lambda I) x = b` with A symmetric PSD, from x_0 = 0.

    Stops when CG's recursive residual satisfies :math:`\|r_k\| \le \mathrm{tol}
    \cdot \|b\|`, then recomputes the true residual with one more matvec and reports
    ``converged`` from that: with an inexact matvec (a Fisher-vector product of a model
    with float32 internals carries ~1e-8 relative rounding) the recursive residual keeps
    shrinking while the true one stalls at the matvec's accuracy, and a tolerance below
    that accuracy is then reported as not reached instead of silently met. Runs in the
    namespace, dtype and device of ``b``; ``callback(x_k)`` is called after
    every iteration (for the iterates' quality, App. F.2 of the paper).

    Parameters
    ----------
    matvec : callable, (P,) -> (P,)
        v -> A v.
    b : array, shape (P,)
    damping : float >= 0
    tol : float > 0
        Relative residual tolerance.
    maxiter : int, optional
        Default 10 * P.

    Returns
    -------
    CGResult
    """
    xp = namespace(b=b)
    check_ndim(b, "b", 1, "(P,)")
    check_finite(xp, b, "b")
    damping = check_damping(damping)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if maxiter is None:
        maxiter = 10 * b.shape[0]
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")

    def op(v: Any) -> Any:
        out = matvec(v)
        if tuple(out.shape) != tuple(v.shape):
            raise ValueError(f"matvec returned shape {tuple(out.shape)}, expected {tuple(v.shape)}")
        return out + damping * v

    x = xp.zeros_like(b)
    r = b
    p = r
    rr = float(xp.sum(r * r))
    b_norm = math.sqrt(rr)
    if b_norm == 0.0:
        return CGResult(x=x, iterations=0, residual_norm=0.0, converged=True)
    for k in range(1, maxiter + 1):
        ap = op(p)
        pap = float(xp.sum(p * ap))
        if not math.isfinite(pap):
            raise ValueError("matvec produced a non-finite value during conjugate gradient")
        if pap <= 0.0:
            raise ValueError(
                "matvec is not positive definite along a search direction (p^T A p <= 0): "
                "the operator must be symmetric positive definite; add damping"
            )
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(xp.sum(r * r))
        if callback is not None:
            callback(x)
        if math.sqrt(rr_new) <= tol * b_norm:
            true_residual = math.sqrt(float(xp.sum((b - op(x)) ** 2)))
            # twice tol: the recomputation itself rounds at the level of ||A|| ||x|| eps
            return CGResult(
                x=x,
                iterations=k,
                residual_norm=true_residual,
                converged=true_residual <= 2 * tol * b_norm,
            )
        p = r + (rr_new / rr) * p
        rr = rr_new
    true_residual = math.sqrt(float(xp.sum((b - op(x)) ** 2)))
    return CGResult(x=x, iterations=maxiter, residual_norm=true_residual, converged=False)
