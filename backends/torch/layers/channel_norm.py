r"""Per-channel affine norms: ``nn.GroupNorm``, ``nn.InstanceNormNd``, ``nn.BatchNormNd``
(and ``nn.SyncBatchNorm``, which in eval mode is a batch norm on running statistics).

y = xhat (.) gamma_c + beta_c per channel c of an input ``(B, C, *spatial)``, with xhat the
normalised input. Exact only where xhat of a sample depends on that sample alone:

==================  =============================================================  =========
module              xhat                                                           per sample
==================  =============================================================  =========
GroupNorm           each (image, group) over its channels and positions            always
InstanceNorm        each (image, channel) over its positions when training or      always
                    without running statistics, else the running statistics
BatchNorm           the running statistics (eval mode, ``track_running_stats``)    eval only
==================  =============================================================  =========

(InstanceNorm in train mode with ``track_running_stats`` normalises by the instance's own
statistics and only *updates* the running ones from the batch: the output, and so the
gradient, of a sample stays its own.) With xhat_nt and b_nt (C) at the positions t of
sample n (the spatial positions of the images its batch axis maps to it),

.. math:: \nabla_\gamma l_n = \sum_t b_{nt} \odot \hat x_{nt}, \qquad
          \nabla_\beta l_n = \textstyle\sum_t b_{nt}

as :class:`~.parts.Rows` (N, C). K-FAC: their diagonal. Refused: samples on the channel or a
spatial axis; BatchNorm in train mode or without running statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..axes import BatchAxis
from .convolution import channels_last
from .layer_norm import scale_rows
from .linear import positions
from .parts import Grad
from .registry import Captured, LayerKind, describe, register

__all__ = ["BatchNorm", "GroupNorm", "InstanceNorm"]


def _running(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(x - running mean) / sqrt(running var + eps), per channel (axis 1)."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - module.running_mean.view(shape)) / torch.sqrt(
        module.running_var.view(shape) + module.eps)


class _ChannelNorm(LayerKind):
    #: input dimensions of a batched call per module type (absent: every call is batched)
    batched: ClassVar[dict[type[nn.Module], int]] = {}

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        x = args[0]
        wanted = next((d for t, d in self.batched.items() if isinstance(module, t)), x.ndim)
        if x.ndim != wanted or x.ndim < 2:
            return (f"{describe(module)}: an unbatched input of shape {tuple(x.shape)}; its "
                    "samples could only lie on the channel or a spatial axis")
        if axis.axis != 0:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of an input of "
                    f"shape {tuple(x.shape)}, a channel or spatial axis")
        return None

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        with torch.no_grad():
            xhat = self.normalise(module, args[0].detach())
        return Captured(axis, num_samples, positions(channels_last(xhat), axis, num_samples))

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        b = positions(channels_last(grads["output"]), inputs.axis, inputs.num_samples)
        return scale_rows(b, inputs.x, self.wanted(module, wanted))


@register(nn.GroupNorm)
class GroupNorm(_ChannelNorm):
    """Per-sample rows of GroupNorm's per-channel scale and shift."""

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNorm(_ChannelNorm):
    """Per-sample rows of InstanceNorm's per-channel scale and shift (``affine=True``)."""

    batched: ClassVar[dict[type[nn.Module], int]] = {
        nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if module.training or not module.track_running_stats:
            return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
        return _running(module, x)


@register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
class BatchNorm(_ChannelNorm):
    """Per-sample rows of BatchNorm's scale and shift, in eval mode on running statistics."""

    def refuse(self, module: nn.Module, mode: str) -> str | None:
        if not module.track_running_stats:
            return (f"{describe(module)}: without running statistics it normalises by the "
                    "statistics of the whole batch in every mode, coupling the samples")
        if mode == "train":
            return (f"{describe(module)}: in train mode it normalises by the statistics of "
                    "the whole batch, coupling the samples (run it in eval mode)")
        return None

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        if module.training:
            return self.refuse(module, "train")
        return super().refuse_call(module, args, kwargs, axis)

    def normalise(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _running(module, x)
