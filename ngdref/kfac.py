r"""Kronecker-factored curvature: KFAC, eKFAC and ieKFAC (Wu et al. 2024, App. D.2.2).

For one linear layer (``nn.Linear``, a LoRA factor, a convolution seen through
its patches) with weight W (d_out, d_in), sample n has inputs a_n (T, d_in)
and output gradients b_n (T, d_out) (sum convention: b_n = dl_n/d(outputs),
T positions; T = 1 for an MLP), and its weight gradient is b_n^T a_n. The
block of the curvature for vec(W) (row-major, torch's flattening) is
approximated by one Kronecker product

.. math::
    F_W \approx B \otimes A, \qquad
    A = \text{norm} \sum_{n} a_n^\top a_n, \qquad
    B = \sum_n w_n\, b_n^\top b_n

and the three methods differ only in the rows b_n and weights w_n that go into B
(:data:`KFAC_METHODS`, one code path):

=========  ==================================================  ==========
method     rows b_n                                            w_n
=========  ==================================================  ==========
kfac       output gradients of a label drawn from the model    1
ekfac      output gradients of the true label (empirical)      1
iekfac     output gradients of the true label                  1 / s_n (Eq. 43)
=========  ==================================================  ==========

with s_n = ||dl_n/dz_n||^2 over all logits of sample n. (The paper's "eKFAC" is
the *empirical* KFAC; curvlinops' ``EKFACLinearOperator`` is the unrelated
*eigenvalue-corrected* KFAC of George et al. 2018.)

Positions (Eschenhagen et al. 2023, curvlinops' ``kfac_approx``)
    ``"expand"``: every (n, t) is its own term, A sums a_nt a_nt^T and B sums
    b_nt b_nt^T over n and t. ``"reduce"``: positions are first reduced,
    a_n -> mean_t a_nt and b_n -> sum_t b_nt, then one term per sample.

The two choices the paper leaves open, as named options
    ``normalisation`` (the expectation in Eq. 42-43): ``"mean"`` (default, as
    Martens & Grosse 2015 and curvlinops with a sum loss) averages A over its
    N T (expand) or N (reduce) terms and sums B, so that B (x) A approximates
    the sum-convention curvature sum_n g_n g_n^T; ``"sum"`` sums both, which
    is the same matrix times c = N T (expand) or N (reduce). The two are one
    scalar apart, so they differ only in what a damping value means:
    (c K + lambda I)^-1 = (K + (lambda/c) I)^-1 / c.

    ``damped_inverse`` (how (B (x) A + lambda I)^-1 is formed): ``"exact"``
    (default, the reference) from the factors' eigendecompositions
    B = U diag(beta) U^T, A = V diag(alpha) V^T:
    (B (x) A + lambda I)^-1 vec(G) = vec(U [(U^T G V) / (beta alpha^T + lambda)] V^T);
    ``"pi"``, the factored damping of Martens & Grosse 2015 (Sec. 6.3):
    (B + lambda^(1/2)/pi I)^-1 G (A + pi lambda^(1/2) I)^-1 with
    pi = sqrt((tr A / d_in) / (tr B / d_out)) (curvlinops'
    ``use_heuristic_damping``; when a trace is 0 both factors get lambda, as
    there). A block without input factor (a bias treated separately: A = [1])
    is damped as B + lambda I in both forms.

Every factor is accumulated and decomposed in float64; an applied inverse is
returned in the dtype of the gradient it was applied to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ngdref.checks import (
    check_array,
    check_choice,
    check_damping,
    check_finite,
    check_floating,
    check_ndim,
    check_vector,
    namespace,
)
from ngdref.kfac_diagonal import (
    check_factor,
    dense_factor,
    diagonal_factor,
    diagonal_inverse_apply,
    factor_eigh,
    from_eigenbasis,
    mean_eigenvalue,
    to_eigenbasis,
)
from ngdref.linalg import SingularMatrixError

__all__ = [
    "CONVENTIONS",
    "DAMPED_INVERSES",
    "KFAC_METHODS",
    "NORMALISATIONS",
    "KroneckerFactors",
    "diagonal_factor",
    "diagonal_inverse_apply",
    "eigenvalue_correction",
    "grad_factor",
    "input_factor",
    "kfac_block_matrix",
    "kfac_factors",
    "kfac_inverse_apply",
    "kfac_sample_weights",
]

KFAC_METHODS = ("kfac", "ekfac", "iekfac")
CONVENTIONS = ("expand", "reduce")
NORMALISATIONS = ("mean", "sum")
DAMPED_INVERSES = ("exact", "pi")


@dataclass(frozen=True)
class KroneckerFactors:
    """The factors of one layer's block B (x) A (row-major vec of W (d_out, d_in)).

    Attributes
    ----------
    input_factor : array, shape (d_in, d_in) or (d_in,), float64, or None
        A, dense or its diagonal (:mod:`ngdref.kfac_diagonal`: a lookup table's
        diag(counts) / c); None for a block without inputs (a bias treated on its own),
        i.e. A = [1].
    grad_factor : array, shape (d_out, d_out) or (d_out,), float64
        B, dense or its diagonal.
    corrected_eigenvalues : array, shape (d_out, d_in) or (d_out,), float64, or None
        E of the eigenvalue-corrected block (George et al. 2018), set by
        :func:`eigenvalue_correction`; None for the plain Kronecker product.
    """

    input_factor: Any
    grad_factor: Any
    corrected_eigenvalues: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the gradient this block acts on: (d_out, d_in), or (d_out,)."""
        d_out = self.grad_factor.shape[0]
        return (d_out,) if self.input_factor is None else (d_out, self.input_factor.shape[0])


