r"""The approximation-quality indicator gamma (Eq. 15) and per-batch diagnostics
(:ref:`conv-gamma`).

.. math:: \gamma(d) = \frac{\sqrt{d^\top F d}}{|d^\top g|}

with F and g from the same batch as d. gamma is scale invariant, minimised
by d proportional to F^{-1} g with minimum 1/sqrt(g^T F^{-1} g)
(Cauchy-Schwarz), and the best loss drop of the quadratic model along d is
-1/(2 gamma^2) (Eq. 59). d^T F d needs one Jacobian-vector product per sample,
no matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypedDict

import array_api_compat

from ngdref.checks import (
    check_choice,
    check_finite,
    check_floating,
    check_grad_matrix,
    check_ndim,
    namespace,
)
from ngdref.linalg import DampedGram
from ngdref.losses import LogitLoss, reduction_factor
from ngdref.provider import JacobianProvider
from ngdref.rows import as_rows, sq_row_norms

if TYPE_CHECKING:
    from typing import Unpack

__all__ = [
    "QuadraticForm",
    "fisher_quadratic_form",
    "fisher_vp",
    "gamma",
    "gamma_ratio",
    "grad_norm_imbalance",
    "loss_reductions",
    "projections",
]

def _check_update(xp: Any, update: Any, name: str, size: int | None = None) -> None:
    check_ndim(update, name, 1, "(P,)")
    check_floating(xp, update, name)
    if size is not None and update.shape[0] != size:
        raise ValueError(f"{name} has {update.shape[0]} entries but grad has {size}")
    check_finite(xp, update, name)


@dataclass(frozen=True)
class QuadraticForm:
    """The Fisher as its quadratic form v -> v^T F v, which is all :func:`gamma` needs.

    Build with :func:`fisher_quadratic_form`: one Jacobian-vector product per call and no
    vector-Jacobian product, half the cost of going through :func:`fisher_vp`. Pass it
    as ``gamma(..., quadratic_form=...)``.
    """

    form: Callable[[Any], Any]

    def __call__(self, vector: Any) -> Any:
        return self.form(vector)


def _curvature(
    update: Any, fisher_vp: Any, quadratic_form: Any, fisher: Any
) -> float:
    """d^T F d from exactly one of the three ways of giving F (see :func:`gamma`)."""
    given = [n for n, v in (("fisher_vp", fisher_vp), ("quadratic_form", quadratic_form),
                            ("fisher", fisher)) if v is not None]
    if len(given) != 1:
        raise TypeError(
            "gamma needs exactly one of fisher_vp= (v -> F v), quadratic_form= (v -> v^T F v) "
            f"or fisher= (a (P, P) array), got {given or 'none'}"
        )
    if fisher_vp is not None:
        if isinstance(fisher_vp, QuadraticForm) or not callable(fisher_vp):
            raise TypeError(
                "fisher_vp must be a callable v -> F v (a QuadraticForm goes to quadratic_form=)"
            )
        xp = namespace(update=update)
        return float(xp.sum(update * fisher_vp(update)))
    if quadratic_form is not None:
        if not callable(quadratic_form):
            raise TypeError("quadratic_form must be a callable v -> v^T F v")
        return float(quadratic_form(update))
    xp = namespace(fisher=fisher, update=update)
    p = update.shape[0]
    if tuple(fisher.shape) != (p, p):
        raise ValueError(f"fisher must have shape {(p, p)}, got {tuple(fisher.shape)}")
    return float(xp.sum(update * xp.matmul(fisher, update[:, None])[:, 0]))


def gamma(
    update: Any,
    grad: Any,
    *,
    fisher_vp: Callable[[Any], Any] | None = None,
    quadratic_form: Callable[[Any], Any] | None = None,
    fisher: Any = None,
) -> float:
    r"""Approximation-quality indicator :math:`\gamma(d) = \sqrt{d^\top F d} / |d^\top g|` (Eq. 15).

    F comes in exactly one of three forms, all of the same batch and in the same
    reduction convention as ``grad``.

    Parameters
    ----------
    update : array, shape (P,)
        d, any scale or sign.
    grad : array, shape (P,)
        g of the same batch.
    fisher_vp : callable (P,) -> (P,), keyword-only
        v -> F v, e.g. :func:`ngdref.fisher_vp`.
    quadratic_form : callable (P,) -> scalar, keyword-only
        v -> v^T F v, e.g. :func:`fisher_quadratic_form` (half the cost of ``fisher_vp``).
    fisher : array (P, P), keyword-only
        F itself (e.g. :func:`ngdref.fisher_matrix`).

    Returns
    -------
    float
        +inf when d^T g = 0 (d is useless to first order).

    Raises
    ------
    TypeError
        Unless exactly one of ``fisher_vp``, ``quadratic_form``, ``fisher`` is given.
    ValueError
        If ``update`` is zero (gamma is 0/0) or d^T F d < 0 (F not PSD).
    """
    xp = namespace(update=update, grad=grad)
    _check_update(xp, update, "update", grad.shape[0])
    _check_update(xp, grad, "grad")
    if not bool(xp.any(update != 0)):
        raise ValueError("update is the zero vector: gamma = 0/0 is undefined")
    curvature = _curvature(update, fisher_vp, quadratic_form, fisher)
    if curvature < 0:
        raise ValueError(f"the Fisher is not positive semi-definite along update "
                         f"(d^T F d = {curvature:.3g})")
    slope = abs(float(xp.sum(update * grad)))
    return math.inf if slope == 0.0 else math.sqrt(curvature) / slope


class _FisherForm(TypedDict, total=False):
    """The three ways of giving F to :func:`gamma` (exactly one of them)."""

    fisher_vp: Callable[[Any], Any]
    quadratic_form: Callable[[Any], Any]
    fisher: Any


def gamma_ratio(update: Any, grad: Any, **fisher: Unpack[_FisherForm]) -> float:
    r""":math:`\gamma(d) / \gamma(g)`, the paper's ratio to SGD (< 1: better than SGD).

    Takes F as :func:`gamma` does (exactly one of ``fisher_vp=``, ``quadratic_form=``,
    ``fisher=``, keyword-only); returns a float.
    """
    return gamma(update, grad, **fisher) / gamma(grad, grad, **fisher)


def fisher_vp(
    provider: JacobianProvider,
    loss: LogitLoss,
    targets: Any,
    *,
    reduction: str | float = "sum",
) -> Callable[[Any], Any]:
    r"""Matrix-free Fisher-vector product :math:`v \mapsto R \sum_n J_n^\top H_n (J_n v)`.

    One Jacobian-vector product, a logit-space Hessian-vector product and one
    summed vector-Jacobian product per call; no P x P or (N, C, P) array.

    Parameters
    ----------
    provider : JacobianProvider
    loss : LogitLoss
    targets : array
        The batch's targets (for CE the Fisher does not depend on them, but
        sequence losses use their ignore mask).
    reduction : {"sum", "mean"} or float
        R, see :func:`ngdref.losses.reduction_factor`.

    Returns
    -------
    callable, (P,) -> (P,)
    """
    logits = provider.logits()
    loss.check(logits, targets)
    factor = reduction_factor(reduction, logits.shape[0])

    def matvec(vector: Any) -> Any:
        jv = provider.jvp(vector)
        return provider.vjp_sum(factor * loss.hessian_vp(logits, targets, jv))

    return matvec


def _row_norms(per_sample_grads: Any) -> tuple[Any, Any]:
    """Namespace and the row norms ||grad l_n|| (N,), checked finite (so is every row)."""
    xp = check_grad_matrix(per_sample_grads, finite=False)
    norms = xp.linalg.vector_norm(per_sample_grads, axis=1)  # no (N, P) temporary
    check_finite(xp, norms, "per_sample_grads")
    return xp, norms


def fisher_quadratic_form(
    provider: JacobianProvider,
    loss: LogitLoss,
    targets: Any,
    *,
    reduction: str | float = "sum",
) -> QuadraticForm:
    r"""The quadratic form :math:`v \mapsto R \sum_n (J_n v)^\top H_n (J_n v)` of the Fisher.

    One Jacobian-vector product and a logit-space Hessian-vector product per call; pass it
    to :func:`gamma` as ``fisher``. Same parameters as :func:`fisher_vp`.
    """
    logits = provider.logits()
    loss.check(logits, targets)
    factor = reduction_factor(reduction, logits.shape[0])

    def form(vector: Any) -> Any:
        jv = provider.jvp(vector)
        xp = array_api_compat.array_namespace(jv)
        return factor * xp.sum(jv * loss.hessian_vp(logits, targets, jv))

    return QuadraticForm(form)


IMBALANCE_STATISTICS = ("max_min", "tail_10")


def grad_norm_imbalance(
    per_sample_grads: Any, *, statistic: str = "max_min", kept: Any = None,
    zero_rows: str = "raise",
) -> float:
    r"""Gradient-norm imbalance of the per-sample gradients (:ref:`conv-imbalance`).

    "max_min": :math:`\max_n \|\nabla l_n\| / \min_n \|\nabla l_n\|` (the paper and the
    authors' evaluation). "tail_10": the mean norm of the largest k over the mean of
    the smallest k, k = max(1, floor(N / 10)) (the authors' optimiser log, whose
    k = int(0.1 N) is 0, an empty mean, below N = 10; k = 1 there is max/min).

    Norms are accumulated in float64 (float32 gradients of a well-fitted sample
    underflow when squared in float32). The ratio is the same in every reduction
    convention.

    Parameters
    ----------
    per_sample_grads : array (N, P), PerSampleRows or DampedGram
        A :class:`~ngdref.linalg.DampedGram`'s Gram matrix is reused (its rows' diagonal,
        which rows without a dense array would otherwise form again).
    statistic : {"max_min", "tail_10"}
    kept : array of bool, shape (N,), optional
        Only these rows (e.g. ``kept`` of :class:`ngdref.GramSolve` after the duplicate filter).
    zero_rows : {"raise", "inf"}
        What an all-zero row in the denominator's tail gives: the ratio is then unbounded.
        "raise" (default): a ``ValueError`` naming the zero rows; "inf": +inf, for a caller
        that records it as such (an optimiser's diagnostics: a sample fitted exactly, or
        one whose every label is ignored, has a zero gradient). To measure the other rows,
        leave the zero ones out with ``kept``.

    Returns
    -------
    float
        >= 1; +inf only under ``zero_rows="inf"``.

    Raises
    ------
    ValueError
        A zero row in the denominator under ``zero_rows="raise"`` (the rows are named).
    """
    check_choice(statistic, "statistic", IMBALANCE_STATISTICS)
    check_choice(zero_rows, "zero_rows", ("raise", "inf"))
    if isinstance(per_sample_grads, DampedGram):
        rows, gram = per_sample_grads.rows, per_sample_grads.gram
    else:
        rows, gram = as_rows(per_sample_grads), None
    xp = rows.array_namespace()
    sq = sq_row_norms(rows, gram)
    check_finite(xp, sq, "per_sample_grads")
    if kept is not None:
        namespace(per_sample_grads=sq, kept=kept)
        check_ndim(kept, "kept", 1, "(N,)")
        if kept.dtype != xp.bool or kept.shape[0] != sq.shape[0]:
            raise ValueError(
                f"kept must be a bool mask of {sq.shape[0]} entries, got shape "
                f"{tuple(kept.shape)} and dtype {kept.dtype}"
            )
        rows_index = xp.nonzero(kept)[0]
        if rows_index.shape[0] == 0:
            raise ValueError("kept selects no rows")
        sq = xp.take(sq, rows_index)
    norms = xp.sort(xp.sqrt(sq))
    k = 1 if statistic == "max_min" else max(1, norms.shape[0] // 10)
    smallest = float(xp.mean(norms[:k]))
    largest = float(xp.mean(norms[-k:]))
    if smallest > 0.0:
        return largest / smallest
    if zero_rows == "inf":
        return math.inf
    zero = xp.nonzero(sq == 0.0)[0]
    if kept is not None:  # number them as the caller's rows
        zero = xp.take(rows_index, zero)
    raise ValueError(
        f"per_sample_grads: rows {[int(zero[i]) for i in range(min(10, zero.shape[0]))]} are "
        f"all zero, so the "
        f"{statistic} imbalance is unbounded; leave them out with kept, or pass "
        "zero_rows='inf' to record +inf"
    )


def loss_reductions(per_sample_grads: Any, update: Any) -> Any:
    r"""First-order per-sample loss reductions per unit step, :math:`G d` (N,).

    With ``theta <- theta - eta d`` sample n's loss changes by -eta (G d)_n to
    first order; EF makes these all 1 and iEF makes them s (as lambda -> 0).
    """
    xp = check_grad_matrix(per_sample_grads, finite=False)
    namespace(per_sample_grads=per_sample_grads, update=update)
    _check_update(xp, update, "update")
    if update.shape[0] != per_sample_grads.shape[1]:
        raise ValueError(
            f"update has {update.shape[0]} entries but per_sample_grads has "
            f"{per_sample_grads.shape[1]} columns"
        )
    reductions = xp.matmul(per_sample_grads, update[:, None])[:, 0]
    check_finite(xp, reductions, "per_sample_grads")  # a NaN or inf row reaches its product
    return reductions


def projections(per_sample_grads: Any, update: Any) -> Any:
    r"""Projections :math:`\kappa_n = \nabla l_n^\top d / \|\nabla l_n\|` (N,) (Eq. 6).

    The step -eta d moves theta by -eta kappa_n along the unit direction of
    grad l_n. For EF (lambda -> 0) kappa_n = 1/||grad l_n||: the
    inversely-scaled projection. Zero per-sample gradients are rejected.
    """
    xp, norms = _row_norms(per_sample_grads)
    if not bool(xp.all(norms > 0)):
        raise ValueError("per_sample_grads has a zero row: its projection is undefined")
    return loss_reductions(per_sample_grads, update) / norms
