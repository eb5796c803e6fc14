r"""The zoo's independent reference: single-sample backward passes in float64, then NumPy.

:func:`reference` runs the model (eval mode) on one sample at a time, a batch of one, and
takes the logit Jacobian J_n (C, P) of that sample by C calls of ``torch.autograd.grad``
with respect to the trainable parameters, in ``named_parameters()`` order (tied parameters
once, every use summed by autograd; sparse gradients made dense). Everything after that is
dense float64 NumPy written here, not ngdref's:

- the logit gradients e_n = dl_n/dz_n and s_n = ||e_n||^2 of softmax cross-entropy (per label
  position for a sequence loss, ignored positions zero), in the sum convention;
- G = [J_n^T e_n]_n (N, P), and the sampled rows A of SF from labels drawn as
  :class:`backends.torch.optim.methods.SF` documents it (:func:`sampled_labels`);
- G G^T, G v, G^T w and the updates by dense solves (:func:`ief_update`, :func:`ef_update`,
  :func:`sf_update`) with the error bounds they are compared within (:func:`bounds`).

A case whose samples are coupled (``Case.refuse``) has no such reference: a batch of one
would silently define another loss.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .case import IGNORE, Case, N
from .models import CASES

EPS = float(np.finfo(np.float64).eps)
#: c of the rows' relative error bound gamma = c eps sqrt(P) (:func:`rows_gamma`)
C_ROWS = 1e3
#: SF's labels per sample (K) and seed in the step tests
SF_SAMPLES, SF_SEED = 2, 0


def sample_of(inputs: Any, n: int) -> Any:
    """Sample n of a batch as a batch of one (every tensor sliced along its first axis)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[n:n + 1]
    return {k: v[n:n + 1] for k, v in inputs.items()}


