"""Small problems as data for the core math tests, with their NumPy reference quantities.

A :class:`Case` is a name, a loss kind, the sizes (N, C, P) and a seed. Its
builder draws random per-sample Jacobians J (N, C, P), logits z (N, C) and
targets with ``numpy.random.default_rng(seed)`` in float64, then computes the
reference logit-level quantities (e_n, H_n) from closed forms written here in
NumPy, independently of :mod:`ngdref.losses`. Tests convert with
:meth:`Problem.on` to the backend under test.

Every case has N < P, so the per-sample gradient matrix G (N, P) has full row
rank (almost surely for Gaussian Jacobians); the "tall" cases also have
N*C >= P (and N*rank(H_n) >= P), so that F is invertible and damping 0 is
allowed for the P x P solves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import ngdref
from tests.array_backends import Backend

IGNORE = -100


# ---- NumPy closed forms (the independent route) ----------------------------
def np_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def np_sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def np_logit_grads(kind: str, logits: np.ndarray, targets: np.ndarray, vocab: int = 0):
    """e_n = dl_n/dz_n (N, C) from the closed forms (:ref:`conv-notation`)."""
    if kind == "ce":
        return np_softmax(logits) - np.eye(logits.shape[1])[targets]
    if kind == "mse":
        return logits - targets
    if kind == "bce":
        return np_sigmoid(logits) - targets
    if kind == "seq":
        n, t = targets.shape
        z = logits.reshape(n, t, vocab)
        e = np.zeros_like(z)
        for i in range(n):
            for j in range(t):
                if targets[i, j] != IGNORE:
                    e[i, j] = np_softmax(z[i, j]) - np.eye(vocab)[targets[i, j]]
        return e.reshape(n, t * vocab)
    raise ValueError(kind)


def np_logit_hessians(kind: str, logits: np.ndarray, targets: np.ndarray, vocab: int = 0):
    """H_n (N, C, C) from the closed forms, one sample at a time."""
    n, c = logits.shape
    out = np.zeros((n, c, c))
    for i in range(n):
        if kind == "ce":
            p = np_softmax(logits[i])
            out[i] = np.diag(p) - np.outer(p, p)
        elif kind == "mse":
            out[i] = np.eye(c)
        elif kind == "bce":
            p = np_sigmoid(logits[i])
            out[i] = np.diag(p * (1 - p))
        elif kind == "seq":
            for j in range(targets.shape[1]):
                if targets[i, j] != IGNORE:
                    p = np_softmax(logits[i, j * vocab : (j + 1) * vocab])
                    sl = slice(j * vocab, (j + 1) * vocab)
                    out[i, sl, sl] = np.diag(p) - np.outer(p, p)
        else:
            raise ValueError(kind)
    return out


def np_value(kind: str, logits: np.ndarray, targets: np.ndarray, vocab: int = 0):
    """l_n (N,) by a direct log-sum-exp / softplus."""
    if kind == "ce":
        m = logits.max(axis=1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        return lse - logits[np.arange(len(targets)), targets]
    if kind == "mse":
        return 0.5 * ((logits - targets) ** 2).sum(axis=1)
    if kind == "bce":
        return (np.logaddexp(0.0, logits) - targets * logits).sum(axis=1)
    if kind == "seq":
        n, t = targets.shape
        out = np.zeros(n)
        for i in range(n):
            for j in range(t):
                if targets[i, j] != IGNORE:
                    zz = logits[i, j * vocab : (j + 1) * vocab]
                    out[i] += np.logaddexp.reduce(zz) - zz[targets[i, j]]
        return out
    raise ValueError(kind)


def make_loss(kind: str, vocab: int = 0) -> ngdref.LogitLoss:
    return {
        "ce": ngdref.SoftmaxCrossEntropy,
        "mse": ngdref.SquaredError,
        "bce": ngdref.SigmoidBinaryCrossEntropy,
        "seq": lambda: ngdref.SequenceSoftmaxCrossEntropy(vocab),
    }[kind]()


# ---- problems ---------------------------------------------------------------
@dataclass(frozen=True)
class Arrays:
    """A problem's arrays in one backend (and dtype)."""

    jacobians: Any
    logits: Any
    targets: Any
    per_sample_grads: Any
    logit_grads: Any
    logit_grad_sq_norms: Any
    grad: Any
    logit_hessians: Any


