r"""The curvature matrices as ``scipy.sparse.linalg.LinearOperator`` s, for NumPy inputs.

Spectra with ``eigsh`` and solves with ``cg`` / ``minres`` in two lines, never
forming a P x P matrix::

    op = curvature_operator("ief", provider, loss, targets)     # (P, P), matrix-free
    top = scipy.sparse.linalg.eigsh(op, k=10, return_eigenvectors=False)

=============  ====================================================  ==========================
method         product (sum convention)                               built from
=============  ====================================================  ==========================
``"fisher"``   F v = sum_n J_n^T H_n (J_n v)                          :func:`ngdref.fisher_vp`
``"gn"``       G_hat v = sum_n J_n^T (J_n v)                          provider ``jvp``/``vjp_sum``
``"ef"``       F_EF v = G^T (G v)                                     rows ``matvec``/``rmatvec``
``"ief"``      F_iEF v = G^T diag(s)^{-1} (G v)                       rows ``matvec``/``rmatvec``
``"sf"``       F_SF v = (1/K) G_s^T (G_s v), sampled-label rows G_s   rows ``matvec``/``rmatvec``
K-FAC family   block diagonal: B V A per Kronecker block, D v on      :mod:`ngdref.kfac` factors
               the diagonal blocks (:func:`kfac_operator`)
=============  ====================================================  ==========================

The matrices are those of the conventions page, :ref:`conv-curvature`.

Reduction: :func:`curvature_operator` takes ``reduction`` ("sum" default, "mean" or a
positive factor R) and builds its inputs as :func:`ngdref.directions` does
(e -> R e, H -> R H), so the operators are R F, R G_hat, R^2 F_EF, F_iEF (R-free)
and R^2 F_SF: the matrices of the reduced loss. The constructors that take rows
(:func:`ef_operator`, :func:`ief_operator`, :func:`sf_operator`) use the rows as
given, like :mod:`ngdref.curvature`.

Every operator is real symmetric: ``rmatvec`` is ``matvec`` and ``op.H`` is ``op``.
Its dtype is the dtype of the model's logits (or rows); vectors must have that
dtype (no silent casting). K-FAC operators are float64, the dtype of their factors.

Why here and not ``ngdref.linear_operator`` (issue 12's name): the design card keeps
``ngdref/`` free of everything but the standard library and ``array_api_compat``,
and SciPy is a NumPy-only library, so the operators live with the other backends
and are imported lazily: ``from backends import curvature_operator`` imports SciPy,
``import backends`` does not. (The function is not named ``linear_operator`` because
that is this module's name: ``backends.scipy.operators`` would be the module or the
function depending on import order.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat
import numpy as np
from scipy.sparse.linalg import LinearOperator

import ngdref
from ngdref.checks import check_choice, check_int
from ngdref.kfac import KroneckerFactors
from ngdref.losses import LogitLoss, reduction_factor
from ngdref.provider import JacobianProvider
from ngdref.rows import PerSampleRows, as_rows

__all__ = [
    "OPERATOR_METHODS",
    "CurvatureOperator",
    "curvature_operator",
    "ef_operator",
    "fisher_operator",
    "gn_operator",
    "ief_operator",
    "kfac_curvature_operator",
    "kfac_operator",
    "sf_operator",
]

OPERATOR_METHODS = ("fisher", "gn", "ef", "ief", "sf")


class CurvatureOperator(LinearOperator):
    """A symmetric (P, P) ``LinearOperator`` given by its product v -> M v.

    Parameters
    ----------
    name : str
        What M is (shown in ``repr`` and error messages).
    product : callable, (P,) NumPy array -> (P,) NumPy array
    size : int
        P.
    dtype : numpy dtype
        The dtype of the vectors it accepts and returns.
    """

    def __init__(
        self, name: str, product: Callable[[np.ndarray], Any], size: int, dtype: Any
    ) -> None:
        super().__init__(dtype=np.dtype(dtype), shape=(size, size))
        self.name = name
        self._product = product

    def __repr__(self) -> str:
        return f"<{self.shape[0]}x{self.shape[1]} {self.name} CurvatureOperator, {self.dtype}>"

    def _check_x(self, x: Any, matrix: bool) -> None:
        """Name the argument before scipy's own checks ("dimension mismatch")."""
        if not isinstance(x, np.ndarray):
            raise TypeError(f"x must be a NumPy array, got {type(x).__name__}")
        p = self.shape[0]
        ok = (x.ndim == 2 and x.shape[0] == p) if matrix else x.shape in ((p,), (p, 1))
        if not ok:
            expected = "(P, k)" if matrix else "(P,) or (P, 1)"
            raise ValueError(f"x must have shape {expected} with P = {p}, got {x.shape}")

    def matvec(self, x: Any) -> np.ndarray:
        self._check_x(x, matrix=False)
        return super().matvec(x)

    def rmatvec(self, x: Any) -> np.ndarray:
        self._check_x(x, matrix=False)
        return super().rmatvec(x)

    def matmat(self, X: Any) -> np.ndarray:
        self._check_x(X, matrix=True)
        return super().matmat(X)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != self.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the {self.name} operator has dtype {self.dtype}: "
                "cast it explicitly"
            )
        if not np.all(np.isfinite(x)):
            raise ngdref.NonFiniteError("x holds NaN or infinity")
        out = np.asarray(self._product(np.ascontiguousarray(x.reshape(-1))))
        return out.reshape(x.shape)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)  # symmetric

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        if x.shape[1] == 0:
            return np.zeros(x.shape, dtype=self.dtype)
        return np.stack([self._matvec(x[:, j]) for j in range(x.shape[1])], axis=1)

    def _rmatmat(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(x)

    def _adjoint(self) -> CurvatureOperator:
        return self

    _transpose = _adjoint  # real symmetric


def _check_numpy_provider(provider: Any) -> np.ndarray:
    """The provider's logits, after checking that it is a NumPy JacobianProvider."""
    if not isinstance(provider, JacobianProvider):
        raise TypeError(f"provider must be a JacobianProvider, got {type(provider).__name__}")
    logits = provider.logits()
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            f"provider must give NumPy arrays (its logits are {type(logits).__name__}): "
            "scipy's LinearOperator works on NumPy"
        )
    return logits


