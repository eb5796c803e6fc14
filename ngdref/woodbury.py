r"""Parameter-space damped inverses through the Woodbury identity (:ref:`conv-updates`).

:math:`(A^\top A + \lambda I_P)^{-1} v` for rows A (M, P) with M << P, computed in the
M x M space: the shared kernel of :func:`ngdref.sf_update`, :func:`ngdref.gn_update` and
:func:`ngdref.ngd_update`. The M x M systems are formed and solved in float64
(:class:`ngdref.linalg.DampedGram`); the P-length products stay in the rows' dtype.
"""

from __future__ import annotations

from typing import Any

from array_api_compat import device

from ngdref.checks import check_finite, check_same_dtype
from ngdref.linalg import DampedGram, GramSolve, SingularMatrixError
from ngdref.rows import DenseRows, PerSampleRows, as_rows, ones_like_rows, rows_namespace

__all__ = ["damped_inverse_apply", "true_rows_inverse_apply"]


def _undamped_refused(m: int, p: int) -> SingularMatrixError:
    return SingularMatrixError(
        f"damping=0 but the curvature matrix has rank at most {min(m, p)} < P = {p} "
        "(or its rows come as a DampedGram, solved by Woodbury): its undamped inverse "
        "is not available; use damping > 0"
    )



def damped_inverse_apply(
    rows: Any, grad: Any, damping: float, rows_name: str
) -> tuple[Any, GramSolve]:
    r"""(A^T A + lambda I_P)^{-1} g for A = ``rows`` (M, P), and the solve (in float64).

    Uses the P x P system (the Gram matrix of A's columns) when P <= M and A is
    dense, else the Woodbury identity (1/lambda) [g - A^T (A A^T + lambda I_M)^{-1} A g],
    which needs lambda > 0. ``rows`` may be a :class:`~ngdref.linalg.DampedGram` of A
    (always Woodbury; its Gram matrix and factorisations are reused). A NaN or infinity
    in ``rows`` is caught in the small matrix, reported as ``rows_name``.
    """
    solver = rows if isinstance(rows, DampedGram) else None
    rows = as_rows(rows, name=rows_name) if solver is None else solver.rows
    xp = rows_namespace(rows, rows_name, rows_first=False, grad=grad)
    m, p = rows.shape
    dense = solver is None and isinstance(rows, DenseRows)
    if dense and p <= m:
        columns = DampedGram(xp.matrix_transpose(rows.array), rows_name=rows_name)
        info = columns.solve(xp.astype(grad, xp.float64, copy=False), damping=damping)
        return xp.astype(info.coefficients, grad.dtype), info
    if damping == 0:
        raise _undamped_refused(m, p)
    if dense:  # A g and A^T c in float64: g - A^T c cancels when lambda is small
        rows = DenseRows(xp.astype(rows.array, xp.float64, copy=False), name=rows_name)
    if solver is None:
        solver = DampedGram(rows, rows_name=rows_name)
    # products in the rows' own dtype (a float32 PerSampleRows need not take float64 input)
    ag = xp.astype(rows.matvec(xp.astype(grad, rows.dtype, copy=False)), xp.float64)
    info = solver.solve(ag, damping=damping)
    # g - A^T c in the dtype of A^T c: where it cancels (g, A^T c within a factor 2) a float32
    # difference is exact (Sterbenz), elsewhere it adds one float32 rounding, all that float64
    # copies of g and A^T c (P-length passes) would save; dense rows are float64 here already
    back = rows.rmatvec(info.coefficients)
    update = (xp.astype(grad, back.dtype, copy=False) - back) / damping
    return xp.astype(update, grad.dtype, copy=False), info


