"""ngdref's losses and models as the torch peer libraries (curvlinops, BackPACK) take them.

Every torch loss is built with ``reduction="sum"`` (ngdref's sum convention);
``torch.nn.MSELoss`` is ``sum ||z - y||^2``, twice ngdref's ``0.5 ||z - y||^2``,
which ``TorchLoss.scale`` records; a sequence loss's logits (N, T*V) are
viewed as (N, V, T) for ``CrossEntropyLoss(ignore_index=...)``. See the
docstring of :mod:`validation.oracles.peers`. torch is imported only when a function
here runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ngdref

__all__ = [
    "TorchLoss", "batch_size", "call", "logits_of", "output_model", "torch_loss", "trainable",
]


@dataclass(frozen=True)
class TorchLoss:
    """A torch loss module standing for an ngdref loss."""

    module: Any  # a torch.nn loss with reduction="sum"
    to_loss_input: Callable[[Any], Any]  # logits -> what the loss module takes
    scale: float  # torch loss = scale * ngdref loss (gradients x scale, GGN x scale, EF x scale^2)


def _identity(z: Any) -> Any:
    return z


def torch_loss(loss: ngdref.LogitLoss) -> TorchLoss:
    """The sum-reduced torch loss of ``loss``; TypeError for a loss torch has none of."""
    from torch import nn

    if isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        vocab = loss.vocab_size

        def to_nvt(z: Any) -> Any:
            return z.reshape(z.shape[0], -1, vocab).transpose(1, 2)

        return TorchLoss(
            nn.CrossEntropyLoss(reduction="sum", ignore_index=loss.ignore_index),
            to_nvt, 1.0,
        )
    if isinstance(loss, ngdref.SoftmaxCrossEntropy):
        return TorchLoss(nn.CrossEntropyLoss(reduction="sum"), _identity, 1.0)
    if isinstance(loss, ngdref.SigmoidBinaryCrossEntropy):
        return TorchLoss(nn.BCEWithLogitsLoss(reduction="sum"), _identity, 1.0)
    if isinstance(loss, ngdref.SquaredError):
        return TorchLoss(nn.MSELoss(reduction="sum"), _identity, 2.0)
    raise TypeError(f"no torch loss for {type(loss).__name__}")


def call(module: Any, inputs: Any) -> Any:
    """``module(**inputs)`` for a mapping of keyword inputs, else ``module(inputs)``."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(inputs)


def logits_of(module: Any, inputs: Any) -> Any:
    """The logits tensor of ``module`` on ``inputs`` (a Hugging Face output's ``.logits``)."""
    from backends.torch.provider import default_output_fn

    return default_output_fn(call(module, inputs))


def output_model(module: Any, to_loss_input: Callable[[Any], Any]) -> Any:
    """An ``nn.Module`` mapping the inputs to what the torch loss takes (same parameters)."""
    from torch import nn

    class OutputModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = module

        def forward(self, inputs: Any) -> Any:
            return to_loss_input(logits_of(self.net, inputs))

    return OutputModel().eval()


def trainable(module: Any) -> list[Any]:
    """The parameters of ``module`` that require gradients, in ``parameters()`` order."""
    return [p for p in module.parameters() if p.requires_grad]


def batch_size(inputs: Any) -> int:
    """N of a batch: the leading dimension of the inputs (of the first tensor of a mapping)."""
    if isinstance(inputs, Mapping):
        return int(next(v for v in inputs.values() if hasattr(v, "shape")).shape[0])
    return int(inputs.shape[0])
