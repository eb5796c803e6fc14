r"""``nn.EmbeddingBag``: modes sum, mean (per-position factors) and max (materialised rows).

Bag j reduces the rows of its positions p: sum_p w_p W[i_p] (``mode="sum"``, w_p the
``per_sample_weights`` or 1) or the mean over its non-padding positions (w_p = 1 / size of bag j);
positions at ``padding_idx`` have w_p = 0. So with b_j (d) the output gradient of bag j,

.. math:: \nabla_W l_n = \sum_{p \in \text{bags of } n} e_{i_p}\, (w_p\, b_{j(p)})^\top

an embedding lookup whose output gradient at position p is w_p b_{j(p)}: the weights fold
into the gradient side, and the part is ``Outer(u=i_n, v=(w_p b_{j(p)})_p, grad="v")``
(padded with w = 0 where samples own different numbers of positions). ``mode="max"``
passes b_{jk} to the row that won dimension k of bag j (the same ``max_indices`` torch's
backward uses): g_n[i*_{jk}, k] += b_{jk}, materialised as :class:`~.parts.Rows`.
K-FAC: the diagonal of the rows (the layer's inputs are bag vectors sum_p w_p e_{i_p}, not
the positions of the factor form, whose one-hot counts would not be its A).

The samples are given over the bags (the output's axis 0, merged or not): a 2-D input
(B, L) holds one bag per row, so that is its axis 0; for a 1-D input with ``offsets`` the
engine must pass the bags' axis, since nothing in the flat indices says where a sample
ends (bags as samples, or several bags per sample). Refused: samples along the positions of
a bag (a bag would mix samples), ``scale_grad_by_freq`` and ``max_norm``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..axes import BatchAxis, batch_first
from .embedding import refuse_lookup
from .parts import Grad, Outer, Rows
from .registry import Captured, LayerKind, describe, register

__all__ = ["EmbeddingBag"]

_SIGNATURE = inspect.signature(nn.EmbeddingBag.forward)
_MODES = {"sum": 0, "mean": 1, "max": 2}


def _flat(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> tuple:
    """(indices (M,), bag of each position (M,), weight of each position (M,), bags B)."""
    call = _SIGNATURE.bind(module, *args, **kwargs).arguments
    index, offsets, weights = call["input"], call.get("offsets"), call.get("per_sample_weights")
    if index.ndim == 2:
        bags, length = index.shape
        bag = torch.arange(bags, device=index.device).repeat_interleave(length)
        index = index.reshape(-1)
        weights = None if weights is None else weights.reshape(-1)
    else:
        starts = offsets[:-1] if module.include_last_offset else offsets
        bags = starts.numel()
        where = torch.arange(index.numel(), device=index.device)
        bag = torch.searchsorted(starts.contiguous(), where, right=True) - 1
    inside = bag >= 0
    if module.include_last_offset and index.ndim == 1:
        inside &= torch.arange(index.numel(), device=index.device) < offsets[-1]
    keep = inside if module.padding_idx is None else inside & (index != module.padding_idx)
    w = keep.to(module.weight.dtype)
    if weights is not None:
        w = w * weights.detach()
    bag = bag.clamp(min=0)
    if module.mode == "mean":
        size = torch.zeros(bags, dtype=w.dtype, device=w.device)
        size.index_add_(0, bag, keep.to(w.dtype))
        w = w / size.clamp(min=1)[bag]
    return index.long(), bag, w, bags


def _by_sample(values: list[torch.Tensor], sample: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Each (M,) array as (N, T): sample n's entries in order, zero-padded to the longest."""
    counts = torch.bincount(sample, minlength=n)
    t = int(counts.max()) if sample.numel() else 0
    order = torch.argsort(sample, stable=True)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(sample.numel(), device=sample.device) - first[sample[order]]
    out = []
    for v in values:
        padded = torch.zeros(n, max(t, 1), dtype=v.dtype, device=v.device)
        padded[sample[order], rank] = v[order]
        out.append(padded)
    return out


@register(nn.EmbeddingBag)
class EmbeddingBag(LayerKind):
    """Per-sample factors of ``nn.EmbeddingBag``: the indices of sample n's bags and their
    bags' output gradients scaled by each position's weight (mode max: rows)."""

    def refuse(self, module: nn.Module, mode: str) -> str | None:
        return refuse_lookup(module)

    def first_input(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    output: Any = None) -> torch.Tensor | None:
        """The indices of a 2-D call; the output (its bags) of a 1-D call with offsets."""
        index = _SIGNATURE.bind(module, *args, **kwargs).arguments["input"]
        if index.ndim == 2:
            return index
        return output if isinstance(output, torch.Tensor) else None

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        if axis.axis != 0:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of indices of "
                    f"shape {tuple(args[0].shape)}, along the positions that a bag reduces")
        return None

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        index, bag, w, bags = _flat(module, args, kwargs)
        owner = batch_first(torch.arange(bags, device=bag.device), axis, num_samples)
        sample = torch.empty(bags, dtype=torch.long, device=bag.device)
        sample[owner.reshape(num_samples, -1)] = torch.arange(
            num_samples, device=bag.device)[:, None]
        if module.mode == "max":
            return Captured(axis, num_samples, (sample, self._winners(module, args, kwargs)))
        return Captured(axis, num_samples, tuple(_by_sample([index, bag, w], sample[bag],
                                                            num_samples)))

    def _winners(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The rows that won each (bag, dimension) of ``mode="max"``, (B, d); -1 for a bag
        with no non-padding position (torch reports row 0 there and passes it nothing)."""
        call = _SIGNATURE.bind(module, *args, **kwargs).arguments
        index, offsets = call["input"], call.get("offsets")
        if index.ndim == 2:
            offsets = torch.arange(0, index.numel(), index.shape[1], device=index.device)
            index = index.reshape(-1)
        with torch.no_grad():
            found = torch.embedding_bag(module.weight, index, offsets, False, _MODES["max"],
                                        False, None, module.include_last_offset,
                                        module.padding_idx)
        return found[3].masked_fill(found[2][:, None] == 0, -1)

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        if not self.wanted(module, wanted):
            return {}
        g = grads["output"]
        n = inputs.num_samples
        if module.mode == "max":
            sample, winners = inputs.x
            vocab, d = module.weight.shape
            valid = winners >= 0
            column = torch.arange(d, device=g.device).expand_as(winners)
            where = (sample[:, None] * vocab + winners.clamp(min=0)) * d + column
            rows = torch.zeros(n * vocab * d, dtype=g.dtype, device=g.device)
            rows.index_add_(0, where[valid], g[valid])
            return {"weight": (Rows(rows.view(n, -1)),)}
        index, bag, w = inputs.x
        b = g[bag] * w[..., None].to(g.dtype)
        return {"weight": (Outer(index, b, 0, "v", kronecker=False),)}
