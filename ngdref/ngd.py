r"""Exact natural gradient and Gauss-Newton directions: Woodbury over N*C, and matrix-free CG.

An *update* is a direction d without learning rate or sign (the optimiser applies
``theta <- theta - lr * d``), in the paper's sum convention, damped in parameter space:

.. math:: d = (F + \lambda I_P)^{-1} g, \qquad F = \sum_n J_n^\top H_n J_n

(:func:`ngd_update`, :func:`ngd_update_cg`), or with :math:`H_n = I` (:func:`gn_update`).
The SGD, EF, iEF and SF updates are :mod:`ngdref.updates`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ngdref.cg import (
    NotConvergedError,
    conjugate_gradient,
    default_cg_tol,
    not_converged_message,
)
from ngdref.checks import (
    check_damping,
    check_finite,
    check_floating,
    check_logit_matrices,
    check_ndim,
    check_vector,
    namespace,
)
from ngdref.curvature import _check_jacobians
from ngdref.woodbury import damped_inverse_apply

__all__ = ["gn_update", "ngd_update", "ngd_update_cg"]


def _factor_rows(xp: Any, jacobians: Any, factors: Any | None) -> Any:
    """Rows of A with A^T A = sum_n J_n^T Q_n Q_n^T J_n: (Q_n^T J_n) stacked, (N*C, P)."""
    n, c, p = jacobians.shape
    if factors is not None:
        check_logit_matrices(xp, factors, "logit_hessian_sqrt", jacobians)
        jacobians = xp.matmul(xp.matrix_transpose(factors), jacobians)
    return xp.reshape(jacobians, (n * c, p))


def ngd_update(jacobians: Any, logit_hessian_sqrt: Any, grad: Any, *, damping: float) -> Any:
    r"""Exact (damped) natural gradient :math:`(F + \lambda I_P)^{-1} g` by Woodbury over N*C.

    .. math::
        U = [J_n^\top Q_n]_n \in R^{P \times NC}, \quad F = U U^\top, \quad
        (F + \lambda I)^{-1} g = \frac{1}{\lambda}\left[g - U (U^\top U + \lambda I)^{-1}
        U^\top g\right]

    When P <= N*C the P x P system is solved directly (then lambda = 0 is
    allowed if F is invertible, as in the toy problems).

    Parameters
    ----------
    jacobians : array, shape (N, C, P)
    logit_hessian_sqrt : array, shape (N, C, C)
        Q_n with Q_n Q_n^T = H_n (sum convention).
    grad : array, shape (P,)
    damping : float >= 0

    Returns
    -------
    array, shape (P,), namespace, device and dtype of ``grad``.
    """
    xp = _check_jacobians(jacobians)
    namespace(jacobians=jacobians, logit_hessian_sqrt=logit_hessian_sqrt, grad=grad)
    check_vector(xp, grad, "grad", jacobians.shape[2], "jacobians' last axis", jacobians.dtype)
    damping = check_damping(damping)
    update, _ = damped_inverse_apply(
        _factor_rows(xp, jacobians, logit_hessian_sqrt), grad, damping, "jacobians"
    )
    return update


def gn_update(jacobians: Any, grad: Any, *, damping: float) -> Any:
    r"""Gauss-Newton without output curvature, :math:`(\sum_n J_n^\top J_n + \lambda I_P)^{-1} g`.

    :func:`ngd_update` with Q_n = I (Eq. 9: gradient descent in logit space).

    Parameters
    ----------
    jacobians : array, shape (N, C, P)
    grad : array, shape (P,)
    damping : float >= 0

    Returns
    -------
    array, shape (P,)
    """
    xp = _check_jacobians(jacobians)
    namespace(jacobians=jacobians, grad=grad)
    check_vector(xp, grad, "grad", jacobians.shape[2], "jacobians' last axis", jacobians.dtype)
    damping = check_damping(damping)
    update, _ = damped_inverse_apply(_factor_rows(xp, jacobians, None), grad, damping, "jacobians")
    return update


def ngd_update_cg(
    fisher_vp: Callable[[Any], Any],
    grad: Any,
    *,
    damping: float,
    tol: float | None = None,
    maxiter: int | None = None,
    callback: Callable[[Any], None] | None = None,
    check_convergence: bool = True,
) -> Any:
    r"""Matrix-free natural gradient: conjugate gradient on :math:`(F + \lambda I) d = g`.

    Parameters
    ----------
    fisher_vp : callable, (P,) -> (P,)
        v -> F v, e.g. :func:`ngdref.quality.fisher_vp`.
    grad : array, shape (P,)
    damping : float >= 0
        lambda = 0 is allowed: from d_0 = 0, CG stays in the Krylov space of g
        and converges to the minimum-norm solution when g is in range(F).
    tol : float, optional
        Relative residual ||(F + lambda I) d - g|| <= tol ||g||; default
        :func:`ngdref.cg.default_cg_tol` of ``grad``'s dtype (1e-10 for float64,
        3.5e-4 for float32).
    maxiter : int, optional
        Default 10 * P.
    callback : callable, optional
        Called with every iterate d_k; CG's iterates are locally optimal for
        the quality indicator gamma (App. F.2).
    check_convergence : bool
        If True (default), raise :class:`~ngdref.cg.NotConvergedError` when the
        true residual of the returned d is above 2 tol ||g||; False returns the
        last iterate (truncated CG).

    Returns
    -------
    array, shape (P,), namespace, device and dtype of ``grad``.
    """
    xp = namespace(grad=grad)
    check_ndim(grad, "grad", 1, "(P,)")
    check_floating(xp, grad, "grad")
    check_finite(xp, grad, "grad")
    if tol is None:
        tol = default_cg_tol(xp, grad.dtype)
    result = conjugate_gradient(
        fisher_vp, grad, damping=damping, tol=tol, maxiter=maxiter, callback=callback
    )
    if check_convergence and not result.converged:
        raise NotConvergedError(not_converged_message(result, tol, maxiter, _norm(xp, grad)))
    return result.x


def _norm(xp: Any, v: Any) -> float:
    return float(xp.sqrt(xp.sum(v * v)))