@dataclass(frozen=True)
class Problem:
    """A case's NumPy float64 data and reference quantities."""

    name: str
    kind: str
    vocab: int
    jacobians: np.ndarray  # (N, C, P)
    logits: np.ndarray  # (N, C)
    targets: np.ndarray
    logit_grads: np.ndarray  # e (N, C)
    logit_hessians: np.ndarray  # H (N, C, C)

    @property
    def n(self) -> int:
        return self.jacobians.shape[0]

    @property
    def c(self) -> int:
        return self.jacobians.shape[1]

    @property
    def p(self) -> int:
        return self.jacobians.shape[2]

    @property
    def loss(self) -> ngdref.LogitLoss:
        return make_loss(self.kind, self.vocab)

    @property
    def per_sample_grads(self) -> np.ndarray:
        """G (N, P), row n = J_n^T e_n."""
        return np.einsum("ncp,nc->np", self.jacobians, self.logit_grads)

    @property
    def logit_grad_sq_norms(self) -> np.ndarray:
        return (self.logit_grads**2).sum(axis=1)

    @property
    def grad(self) -> np.ndarray:
        return self.per_sample_grads.sum(axis=0)

    def on(self, backend: Backend, dtype: str | None = None) -> Arrays:
        """The problem's arrays in ``backend`` (float64 unless ``dtype``)."""
        return Arrays(
            jacobians=backend.asarray(self.jacobians, dtype),
            logits=backend.asarray(self.logits, dtype),
            targets=backend.asarray(
                self.targets, dtype if self.targets.dtype.kind == "f" else None
            ),
            per_sample_grads=backend.asarray(self.per_sample_grads, dtype),
            logit_grads=backend.asarray(self.logit_grads, dtype),
            logit_grad_sq_norms=backend.asarray(self.logit_grad_sq_norms, dtype),
            grad=backend.asarray(self.grad, dtype),
            logit_hessians=backend.asarray(self.logit_hessians, dtype),
        )

    def provider(self, backend: Backend, dtype: str | None = None) -> DenseProvider:
        arrays = self.on(backend, dtype)
        return DenseProvider(arrays.jacobians, arrays.logits)


@dataclass(frozen=True)
class Case:
    """A small problem as data: a loss kind, sizes, a seed."""

    name: str
    kind: str  # "ce" | "mse" | "bce" | "seq"
    n: int
    c: int  # for "seq": T positions (C = T * vocab)
    p: int
    seed: int
    vocab: int = 0
    logit_scale: float = 1.5

    def build(self) -> Problem:
        rng = np.random.default_rng(self.seed)
        c = self.c * self.vocab if self.kind == "seq" else self.c
        jacobians = rng.standard_normal((self.n, c, self.p))
        logits = self.logit_scale * rng.standard_normal((self.n, c))
        if self.kind == "ce":
            targets = rng.integers(0, c, size=self.n)
        elif self.kind == "mse":
            targets = rng.standard_normal((self.n, c))
        elif self.kind == "bce":
            # soft labels in [0, 1] as well as hard ones
            targets = rng.uniform(0.0, 1.0, size=(self.n, c))
            targets[0] = np.round(targets[0])
        elif self.kind == "seq":
            targets = rng.integers(0, self.vocab, size=(self.n, self.c))
            # ignored positions (label padding), but every sample keeps at least one label
            targets[0, -1] = IGNORE
            targets[1, 0] = IGNORE
            targets[-1, 1:] = IGNORE
        else:
            raise ValueError(self.kind)
        e = np_logit_grads(self.kind, logits, targets, self.vocab)
        h = np_logit_hessians(self.kind, logits, targets, self.vocab)
        return Problem(self.name, self.kind, self.vocab, jacobians, logits, targets, e, h)


#: N*C < P: the regime of the paper (F singular, Woodbury over N*C)
WIDE = [
    Case("ce_wide", "ce", n=4, c=3, p=20, seed=1),
    Case("ce_many", "ce", n=6, c=5, p=40, seed=2),
    Case("mse_wide", "mse", n=5, c=2, p=15, seed=3),
    Case("bce_wide", "bce", n=4, c=3, p=16, seed=4),
    Case("bce_scalar", "bce", n=5, c=1, p=9, seed=14),
    Case("seq_wide", "seq", n=4, c=3, p=40, seed=6, vocab=4),
]
#: N < P <= N*C (and N * rank(H_n) >= P): F invertible, P x P solves
TALL = [
    Case("ce_tall", "ce", n=5, c=3, p=8, seed=11),
    Case("mse_tall", "mse", n=3, c=4, p=7, seed=12),
    Case("seq_tall", "seq", n=4, c=2, p=8, seed=17, vocab=3),
]
CASES = WIDE + TALL
#: the dampings the update identities are checked at
DAMPINGS = [1e-3, 0.1, 1.0, 10.0]
#: one case per loss kind, for the slower or Monte Carlo tests
ONE_PER_KIND = [WIDE[0], WIDE[2], WIDE[3], WIDE[5]]


def ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


class DenseProvider(ngdref.JacobianProvider):
    """A provider from a fixed Jacobian (N, C, P) and logits (N, C); jvp/vjp use the defaults."""

    def __init__(self, jacobians: Any, logits: Any) -> None:
        self._jacobians = jacobians
        self._logits = logits
        self.num_params = int(jacobians.shape[2])

    def logits(self) -> Any:
        return self._logits

    def jacobian(self) -> Any:
        return self._jacobians


# ---- NumPy dense references -------------------------------------------------

