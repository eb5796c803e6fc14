"""What every oracle comparison shares: its row, the model on a batch, and ngdref's side.

:class:`OracleCheck` is one row of the "oracles" section of ``python -m
validation``; :class:`OracleSetup` is a model on one batch as the peer
libraries need it, with ngdref's reference provider; the functions here
compute the ngdref side of each comparison (F V, the per-token gradients of a
sequence loss) from that provider. Conventions and tolerances: the docstring
of :mod:`validation.oracles.peers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

import ngdref
from backends.arrays.adapters import from_numpy, to_numpy
from validation.independent.references import Verdict, library_of

__all__ = [
    "NUM_VECTORS",
    "TOLERANCES",
    "OracleCheck",
    "OracleSetup",
    "ngdref_fisher_products",
    "per_token_grads",
    "random_vectors",
]

#: relative tolerance per float32_internals; see the docstring of validation.oracles.peers
TOLERANCES = {False: 1e-10, True: 1e-5}
#: how many random vectors V (P, NUM_VECTORS) every product is compared on
NUM_VECTORS = 3


@dataclass
class OracleCheck(Verdict):
    """One oracle quantity against ngdref's on one problem."""

    oracle: str
    quantity: str
    difference: float
    tolerance: float
    skipped: str = ""
    note: str = ""
    error: str = ""


@dataclass
class OracleSetup:
    """A model on one batch as the oracles need it, with ngdref's reference provider.

    Attributes
    ----------
    module : torch.nn.Module
        float64, eval mode; its trainable parameters (``named_parameters()``
        order) are theta.
    inputs : torch.Tensor or dict
        What ``module`` gets (positionally, or as keywords).
    targets : torch.Tensor
        Torch targets of the batch (class ids, token ids with -100, or reals).
    loss : ngdref.LogitLoss
    provider : ngdref.JacobianProvider
        The reference provider (any namespace); its Fisher-vector products and
        VJPs are the ngdref side of every comparison.
    provider_targets : array
        ``targets`` in the provider's namespace.
    per_sample_grads : numpy.ndarray, shape (N, P)
        The reference per-sample gradients.
    backpack : bool
        BackPACK supports every module of ``module``.
    float32_internals : bool
        The model computes parts of its forward in float32.
    """

    module: Any
    inputs: Any
    targets: Any
    loss: ngdref.LogitLoss
    provider: Any
    provider_targets: Any
    per_sample_grads: np.ndarray
    backpack: bool
    float32_internals: bool = False

    @property
    def sequence(self) -> bool:
        return isinstance(self.loss, ngdref.SequenceSoftmaxCrossEntropy)

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.float32_internals]


def random_vectors(num_params: int, seed: int = 0) -> np.ndarray:
    """V, standard normal of shape (P, NUM_VECTORS): what every product is applied to."""
    return np.random.default_rng(seed).standard_normal((num_params, NUM_VECTORS))


def _in_provider(setup: OracleSetup, array: np.ndarray) -> Any:
    """A float64 host array moved to the reference provider's array library."""
    return from_numpy(array, library_of(setup.provider.logits()), dtype="float64")


def ngdref_fisher_products(
    setup: OracleSetup, vectors: np.ndarray, targets: Any = None
) -> np.ndarray:
    """F V by :func:`ngdref.fisher_vp` on the reference provider; (P, K).

    ``targets`` (provider namespace) default to the setup's; they matter only
    through a sequence loss's ignore mask.
    """
    targets = setup.provider_targets if targets is None else targets
    fvp = ngdref.fisher_vp(setup.provider, setup.loss, targets)
    columns = [to_numpy(fvp(_in_provider(setup, vectors[:, k]))) for k in range(vectors.shape[1])]
    return np.stack(columns, axis=1)


def per_token_grads(setup: OracleSetup) -> np.ndarray:
    """Rows g_nt = J_nt^T e_nt, the gradient of token t's loss of sample n; (N*T, P).

    One provider VJP per label position t, with the logit gradient e of
    :class:`ngdref.SequenceSoftmaxCrossEntropy` kept at position t only
    (ignored positions have e = 0, so their rows are zero).
    """
    loss = setup.loss
    if not isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        raise TypeError(f"per-token gradients need a sequence loss, got {type(loss).__name__}")
    logits = setup.provider.logits()
    e = loss.grad(logits, setup.provider_targets)
    vocab = loss.vocab_size
    positions = logits.shape[1] // vocab
    columns = np.arange(logits.shape[1]) // vocab
    rows = []
    for t in range(positions):
        keep = _in_provider(setup, (columns == t).astype(np.float64))
        rows.append(to_numpy(setup.provider.vjp(e * keep[None, :])))
    return np.concatenate(rows, axis=0)
