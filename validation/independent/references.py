r"""Independent references for every update of a reference run: dense P x P solves in NumPy.

Nothing here calls :mod:`ngdref.updates`, :mod:`ngdref.ngd`, :mod:`ngdref.linalg`,
:mod:`ngdref.directions` or ngdref's loss classes' formulas. From the
reference provider's dense Jacobian J (N, C, P) and logits z (N, C), the
logit-level gradient e_n, Hessian H_n and the labels drawn for SF are written
out again from their definitions (:ref:`conv-notation`, :ref:`conv-curvature`;
:func:`logit_terms`, :func:`sampled_logit_grads`),
the curvature matrices are formed as P x P matrices and every update is
solved as (M + lambda I_P) d = b by a Cholesky factorisation
(``scipy.linalg.cho_factor``) in float64:

=================  ==========================================================
quantity           dense reference
=================  ==========================================================
per_sample_grads   G = [J_n^T e_n]_n
s                  s_n = ||e_n||^2
sgd                g = G^T 1
ef                 (G^T G + lambda I_P)^-1 g  (= Eq. 5 by push-through)
ief                (G^T G + lambda I_P)^-1 G^T s  (= Eq. 8, sample damping)
ief-param          (G^T diag(s)^-1 G + lambda I_P)^-1 g
sf                 (Ghat^T Ghat / K + lambda I_P)^-1 g, labels drawn here
gn, ngd, ngd-cg    (sum_n J_n^T J_n + lambda I)^-1 g, (sum_n J_n^T H_n J_n + lambda I)^-1 g
gamma_ratio        ``sqrt(d^T F d) / |d^T g|`` over that of SGD, dense F
=================  ==========================================================

and three more families that call ``ngdref.directions`` again on the
reference provider: the lambda -> 0 limits G d = 1 (EF) and G d = s (iEF)
(:ref:`conv-updates`), the mean-reduction convention (:ref:`conv-damping-reduction`: rows
R G, s -> R^2 s, g -> R g and SF's sampled rows R Ghat with one lambda:
EF(lambda) = EF_sum(lambda/R^2)/R, iEF(lambda) = R iEF_sum(lambda/R^2),
SF(lambda) = SF_sum(lambda/R^2)/R), and the closed forms of the toy problems
(:ref:`conv-toys`) at lambda = 0.

Tolerances (:func:`update_bound`, first-order perturbation theory, norm-wise):
a backward-stable solve of A d = b with A = M + lambda I_P has relative
forward error <= kappa(A) (||dA|| / ||A|| + ||db|| / ||b||). Both sides are
such solves up to rounding (c n eps, n the largest dimension, c = 8) except
that ngdref's Woodbury and Gram forms combine g - U c or G^T c, which loses
up to rho = ||b|| / (lambda_min(A) ||d||) >= 1 more (<= kappa(A)); the inputs
differ by the rounding of two autodiff routes (``Dense.rows_accuracy``); CG
adds kappa(A) times its relative residual. Everything is computed from the
data of the problem; nothing is fitted to a measured difference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import scipy.linalg

import ngdref
from backends.arrays.adapters import to_numpy

__all__ = [
    "EPS64",
    "Dense",
    "IndependentCheck",
    "error_message",
    "logit_terms",
    "relative",
    "sampled_logit_grads",
    "sf_uniforms",
    "uniforms_shape",
    "update_bound",
]

EPS64 = float(np.finfo(np.float64).eps)
EPS32 = float(np.finfo(np.float32).eps)
#: the seed of the uniforms that draw SF's labels (passed to ngdref as uniforms, not as a key)
SF_SEED = 20240611
#: c of the rounding term c n eps of a backward-stable solve or product
ROUNDING = 8.0
#: float32 roundings per Jacobian entry in a model with float32 internals (a few
#: float32 ops, T5LayerNorm's variance or ViT's softmax, on each path)
FLOAT32_OPS = 8.0


class Verdict:
    """``ok`` and ``as_dict`` of a check dataclass with ``difference``, ``tolerance``,
    ``skipped`` and ``error`` fields (independent and oracle checks alike)."""

    difference: float
    tolerance: float
    skipped: str
    error: str

    @property
    def ok(self) -> bool:
        """No error, and skipped or within tolerance (NaN is never within)."""
        if self.error:
            return False
        return bool(self.skipped) or (
            math.isfinite(self.difference) and self.difference <= self.tolerance
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, with ``ok``."""
        return self.__dict__ | {"ok": self.ok}


@dataclass
class IndependentCheck(Verdict):
    """One quantity of the reference run against its independent dense reference."""

    quantity: str
    route: str
    difference: float
    tolerance: float
    skipped: str = ""
    error: str = ""


# ---- the losses, again, in NumPy (conventions page, Notation) ------------------------------------
def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z - z.max(axis=-1, keepdims=True))
    return w / w.sum(axis=-1, keepdims=True)