class ProductsOnlyRows:
    """A PerSampleRows that hides its array: only the protocol's products are available.

    ``gram_calls`` counts how often its Gram matrix is formed (the factorisation-reuse tests).
    """

    def __init__(self, array: Any) -> None:
        self._dense = ngdref.DenseRows(array)
        self.shape, self.dtype = self._dense.shape, self._dense.dtype
        self.gram_calls = 0

    def array_namespace(self) -> Any:
        return self._dense.array_namespace()

    def gram(self) -> Any:
        self.gram_calls += 1
        return self._dense.gram()

    def cross_gram(self, other: Any) -> Any:
        return self._dense.cross_gram(other)

    def matvec(self, v: Any) -> Any:
        return self._dense.matvec(v)

    def rmatvec(self, w: Any) -> Any:
        return self._dense.rmatvec(w)

def np_sum_outer(rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """sum_n w_n a_n a_n^T by an explicit Python loop over the rows."""
    p = rows.shape[1]
    out = np.zeros((p, p))
    for i, a in enumerate(rows):
        out += (1.0 if weights is None else weights[i]) * np.outer(a, a)
    return out


def np_fisher(jacobians: np.ndarray, hessians: np.ndarray) -> np.ndarray:
    """sum_n J_n^T H_n J_n by a loop."""
    p = jacobians.shape[2]
    out = np.zeros((p, p))
    for jn, hn in zip(jacobians, hessians, strict=True):
        out += jn.T @ hn @ jn
    return out


def np_psd_sqrt(h: np.ndarray) -> np.ndarray:
    """Symmetric square roots of PSD matrices (N, C, C) by eigh (not the losses' factors)."""
    w, v = np.linalg.eigh(h)
    return np.einsum("nij,nj,nkj->nik", v, np.sqrt(np.clip(w, 0, None)), v)


def np_damped_solve(matrix: np.ndarray, grad: np.ndarray, damping: float) -> np.ndarray:
    """(M + lambda I)^-1 g by a dense solve."""
    return np.linalg.solve(matrix + damping * np.eye(matrix.shape[0]), grad)


# ---- tolerances from error analysis (norm-wise, scaled by condition and size) -------------
EPS = float(np.finfo(np.float64).eps)
#: the unspecified small constants of the standard rounding-error bounds (Higham, Accuracy
#: and Stability of Numerical Algorithms, ch. 3, 7, 10); a choice, not a fit to one machine
SAFETY = 10.0


def solve_rtol(matrix: np.ndarray, eps: float = EPS) -> float:
    """Norm-wise bound on ||x1 - x2|| / ||x|| of two backward-stable solves of M x = b.

    Each computed solution is within n kappa(M) eps of x (first order; Higham Thm 7.2 with a
    backward error of n eps ||M||), so two of them differ by at most twice that.
    """
    n = matrix.shape[0]
    return 2 * SAFETY * n * float(np.linalg.cond(matrix)) * eps


def gram_rtol(rows: np.ndarray, matrix: np.ndarray, c: np.ndarray, eps: float = EPS) -> float:
    """Norm-wise bound on the relative difference of two float64 routes to d = A^T c.

    A = ``rows`` (n, p), ``matrix`` = A A^T + damping term, c = matrix^-1 b. Forming A A^T
    perturbs it by at most p eps ||A||^2 (dot products of p terms), the solve adds n eps
    ||M|| backward error, so ||dc|| / ||c|| <= kappa(M) (p eps ||A||^2 / ||M|| + n eps); the
    product A^T c adds p eps ||A|| ||c||. ||A|| ||c|| / ||d|| converts to d's relative error.
    ``eps`` is the unit roundoff of the dtype the result is formed in.
    """
    n, p = rows.shape
    a_norm = float(np.linalg.norm(rows, 2))
    amplification = a_norm * np.linalg.norm(c) / np.linalg.norm(rows.T @ c)
    perturbation = p * EPS * a_norm**2 / np.linalg.norm(matrix, 2) + n * EPS
    return 2 * SAFETY * amplification * (np.linalg.cond(matrix) * perturbation + p * eps)


def sum_rtol(scale: float, result: np.ndarray, terms: int) -> float:
    """Norm-wise bound for two routes to a sum of products of ``terms`` terms in all.

    Each route's rounding is at most terms * eps * ``scale`` (the sum of the absolute
    products, e.g. sum_n ||J_n||_F^2 ||H_n|| for sum_n J_n^T H_n J_n), relative to ||result||.
    """
    return 2 * SAFETY * terms * EPS * scale / float(np.linalg.norm(result))


def assert_close_norm(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """||actual - expected|| <= rtol * ||expected|| (a norm-wise comparison)."""
    err = np.linalg.norm(np.asarray(actual) - expected)
    scale = np.linalg.norm(expected)
    assert err <= rtol * scale, f"relative error {err / scale:.3g} > {rtol:.3g}"
