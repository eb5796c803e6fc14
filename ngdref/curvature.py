r"""Dense curvature matrices (P x P), for small P: the reference the Gram forms are checked against.

All are sums over the batch (the paper's sum convention, :ref:`conv-curvature`); for a
mean-reduced loss scale the per-sample inputs by the reduction factor first.

=====================  =================================================
function               matrix
=====================  =================================================
``fisher_matrix``      F = sum_n J_n^T H_n J_n  (Eq. 2; = GGN for CE, MSE)
``gn_matrix``          G_hat = sum_n J_n^T J_n  (Eq. 9)
``ef_matrix``          F_EF = G^T G  (Eq. 3)
``ief_matrix``         F_iEF = G^T diag(s)^{-1} G  (Eq. 14)
``ief_matrix_logit``   sum_n J_n^T u_n u_n^T J_n, u_n = e_n/||e_n||  (the same, via logits)
``sf_matrix``          F_SF = (1/K) G_hat_s^T G_hat_s  (Eq. 47)
=====================  =================================================
"""

from __future__ import annotations

from typing import Any

from ngdref.checks import (
    check_array,
    check_finite,
    check_grad_matrix,
    check_int,
    check_logit_matrices,
    check_same_dtype,
    check_vector,
    namespace,
)

__all__ = [
    "ef_matrix",
    "fisher_matrix",
    "gn_matrix",
    "ief_matrix",
    "ief_matrix_logit",
    "sf_matrix",
]


def _check_jacobians(jacobians: Any) -> Any:
    xp = namespace(jacobians=jacobians)
    check_array(xp, jacobians, "jacobians", 3, "(N, C, P)")
    return xp


def _stacked_gram(xp: Any, left: Any, right: Any) -> Any:
    """sum_n L_n^T R_n for L, R (N, C, P) as one (N*C, P)^T (N*C, P) product."""
    n, c, p = left.shape
    return xp.matmul(
        xp.matrix_transpose(xp.reshape(left, (n * c, p))), xp.reshape(right, (n * c, p))
    )


def fisher_matrix(jacobians: Any, logit_hessians: Any) -> Any:
    r"""Fisher / GGN :math:`F = \sum_n J_n^\top H_n J_n` (Eq. 2), sum convention.

    Parameters
    ----------
    jacobians : array, shape (N, C, P)
    logit_hessians : array, shape (N, C, C)

    Returns
    -------
    array, shape (P, P)
    """
    xp = _check_jacobians(jacobians)
    namespace(jacobians=jacobians, logit_hessians=logit_hessians)
    check_logit_matrices(xp, logit_hessians, "logit_hessians", jacobians)
    return _stacked_gram(xp, jacobians, xp.matmul(logit_hessians, jacobians))


def gn_matrix(jacobians: Any) -> Any:
    r"""Gauss-Newton without output curvature, :math:`\hat G = \sum_n J_n^\top J_n` (Eq. 9).

    Parameters
    ----------
    jacobians : array, shape (N, C, P)

    Returns
    -------
    array, shape (P, P)
    """
    xp = _check_jacobians(jacobians)
    return _stacked_gram(xp, jacobians, jacobians)


def ef_matrix(per_sample_grads: Any) -> Any:
    r"""Empirical Fisher :math:`F_{EF} = G^\top G` (Eq. 3) from G (N, P); (P, P)."""
    xp = check_grad_matrix(per_sample_grads)
    return xp.matmul(xp.matrix_transpose(per_sample_grads), per_sample_grads)


def ief_matrix(per_sample_grads: Any, logit_grad_sq_norms: Any) -> Any:
    r"""Improved empirical Fisher :math:`F_{iEF} = G^\top \mathrm{diag}(s)^{-1} G` (Eq. 14).

    Parameters
    ----------
    per_sample_grads : array, shape (N, P)
    logit_grad_sq_norms : array, shape (N,)
        s_n = ||dl_n/dz_n||^2 > 0.

    Returns
    -------
    array, shape (P, P)
    """
    xp = check_grad_matrix(per_sample_grads)
    namespace(per_sample_grads=per_sample_grads, logit_grad_sq_norms=logit_grad_sq_norms)
    check_vector(
        xp,
        logit_grad_sq_norms,
        "logit_grad_sq_norms",
        per_sample_grads.shape[0],
        "per_sample_grads rows",
        per_sample_grads.dtype,
    )
    if not bool(xp.all(logit_grad_sq_norms > 0)):
        raise ValueError(
            "logit_grad_sq_norms must be > 0: F_iEF divides each per-sample gradient "
            "outer product by s_n"
        )
    scaled = per_sample_grads / logit_grad_sq_norms[:, None]
    return xp.matmul(xp.matrix_transpose(per_sample_grads), scaled)


def ief_matrix_logit(jacobians: Any, logit_grads: Any) -> Any:
    r"""iEF as a GGN with a rank-one logit curvature (:ref:`conv-curvature`).

    .. math:: F_{iEF} = \sum_n J_n^\top u_n u_n^\top J_n, \quad u_n = e_n / \|e_n\|

    Parameters
    ----------
    jacobians : array, shape (N, C, P)
    logit_grads : array, shape (N, C)
        e_n = dl_n/dz_n, nonzero rows.

    Returns
    -------
    array, shape (P, P)
    """
    xp = _check_jacobians(jacobians)
    namespace(jacobians=jacobians, logit_grads=logit_grads)
    if tuple(logit_grads.shape) != tuple(jacobians.shape[:2]):
        raise ValueError(
            f"logit_grads must have shape {tuple(jacobians.shape[:2])}, "
            f"got {tuple(logit_grads.shape)}"
        )
    check_same_dtype(logit_grads, "logit_grads", jacobians, "jacobians")
    check_finite(xp, logit_grads, "logit_grads")
    norms = xp.sqrt(xp.sum(logit_grads * logit_grads, axis=1))
    if not bool(xp.all(norms > 0)):
        raise ValueError("logit_grads has a zero row: its direction u_n is undefined")
    u = logit_grads / norms[:, None]
    projector = u[:, :, None] * u[:, None, :]
    return fisher_matrix(jacobians, projector)


def sf_matrix(sampled_grads: Any, *, num_samples: int = 1) -> Any:
    r"""Sampled Fisher (Eq. 47).

    .. math:: F_{SF} = \frac{1}{K} \sum_{n,k} \hat g_{nk} \hat g_{nk}^\top

    Parameters
    ----------
    sampled_grads : array, shape (N*K, P)
        Rows are gradients of -log p_n(yhat_nk), yhat_nk drawn from the model.
    num_samples : int
        K, the draws per sample.

    Returns
    -------
    array, shape (P, P)
    """
    xp = check_grad_matrix(sampled_grads, "sampled_grads")
    _check_num_samples(num_samples, sampled_grads.shape[0])
    return xp.matmul(xp.matrix_transpose(sampled_grads), sampled_grads) / num_samples


def _check_num_samples(num_samples: int, rows: int) -> None:
    check_int(num_samples, "num_samples")
    if rows % num_samples != 0:
        raise ValueError(
            f"sampled_grads has {rows} rows, not a multiple of num_samples={num_samples}"
        )
