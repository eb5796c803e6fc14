r"""``nn.Embedding`` (``padding_idx``, ``sparse``); refused: ``scale_grad_by_freq``, ``max_norm``.

y[..., :] = W[i[...], :] for indices i of any shape. Sample n owns the positions of the
axes its batch axis maps to it (any axis: batch first, sequence first, merged); with
i_nt its indices there and b_nt (d) its output gradients,

.. math:: \nabla_W l_n = \sum_t e_{i_{nt}}\, b_{nt}^\top

(zero rows at ``padding_idx``, whose rows torch never updates: those b_nt are zeroed). Part:
``Outer(u=i_n, v=b_n, grad="v")`` (indices as one-hot rows). K-FAC: A = diag(counts) / c on
the rows, B from b_n on the columns. ``sparse=True`` only changes how autograd stores the
gradient, not its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..axes import BatchAxis, batch_first
from .linear import positions
from .parts import Grad, Outer
from .registry import Captured, LayerKind, describe, register

__all__ = ["Embedding", "refuse_lookup"]


def refuse_lookup(module: nn.Module) -> str | None:
    """The refusals an embedding table and an embedding bag share."""
    if module.scale_grad_by_freq:
        return (f"{describe(module)}: scale_grad_by_freq divides each row's gradient by how "
                "often the whole batch looked it up, so a sample's gradient depends on the "
                "other samples' indices")
    if module.max_norm is not None:
        return (f"{describe(module)}: max_norm renormalises the looked-up rows of the weight "
                "in place during the forward pass, so the weight (and every later sample's "
                "gradient) depends on the batch it was called on")
    return None


@register(nn.Embedding)
class Embedding(LayerKind):
    """Per-sample factors of ``nn.Embedding``: indices i_n (T,) and output gradients b_n."""

    def refuse(self, module: nn.Module, mode: str) -> str | None:
        return refuse_lookup(module)

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        if axis.axis >= args[0].ndim:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of indices of "
                    f"shape {tuple(args[0].shape)}")
        return None

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        index = batch_first(args[0].detach(), axis, num_samples).reshape(num_samples, -1)
        return Captured(axis, num_samples, index.long())

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        if not self.wanted(module, wanted):
            return {}
        b = positions(grads["output"], inputs.axis, inputs.num_samples)
        if module.padding_idx is not None:
            b = b * (inputs.x != module.padding_idx)[..., None]
        return {"weight": (Outer(inputs.x, b, 0, "v"),)}
