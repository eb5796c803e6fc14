r"""``nn.Conv1d/2d/3d``: any stride, padding ("same", "valid" too), padding mode, dilation, groups.

A convolution is a linear map of its input patches. With the input padded as the layer
pads it (zeros, reflect, replicate or circular; ``padding="same"`` puts
floor(total / 2) in front, as torch does), the patch of output position t is the
(C_in, k_1, ..., k_d) window at stride and dilation; for group j (C_in / G input and
C_out / G output channels) a_{n t j} (C_in k / G) is its slice of the patch, b_{n t j}
(C_out / G) its output gradients, and

.. math:: \nabla_{W_j} l_n = \sum_t b_{ntj}\, a_{ntj}^\top, \qquad
          \nabla_b l_n = \textstyle\sum_t b_{nt}

where W_j (C_out / G, C_in k / G) are the rows of group j of the weight flattened
row-major to (C_out, C_in k / G): a contiguous slice. Parts: one ``Outer`` per group
(start j C_out / G); the bias ``Outer(u=b_n, v=None)``. Sample n's positions are the output
positions of the images its batch axis maps to it (axis 0, merged or not). K-FAC: per group,
A from the patches, B from the output gradients (for groups=1 and zero padding the
factors of ``backends/kfac.py``). Refused: samples on the channel or a spatial axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..axes import BatchAxis
from .linear import positions
from .parts import Grad, Outer
from .registry import Captured, LayerKind, describe, register

__all__ = ["Convolution", "channels_last", "unfold"]


def unfold(x: torch.Tensor, kernel: Sequence[int], dilation: Sequence[int],
           stride: Sequence[int], pads: Sequence[tuple[int, int]],
           mode: str = "zeros") -> torch.Tensor:
    """Patches of an N-d convolution, (B, T, C prod(kernel)), columns in (C, k_1, ...) order.

    ``x`` ``(B, C, *spatial)``; ``pads`` (front, back) per spatial axis, negative crops (zeros
    mode only); T = the product of the output sizes, row-major.
    """
    d = len(kernel)
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        x = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
    x = x[(..., *(slice(None, None, dl) for dl in dilation))]
    order = (0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    b, t = x.shape[0], math.prod(x.shape[2:2 + d])
    return x.permute(order).reshape(b, t, -1)


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` -> (B, T, C), T the spatial positions row-major (T = 1 for (B, C))."""
    return t.reshape(t.shape[0], t.shape[1], -1).transpose(1, 2)


def _pads(module: nn.Module) -> list[tuple[int, int]]:
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [dl * (k - 1) for dl, k in zip(module.dilation, module.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def group_parts(u: torch.Tensor, v: torch.Tensor | None, groups: int, grad: str) -> Grad:
    """One ``Outer`` per group: the last axis of u and of v split into ``groups`` blocks."""
    if groups == 1:
        return (Outer(u, v, 0, grad),)
    du, dv = u.shape[-1] // groups, v.shape[-1] // groups
    return tuple(Outer(u[..., j * du:(j + 1) * du], v[..., j * dv:(j + 1) * dv], j * du, grad)
                 for j in range(groups))


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class Convolution(LayerKind):
    """Per-sample factors of an N-d convolution: unfolded input patches a_n (T, C_in k / G)
    and output gradients b_n (T, C_out / G), per group; T = output positions."""

    #: a subclass replacing how the padded input is convolved is not this kind
    inherited = ("forward", "_conv_forward")

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
        patches = unfold(args[0].detach(), module.kernel_size, module.dilation, module.stride,
                         _pads(module), module.padding_mode)
        return Captured(axis, num_samples, positions(patches, axis, num_samples))

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        b = positions(channels_last(grads["output"]), inputs.axis, inputs.num_samples)
        return {a: group_parts(b, inputs.x, module.groups, "u") if a == "weight"
                else (Outer(b, None),) for a in self.wanted(module, wanted)}
