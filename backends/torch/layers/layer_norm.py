r"""``nn.LayerNorm`` and ``nn.RMSNorm``: an elementwise affine map of the normalised input.

y = xhat (.) gamma + beta over the ``normalized_shape`` (D entries) trailing axes, where
xhat normalises each position on its own (mean and variance, or root mean square, over
those axes): no statistic crosses positions or samples. With xhat_nt and b_nt (D) at the
positions t of sample n (every leading axis its batch axis maps to it),

.. math:: \nabla_\gamma l_n = \sum_t b_{nt} \odot \hat x_{nt}, \qquad
          \nabla_\beta l_n = \textstyle\sum_t b_{nt}

materialised as :class:`~.parts.Rows` (N, D): forming them costs N T D, what any factor
form would cost per product, so there is no ghost form to choose. K-FAC: the diagonal
sum_n w_n g_n^2 of these rows. Refused: samples on a normalised axis.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..axes import BatchAxis
from .linear import positions
from .parts import Grad, Rows
from .registry import Captured, LayerKind, describe, register

__all__ = ["LastAxesNorm", "scale_rows"]


def scale_rows(b: torch.Tensor, xhat: torch.Tensor, attrs: tuple[str, ...]) -> dict[str, Grad]:
    """Rows of a scale ("weight": sum_t b (.) xhat) and a shift ("bias": sum_t b), b and
    xhat (N, T, D)."""
    out: dict[str, Grad] = {}
    for a in attrs:
        out[a] = (Rows((b * xhat).sum(dim=1) if a == "weight" else b.sum(dim=1)),)
    return out


@register(nn.LayerNorm, nn.RMSNorm)
class LastAxesNorm(LayerKind):
    """Per-sample rows of the scale and shift of a norm over the trailing axes."""

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        x, k = args[0], len(module.normalized_shape)
        if axis.axis >= x.ndim - k:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of an input of "
                    f"shape {tuple(x.shape)}, one of the {k} normalised axes")
        return None

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        x, shape = args[0].detach(), tuple(module.normalized_shape)
        with torch.no_grad():
            if isinstance(module, nn.LayerNorm):
                xhat = F.layer_norm(x, shape, None, None, module.eps)
            else:
                xhat = F.rms_norm(x, shape, None, module.eps)
        flat = xhat.reshape(*x.shape[:x.ndim - len(shape)], -1)
        return Captured(axis, num_samples, positions(flat, axis, num_samples))

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        g = grads["output"]
        flat = g.reshape(*g.shape[:g.ndim - len(module.normalized_shape)], -1)
        b = positions(flat, inputs.axis, inputs.num_samples)
        return scale_rows(b, inputs.x, self.wanted(module, wanted))
