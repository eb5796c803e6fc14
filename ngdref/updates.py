r"""Update directions of SGD, EF, iEF and SF (:ref:`conv-updates`).

An *update* is a direction d without learning rate or sign: the optimiser
applies ``theta <- theta - lr * d``. Every function works in the paper's sum
convention (the per-sample inputs are those of l_n, not of a mean loss); to
use a mean-reduced loss, scale the per-sample inputs by the reduction factor
(:func:`ngdref.batch_quantities` and :func:`ngdref.sampled_grads` do this from
``reduction=``, with the convention stated in :mod:`ngdref.directions`).

Two families of damping (:ref:`conv-updates`):

* Gram / sample space (the paper's Eq. 5 and 8): lambda I_N is added to the
  N x N Gram matrix G G^T. ``damping_space="sample"``.
* Parameter space: (M + lambda I_P)^{-1} g for the P x P matrix M, computed
  through the N x N (or N*C x N*C) space by the push-through / Woodbury
  identities. ``damping_space="parameter"``; SF, GN and NGD are always this.

For EF both coincide exactly; for iEF they differ for lambda > 0:
(F_iEF + lambda I_P)^{-1} g = G^T (G G^T + lambda diag(s))^{-1} s.

Exact NGD and GN (Woodbury over N*C, and conjugate gradient) are :mod:`ngdref.ngd`.

The small systems are formed and solved in float64 (the authors' practice) by
:class:`ngdref.linalg.DampedGram`, and the final combination ``G^T c`` is done in
the input dtype. Per-sample gradients may be dense (N, P) arrays or
:class:`~ngdref.rows.PerSampleRows`; ``return_info=True`` returns the solve's
diagnostics (:class:`~ngdref.linalg.GramSolve`) with the update.
"""

from __future__ import annotations

from typing import Any

from ngdref.checks import (
    check_choice,
    check_damping,
    check_finite,
    check_vector,
    namespace,
)
from ngdref.curvature import _check_num_samples
from ngdref.linalg import DAMPING_MODES, DampedGram, GramSolve, SingularMatrixError
from ngdref.rows import DenseRows, as_rows, ones_like_rows, rows_namespace
from ngdref.woodbury import damped_inverse_apply, true_rows_inverse_apply

__all__ = [
    "check_damping_options",
    "ef_update",
    "gram_solver",
    "gram_update",
    "ief_damping_weights",
    "ief_update",
    "median_damping",
    "sf_update",
    "sgd_update",
]

DAMPING_SPACES = ("sample", "parameter")


def sgd_update(per_sample_grads: Any) -> Any:
    r"""Gradient of the summed loss, :math:`g = G^\top 1`.

    Parameters
    ----------
    per_sample_grads : array, shape (N, P), or PerSampleRows

    Returns
    -------
    array, shape (P,), in the rows' dtype
    """
    rows = as_rows(per_sample_grads)
    xp = rows.array_namespace()
    if isinstance(rows, DenseRows):
        grad = xp.sum(rows.array, axis=0)
    else:
        grad = rows.rmatvec(ones_like_rows(rows))
    check_finite(xp, grad, "per_sample_grads")  # a NaN or inf row reaches the sum
    return grad


def gram_solver(
    per_sample_grads: Any,
    dedup_threshold: float | None = None,
    dedup_rule: str = "all_pairs",
    dedup_zero_rows: str = "drop",
) -> DampedGram:
    """A :class:`~ngdref.linalg.DampedGram` of ``per_sample_grads``; one passed in is reused.

    Passing a DampedGram to the Gram-form updates (:func:`ef_update`, :func:`ief_update`,
    :func:`gram_update`) shares its Gram matrix, filter and factorisations between them;
    its filter is fixed at construction, so ``dedup_threshold`` must then be None.
    ``dedup_zero_rows`` ("drop" or "keep") is the filter's rule for all-zero rows
    (:func:`ngdref.linalg.near_duplicate_mask`).
    """
    if isinstance(per_sample_grads, DampedGram):
        if dedup_threshold is not None or dedup_zero_rows != "drop":
            raise ValueError(
                "dedup_threshold must be None when per_sample_grads is a DampedGram (and "
                "dedup_zero_rows 'drop'): its near-duplicate filter is chosen when it is built"
            )
        return per_sample_grads
    return DampedGram(
        per_sample_grads,
        dedup_threshold=dedup_threshold,
        dedup_rule=dedup_rule,
        dedup_zero_rows=dedup_zero_rows,
        rows_name="per_sample_grads",
    )