def true_rows_inverse_apply(
    rows: Any, true_rows: PerSampleRows, damping: float, rows_name: str
) -> tuple[Any, GramSolve]:
    r""":math:`(A^\top A + \lambda I_P)^{-1} G^\top 1` without forming g = G^T 1.

    With A = ``rows`` (M, P) and G = ``true_rows`` (N, P), Woodbury gives

    .. math::
        u = \frac{1}{\lambda}\left[G^\top 1 - A^\top c\right]
          = \begin{bmatrix} G \\ A \end{bmatrix}^\top
            \begin{bmatrix} 1/\lambda \\ -c/\lambda \end{bmatrix}, \qquad
        (A A^\top + \lambda I_M)\, c = (A G^\top)\, 1,

    so A g comes from the (M, N) cross-Gram (float64, no P-length pass), and u is one
    combination of the two sets of rows: no g, no A g product, no P-length subtraction.
    Same conventions and result as :func:`damped_inverse_apply` with g = G^T 1 (the P x P
    route, dense A with P <= M, forms g and takes it). ``rows`` may be a DampedGram of A;
    ``true_rows`` must share A's namespace, dtype and P. A NaN or infinity in G is caught in
    A G^T 1 and reported as ``per_sample_grads``. Rows with the optional methods
    ``true_rows.cross_row_sums(a)`` = A G^T 1 (M,) float64 and ``true_rows.rmatvec_pair(a,
    w, v)`` = G^T w + A^T v are asked for these instead (a backend that can choose per
    block, or whose two sets of rows share factors:
    :class:`backends.torch.optim.sf_rows.PairedRows`).
    """
    solver = rows if isinstance(rows, DampedGram) else None
    a = as_rows(rows, name=rows_name) if solver is None else solver.rows
    xp = rows_namespace(a, rows_name)
    true_rows = as_rows(true_rows, name="per_sample_grads")
    _check_true_rows(xp, a, true_rows, rows_name)
    m, p = a.shape
    dtype = true_rows.dtype
    dense = solver is None and isinstance(a, DenseRows) and isinstance(true_rows, DenseRows)
    if solver is None and isinstance(a, DenseRows) and p <= m:
        grad = true_rows.rmatvec(ones_like_rows(true_rows))
        check_finite(xp, grad, "per_sample_grads")
        return damped_inverse_apply(a, grad, damping, rows_name)
    if damping == 0:
        raise _undamped_refused(m, p)
    if dense:  # both in float64: G^T 1 - A^T c cancels when lambda is small
        a = DenseRows(xp.astype(a.array, xp.float64, copy=False), name=rows_name)
        true_rows = DenseRows(xp.astype(true_rows.array, xp.float64, copy=False))
    if solver is None:
        solver = DampedGram(a, rows_name=rows_name)
    sums = getattr(true_rows, "cross_row_sums", None)  # optional: A G^T 1 by other means
    ag = sums(a) if sums is not None else xp.sum(a.cross_gram(true_rows), axis=1)  # (M,) f64
    check_finite(xp, ag, "per_sample_grads")
    info = solver.solve(ag, damping=damping)
    weights = xp.full(true_rows.shape[0], 1.0 / damping, dtype=xp.float64, device=device(ag))
    # each product in its rows' dtype; where the two cancel the float32 sum is exact
    # (Sterbenz), elsewhere one rounding, as in damped_inverse_apply's g - A^T c (a paired
    # product combines them before its one product: the same float32 rounding per term)
    other = info.coefficients / (-damping)
    pair = getattr(true_rows, "rmatvec_pair", None)  # optional: both in one pass
    update = (
        pair(a, weights, other) if pair is not None
        else true_rows.rmatvec(weights) + a.rmatvec(other)
    )
    return xp.astype(update, dtype, copy=False), info


def _check_true_rows(xp: Any, a: PerSampleRows, true_rows: PerSampleRows, name: str) -> None:
    """G must share A's namespace, dtype and number of columns (the message names both)."""
    if true_rows.array_namespace() is not xp:
        raise TypeError(
            f"per_sample_grads comes from namespace {true_rows.array_namespace().__name__} but "
            f"{name} comes from {xp.__name__}: pass all arrays from one library"
        )
    if true_rows.shape[1] != a.shape[1]:
        raise ValueError(
            f"per_sample_grads has {true_rows.shape[1]} columns but {name} has {a.shape[1]}"
        )
    check_same_dtype(true_rows, "per_sample_grads", a, name)