def _positions(x: Any, name: str) -> tuple[Any, Any]:
    """Namespace and a float64 (N, T, d) view of a (N, d) or (N, T, d) array."""
    xp = namespace(**{name: x})
    if x.ndim == 2:
        x = x[:, None, :]
    check_array(xp, x, name, 3, "(N, T, d) or (N, d)")
    return xp, xp.astype(x, xp.float64)


def input_factor(
    layer_inputs: Any, *, convention: str = "expand", normalisation: str = "mean"
) -> Any:
    r"""The input factor A of one layer.

    .. math::
        A_{\text{expand}} = c^{-1} \sum_{n,t} a_{nt} a_{nt}^\top, \qquad
        A_{\text{reduce}} = c^{-1} \sum_n \bar a_n \bar a_n^\top, \quad
        \bar a_n = \tfrac1T \sum_t a_{nt}

    with c = N T (expand) or N (reduce) under ``normalisation="mean"``, c = 1
    under ``"sum"``.

    Parameters
    ----------
    layer_inputs : array, shape (N, T, d_in) or (N, d_in)
    convention : {"expand", "reduce"}
    normalisation : {"mean", "sum"}

    Returns
    -------
    array, shape (d_in, d_in), float64
    """
    check_choice(convention, "convention", CONVENTIONS)
    check_choice(normalisation, "normalisation", NORMALISATIONS)
    xp, a = _positions(layer_inputs, "layer_inputs")
    n, t, d = a.shape
    if convention == "reduce":
        a, t = xp.mean(a, axis=1), 1
    else:
        a = xp.reshape(a, (n * t, d))
    factor = xp.matmul(xp.matrix_transpose(a), a)
    return factor / (n * t) if normalisation == "mean" else factor


def grad_factor(output_grads: Any, *, weights: Any = None, convention: str = "expand") -> Any:
    r"""The output-gradient factor B of one layer (always a sum over samples).

    .. math::
        B_{\text{expand}} = \sum_n w_n \sum_t b_{nt} b_{nt}^\top, \qquad
        B_{\text{reduce}} = \sum_n w_n \bar b_n \bar b_n^\top, \quad
        \bar b_n = \sum_t b_{nt}

    Parameters
    ----------
    output_grads : array, shape (N, T, d_out) or (N, d_out)
        b_n, sum convention (the gradient of l_n, not of a mean loss).
    weights : array, shape (N,), optional
        w_n (default 1); see :func:`kfac_sample_weights`.
    convention : {"expand", "reduce"}

    Returns
    -------
    array, shape (d_out, d_out), float64
    """
    check_choice(convention, "convention", CONVENTIONS)
    xp, b = _positions(output_grads, "output_grads")
    n, t, d = b.shape
    if convention == "reduce":
        b, t = xp.sum(b, axis=1)[:, None, :], 1
    if weights is not None:
        check_vector(xp, weights, "weights", n, "output_grads", weights.dtype)
        if bool(xp.any(weights < 0)):
            raise ValueError("weights must be >= 0 (B must be positive semi-definite)")
        b = b * xp.sqrt(xp.astype(weights, xp.float64))[:, None, None]
    b = xp.reshape(b, (n * t, d))
    return xp.matmul(xp.matrix_transpose(b), b)