def call(model: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """The model's logits (n, C) on a tensor (positional) or keyword inputs."""
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.reshape(out.shape[0], -1)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


@dataclass(frozen=True)
class Reference:
    """Per-sample logits (N, C) and logit Jacobians (N, C, P) of a case, float64 NumPy."""

    case: Case
    logits: np.ndarray
    jacobians: np.ndarray
    targets: np.ndarray
    names: tuple[str, ...]

    @property
    def num_params(self) -> int:
        return self.jacobians.shape[2]

    def rows(self, cotangents: np.ndarray) -> np.ndarray:
        """[J_n^T u_n]_n, (N, P)."""
        return np.einsum("ncp,nc->np", self.jacobians, cotangents)

    @functools.cached_property
    def logit_grads(self) -> np.ndarray:
        return logit_grads(self.case, self.logits, self.targets)

    @functools.cached_property
    def grads(self) -> np.ndarray:
        """G (N, P): row n is grad l_n (sum convention)."""
        return self.rows(self.logit_grads)

    @functools.cached_property
    def sampled_grads(self) -> np.ndarray:
        """SF's rows A (K N, P) for the labels its first step draws (k-major)."""
        labels = sampled_labels(self.case, self.logits, self.targets, step_key(SF_SEED, 0),
                                SF_SAMPLES)
        return np.concatenate(
            [self.rows(logit_grads(self.case, self.logits, y)) for y in labels]
        )

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return vectors(self.case, self.num_params)


def vectors(case: Case, num_params: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded v (P,) and w (N,) for G v and G^T w."""
    rng = np.random.default_rng(case.seed)
    return rng.standard_normal(num_params), rng.standard_normal(N)


@functools.cache
def reference(name: str) -> Reference:
    """The loop reference of case ``name`` (cached: the cases are seeded, the model fresh)."""
    return loop_reference(CASES[name])


def loop_reference(case: Case) -> Reference:
    """The loop reference of any case (also one outside :data:`.models.CASES`)."""
    if case.refuse is not None:
        raise ValueError(f"{case.name} has no per-sample reference: {case.refuse}")
    model, inputs, targets = case.build()
    model.eval()  # the documented policy: dropout off, running statistics
    named = trainable(model)
    params = [p for _, p in named]
    logits, jacobians = [], []
    for n in range(N):
        z = call(model, sample_of(inputs, n))[0]
        rows = []
        for c in range(z.shape[0]):
            grads = torch.autograd.grad(z[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([
                (torch.zeros_like(p) if g is None else g.to_dense() if g.is_sparse else g
                 ).reshape(-1) for g, p in zip(grads, params, strict=True)
            ]))
        logits.append(z.detach().numpy())
        jacobians.append(torch.stack(rows).numpy())
    return Reference(case, np.stack(logits), np.stack(jacobians), targets.numpy(),
                     tuple(name for name, _ in named))


# ---- the loss, by hand ----------------------------------------------------------------------
def _probabilities(case: Case, logits: np.ndarray) -> np.ndarray:
    """Softmax per label position: (N, C) or (N, T, V)."""
    z = logits if case.positions is None else logits.reshape(N, case.positions, case.classes)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def logit_grads(case: Case, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """e_n = softmax(z_n) - onehot(y_n) per label position, zero where ignored; (N, C)."""
    p = _probabilities(case, logits)
    kept = targets != IGNORE
    onehot = np.eye(case.classes)[np.where(kept, targets, 0)]
    return (kept[..., None] * (p - onehot)).reshape(N, -1)


def step_key(seed: int, step: int) -> int:
    """SF's documented key of a step: the first 8 bytes, little-endian, of blake2b("seed:t")."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sampled_labels(case: Case, logits: np.ndarray, targets: np.ndarray, key: int, k: int
                   ) -> np.ndarray:
    """K labels per sample (and position) by inverse CDF of the model's softmax, on uniforms
    of the standard library's Mersenne Twister seeded with ``key``, row-major (K, N[, T]), as
    :meth:`ngdref.LogitLoss.sample` documents; ignored positions stay ignored."""
    p = _probabilities(case, logits)
    shape = (k, *p.shape[:-1])
    rng = random.Random(key)
    u = np.array([rng.random() for _ in range(math.prod(shape))]).reshape(shape)
    labels = np.minimum((np.cumsum(p, axis=-1)[None] <= u[..., None]).sum(-1), case.classes - 1)
    return np.where(targets[None] != IGNORE, labels, IGNORE)


# ---- updates by dense solves ------------------------------------------------------------------
def gram_damping(g: np.ndarray) -> float:
    """lambda = ||G||_F^2 / N = tr(G G^T) / N: then ||G G^T||_2 / lambda <= N, so the damped
    Gram's condition number is at most N + 1 (every case's G is nonzero)."""
    return float(np.sum(g * g)) / g.shape[0]


def sf_damping(a: np.ndarray, k: int) -> float:
    """lambda = ||A||_F^2 / (K N) for F_SF = A^T A / K: ||F_SF||_2 / lambda <= N."""
    return float(np.sum(a * a)) / (k * N)


def ief_update(g: np.ndarray, s: np.ndarray, damping: float) -> np.ndarray:
    """d = G^T (G G^T + lambda I)^{-1} s."""
    return g.T @ np.linalg.solve(g @ g.T + damping * np.eye(len(s)), s)


def ef_update(g: np.ndarray, damping: float) -> np.ndarray:
    """u = G^T (G G^T + lambda I)^{-1} 1 (before EF's normalisation)."""
    return ief_update(g, np.ones(g.shape[0]), damping)


def sf_update(g: np.ndarray, a: np.ndarray, k: int, damping: float) -> np.ndarray:
    """u = (A^T A / K + lambda I)^{-1} G^T 1 = (g - A^T (A A^T + K lambda I)^{-1} A g) / lambda."""
    grad = g.sum(axis=0)
    return (grad - a.T @ np.linalg.solve(a @ a.T + k * damping * np.eye(len(a)), a @ grad)
            ) / damping


def rows_gamma(num_params: int) -> float:
    r"""gamma = c eps sqrt(P): a bound on ||G_route - G||_F / ||G||_F for two exact float64
    routes, and on the rounding of the products with G.

    Each entry of G is a sum of products through the model's depth; a backward pass in float64
    errs by a few eps times the size of the terms per layer, and the tiny models here have at
    most ~10 layers and sums of at most ~100 terms, so c = 1e3 covers depth x width x the
    cancellation between terms. A product G v or G^T w adds sqrt(P) eps (norm-wise). Any real
    defect (a wrong batch axis, a scale, a dropped use) is 1e-3 or more, 1e8 above this.
    """
    return C_ROWS * EPS * math.sqrt(num_params)


def bounds(ref: Reference, theta_norm: float) -> dict[str, float]:
    r"""The allowed 2-norm error of each quantity (see :func:`rows_gamma` for gamma).

    gram  ||dK|| <= 3 gamma ||G||^2  (dK = dG G^T + G dG^T + dG dG^T)
    gv    ||G v|| errs by <= 2 gamma ||G|| ||v||; gtw likewise with ||w||
    ief   d = G^T c, c = (K + lambda I)^{-1} s, ||c|| <= ||s|| / lambda; to first order
          dd = dG^T c + G^T (K + lambda I)^{-1} (ds - dK c), so with lambda = ||G||^2 / N
          ||dd|| <= gamma (2 + 3 N) ||G|| ||s|| / lambda
    ef    the same for s = 1 (||1|| = sqrt N, exact), then the unit direction u / ||u||
          errs by <= 2 ||du|| / ||u||
    sf    du = (F + lambda I)^{-1} (dg - dF u), ||u|| <= ||g|| / lambda, ||dF|| <= 3 gamma
          ||A||^2 / K = 3 gamma N lambda: ||du|| <= gamma (sqrt N ||G|| + 3 N ||g||) / lambda;
          the unit direction as for EF

    A step's change theta_after - theta_before, divided by lr = 1, adds the rounding of the
    two parameter vectors, 2 eps (||theta|| + ||d||).
    """
    g, a = ref.grads, ref.sampled_grads
    gamma, n = rows_gamma(ref.num_params), N
    v, w = ref.vectors()
    norm_g = float(np.linalg.norm(g))
    s = np.sum(ref.logit_grads**2, axis=1)
    lam, lam_sf = gram_damping(g), sf_damping(a, SF_SAMPLES)
    d = ief_update(g, s, lam)
    u_ef = ef_update(g, lam)
    u_sf = sf_update(g, a, SF_SAMPLES, lam_sf)
    du_ef = gamma * (1 + 3 * n) * norm_g * math.sqrt(n) / lam
    du_sf = gamma * (math.sqrt(n) * norm_g + 3 * n * np.linalg.norm(g.sum(0))) / lam_sf
    write = 2 * EPS * (theta_norm + 1.0)
    return {
        "gram": 3 * gamma * norm_g**2,
        "gv": 2 * gamma * norm_g * float(np.linalg.norm(v)),
        "gtw": 2 * gamma * norm_g * float(np.linalg.norm(w)),
        "ief": gamma * (2 + 3 * n) * norm_g * float(np.linalg.norm(s)) / lam
        + 2 * EPS * (theta_norm + float(np.linalg.norm(d))),
        "ef": 2 * du_ef / float(np.linalg.norm(u_ef)) + write,
        "sf": 2 * du_sf / float(np.linalg.norm(u_sf)) + write,
    }


def expected(ref: Reference) -> dict[str, np.ndarray]:
    """The reference value of every quantity: G G^T, G v, G^T w, the IEF update d and the
    unit directions of EF and SF (their first step with lr = 1 moves theta by -d)."""
    g, a = ref.grads, ref.sampled_grads
    v, w = ref.vectors()
    s = np.sum(ref.logit_grads**2, axis=1)
    u_ef = ef_update(g, gram_damping(g))
    u_sf = sf_update(g, a, SF_SAMPLES, sf_damping(a, SF_SAMPLES))
    return {
        "gram": g @ g.T,
        "gv": g @ v,
        "gtw": g.T @ w,
        "ief": ief_update(g, s, gram_damping(g)),
        "ef": u_ef / np.linalg.norm(u_ef),
        "sf": u_sf / np.linalg.norm(u_sf),
    }