def _softmax_hessian(p: np.ndarray) -> np.ndarray:
    """diag(p) - p p^T over the last axis."""
    return p[..., :, None] * np.eye(p.shape[-1]) - p[..., :, None] * p[..., None, :]


def _sequence_parts(loss: Any, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-position probabilities (N, T, V) and the kept-position mask (N, T)."""
    n, t = y.shape
    return _softmax(z.reshape(n, t, loss.vocab_size)), y != loss.ignore_index


def logit_terms(loss: Any, z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """e_n = dl_n/dz_n (N, C) and H_n = d^2 l_n/dz_n^2 (N, C, C), sum convention, float64."""
    z = np.asarray(z, dtype=np.float64)
    n, c = z.shape
    if isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        p, kept = _sequence_parts(loss, z, y)
        onehot = np.eye(loss.vocab_size)[np.where(kept, y, 0)]
        e = (kept[..., None] * (p - onehot)).reshape(n, c)
        blocks = kept[..., None, None] * _softmax_hessian(p)
        hessians = np.stack([scipy.linalg.block_diag(*b) for b in blocks])
        return e, hessians
    if isinstance(loss, ngdref.SoftmaxCrossEntropy):
        p = _softmax(z)
        return p - np.eye(c)[y], _softmax_hessian(p)
    if isinstance(loss, ngdref.SigmoidBinaryCrossEntropy):
        p = scipy.special.expit(z)
        return p - y, (p * (1 - p))[:, :, None] * np.eye(c)
    if isinstance(loss, ngdref.SquaredError):
        return z - y, np.broadcast_to(np.eye(c), (n, c, c))
    raise TypeError(f"no independent reference for the loss {type(loss).__name__}")


def uniforms_shape(loss: Any, n: int, c: int, k: int) -> tuple[int, ...]:
    """The documented shape of the uniforms that draw K targets per sample."""
    if isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        return (k, n, c // loss.vocab_size)
    if isinstance(loss, ngdref.SoftmaxCrossEntropy):
        return (k, n)
    if isinstance(loss, ngdref.SquaredError):
        return (k, n, c, 2)  # Box-Muller: a radius and an angle per logit
    return (k, n, c)


def sf_uniforms(loss: Any, n: int, c: int, k: int = 1) -> np.ndarray:
    """Uniforms in [0, 1) for SF's draws, below 1 in float32 too."""
    u = np.random.default_rng(SF_SEED).random(uniforms_shape(loss, n, c, k))
    return np.minimum(u, 1.0 - EPS32 / 2)


def _categorical(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF: the label is the number of cumulative probabilities <= u."""
    counts = (np.cumsum(p, axis=-1)[None] <= u[..., None]).sum(axis=-1)
    return np.minimum(counts, p.shape[-1] - 1)


def sampled_logit_grads(loss: Any, z: np.ndarray, y: np.ndarray, u: np.ndarray) -> np.ndarray:
    """e at targets drawn from the model with the uniforms ``u``: (K, N, C)."""
    n, c = z.shape
    if isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        p, kept = _sequence_parts(loss, z, y)
        onehot = np.eye(loss.vocab_size)[_categorical(p, u)]
        return (kept[None, ..., None] * (p[None] - onehot)).reshape(-1, n, c)
    if isinstance(loss, ngdref.SoftmaxCrossEntropy):
        p = _softmax(z)
        return p[None] - np.eye(c)[_categorical(p, u)]
    if isinstance(loss, ngdref.SigmoidBinaryCrossEntropy):
        p = scipy.special.expit(z)
        return p[None] - (u < p[None]).astype(np.float64)
    if isinstance(loss, ngdref.SquaredError):  # y = z + eps, eps ~ N(0, I): e = z - y = -eps
        radius = np.sqrt(-2.0 * np.log1p(-u[..., 0]))
        return -radius * np.cos(2.0 * np.pi * u[..., 1])
    raise TypeError(f"no independent sampler for the loss {type(loss).__name__}")


# ---- the dense problem ------------------------------------------------------------------------
@dataclass
class Dense:
    """Every dense P x P quantity of one model on one batch (sum convention, float64).

    Attributes
    ----------
    jacobians : (N, C, P)
    logit_grads : (N, C)
    hessians : (N, C, C)
    sampled : (K, N, C)
        Logit gradients at the labels drawn for SF.
    eps_model : float
        Unit roundoff of the model's own arithmetic (float32 for Hugging Face internals).
    """

    jacobians: np.ndarray
    logit_grads: np.ndarray
    hessians: np.ndarray
    sampled: np.ndarray
    eps_model: float = EPS64

    @property
    def size(self) -> int:
        """n of the rounding terms: the largest dimension, max(P, N*C)."""
        n, c, p = self.jacobians.shape
        return max(p, n * c)

    @cached_property
    def per_sample_grads(self) -> np.ndarray:
        return np.einsum("ncp,nc->np", self.jacobians, self.logit_grads)

    @cached_property
    def grad(self) -> np.ndarray:
        return self.per_sample_grads.sum(axis=0)

    @cached_property
    def s(self) -> np.ndarray:
        return (self.logit_grads**2).sum(axis=1)

    @cached_property
    def sampled_grads(self) -> np.ndarray:
        """Ghat / sqrt(K): rows J_n^T ehat_nk, (K*N, P), so that F_SF = Ghat^T Ghat."""
        k = self.sampled.shape[0]
        rows = np.einsum("ncp,knc->knp", self.jacobians, self.sampled)
        return rows.reshape(-1, rows.shape[-1]) / math.sqrt(k)

    @cached_property
    def fisher(self) -> np.ndarray:
        return np.einsum("nap,nab,nbq->pq", self.jacobians, self.hessians, self.jacobians)

    @cached_property
    def gauss_newton(self) -> np.ndarray:
        return np.einsum("nap,naq->pq", self.jacobians, self.jacobians)

    def rows_accuracy(self, weights: np.ndarray | None = None) -> float:
        r"""Relative accuracy of sum_n w_n g_n (or of G, ``weights=None``) between two routes.

        An entry of J carries FLOAT32_OPS eps_model relative rounding from the
        model's arithmetic, and J_n^T e_n adds C eps_64 (a C-term dot product);
        relative to the result this is multiplied by the cancellation ratio
        ``|| sum |w_n| |J_n|^T |e_n| || / || sum w_n J_n^T e_n ||``.
        """
        c = self.jacobians.shape[1]
        unit = FLOAT32_OPS * self.eps_model + c * EPS64
        magnitude = np.einsum("ncp,nc->np", np.abs(self.jacobians), np.abs(self.logit_grads))
        if weights is None:
            return unit * float(np.linalg.norm(magnitude) / np.linalg.norm(self.per_sample_grads))
        exact = np.linalg.norm(weights @ self.per_sample_grads)
        return unit * float(np.linalg.norm(np.abs(weights) @ magnitude) / exact)


@dataclass(frozen=True)
class Solved:
    """d = (M + lambda I)^-1 b with what its error bound needs."""

    update: np.ndarray
    kappa: float
    lambda_min: float
    rhs_norm: float


def damped_solve(matrix: np.ndarray, rhs: np.ndarray, damping: float) -> Solved:
    """(M + lambda I_P)^-1 b by Cholesky; kappa from the eigenvalues of M + lambda I_P."""
    a = matrix + damping * np.eye(matrix.shape[0])
    w = np.linalg.eigvalsh(a)
    kappa = float(w[-1] / w[0]) if w[0] > 0 else math.inf
    update = scipy.linalg.cho_solve(scipy.linalg.cho_factor(a), rhs)
    return Solved(update, kappa, float(w[0]), float(np.linalg.norm(rhs)))


def update_bound(
    solved: Solved, size: int, input_error: float, cg_tol: float = 0.0
) -> float:
    r"""Relative error bound of ngdref's update against the dense solve (module docstring).

    .. math:: \kappa(A)\,[\delta_{in} + c\, n\, \epsilon (2 + \rho) + \mathrm{cg\_tol}],
        \quad \rho = \frac{\|b\|}{\lambda_{min}(A) \|d\|}

    ``input_error`` is ||dA|| / ||A|| + ||db|| / ||b|| from the two routes' inputs.
    """
    rho = solved.rhs_norm / (solved.lambda_min * float(np.linalg.norm(solved.update)))
    return solved.kappa * (input_error + ROUNDING * size * EPS64 * (2 + max(rho, 1.0)) + cg_tol)


def relative(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| in float64."""
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - ref) / np.linalg.norm(ref))


