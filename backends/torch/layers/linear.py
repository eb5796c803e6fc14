r"""``nn.Linear`` over any leading axes (and subclasses keeping its forward, peft LoRA's A, B).

y = x W^T + b with x (..., d_in). Sample n owns the positions of the leading axes that its
batch axis maps to it (any leading axis, merged or not: batch first, sequence first, (T N,
d)); a_n (T, d_in) its inputs there, b_n (T, d_out) its output gradients:

.. math:: \nabla_W l_n = b_n^\top a_n, \qquad \nabla_b l_n = \textstyle\sum_t b_{nt}

Parts: weight ``Outer(u=b_n, v=a_n)``, bias ``Outer(u=b_n, v=None)``. K-FAC: A from a_n, B
from b_n (``backends/kfac.py``'s factors of ``nn.Linear``). Refused: samples on the
feature axis (the one the weight contracts).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..axes import BatchAxis, batch_first
from .parts import Grad, Outer
from .registry import Captured, LayerKind, describe, register

__all__ = ["Linear", "positions"]


def positions(t: torch.Tensor, axis: BatchAxis, n: int) -> torch.Tensor:
    """(N, T, d): the last axis kept, every other axis but the samples' merged into T."""
    if axis.axis == 0 and axis.plain and t.shape[0] == n:  # batch first: a view, no move
        return t.reshape(n, -1, t.shape[-1])
    s = batch_first(t, axis, n)
    return s.reshape(n, -1, s.shape[-1])


@register(nn.Linear)
class Linear(LayerKind):
    """Per-sample factors of ``nn.Linear``: inputs a_n (T, d_in), output gradients b_n."""

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        x = args[0]
        if axis.axis >= x.ndim - 1:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of an input of "
                    f"shape {tuple(x.shape)}, the feature axis the weight contracts")
        return None

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        return Captured(axis, num_samples, positions(args[0].detach(), axis, num_samples))

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        b = positions(grads["output"], inputs.axis, inputs.num_samples)
        return {a: (Outer(b, inputs.x if a == "weight" else None),)
                for a in self.wanted(module, wanted)}