def kfac_sample_weights(method: str, logit_grad_sq_norms: Any = None) -> Any:
    """w_n of B: None (all 1) for "kfac" and "ekfac", 1 / s_n for "iekfac" (Eq. 43).

    Parameters
    ----------
    method : {"kfac", "ekfac", "iekfac"}
    logit_grad_sq_norms : array, shape (N,), optional
        s_n = ||dl_n/dz_n||^2 of the true labels; required (and > 0) for "iekfac".
    """
    check_choice(method, "method", KFAC_METHODS)
    if method != "iekfac":
        return None
    if logit_grad_sq_norms is None:
        raise ValueError('logit_grad_sq_norms (s_n) is required for method="iekfac"')
    xp = namespace(logit_grad_sq_norms=logit_grad_sq_norms)
    check_ndim(logit_grad_sq_norms, "logit_grad_sq_norms", 1, "(N,)")
    check_floating(xp, logit_grad_sq_norms, "logit_grad_sq_norms")
    check_finite(xp, logit_grad_sq_norms, "logit_grad_sq_norms")
    if not bool(xp.all(logit_grad_sq_norms > 0)):
        raise ValueError(
            "logit_grad_sq_norms must be > 0 for ieKFAC's weights 1/s_n: a sample with a zero "
            "logit gradient contributes nothing (drop it)"
        )
    return 1.0 / xp.astype(logit_grad_sq_norms, xp.float64)


def kfac_factors(
    layer_inputs: Any,
    output_grads: Any,
    *,
    method: str,
    logit_grad_sq_norms: Any = None,
    convention: str = "expand",
    normalisation: str = "mean",
) -> KroneckerFactors:
    r"""The factors of KFAC, eKFAC or ieKFAC for one layer (one code path).

    .. math:: A = \text{norm}\sum_n a_n^\top a_n, \qquad B = \sum_n w_n b_n^\top b_n

    Parameters
    ----------
    layer_inputs : array, shape (N, T, d_in) or (N, d_in)
        a_n; append a column of ones to treat a bias jointly with its weight.
    output_grads : array, shape (N, T, d_out) or (N, d_out)
        b_n: of a sampled label for "kfac", of the true label for "ekfac" and
        "iekfac" (sum convention).
    method : {"kfac", "ekfac", "iekfac"}
        Selects w_n (:func:`kfac_sample_weights`).
    logit_grad_sq_norms : array, shape (N,), optional
        s_n, for "iekfac".
    convention : {"expand", "reduce"}
    normalisation : {"mean", "sum"}
        Of A (see the module docstring).
    """
    if layer_inputs.shape[0] != output_grads.shape[0]:
        raise ValueError(
            f"output_grads has {output_grads.shape[0]} samples but layer_inputs has "
            f"{layer_inputs.shape[0]}"
        )
    if layer_inputs.ndim != output_grads.ndim or (
        layer_inputs.ndim == 3 and layer_inputs.shape[1] != output_grads.shape[1]
    ):
        raise ValueError(
            f"output_grads has shape {tuple(output_grads.shape)} but layer_inputs has "
            f"{tuple(layer_inputs.shape)}: they need the same (N, T) leading axes"
        )
    weights = kfac_sample_weights(method, logit_grad_sq_norms)
    return KroneckerFactors(
        input_factor(layer_inputs, convention=convention, normalisation=normalisation),
        grad_factor(output_grads, weights=weights, convention=convention),
    )


def _checked_factors(factors: KroneckerFactors) -> tuple[Any, Any, Any]:
    """Namespace, B and A (A = [1] when absent) in float64 after the shape and finiteness
    checks; each dense (d, d) or diagonal (d,) (:mod:`ngdref.kfac_diagonal`)."""
    if not isinstance(factors, KroneckerFactors):
        raise TypeError(f"factors must be KroneckerFactors, got {type(factors).__name__}")
    b, a = factors.grad_factor, factors.input_factor
    xp = namespace(**{"factors.grad_factor": b, "factors.input_factor": a})
    for name, m in (("factors.grad_factor", b), ("factors.input_factor", a)):
        if m is not None:
            check_factor(xp, m, name)
    b = xp.astype(b, xp.float64)
    a = xp.ones((1,), dtype=xp.float64) if a is None else xp.astype(a, xp.float64)
    return xp, b, a