def error_message(err: BaseException) -> str:
    """One line naming an exception, for a report row."""
    return f"{type(err).__name__}: {err}".splitlines()[0]


def guarded(
    quantity: str, route: str, fn: Callable[[], list[IndependentCheck]]
) -> list[IndependentCheck]:
    """``fn()``, or one failing check naming the exception."""
    try:
        return fn()
    except Exception as err:  # a crashing reference is a failed check, not a crashed suite
        return [IndependentCheck(quantity, route, math.nan, math.nan, error=error_message(err))]


def library_of(array: Any) -> str:
    """The :data:`backends.arrays.adapters.LIBRARIES` name of ``array``'s namespace."""
    import array_api_compat

    xp = array_api_compat.array_namespace(array)
    for library, test in (
        ("torch", array_api_compat.is_torch_namespace),
        ("array_api_strict", array_api_compat.is_array_api_strict_namespace),
        ("cupy", array_api_compat.is_cupy_namespace),
    ):
        if test(xp):
            return library
    return "numpy"


def sf_key(provider: Any, loss: Any) -> Any:
    """The uniforms of :func:`sf_uniforms` in the provider's library and dtype (ngdref's SF key)."""
    from backends.arrays.adapters import from_numpy

    logits = provider.logits()
    dtype = "float32" if to_numpy(logits).dtype == np.float32 else "float64"
    u = sf_uniforms(loss, logits.shape[0], logits.shape[1])
    return from_numpy(u, library_of(logits), dtype=dtype)