def _numpy_rows(rows: Any, name: str) -> PerSampleRows:
    """``rows`` as PerSampleRows over NumPy, or a TypeError naming ``name``."""
    if array_api_compat.is_array_api_obj(rows) and not isinstance(rows, np.ndarray):
        kind = f"{type(rows).__module__}.{type(rows).__name__}"
        raise TypeError(f"{name} must be a NumPy array, got {kind}")
    out = as_rows(rows, name=name)
    if not array_api_compat.is_numpy_namespace(out.array_namespace()):
        raise TypeError(f"{name} must be NumPy rows, got {out.array_namespace().__name__} rows")
    return out


def fisher_operator(
    provider: JacobianProvider, loss: LogitLoss, targets: Any, *, reduction: str | float = "sum"
) -> CurvatureOperator:
    r"""Fisher / GGN :math:`R \sum_n J_n^\top H_n J_n` (Eq. 2) through :func:`ngdref.fisher_vp`."""
    logits = _check_numpy_provider(provider)
    product = ngdref.fisher_vp(provider, loss, targets, reduction=reduction)
    return CurvatureOperator("fisher", product, provider.num_params, logits.dtype)


def gn_operator(provider: JacobianProvider, *, reduction: str | float = "sum") -> CurvatureOperator:
    r"""Gauss-Newton without output curvature :math:`R \sum_n J_n^\top J_n` (Eq. 9)."""
    logits = _check_numpy_provider(provider)
    factor = reduction_factor(reduction, logits.shape[0])

    def product(v: np.ndarray) -> Any:
        return provider.vjp_sum(factor * provider.jvp(v))

    return CurvatureOperator("gn", product, provider.num_params, logits.dtype)


def _gram_operator(
    name: str, rows: PerSampleRows, weights: np.ndarray | None, scale: float
) -> CurvatureOperator:
    r"""v -> scale G^T diag(w) (G v) from the rows' matvec and rmatvec."""

    def product(v: np.ndarray) -> Any:
        w = rows.matvec(v)
        if weights is not None:
            w = w * weights
        return scale * rows.rmatvec(w)

    return CurvatureOperator(name, product, rows.shape[1], rows.dtype)


def ef_operator(per_sample_grads: Any) -> CurvatureOperator:
    r"""Empirical Fisher :math:`F_{EF} = G^\top G` (Eq. 3) of NumPy rows G (N, P) or rows."""
    return _gram_operator("ef", _numpy_rows(per_sample_grads, "per_sample_grads"), None, 1.0)