def _kron(xp: Any, b: Any, a: Any) -> Any:
    """b (x) a for the row-major vec: entry [i d_a + k, j d_a + l] = b[i, j] a[k, l]."""
    b, a = dense_factor(xp, b), dense_factor(xp, a)
    (bo, bi), (ao, ai) = b.shape, a.shape
    return xp.reshape(b[:, None, :, None] * a[None, :, None, :], (bo * ao, bi * ai))


def kfac_block_matrix(factors: KroneckerFactors) -> Any:
    r"""The dense block, (d_out d_in, d_out d_in) float64, for row-major vec(W).

    B (x) A (entry [i d_in + k, j d_in + l] = B[i, j] A[k, l]), or with corrected
    eigenvalues (U (x) V) diag(vec E) (U (x) V)^T, B = U diag(beta) U^T, A = V diag(alpha) V^T
    (the identity for a diagonal factor). The reference for small layers.
    """
    xp, b, a = _checked_factors(factors)
    if factors.corrected_eigenvalues is None:
        return _kron(xp, b, a)
    u, v = (_basis(xp, m) for m in (b, a))
    q = _kron(xp, u, v)
    e = xp.reshape(_checked_eigenvalues(xp, factors), (-1,))
    return xp.matmul(q * e[None, :], xp.matrix_transpose(q))


def _basis(xp: Any, factor: Any) -> Any:
    """The eigenvectors of a factor as a dense (d, d) array."""
    vectors = factor_eigh(xp, factor)[1]
    return xp.eye(factor.shape[0], dtype=factor.dtype) if vectors is None else vectors


def _checked_eigenvalues(xp: Any, factors: KroneckerFactors) -> Any:
    """E as float64 (d_out, d_in) ((d_out, 1) for a block without input factor)."""
    e = factors.corrected_eigenvalues
    name = "factors.corrected_eigenvalues"
    namespace(**{name: e, "factors.grad_factor": factors.grad_factor})
    if tuple(e.shape) != factors.shape:
        raise ValueError(f"{name} has shape {tuple(e.shape)}, expected {factors.shape}")
    check_floating(xp, e, name)
    check_finite(xp, e, name)
    e = xp.astype(e, xp.float64)
    return e[:, None] if e.ndim == 1 else e


def eigenvalue_correction(
    factors: KroneckerFactors, layer_inputs: Any, output_grads: Any, *, weights: Any = None
) -> KroneckerFactors:
    r"""The eigenvalue-corrected block (EK-FAC, George et al. 2018; curvlinops' EKFAC).

    .. math::
        E = \sum_n w_n \big(U^\top G_n V\big)^{\odot 2}, \qquad
        G_n = \sum_t b_{nt} a_{nt}^\top \ \text{(the per-sample gradient)}

    with U, V the eigenvectors of B and A: the block keeps the Kronecker
    eigenbasis and replaces its eigenvalues beta_i alpha_j by E_ij, the exact
    second moments of the per-sample gradients in that basis (sum convention;
    independent of A's normalisation). The weights and rows are the method's,
    as for :func:`grad_factor`; with 1/s_n this is an eigenvalue-corrected ieKFAC.
    E belongs to the eigenvectors ``eigh`` returns for these factors (recomputed
    deterministically by :func:`kfac_inverse_apply`; the identity for a diagonal
    factor); do not average E across different factors.

    Parameters
    ----------
    factors : KroneckerFactors
    layer_inputs : array, shape (N, T, d_in) or (N, d_in); ignored without input factor
    output_grads : array, shape (N, T, d_out) or (N, d_out)
    weights : array, shape (N,), optional

    Returns
    -------
    KroneckerFactors with ``corrected_eigenvalues`` set.
    """
    xp, b_factor, a_factor = _checked_factors(factors)
    _, b = _positions(output_grads, "output_grads")
    y = _rotated(xp, b, b_factor)
    if factors.input_factor is None:
        rotated = xp.sum(y, axis=1)
    else:
        _, a = _positions(layer_inputs, "layer_inputs")
        if a.shape[:2] != b.shape[:2] or a.shape[2] != factors.shape[1]:
            raise ValueError(
                f"layer_inputs has shape {tuple(layer_inputs.shape)}, output_grads "
                f"{tuple(output_grads.shape)} and the factors {factors.shape}: they disagree"
            )
        rotated = xp.matmul(xp.matrix_transpose(y), _rotated(xp, a, a_factor))
    if weights is not None:
        check_vector(xp, weights, "weights", b.shape[0], "output_grads", weights.dtype)
        rotated = rotated * xp.reshape(
            xp.sqrt(xp.astype(weights, xp.float64)), (-1,) + (1,) * (rotated.ndim - 1)
        )
    return KroneckerFactors(
        factors.input_factor, factors.grad_factor, xp.sum(rotated * rotated, axis=0)
    )