def gram_update(
    per_sample_grads: Any,
    rhs: Any,
    *,
    damping: float,
    damping_mode: str = "absolute",
    sample_weights: Any = None,
    dedup_threshold: float | None = None,
    dedup_rule: str = "all_pairs",
    dedup_zero_rows: str = "drop",
) -> tuple[Any, GramSolve]:
    r"""The shared Gram-form update :math:`d = G^\top (G G^\top + \lambda W)^{-1} b`.

    :func:`ef_update` and :func:`ief_update` are this with b = 1 or b = s.
    Returns the update (P,) in the dtype of ``per_sample_grads`` and the
    :class:`~ngdref.linalg.GramSolve` (coefficients, kept rows, damping used,
    Gram matrix, residual, condition) for diagnostics.

    Parameters
    ----------
    per_sample_grads : array (N, P), PerSampleRows or DampedGram
        A DampedGram is reused (see :func:`gram_solver`).
    rhs : array, shape (N,)
    damping, damping_mode, sample_weights
        See :meth:`ngdref.linalg.DampedGram.solve`.
    dedup_threshold, dedup_rule, dedup_zero_rows
        See :class:`ngdref.linalg.DampedGram`.
    """
    solver = gram_solver(per_sample_grads, dedup_threshold, dedup_rule, dedup_zero_rows)
    rows = solver.rows
    xp = rows_namespace(rows, "per_sample_grads", rhs=rhs, sample_weights=sample_weights)
    check_vector(xp, rhs, "rhs", rows.shape[0], "per_sample_grads rows", rows.dtype)
    return solver.update(
        rhs, damping=damping, damping_mode=damping_mode, sample_weights=sample_weights
    )


