r"""``nn.ConvTranspose1d/2d/3d``: any stride, padding, output padding (or ``output_size``),
dilation and groups.

A transposed convolution scatters input position p into the output positions
p s + k dil - pad: y[c_o, p s + k dil - pad] += x[c_i, p] W[c_i, c_o, k]. Its weight gradient
is therefore a convolution weight gradient with the roles swapped: with the output
gradient zero-padded by ``pad`` in front (and cropped or padded behind to the uncropped
length (I - 1) s + dil (k - 1) + 1, which takes care of ``output_padding``), its
(C_out, k) window at stride s and dilation dil starting at p s is the patch c_{np} of input
position p, and for group j

.. math:: \nabla_{W_j} l_n = \sum_p x_{npj}\, c_{npj}^\top, \qquad
          \nabla_b l_n = \textstyle\sum_t b_{nt}

with x_{npj} (C_in / G) the inputs and W_j (C_in / G, C_out k / G) the rows of group j of
the weight (C_in, C_out / G, k) flattened row-major: contiguous. Parts: one
``Outer(u=x, v=c, grad="v")`` per group (the patches carry the loss's gradient, so K-FAC's B
comes from them and A from the inputs); the bias ``Outer(u=b_n, v=None)``. Refused: samples
on the channel or a spatial axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..axes import BatchAxis
from .convolution import channels_last, group_parts, unfold
from .linear import positions
from .parts import Grad, Outer
from .registry import Captured, LayerKind, describe, register

__all__ = ["TransposedConvolution"]


@register(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class TransposedConvolution(LayerKind):
    """Per-sample factors of an N-d transposed convolution: inputs x_n (T_in, C_in / G) and
    output-gradient patches c_n (T_in, C_out k / G), per group; T_in = input positions."""

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        x, d = args[0], len(module.kernel_size)
        if x.ndim != d + 2:
            return (f"{describe(module)}: an unbatched input of shape {tuple(x.shape)}; its "
                    "samples could only lie on the channel or a spatial axis, which it mixes")
        if axis.axis != 0:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of an input of "
                    f"shape {tuple(x.shape)}, a channel or spatial axis that the kernel mixes")
        return None

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        x = args[0].detach()
        return Captured(axis, num_samples, (positions(channels_last(x), axis, num_samples),
                                            tuple(x.shape[2:])))

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        x, sizes = inputs.x
        g = grads["output"]
        out: dict[str, Grad] = {}
        for a in self.wanted(module, wanted):
            if a == "bias":
                out[a] = (Outer(positions(channels_last(g), inputs.axis, inputs.num_samples),
                                None),)
                continue
            pads = []
            for i, (k, s, dl, p) in enumerate(zip(module.kernel_size, module.stride,
                                                  module.dilation, module.padding, strict=True)):
                full = (sizes[i] - 1) * s + dl * (k - 1) + 1
                pads.append((p, full - p - g.shape[2 + i]))
            patches = unfold(g, module.kernel_size, module.dilation, module.stride, pads)
            c = positions(patches, inputs.axis, inputs.num_samples)
            out[a] = group_parts(x, c, module.groups, "v")
        return out