def _rotated(xp: Any, x: Any, factor: Any) -> Any:
    """x (N, T, d) in the factor's eigenbasis (x V)."""
    vectors = factor_eigh(xp, factor)[1]
    return x if vectors is None else xp.matmul(x, vectors)


def _pi_shifts(xp: Any, b: Any, a: Any, damping: float, has_input: bool) -> tuple[float, float]:
    """(shift of B, shift of A) of the pi-damped factored inverse."""
    if not has_input:
        return damping, 0.0
    mean_a, mean_b = mean_eigenvalue(xp, a), mean_eigenvalue(xp, b)
    if mean_a <= 0 or mean_b <= 0:
        return damping, damping  # curvlinops' fallback for a zero factor
    pi = math.sqrt(mean_a / mean_b)
    root = math.sqrt(damping)
    return root / pi, root * pi


def kfac_inverse_apply(
    factors: KroneckerFactors, grad: Any, *, damping: float, damped_inverse: str = "exact"
) -> Any:
    r"""Apply the damped inverse of one Kronecker block to a gradient.

    .. math::
        \text{exact:}\ (B \otimes A + \lambda I)^{-1}\,\mathrm{vec}(G), \qquad
        \text{pi:}\ (B + \tfrac{\sqrt\lambda}{\pi} I)^{-1} G (A + \pi\sqrt\lambda I)^{-1}

    Both through the eigendecompositions B = U diag(beta) U^T, A = V diag(alpha) V^T
    (V = I for a diagonal A, so a lookup table's block costs O(V d^2)).

    Parameters
    ----------
    factors : KroneckerFactors
    grad : array, shape (d_out, d_in), or (d_out,) when ``factors`` has no input factor
        G (any reduction: the map is linear).
    damping : float >= 0
        lambda, absolute.
    damped_inverse : {"exact", "pi"}

    Returns
    -------
    array, the shape and dtype of ``grad``

    Raises
    ------
    ngdref.SingularMatrixError
        If the damped block is singular to float64 working precision.
    ngdref.NonFiniteError
        If a factor or ``grad`` holds NaN or infinity.
    """
    check_choice(damped_inverse, "damped_inverse", DAMPED_INVERSES)
    damping = check_damping(damping)
    xp, b, a = _checked_factors(factors)
    namespace(grad=grad, **{"factors.grad_factor": factors.grad_factor})
    if tuple(grad.shape) != factors.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but factors expect {factors.shape}")
    check_floating(xp, grad, "grad")
    check_finite(xp, grad, "grad")
    (beta, u), (alpha, v) = factor_eigh(xp, b), factor_eigh(xp, a)
    if factors.corrected_eigenvalues is not None:
        if damped_inverse != "exact":
            raise ValueError(
                'damped_inverse must be "exact" for eigenvalue-corrected factors (E + lambda)'
            )
        denominator = _checked_eigenvalues(xp, factors) + damping
    elif damped_inverse == "exact":
        denominator = beta[:, None] * alpha[None, :] + damping
    else:
        shift_b, shift_a = _pi_shifts(xp, b, a, damping, factors.input_factor is not None)
        denominator = (beta[:, None] + shift_b) * (alpha[None, :] + shift_a)
    _check_nonsingular(xp, denominator, max(b.shape[0], a.shape[0]), damping)
    g = xp.reshape(xp.astype(grad, xp.float64), (b.shape[0], a.shape[0]))
    result = from_eigenbasis(xp, to_eigenbasis(xp, g, u, v) / denominator, u, v)
    return xp.astype(xp.reshape(result, grad.shape), grad.dtype)


def _check_nonsingular(xp: Any, denominator: Any, size: int, damping: float) -> None:
    """Refuse eigenvalues of the damped block at or below float64 rounding of the largest."""
    # eigh's eigenvalue errors are ~ d eps ||factor||; below that a zero cannot be told apart
    tol = 2.0**-52 * size * float(xp.max(xp.abs(denominator)))
    smallest = float(xp.min(denominator))
    if not smallest > tol:
        raise SingularMatrixError(
            f"the damped Kronecker block is singular: smallest eigenvalue {smallest:.3g} <= "
            f"{tol:.3g} (damping={damping}); increase damping"
        )
