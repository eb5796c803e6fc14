r"""Diagonal forms in K-FAC: a Kronecker factor given by its diagonal, and the diagonal block.

A Kronecker factor of :class:`ngdref.kfac.KroneckerFactors` is either a dense symmetric
(d, d) array or a (d,) array f standing for the diagonal matrix diag(f). The second form is
the input factor of a lookup table (an embedding: one-hot inputs e_i give
A = c^{-1} sum_{n,t} e_{i_nt} e_{i_nt}^T = diag(counts) / c), whose V x V matrix is never
formed: the eigendecomposition of diag(f) is f with the identity basis (in index order), so
products, damped inverses and eigenvalue corrections cost O(V d) instead of O(V^3). That
identity basis is also the basis an eigenvalue-corrected block with a diagonal factor refers
to (any basis of a repeated eigenvalue is an eigenbasis; this one is fixed).

The diagonal block (the fallback for parameters without a Kronecker form),

.. math:: D = \sum_n w_n\, g_n \odot g_n ,

and its damped inverse live here too. Everything is accumulated in float64.
"""

from __future__ import annotations

from typing import Any

from ngdref.checks import (
    check_array,
    check_damping,
    check_finite,
    check_floating,
    check_ndim,
    check_vector,
    namespace,
)
from ngdref.linalg import SingularMatrixError

__all__ = [
    "check_factor",
    "dense_factor",
    "diagonal_factor",
    "diagonal_inverse_apply",
    "factor_eigh",
    "from_eigenbasis",
    "mean_eigenvalue",
    "to_eigenbasis",
]


def check_factor(xp: Any, factor: Any, name: str) -> None:
    """Raise unless ``factor`` is a dense square (d, d) or a diagonal (d,) factor, real
    floating and finite."""
    if factor.ndim not in (1, 2):
        raise ValueError(f"{name} must be (d, d) or its diagonal (d,), got shape "
                         f"{tuple(factor.shape)}")
    if factor.ndim == 2 and factor.shape[0] != factor.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(factor.shape)}")
    check_floating(xp, factor, name)
    check_finite(xp, factor, name)


def factor_eigh(xp: Any, factor: Any) -> tuple[Any, Any]:
    """(eigenvalues (d,), eigenvectors (d, d)) of a float64 factor; the eigenvectors of a
    diagonal factor are None, standing for the identity."""
    if factor.ndim == 1:
        return factor, None
    return xp.linalg.eigh(factor)


def dense_factor(xp: Any, factor: Any) -> Any:
    """The (d, d) matrix of either form (for small factors: references, tests)."""
    if factor.ndim == 2:
        return factor
    return xp.eye(factor.shape[0], dtype=factor.dtype) * factor[None, :]


def mean_eigenvalue(xp: Any, factor: Any) -> float:
    """tr(F) / d."""
    diagonal = factor if factor.ndim == 1 else xp.linalg.diagonal(factor)
    return float(xp.sum(diagonal)) / factor.shape[0]


def to_eigenbasis(xp: Any, g: Any, left: Any, right: Any) -> Any:
    """U^T G V of a (d_out, d_in) array; None stands for the identity."""
    if left is not None:
        g = xp.matmul(xp.matrix_transpose(left), g)
    return g if right is None else xp.matmul(g, right)


def from_eigenbasis(xp: Any, r: Any, left: Any, right: Any) -> Any:
    """U R V^T of a (d_out, d_in) array; None stands for the identity."""
    if left is not None:
        r = xp.matmul(left, r)
    return r if right is None else xp.matmul(r, xp.matrix_transpose(right))


def diagonal_factor(per_sample_grads: Any, *, weights: Any = None) -> Any:
    r"""Fallback diagonal block for parameters outside supported layers, float64 (P,).

    .. math:: D = \sum_n w_n\, g_n \odot g_n

    ``per_sample_grads`` (N, P) holds the rows of the method (sampled-label
    gradients for "kfac"); ``weights`` (N,) are :func:`ngdref.kfac.kfac_sample_weights`.
    """
    xp = namespace(per_sample_grads=per_sample_grads)
    check_array(xp, per_sample_grads, "per_sample_grads", 2, "(N, P)")
    g = xp.astype(per_sample_grads, xp.float64)
    if weights is not None:
        check_vector(xp, weights, "weights", g.shape[0], "per_sample_grads", weights.dtype)
        g = g * xp.sqrt(xp.astype(weights, xp.float64))[:, None]
    return xp.sum(g * g, axis=0)


def diagonal_inverse_apply(diagonal: Any, grad: Any, *, damping: float) -> Any:
    r"""(diag(D) + lambda I)^-1 g, in the dtype of ``grad`` (P,); singular D + lambda is refused."""
    damping = check_damping(damping)
    xp = namespace(diagonal=diagonal, grad=grad)
    check_ndim(diagonal, "diagonal", 1, "(P,)")
    check_finite(xp, diagonal, "diagonal")
    check_vector(xp, grad, "grad", diagonal.shape[0], "diagonal", grad.dtype)
    denominator = xp.astype(diagonal, xp.float64) + damping
    tol = 2.0**-52 * (float(xp.max(xp.abs(diagonal))) + damping)
    if not float(xp.min(denominator)) > tol:
        raise SingularMatrixError(
            "the damped diagonal block is singular (a zero entry with damping=0); increase damping"
        )
    return xp.astype(xp.astype(grad, xp.float64) / denominator, grad.dtype)