def median_damping(
    per_sample_grads: Any,
    damping: float,
    *,
    dedup_threshold: float | None = 0.99,
    dedup_rule: str = "all_pairs",
    dedup_zero_rows: str = "keep",
) -> float:
    r"""SF's relative damping: lambda times the median squared norm of the kept true rows.

    .. math:: \lambda_{\text{abs}} = \lambda \operatorname{median}_{n \in \text{kept}}
        \|g_n\|^2 = \lambda \operatorname{median} \operatorname{diag}(G G^\top)_{\text{kept}}

    The authors' SF optimiser reads a negative damping -lambda this way: its scale is the
    median of the diagonal of the true-label rows' Gram matrix, over the rows its duplicate
    filter keeps (every pair with ``|cos| > 0.99`` drops its smaller-norm row; an all-zero row
    is kept, its cosines being NaN there). For an even count the median is the lower of the
    two middle values, as ``torch.median`` returns. The rows are in the convention of the
    step (R g_n under a reduction R), so the result damps like an absolute lambda there.

    Parameters
    ----------
    per_sample_grads : array (N, P), PerSampleRows or DampedGram
        The true-label rows G; a DampedGram's own filter is used (``dedup_threshold`` None).
    damping : float >= 0
        lambda, relative.
    dedup_threshold, dedup_rule, dedup_zero_rows
        The filter (:func:`ngdref.linalg.near_duplicate_mask`); the defaults are the
        authors'. None: every row counts.

    Returns
    -------
    float
        The absolute damping.

    Raises
    ------
    SingularMatrixError
        If the median is 0 (half the kept rows or more are zero): the damping would be 0.
    """
    damping = check_damping(damping)
    solver = gram_solver(per_sample_grads, dedup_threshold, dedup_rule, dedup_zero_rows)
    xp = solver.rows.array_namespace()
    diagonal = xp.take(xp.linalg.diagonal(solver.gram), xp.nonzero(solver.kept)[0])
    ordered = xp.sort(diagonal)
    median = float(ordered[(ordered.shape[0] - 1) // 2])
    if not median > 0:
        raise SingularMatrixError(
            f"the median squared norm of the {ordered.shape[0]} kept per_sample_grads rows is "
            f"{median}: the relative (median) damping would be 0; use an absolute damping"
        )
    return damping * median


def check_damping_options(damping_space: str, damping_mode: str) -> None:
    """Validate a (damping_space, damping_mode) pair of the Gram-form updates.

    "diagonal_only" and "levenberg_marquardt" choose the sample-space damping
    matrix themselves, so they cannot be combined with parameter space.
    """
    check_choice(damping_space, "damping_space", DAMPING_SPACES)
    check_choice(damping_mode, "damping_mode", DAMPING_MODES)
    if damping_space == "parameter" and damping_mode not in ("absolute", "relative"):
        raise ValueError(
            f"damping_mode={damping_mode!r} is a sample-space damping (it chooses the damping "
            "of G G^T itself); it cannot be combined with damping_space='parameter'"
        )


def ief_damping_weights(logit_grad_sq_norms: Any, damping_space: str) -> Any:
    """W of iEF's Gram system (G G^T + lambda W) c = s: None (W = I_N) or s (parameter space).

    Parameter-space damping of F_iEF = G^T diag(s)^{-1} G is lambda diag(s) in
    sample space, so it needs every s_n > 0.
    """
    if damping_space != "parameter":
        return None
    xp = namespace(logit_grad_sq_norms=logit_grad_sq_norms)
    if not bool(xp.all(logit_grad_sq_norms > 0)):
        raise ValueError(
            "logit_grad_sq_norms must be > 0 for damping_space='parameter': F_iEF divides by "
            "s_n (a sample fitted to machine precision has s_n = 0; use 'sample')"
        )
    return logit_grad_sq_norms


def ef_update(
    per_sample_grads: Any,
    *,
    damping: float,
    damping_mode: str = "absolute",
    dedup_threshold: float | None = None,
    dedup_rule: str = "all_pairs",
    dedup_zero_rows: str = "drop",
    return_info: bool = False,
) -> Any:
    r"""Empirical Fisher direction (Eq. 5).

    .. math:: d = G^\top (G G^\top + \lambda I_N)^{-1} 1 = (G^\top G + \lambda I_P)^{-1} G^\top 1

    Sample-space and parameter-space damping agree exactly for EF (push-through
    identity), so unlike :func:`ief_update` it takes no ``damping_space``. As
    lambda -> 0 with G of full row rank, G d = 1: every sample's first-order loss
    drop is the same (Eq. 6).

    Parameters
    ----------
    per_sample_grads : array (N, P), PerSampleRows or DampedGram
        Row n is grad l_n (sum convention). A DampedGram is reused (:func:`gram_solver`).
    damping : float >= 0
    damping_mode : {"absolute", "relative", "diagonal_only", "levenberg_marquardt"}
        See :meth:`ngdref.linalg.DampedGram.solve`.
    dedup_threshold : float, optional
        Drop near-duplicate per-sample gradients (``|cos|`` above it) first.
    dedup_rule : {"all_pairs", "greedy"}
    dedup_zero_rows : {"drop", "keep"}
        Whether the filter drops all-zero rows (the authors' code keeps them; with
        damping > 0 a kept zero row leaves the update unchanged).
    return_info : bool
        Also return the solve's :class:`~ngdref.linalg.GramSolve` (residual, rows kept,
        condition, damping used).

    Returns
    -------
    array, shape (P,), namespace, device and dtype of the rows; with ``return_info``,
    ``(update, GramSolve)``.
    """
    check_damping_options("sample", damping_mode)
    solver = gram_solver(per_sample_grads, dedup_threshold, dedup_rule, dedup_zero_rows)
    ones = ones_like_rows(solver.rows)
    update, info = solver.update(ones, damping=damping, damping_mode=damping_mode)
    return (update, info) if return_info else update


def ief_update(
    per_sample_grads: Any,
    logit_grad_sq_norms: Any,
    *,
    damping: float,
    damping_space: str = "sample",
    damping_mode: str = "absolute",
    dedup_threshold: float | None = None,
    dedup_rule: str = "all_pairs",
    dedup_zero_rows: str = "drop",
    return_info: bool = False,
) -> Any:
    r"""Improved empirical Fisher direction (Wu et al. 2024, Eq. 8).

    .. math::
        d_{\mathrm{sample}} = G^\top (G G^\top + \lambda I_N)^{-1} s, \qquad
        d_{\mathrm{parameter}} = (F_{iEF} + \lambda I_P)^{-1} G^\top 1
        = G^\top (G G^\top + \lambda\, \mathrm{diag}(s))^{-1} s

    The two agree as lambda -> 0 and differ otherwise. As lambda -> 0 with G
    of full row rank, G d = s (Eq. 7, 10).

    Parameters
    ----------
    per_sample_grads : array (N, P), PerSampleRows or DampedGram
        Row n is grad l_n (sum convention). A DampedGram is reused (:func:`gram_solver`).
    logit_grad_sq_norms : array, shape (N,)
        s_n = ||dl_n/dz_n||^2 >= 0 (> 0 for ``damping_space="parameter"``).
    damping : float >= 0
    damping_space : {"sample", "parameter"}
    damping_mode : {"absolute", "relative", "diagonal_only", "levenberg_marquardt"}
    dedup_threshold : float, optional
    dedup_rule : {"all_pairs", "greedy"}
    dedup_zero_rows : {"drop", "keep"}
        See :func:`ef_update`.
    return_info : bool
        Also return the :class:`~ngdref.linalg.GramSolve`.

    Returns
    -------
    array, shape (P,), namespace, device and dtype of the rows; with ``return_info``,
    ``(update, GramSolve)``.
    """
    check_damping_options(damping_space, damping_mode)
    solver = gram_solver(per_sample_grads, dedup_threshold, dedup_rule, dedup_zero_rows)
    rows = solver.rows
    xp = rows_namespace(rows, "per_sample_grads", logit_grad_sq_norms=logit_grad_sq_norms)
    check_vector(
        xp, logit_grad_sq_norms, "logit_grad_sq_norms", rows.shape[0], "per_sample_grads rows",
        rows.dtype,
    )
    if not bool(xp.all(logit_grad_sq_norms >= 0)):
        raise ValueError("logit_grad_sq_norms must be >= 0 (squared norms)")
    weights = ief_damping_weights(logit_grad_sq_norms, damping_space)
    update, info = solver.update(
        logit_grad_sq_norms, damping=damping, damping_mode=damping_mode, sample_weights=weights
    )
    return (update, info) if return_info else update


def sf_update(
    sampled_grads: Any,
    grad: Any,
    *,
    damping: float,
    num_samples: int = 1,
    return_info: bool = False,
    per_sample_grads: Any = None,
) -> Any:
    r"""Sampled Fisher direction (Eq. 49), :math:`(F_{SF} + \lambda I_P)^{-1} g`.

    .. math::
        d = \frac{1}{\lambda}\left[g - \hat G^\top (\hat G \hat G^\top + \lambda I)^{-1}
        \hat G g\right], \quad \hat G = \frac{1}{\sqrt{K}} [\hat g_{nk}]

    computed as the authors do, :math:`K (A^\top A + K \lambda I)^{-1} g` with A the
    unscaled sampled rows. Not in the span of the per-sample gradients: it has a
    (1/lambda) g component and depends strongly on lambda.

    Parameters
    ----------
    sampled_grads : array (N*K, P), PerSampleRows or DampedGram
        Rows are gradients of -log p_n(yhat_nk) with yhat_nk drawn from the model. A
        :class:`~ngdref.linalg.DampedGram` of them is reused across calls (a damping
        sweep forms their Gram matrix once and factorises once per damping).
    grad : array, shape (P,), or None
        g = G^T 1, in the convention of ``sampled_grads`` (see :mod:`ngdref.directions`);
        None when ``per_sample_grads`` is given (exactly one of the two).
    damping : float > 0 (0 only when N*K >= P, the rows are dense and F_SF is invertible)
    num_samples : int
        K.
    return_info : bool
        Also return the :class:`~ngdref.linalg.GramSolve` of the (N*K)-sized Woodbury
        system (of the P x P one when P <= N*K), whose damping is K lambda.
    per_sample_grads : array (N, P) or PerSampleRows, optional
        The true-label rows G instead of ``grad`` (then ``sf_update(A, None, ...,
        per_sample_grads=G)``) (same namespace, dtype and convention as
        ``sampled_grads``). g is then never formed: A g = (A G^T) 1 comes from the
        (N*K, N) cross-Gram and d = [G; A]^T [1; -c] / lambda from the rows directly
        (:func:`ngdref.woodbury.true_rows_inverse_apply`), which saves g's own product, the
        A g product and a P-length subtraction. The same d to rounding.

    Returns
    -------
    array, shape (P,), namespace, device and dtype of ``grad`` (of ``per_sample_grads``);
    with ``return_info``, ``(update, GramSolve)``.
    """
    rows = (
        sampled_grads.rows
        if isinstance(sampled_grads, DampedGram)
        else as_rows(sampled_grads, name="sampled_grads")
    )
    if (grad is None) == (per_sample_grads is None):
        raise TypeError("sf_update takes exactly one of grad and per_sample_grads")
    source = sampled_grads if isinstance(sampled_grads, DampedGram) else rows
    if grad is None:
        _check_num_samples(num_samples, rows.shape[0])
        damping = check_damping(damping)
        update, info = true_rows_inverse_apply(
            source, per_sample_grads, num_samples * damping, "sampled_grads"
        )
    else:
        xp = rows_namespace(rows, "sampled_grads", rows_first=False, grad=grad)
        check_vector(xp, grad, "grad", rows.shape[1], "sampled_grads columns", rows.dtype)
        _check_num_samples(num_samples, rows.shape[0])
        damping = check_damping(damping)
        update, info = damped_inverse_apply(source, grad, num_samples * damping, "sampled_grads")
    if num_samples != 1:  # K = 1 (the paper's) would only copy
        update = num_samples * update
    return (update, info) if return_info else update
