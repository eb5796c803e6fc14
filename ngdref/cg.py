r"""Conjugate gradient for the matrix-free natural gradient (:ref:`conv-updates`), in any
array namespace."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ngdref.checks import check_damping, check_finite, check_ndim, namespace

__all__ = [
    "CGResult",
    "NotConvergedError",
    "conjugate_gradient",
    "default_cg_tol",
    "not_converged_message",
]


class NotConvergedError(ArithmeticError):
    """An iterative solver stopped before its true residual reached the tolerance."""


def default_cg_tol(xp: Any, dtype: Any) -> float:
    """1e-10 for float64; sqrt(eps) for lower precisions (3.5e-4 for float32).

    A matvec in float32 (a Fisher-vector product of a float32 model) carries a relative
    rounding of a few eps32 times the condition number, so the true residual stalls far
    above 1e-10: a float64 tolerance would make every float32 solve fail. Half the
    digits of the dtype is what a float32 Fisher-vector product of a small model
    supports at the paper's near-zero damping (measured on the tests' tiny MLP and T5).
    """
    if dtype == xp.float64:
        return 1e-10
    return math.sqrt(float(xp.finfo(dtype).eps))


@dataclass(frozen=True)
class CGResult:
    """The result of :func:`conjugate_gradient`.

    Attributes
    ----------
    x : array (P,)
    iterations : int
    residual_norm : float
        The true residual ||b - (A + lambda I) x|| of the returned x, recomputed with
        one extra matvec, not CG's recursively updated one.
    converged : bool
        CG stopped on its tolerance and the true residual is at most 2 tol ||b||.
    stop : {"tolerance", "maxiter", "breakdown"}
        Why CG stopped: its recursive residual reached tol (then ``converged`` False
        means the matvec is not accurate enough for tol); it ran ``maxiter``
        iterations; or p^T (A + lambda I) p <= 0 at a later iteration, i.e. the
        matvec's rounding overtook the residual (x is then the last good iterate).
    """

    x: Any
    iterations: int
    residual_norm: float
    converged: bool
    stop: str


def conjugate_gradient(
    matvec: Callable[[Any], Any],
    b: Any,
    *,
    damping: float = 0.0,
    tol: float | None = None,
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
    tol : float > 0, optional
        Relative residual tolerance; default :func:`default_cg_tol` of ``b``'s dtype.
    maxiter : int, optional
        Default 10 * P.

    Returns
    -------
    CGResult
    """
    xp = namespace(b=b)
    damping, tol, maxiter = _checked_options(xp, b, damping, tol, maxiter)

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
        return CGResult(x=x, iterations=0, residual_norm=0.0, converged=True, stop="tolerance")

    def result(k: int, stop: str) -> CGResult:
        true_residual = math.sqrt(float(xp.sum((b - op(x)) ** 2)))
        # twice tol: the recomputation itself rounds at the level of ||A|| ||x|| eps
        converged = stop == "tolerance" and true_residual <= 2 * tol * b_norm
        return CGResult(
            x=x, iterations=k, residual_norm=true_residual, converged=converged, stop=stop
        )

    for k in range(1, maxiter + 1):
        ap = op(p)
        pap = float(xp.sum(p * ap))
        if not math.isfinite(pap):
            raise ValueError("matvec produced a non-finite value during conjugate gradient")
        if pap <= 0.0:
            if k == 1:  # p = b: the operator itself is not positive definite along b
                raise ValueError(
                    "matvec is not positive definite along b (b^T A b <= 0): the operator "
                    "must be symmetric positive definite; add damping"
                )
            # later, a PSD operator's rounding (float32 internals) has overtaken the residual
            return result(k - 1, "breakdown")
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = float(xp.sum(r * r))
        if callback is not None:
            callback(x)
        if math.sqrt(rr_new) <= tol * b_norm:
            return result(k, "tolerance")
        p = r + (rr_new / rr) * p
        rr = rr_new
    return result(maxiter, "maxiter")


def _checked_options(
    xp: Any, b: Any, damping: float, tol: float | None, maxiter: int | None
) -> tuple[float, float, int]:
    """Check b (P,) and return (damping, tol, maxiter) with the defaults filled in."""
    check_ndim(b, "b", 1, "(P,)")
    check_finite(xp, b, "b")
    damping = check_damping(damping)
    if tol is None:
        tol = default_cg_tol(xp, b.dtype)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if maxiter is None:
        maxiter = 10 * b.shape[0]
    if maxiter < 1:
        raise ValueError(f"maxiter must be >= 1, got {maxiter}")
    return damping, tol, maxiter


def not_converged_message(result: CGResult, tol: float, maxiter: int | None, b_norm: float) -> str:
    """Say which of CG's stops happened, with the numbers (for a caller's exception)."""
    relative = result.residual_norm / b_norm
    if result.stop == "maxiter":
        limit = "10 * P" if maxiter is None else maxiter
        return (
            f"conjugate gradient hit maxiter={limit} ({result.iterations} iterations) with true "
            f"relative residual {relative:.3g} > tol = {tol:.3g}: raise maxiter or damping "
            "(which improves the conditioning), raise tol, or pass check_convergence=False "
            "for truncated CG"
        )
    what = (
        f"conjugate gradient's recursive residual reached tol={tol:.3g} after "
        f"{result.iterations} iterations, but"
        if result.stop == "tolerance"
        else f"conjugate gradient broke down after {result.iterations} iterations (p^T (F + "
        "lambda I) p <= 0 from rounding) and"
    )
    return (
        f"{what} the true relative residual of the result is {relative:.3g} > 2 tol = "
        f"{2 * tol:.3g}: fisher_vp is not accurate enough for this tol (float32 model "
        f"internals, say); raise tol above {relative:.3g}, or pass check_convergence=False"
    )