def ief_operator(per_sample_grads: Any, logit_grad_sq_norms: Any) -> CurvatureOperator:
    r"""Improved EF :math:`F_{iEF} = G^\top \mathrm{diag}(s)^{-1} G` (Eq. 14).

    Parameters
    ----------
    per_sample_grads : NumPy array (N, P) or PerSampleRows over NumPy
    logit_grad_sq_norms : NumPy array (N,)
        s_n = ||dl_n/dz_n||^2 > 0, the rows' dtype.
    """
    rows = _numpy_rows(per_sample_grads, "per_sample_grads")
    s = logit_grad_sq_norms
    if not isinstance(s, np.ndarray):
        raise TypeError(f"logit_grad_sq_norms must be a NumPy array, got {type(s).__name__}")
    if s.shape != (rows.shape[0],):
        raise ValueError(
            f"logit_grad_sq_norms must have shape ({rows.shape[0]},) for per_sample_grads with "
            f"{rows.shape[0]} rows, got {s.shape}"
        )
    if s.dtype != rows.dtype:
        raise TypeError(f"logit_grad_sq_norms has dtype {s.dtype}, per_sample_grads {rows.dtype}")
    if not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(
            "logit_grad_sq_norms must be finite and > 0: F_iEF divides sample n's outer "
            "product by s_n (drop samples whose logit gradient is zero)"
        )
    return _gram_operator("ief", rows, 1.0 / s, 1.0)


def sf_operator(sampled_grads: Any, *, num_samples: int = 1) -> CurvatureOperator:
    r"""Sampled Fisher :math:`F_{SF} = \frac1K G_s^\top G_s` (Eq. 47) of rows G_s (N*K, P)."""
    rows = _numpy_rows(sampled_grads, "sampled_grads")
    check_int(num_samples, "num_samples")
    if rows.shape[0] % num_samples:
        raise ValueError(
            f"sampled_grads has {rows.shape[0]} rows, not a multiple of num_samples={num_samples}"
        )
    return _gram_operator("sf", rows, None, 1.0 / num_samples)


def curvature_operator(
    method: str,
    provider: JacobianProvider,
    loss: LogitLoss,
    targets: Any,
    *,
    reduction: str | float = "sum",
    key: Any = None,
    num_samples: int = 1,
) -> CurvatureOperator:
    """The curvature ``method`` of one batch as a (P, P) ``LinearOperator``.

    Parameters
    ----------
    method : {"fisher", "gn", "ef", "ief", "sf"}
    provider : JacobianProvider with NumPy arrays
    loss : ngdref.LogitLoss
    targets : NumPy array
    reduction : {"sum", "mean"} or float
        R (see the module docstring); default the paper's sum.
    key : int or array
        Seed or uniforms of SF's sampled labels (required for "sf").
    num_samples : int
        K draws per sample for SF.

    Returns
    -------
    CurvatureOperator
    """
    check_choice(method, "method", OPERATOR_METHODS)
    _check_numpy_provider(provider)
    if method == "fisher":
        return fisher_operator(provider, loss, targets, reduction=reduction)
    if method == "gn":
        return gn_operator(provider, reduction=reduction)
    if method == "sf":
        if key is None:
            raise ValueError("key is required for method 'sf' (an int seed or uniforms)")
        rows = ngdref.sampled_grads(
            provider, loss, targets, key, num_samples=num_samples, reduction=reduction
        )
        return sf_operator(rows, num_samples=num_samples)
    q = ngdref.batch_quantities(provider, loss, targets, reduction=reduction)
    if method == "ef":
        return ef_operator(q.per_sample_grads)
    return ief_operator(q.per_sample_grads, q.logit_grad_sq_norms)


def _kron_product(factors: KroneckerFactors) -> Callable[[np.ndarray], np.ndarray]:
    """W (d_out, d_in) -> the block times vec(W), reshaped: B W A, or the corrected form.

    A factor may be a (d,) diagonal (an embedding's input factor): its product is a scaling
    of W's rows (B) or columns (A), and its eigenbasis the identity, as in
    :func:`ngdref.kfac_block_matrix`.
    """
    b = np.asarray(factors.grad_factor, dtype=np.float64)
    a = np.ones((1, 1)) if factors.input_factor is None else np.asarray(
        factors.input_factor, dtype=np.float64
    )

    def left(w: np.ndarray) -> np.ndarray:
        return b[:, None] * w if b.ndim == 1 else b @ w

    def right(w: np.ndarray) -> np.ndarray:
        return w * a[None, :] if a.ndim == 1 else w @ a

    if factors.corrected_eigenvalues is None:
        return lambda w: right(left(w))
    # the eigenvectors eigh gives for these factors (the identity for a diagonal factor), as
    # ngdref.kfac_block_matrix uses
    u = np.eye(b.shape[0]) if b.ndim == 1 else np.linalg.eigh(b)[1]
    v = np.eye(a.shape[0]) if a.ndim == 1 else np.linalg.eigh(a)[1]
    e = np.asarray(factors.corrected_eigenvalues, dtype=np.float64).reshape(b.shape[0], -1)
    return lambda w: u @ ((u.T @ w @ v) * e) @ v.T


