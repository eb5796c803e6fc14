"""One zoo case: a tiny float64 model ending in logits (N, C), its batch and its loss.

The batch has N = 4 samples, and the sizes collide on purpose: sequence length T == N, width
d == N, classes C == N, channels == N, so that an axis found by its length is found wrongly.
The helpers below build the pieces of a case lazily, after the case has seeded torch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ngdref

N = 4
IGNORE = -100
VOCAB = 6
#: limits of torch.func on a case (checked by tests/backends/torch/zoo/test_coverage.py)
NO_VMAP, NO_FORWARD_AD = "torch.func.vmap unsupported", "forward-mode AD unsupported"
LIMIT_VMAP, LIMIT_FORWARD_AD = frozenset({NO_VMAP}), frozenset({NO_FORWARD_AD})
LIMIT_BOTH = LIMIT_VMAP | LIMIT_FORWARD_AD


@dataclass(frozen=True)
class Case:
    """One zoo model on one batch.

    Attributes
    ----------
    name : str
    model : callable () -> nn.Module
        Built after seeding, converted to float64 and put in eval mode (train mode if
        ``training``).
    inputs : callable () -> tensor or dict of tensors
        One batch, samples first (what ``TorchProvider`` and the optimisers' closures take).
    classes : int
        C, or the vocabulary V of a sequence loss.
    positions : int or None
        T of a sequence loss (``ngdref.SequenceSoftmaxCrossEntropy``, logits (N, T V)); None:
        ``ngdref.SoftmaxCrossEntropy`` on (N, C).
    covers : tuple of str
        The ``torch.nn`` classes (and options) the case is about; a refusal must name one of
        them or a trainable parameter.
    training : bool
        Build the model in train mode.
    refuse : str or None
        Why no route may give per-sample rows (no per-sample meaning); None: the reference
        loop is the expected value.
    limits : frozenset of str
        What torch.func cannot do on the model (:data:`NO_VMAP`, :data:`NO_FORWARD_AD`).
    prepare : callable (nn.Module) -> None, optional
        Changes after the float64 conversion (running statistics, large embedding rows).
    mode : {"eval", "train"}
        The mode policy a route is asked to run the case under ("train": the user asks for
        the train-mode semantics, e.g. batch statistics, which must be refused by name).
    """

    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    classes: int
    covers: tuple[str, ...]
    positions: int | None = None
    training: bool = False
    refuse: str | None = None
    limits: frozenset[str] = frozenset()
    prepare: Callable[[nn.Module], None] | None = None
    mode: str = "eval"

    @property
    def seed(self) -> int:
        return zlib.crc32(self.name.encode()) & 0xFFFF

    def loss(self) -> ngdref.LogitLoss:
        if self.positions is None:
            return ngdref.SoftmaxCrossEntropy()
        return ngdref.SequenceSoftmaxCrossEntropy(self.classes, ignore_index=IGNORE)

    def build(self) -> tuple[nn.Module, Any, torch.Tensor]:
        """(model, inputs, targets), the same every call (seeded from the name)."""
        torch.manual_seed(self.seed)
        model = self.model().double()
        model.train(self.training)
        if self.prepare is not None:
            with torch.no_grad():
                self.prepare(model)
        inputs = self.inputs()
        if self.positions is None:
            targets = torch.randint(0, self.classes, (N,))
        else:
            targets = torch.randint(0, self.classes, (N, self.positions))
            targets[0, -1], targets[2, 1:] = IGNORE, IGNORE  # padded label positions
        return model, inputs, targets


# ---- inputs -------------------------------------------------------------------------------
def x(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(N, *shape, dtype=torch.float64)


def tokens(t: int, *, padded: bool = False) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        ids = torch.randint(1 if padded else 0, VOCAB, (N, t))
        if padded:
            ids[0, -2:], ids[3, -1] = 0, 0
        return ids
    return make


def keywords(**makers: Callable[[], torch.Tensor]) -> Callable[[], dict[str, torch.Tensor]]:
    return lambda: {key: make() for key, make in makers.items()}


def constant(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value.clone()


def seq(*layers: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """An nn.Sequential of layers built when the case is built (after seeding)."""
    return lambda: nn.Sequential(*(make() for make in layers))


def lazy(module: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> Callable[[], nn.Module]:
    """``module(*args, **kwargs)``, called when the case is built."""
    return lambda: module(*args, **kwargs)


def running_stats(model: nn.Module) -> None:
    """Running statistics away from (0, 1), so that using them is visible."""
    for m in model.modules():
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)


def long_rows(model: nn.Module) -> None:
    """Embedding rows longer than max_norm, so that the forward pass renormalises them."""
    model[0].weight.mul_(3.0)


SEQ_MASK = torch.tensor([[False] * 4, [False, False, False, True], [False] * 4,
                         [False, False, True, True]])
LENGTHS = torch.tensor([4, 2, 3, 1])
MHA = nn.MultiheadAttention


