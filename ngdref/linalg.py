r"""The damped Gram solve of the sample-space updates, and the near-duplicate filter.

The Gram (sample-space) matrices here are small, M x M with M the batch size
(or N*C for Woodbury), so they are always formed and solved in float64 whatever
the input dtype (as the paper's code does); the result is cast back by the caller.

How a system :math:`(K + \lambda W) c = b` is solved (:class:`DampedGram`): the
matrix is scaled to unit diagonal, :math:`\tilde M = D^{-1/2} M D^{-1/2}` with
D = diag(M), factorised by Cholesky, and the solution gets one step of iterative
refinement with the residual computed in float64. Cholesky with this scaling is
invariant to the rows' scale (rows whose norms span many decades are as accurate
as rows of equal norm, which an eigendecomposition of M is not); the refinement
step makes the solve componentwise backward stable. The scaled matrix's 2-norm
condition number decides singularity and is reported as ``condition``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ngdref.checks import check_choice, check_damping, check_finite, check_ndim, check_rows
from ngdref.rows import PerSampleRows, as_rows, rows_namespace

__all__ = [
    "DAMPING_MODES",
    "DEDUP_RULES",
    "ZERO_ROWS",
    "DampedGram",
    "GramSolve",
    "SingularMatrixError",
    "near_duplicate_mask",
    "singular_rtol",
]

#: "absolute": lambda as given; "relative": lambda * max_n K_nn; "diagonal_only": the Gram
#: matrix replaced by its diagonal, no lambda (the authors' ``damping == 1``);
#: "levenberg_marquardt": lambda * diag(K) added.
DAMPING_MODES = ("absolute", "relative", "diagonal_only", "levenberg_marquardt")
#: "all_pairs": the authors' rule; "greedy": keep a row unless close to an already kept one.
DEDUP_RULES = ("all_pairs", "greedy")
#: what the duplicate filter does with an all-zero row: "drop" it, or "keep" it (the authors'
#: code, where its cosines are 0/0 = NaN and compare as not close)
ZERO_ROWS = ("drop", "keep")


class SingularMatrixError(ValueError):
    """A matrix that must be inverted is singular (to working precision)."""


@dataclass(frozen=True)
class GramSolve:
    """The result (and diagnostics) of one damped Gram solve.

    Attributes
    ----------
    coefficients : array, shape (M,), float64
        c with (K_kept + damping term) c_kept = rhs_kept and zeros at dropped rows.
    kept : array of bool, shape (M,)
        Rows used by the solve (all True unless the near-duplicate filter dropped some).
    damping : float
        The absolute lambda actually added (after the relative mode's scaling; 0 for
        "diagonal_only").
    gram : array, shape (M, M), float64
        The undamped Gram matrix of all rows.
    residual : float
        Relative residual ||b - M c|| / ||b|| of the kept system after refinement (0 if b = 0).
    condition : float
        2-norm condition number of the damped kept matrix scaled to unit diagonal (what
        bounds the solve's relative error, about ``condition * eps``).
    """

    coefficients: Any
    kept: Any
    damping: float
    gram: Any
    residual: float
    condition: float


def near_duplicate_mask(
    gram: Any, *, threshold: float, rule: str = "all_pairs", zero_rows: str = "drop"
) -> Any:
    r"""Rows to keep after dropping near duplicates (:math:`|\cos| >` ``threshold``).

    ``rule="all_pairs"`` (the authors' code): every pair of rows with
    :math:`|\cos| >` threshold drops its smaller-norm row (of equal norms, the later
    one). ``rule="greedy"``: rows in decreasing norm, each kept unless it is close to
    an already kept row. On a chain a~b~c (a, c not close; norms a > b > c) all pairs
    keep {a}, greedy keeps {a, c}.

    An all-zero row has no direction, so it is close to no row and no row is close to it;
    ``zero_rows`` says whether it is dropped anyway ("drop", the default: it adds nothing
    to G^T c and makes an undamped Gram matrix singular) or kept as any other row ("keep",
    what the authors' code does: their cosine 0/0 is NaN and never exceeds the threshold).
    Keeping one changes nothing in a damped EF or iEF update, but it counts among the kept
    rows, and in the statistics taken over them (a median of their squared norms, the
    max/min imbalance).

    Parameters
    ----------
    gram : array, shape (M, M), or PerSampleRows
        Gram matrix of the rows, K_ij = a_i . a_j, or the rows themselves as a
        PerSampleRows (a dense array is always read as the Gram matrix).
    threshold : float in (0, 1]
        0.99 in the paper's training code, 0.95 in its evaluation.
    rule : {"all_pairs", "greedy"}
    zero_rows : {"drop", "keep"}

    Returns
    -------
    array of bool, shape (M,)
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"dedup_threshold must be a float, got {type(threshold).__name__}")
    if not 0 < threshold <= 1:
        raise ValueError(f"dedup_threshold must be in (0, 1], got {threshold}")
    check_choice(rule, "dedup_rule", DEDUP_RULES)
    check_choice(zero_rows, "dedup_zero_rows", ZERO_ROWS)
    keep_zero = zero_rows == "keep"
    if not array_api_compat.is_array_api_obj(gram):
        gram = as_rows(gram, name="gram").gram()
    xp = array_api_compat.array_namespace(gram)
    m = gram.shape[0]
    norms = xp.sqrt(xp.clip(xp.linalg.diagonal(gram), min=0.0))
    close = xp.abs(gram) > threshold * (norms[:, None] * norms[None, :])
    if rule == "all_pairs":
        index = xp.arange(m, device=array_api_compat.device(gram))
        partner_wins = (norms[None, :] > norms[:, None]) | (
            (norms[None, :] == norms[:, None]) & (index[None, :] < index[:, None])
        )
        dropped = xp.any(close & partner_wins, axis=1)
        return xp.logical_not(dropped if keep_zero else dropped | (norms == 0.0))
    index = xp.arange(m, device=array_api_compat.device(gram))
    kept = xp.zeros(m, dtype=xp.bool, device=array_api_compat.device(gram))
    for i in [int(i) for i in xp.argsort(norms, descending=True, stable=True)]:
        if (keep_zero or float(norms[i]) > 0.0) and not bool(xp.any(close[i, :] & kept)):
            kept = kept | (index == i)  # no item assignment: not every namespace has it
    return kept


def singular_rtol(xp: Any, size: int, dtype: Any, damping: float) -> float:
    """Reciprocal condition number below which a (size x size) system counts as singular.

    Undamped (``damping == 0``): size * eps of the *input* dtype (NumPy's
    ``matrix_rank`` rule): a Gram matrix of float32 gradients is only
    float32-accurate even when accumulated in float64, so smaller eigenvalues
    are rounding noise and the undamped inverse does not exist. Damped: the
    user chose the regularisation (the paper uses lambda down to 1e-12), so
    only a matrix singular in the float64 solve itself is refused.
    """
    dtype = dtype if damping == 0 else xp.float64
    return size * float(xp.finfo(dtype).eps)


def _lower_inverse(xp: Any, lower: Any) -> Any:
    """Inverse of a lower-triangular matrix: torch's triangular solver where the namespace
    is torch's, else by 2 x 2 block recursion (matmuls only).

    [[A, 0], [C, B]]^-1 = [[A^-1, 0], [-B^-1 C A^-1, B^-1]]; the blocked method is as
    stable as substitution (Du Croz and Higham 1992) and needs no triangular solver,
    which the array API lacks. Its 2m - 1 calls cost about a millisecond of dispatch at
    m = 32 on torch, where one ``solve_triangular`` (substitution) takes microseconds.
    """
    m = lower.shape[0]
    if array_api_compat.is_torch_namespace(xp):
        eye = xp.eye(m, dtype=lower.dtype, device=array_api_compat.device(lower))
        return xp.linalg.solve_triangular(lower, eye, upper=False)
    if m == 1:
        return 1.0 / lower
    h = m // 2
    a_inv = _lower_inverse(xp, lower[:h, :h])
    b_inv = _lower_inverse(xp, lower[h:, h:])
    corner = -xp.matmul(b_inv, xp.matmul(lower[h:, :h], a_inv))
    zeros = xp.zeros((h, m - h), dtype=lower.dtype, device=array_api_compat.device(lower))
    return xp.concat(
        [xp.concat([a_inv, zeros], axis=1), xp.concat([corner, b_inv], axis=1)], axis=0
    )


@dataclass(frozen=True)
class _Factor:
    """One damped matrix M, factorised: scale = diag(M)^-1/2, and the scaled inverse's route."""

    matrix: Any  # M, float64
    scale: Any  # (m,)
    scaled: Any  # diag(scale) M diag(scale), unit diagonal
    lower_inverse: Any  # L^-1 of the Cholesky factor of ``scaled``; None: LU solves instead
    damping: float
    condition: float

    def solve(self, xp: Any, rhs: Any) -> tuple[Any, float]:
        """x with M x = rhs after one refinement step, and the relative residual."""
        b = rhs * self.scale

        def apply(v: Any) -> Any:
            if self.lower_inverse is None:
                return xp.linalg.solve(self.scaled, v[:, None])[:, 0]
            li = self.lower_inverse
            return xp.matmul(xp.matrix_transpose(li), xp.matmul(li, v[:, None]))[:, 0]

        y = apply(b)
        y = y + apply(b - xp.matmul(self.scaled, y[:, None])[:, 0])  # iterative refinement
        x = y * self.scale
        b_norm = float(xp.linalg.vector_norm(rhs))
        residual = rhs - xp.matmul(self.matrix, x[:, None])[:, 0]
        return x, (float(xp.linalg.vector_norm(residual)) / b_norm if b_norm > 0 else 0.0)


def _factorise(xp: Any, matrix: Any, damping: float, rtol: float) -> _Factor:
    """Scale ``matrix`` (symmetric, float64) to unit diagonal, check it, Cholesky-factorise it."""
    m = matrix.shape[0]
    diag = xp.linalg.diagonal(matrix)
    if not bool(xp.all(diag > 0)):
        raise SingularMatrixError(
            f"the damped Gram matrix ({m} x {m}) has a zero diagonal entry (a zero per-sample "
            "gradient and no damping): increase damping, or drop zero and near-duplicate rows "
            "with dedup_threshold"
        )
    scale = 1.0 / xp.sqrt(diag)
    scaled = matrix * scale[:, None] * scale[None, :]
    eigenvalues = xp.linalg.eigvalsh(scaled)
    largest, smallest = float(eigenvalues[-1]), float(eigenvalues[0])
    condition = largest / smallest if smallest > 0 else math.inf
    if not smallest > rtol * largest:
        raise SingularMatrixError(
            f"the damped Gram matrix ({m} x {m}) is singular to working precision (condition "
            f"number {condition:.3g} of its unit-diagonal scaling, limit {1 / rtol:.3g}): "
            "increase damping, or drop near-duplicate per-sample gradients with dedup_threshold"
        )
    try:
        lower = xp.linalg.cholesky(scaled)
        lower_inverse = _lower_inverse(xp, lower)
        if not bool(xp.all(xp.isfinite(lower_inverse))):
            lower_inverse = None
    except (ValueError, RuntimeError, ArithmeticError):  # numpy's / torch's LinAlgError
        lower_inverse = None  # positive definite in exact arithmetic only: LU instead
    return _Factor(matrix, scale, scaled, lower_inverse, damping, condition)


class DampedGram:
    r"""The Gram matrix of a set of rows, formed once and solved for any rhs and damping.

    .. math:: (K + \lambda W) c = b, \qquad K = A A^\top \ (M \times M)

    restricted to the rows kept by the near-duplicate filter (c = 0 at dropped
    rows). The Gram matrix is formed once; each (damping, damping_mode, weights)
    is factorised once and cached, so a damping sweep over many right-hand sides
    costs one Gram matrix, one O(M^3) factorisation per damping value and
    O(M^2) per solve.

    Parameters
    ----------
    rows : array (M, P) or PerSampleRows
        A, one row per sample (per-sample gradients), any convention.
    dedup_threshold : float in (0, 1], optional
        Drop near-duplicate rows first (see :func:`near_duplicate_mask`); None: off.
    dedup_rule : {"all_pairs", "greedy"}
    dedup_zero_rows : {"drop", "keep"}
        Whether the filter drops all-zero rows (see :func:`near_duplicate_mask`).
    rows_name : str
        The caller's name for ``rows`` in error messages; a NaN or infinity in the
        rows is detected in the M x M Gram matrix (M/P of the cost of scanning them).

    Attributes
    ----------
    rows : PerSampleRows
    gram : array (M, M), float64
    kept : array of bool (M,)
    """

    def __init__(
        self,
        rows: Any,
        *,
        dedup_threshold: float | None = None,
        dedup_rule: str = "all_pairs",
        dedup_zero_rows: str = "drop",
        rows_name: str = "rows",
    ) -> None:
        self.rows: PerSampleRows = as_rows(rows, name=rows_name)
        xp = self.rows.array_namespace()
        self._xp, self._name = xp, rows_name
        self.gram = self.rows.gram()
        check_finite(xp, self.gram, rows_name)
        m = self.gram.shape[0]
        dev = array_api_compat.device(self.gram)
        if dedup_threshold is None:
            check_choice(dedup_rule, "dedup_rule", DEDUP_RULES)
            check_choice(dedup_zero_rows, "dedup_zero_rows", ZERO_ROWS)
            self.kept = xp.ones(m, dtype=xp.bool, device=dev)
            self._index = None
            self._kept_gram = self.gram
        else:
            self.kept = near_duplicate_mask(
                self.gram, threshold=dedup_threshold, rule=dedup_rule, zero_rows=dedup_zero_rows
            )
            self._index = xp.nonzero(self.kept)[0]
            if self._index.shape[0] == 0:
                raise SingularMatrixError(f"every row of {rows_name} is zero: nothing to solve")
            if self._index.shape[0] == m:  # all kept (the usual case): no gather or scatter
                self._index = None
                self._kept_gram = self.gram
            else:
                self._kept_gram = xp.take(
                    xp.take(self.gram, self._index, axis=0), self._index, axis=1
                )
        self._factors: dict[tuple, _Factor] = {}

    def _take(self, v: Any) -> Any:
        return v if self._index is None else self._xp.take(v, self._index)

    def _factor(self, damping: float, mode: str, weights: Any, rtol: float | None) -> _Factor:
        xp, k = self._xp, self._kept_gram
        key_weights = None if weights is None else tuple(float(w) for w in weights)
        key = (damping, mode, key_weights, rtol)
        if key not in self._factors:
            diag = xp.linalg.diagonal(k)
            if mode == "relative":
                damping = damping * float(xp.max(diag))
            if mode == "diagonal_only":
                damping, matrix = 0.0, _diag_matrix(xp, k, diag)
            else:
                w = diag if mode == "levenberg_marquardt" else weights
                matrix = k if damping == 0 else k + damping * _diag_matrix(xp, k, w)
            if rtol is None:
                rtol = singular_rtol(xp, k.shape[0], self.rows.dtype, damping)
            self._factors[key] = _factorise(xp, matrix, damping, rtol)
        return self._factors[key]

    def solve(
        self,
        rhs: Any,
        *,
        damping: float,
        damping_mode: str = "absolute",
        sample_weights: Any = None,
        rtol: float | None = None,
    ) -> GramSolve:
        r"""Solve :math:`(K + \lambda W) c = b` on the kept rows.

        Parameters
        ----------
        rhs : array, shape (M,)
            b, any real floating dtype (solved in float64).
        damping : float >= 0
            lambda, interpreted by ``damping_mode``.
        damping_mode : {"absolute", "relative", "diagonal_only", "levenberg_marquardt"}
            "absolute": lambda W. "relative": lambda max_n K_nn W (scale-free, the
            authors' negative damping). "diagonal_only": K replaced by diag(K), lambda
            not used (the authors' ``damping == 1``). "levenberg_marquardt": lambda diag(K).
        sample_weights : array, shape (M,), optional
            W = diag(sample_weights) instead of I ("absolute" and "relative" only); iEF's
            parameter-space damping uses W = diag(s).
        rtol : float, optional
            Reciprocal condition number (of the unit-diagonal scaling) below which the
            system counts as singular; default :func:`singular_rtol`.

        Returns
        -------
        GramSolve

        Raises
        ------
        SingularMatrixError
            If the damped matrix is singular, e.g. ``damping=0`` with linearly
            dependent rows or more rows than parameters.
        """
        xp = self._xp
        damping = check_damping(damping)
        check_choice(damping_mode, "damping_mode", DAMPING_MODES)
        if sample_weights is not None and damping_mode not in ("absolute", "relative"):
            raise ValueError(
                f"sample_weights cannot be combined with damping_mode={damping_mode!r}"
            )
        m = self.gram.shape[0]
        rows_namespace(self.rows, self._name, rhs=rhs, sample_weights=sample_weights)
        check_ndim(rhs, "rhs", 1, "(M,)")
        check_rows(rhs, "rhs", m, self._name)
        check_finite(xp, rhs, "rhs")
        weights = None
        if sample_weights is not None:
            check_ndim(sample_weights, "sample_weights", 1, "(M,)")
            check_rows(sample_weights, "sample_weights", m, self._name)
            weights = self._take(xp.astype(sample_weights, xp.float64))
        factor = self._factor(damping, damping_mode, weights, rtol)
        c_kept, residual = factor.solve(xp, self._take(xp.astype(rhs, xp.float64)))
        if self._index is None:
            coefficients = c_kept
        else:  # scatter back to all M rows (zeros where dropped) without item assignment
            dev = array_api_compat.device(self.gram)
            selection = xp.astype(self._index[:, None] == xp.arange(m, device=dev), xp.float64)
            coefficients = xp.matmul(c_kept[None, :], selection)[0, :]
        return GramSolve(
            coefficients=coefficients,
            kept=self.kept,
            damping=factor.damping,
            gram=self.gram,
            residual=residual,
            condition=factor.condition,
        )

    def update(self, rhs: Any, **options: Any) -> tuple[Any, GramSolve]:
        r"""The Gram-form update :math:`d = A^\top c` (P,) in the rows' dtype, and the solve.

        ``options`` are those of :meth:`solve`.
        """
        solve = self.solve(rhs, **options)
        return self.rows.rmatvec(solve.coefficients), solve


def _diag_matrix(xp: Any, like: Any, weights: Any) -> Any:
    """diag(weights) (or I when None), float64, shaped and placed like ``like``."""
    eye = xp.eye(like.shape[0], dtype=xp.float64, device=array_api_compat.device(like))
    return eye if weights is None else weights[:, None] * eye