def _kfac_block(index: Any, block: Any, num_params: int, position: int) -> tuple[np.ndarray, Any]:
    """(indices into theta, product on the block's (d_out, d_in) or (p,) piece)."""
    idx = np.arange(num_params)[index] if isinstance(index, slice) else np.asarray(index)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"blocks[{position}]'s index must be a slice or 1-D integer indices")
    if idx.size and (idx.min() < 0 or idx.max() >= num_params):
        raise ValueError(f"blocks[{position}]'s index is out of range for num_params={num_params}")
    if isinstance(block, KroneckerFactors):
        if idx.size != int(np.prod(block.shape)):
            raise ValueError(
                f"blocks[{position}] has factors for shape {block.shape} but "
                f"{idx.size} indices"
            )
        kron = _kron_product(block)
        shape = (block.shape[0], -1)
        return idx, lambda x: kron(x.reshape(shape)).reshape(-1)
    diagonal = np.asarray(block, dtype=np.float64)
    if diagonal.shape != idx.shape:
        raise ValueError(
            f"blocks[{position}] is a diagonal of shape {diagonal.shape} but has "
            f"{idx.size} indices"
        )
    return idx, lambda x: diagonal * x


def kfac_operator(
    blocks: Sequence[tuple[Any, KroneckerFactors | Any]], num_params: int
) -> CurvatureOperator:
    r"""A block-diagonal K-FAC / eKFAC / ieKFAC curvature (:mod:`ngdref.kfac`), float64.

    .. math:: K = \mathrm{blockdiag}(B_1 \otimes A_1, \ldots, \mathrm{diag}(D), \ldots)

    Parameters
    ----------
    blocks : sequence of (index, block)
        ``index`` (slice or 1-D integers) selects the block's entries of theta, in the
        row-major layout of its weight (d_out, d_in); ``block`` is a
        :class:`ngdref.KroneckerFactors` (the dense block is
        :func:`ngdref.kfac_block_matrix`; eigenvalue-corrected ones too) or the (p,)
        diagonal of a fallback block (:func:`ngdref.kfac.diagonal_factor`). Entries of
        theta in no block are zero rows and columns. The blocks must not overlap.
        (:func:`kfac_curvature_operator` builds them from a torch ``KFACCurvature``.)
    num_params : int
        P.
    """
    check_int(num_params, "num_params")
    parts = [_kfac_block(i, b, num_params, k) for k, (i, b) in enumerate(blocks)]
    covered = np.concatenate([i for i, _ in parts]) if parts else np.zeros(0, dtype=int)
    if np.unique(covered).size != covered.size:
        raise ValueError("blocks overlap: an entry of theta belongs to two blocks")

    def product(v: np.ndarray) -> np.ndarray:
        out = np.zeros(num_params)
        for idx, apply in parts:
            out[idx] = apply(v[idx])
        return out

    return CurvatureOperator("kfac", product, num_params, np.float64)


def kfac_curvature_operator(curvature: Any, method: str) -> CurvatureOperator:
    """One method's block-diagonal curvature of a
    :class:`backends.torch.kfac.curvature.KFACCurvature`.

    The torch curvature of :func:`backends.torch.kfac.curvature.kfac_curvature` (CPU tensors,
    converted to NumPy once) as a float64 operator over its flat (P,) theta, the same matrix as
    ``curvature.dense(method)`` without forming it.

    Parameters
    ----------
    curvature : KFACCurvature
    method : {"kfac", "ekfac", "iekfac"}, one of those it was computed for
    """
    blocks = []
    for block in curvature.blocks:
        per_method = block.factors if block.factors is not None else block.diagonal
        if method not in per_method:
            raise ValueError(
                f"method {method!r} was not computed for this curvature (it has "
                f"{sorted(per_method)}); pass it in methods=... of kfac_curvature"
            )
        blocks.append((np.asarray(block.index), per_method[method]))
    return kfac_operator(blocks, curvature.num_params)
