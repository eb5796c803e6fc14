r"""The host side of one step of the optax transformations: ngdref's math on NumPy arrays.

A :class:`StepSpec` holds a method's checked hyperparameters; its methods take NumPy arrays
(from :func:`backends.jax.host.on_host`) and return NumPy arrays. The conventions are those of
the torch optimisers (``backends.IEF``, ``EF``, ``SF``), stated here once for JAX:

* the step is :math:`\theta \leftarrow \theta - \eta_t d`; iEF: d = u, eta_t = lr;
  EF and SF: d = u / ||u|| (a zero u leaves theta as it is) and eta_t = lr (T - t) / T,
  t = 0, 1, ... the step and T = ``total_steps`` (a step t >= T raises ``ValueError``);
* u is :func:`ngdref.ief_update`, :func:`ngdref.ef_update` or :func:`ngdref.sf_update` of
  the rows in the reduction convention: with R = :func:`ngdref.reduction_factor` every
  logit-level gradient is R e_n, so the rows are R G, s is R^2 s and SF's sampled rows are
  R G_hat, and one damping lambda damps EF, iEF and SF alike (lambda / R^2 in the sum
  convention; :mod:`ngdref.directions`);
* SF draws its K labels per sample once per step with ``loss.sample(logits,
  sampling_key(seed, t), num_samples=K, targets=targets)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

import ngdref

__all__ = ["StepSpec", "sampling_key"]

#: the per-step sampling key, shared with the torch optimisers (one home: ngdref)
sampling_key = ngdref.sampling_key



@dataclass(frozen=True)
class StepSpec:
    """One method's checked hyperparameters (see :mod:`backends.jax.transforms`).

    Attributes
    ----------
    method : {"ief", "ef", "sf"}
    learning_rate, damping : float
    reduction : {"sum", "mean"} or float
    total_steps : int or None
        T of EF and SF (normalised steps decaying linearly); None for iEF.
    gram : dict
        iEF's and EF's keywords of the Gram solve (damping_mode, dedup_threshold,
        dedup_rule; iEF also damping_space).
    num_samples, seed : int
        SF's K and the seed of its sampling keys.
    loss : ngdref.LogitLoss or None
    """

    method: str
    learning_rate: float
    damping: float
    reduction: str | float
    total_steps: int | None
    gram: dict[str, Any]
    num_samples: int = 1
    seed: int = 0
    loss: ngdref.LogitLoss | None = None

    def learning_rate_at(self, step: int) -> float:
        """eta_t: the learning rate, or lr (T - t) / T for the normalised methods."""
        if self.total_steps is None:
            return self.learning_rate
        if step >= self.total_steps:
            raise ValueError(
                f"all total_steps={self.total_steps} steps have been taken; the learning rate "
                f"has decayed to 0 (build the {self.method} transformation with a larger "
                "total_steps)"
            )
        return self.learning_rate * ((self.total_steps - step) / self.total_steps)

    def factor(self, num_samples: int) -> float:
        """R of a batch of ``num_samples``."""
        return ngdref.reduction_factor(self.reduction, num_samples)

    # ---- logit level ---------------------------------------------------------------------
    def logit_grads(self, logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """R e (N, C) of the true labels."""
        return self.factor(logits.shape[0]) * self.loss.grad(logits, targets)

    def sampled_logit_grads(
        self, logits: np.ndarray, targets: np.ndarray, step: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """R e (N, C) of the true labels and R e_hat (K, N, C) of the labels drawn at ``step``."""
        factor = self.factor(logits.shape[0])
        key = sampling_key(self.seed, int(step))
        drawn = self.loss.sample(logits, key, num_samples=self.num_samples, targets=targets)
        sampled = [factor * self.loss.grad(logits, drawn[k]) for k in range(self.num_samples)]
        return factor * self.loss.grad(logits, targets), np.stack(sampled)

    # ---- the steps -----------------------------------------------------------------------
    def gram_step(self, step: np.ndarray, rows: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
        """-eta_t d (P,) of iEF or EF from the rows R G (N, P) and R^2 s (N,)."""
        lr = self.learning_rate_at(int(step))
        if self.method == "ief":
            u = ngdref.ief_update(rows, sq_norms, damping=self.damping, **self.gram)
        else:
            u = ngdref.ef_update(rows, damping=self.damping, **self.gram)
        return self._finish(int(step), lr, u)

    def sf_step(self, step: np.ndarray, sampled: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """-eta_t d (P,) of SF from the sampled rows R G_hat (K N, P) and R g (P,)."""
        lr = self.learning_rate_at(int(step))
        u = ngdref.sf_update(sampled, grad, damping=self.damping, num_samples=self.num_samples)
        return self._finish(int(step), lr, u)

    def _finish(self, step: int, lr: float, u: np.ndarray) -> np.ndarray:
        norm = float(np.linalg.norm(u.astype(np.float64)))
        if not math.isfinite(norm):
            raise ngdref.NonFiniteError(
                f"update contains NaN or infinite values at step {step} (increase damping); "
                "the parameters were not changed"
            )
        scale = lr / norm if self.total_steps is not None and norm > 0 else lr
        return -scale * u
