r"""The "hooks" route of :meth:`backends.TorchProvider.vjp`: G (N, P) from one batched backward
pass with ``nn.Linear`` hooks.

When every trainable parameter is the weight or bias of an ``nn.Linear`` (LoRA A/B matrices,
an MLP), per-sample vector-Jacobian products can be taken in one batched backward pass, as the
paper's code does: a layer with input a_n (T, in) and output gradient g_n (T, out) has

.. math:: \nabla_W l_n = \sum_{\text{positions}} g_n a_n^\top, \qquad
          \nabla_b l_n = \sum_{\text{positions}} g_n .

The pass is :class:`backends.torch.per_sample.layer_pass.LayerPass`, the one home of per-sample
hooks (the optimisers' ``per_sample="hooks"`` runs it too); its factors a_n, g_n are materialised
straight into G. It watches the forward pass, so a weight used outside its layer's forward
(tied), a layer's output changed in place, or a call on a tensor that is not per sample (one
computed from constants whose leading axis happens to have length N) is detected rather than
read as per sample. Such a parameter's rows come from ``vmap``: "auto" returns those exact
rows and takes ``vmap`` from then on, "hooks" raises. With ``chunk_size`` each chunk of
samples has a pass of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from torch import nn

from .layer_pass import LayerPass, ModelBatch

__all__ = ["ChunkedModelBatch", "hookable", "vjp_hooks"]


class ChunkedModelBatch(ModelBatch, Protocol):
    """What :func:`vjp_hooks` needs of a provider (e.g. :class:`backends.TorchProvider`): a
    :class:`~.layer_pass.ModelBatch` split into chunks of samples, each of which it can be
    restricted to."""

    def chunks(self) -> Iterator[slice]:
        """The samples of each pass, consecutive slices covering the batch."""
        ...

    def restricted(self, rows: slice) -> ModelBatch:
        """The same model and theta on the samples ``rows`` only (no forward pass)."""
        ...


def hookable(model: nn.Module, param_names: Sequence[str]) -> bool:
    """Whether every named parameter is the weight or bias of an ``nn.Linear`` (exact type)."""
    for name in param_names:
        path, _, attr = name.rpartition(".")
        if type(model.get_submodule(path)) is not nn.Linear or attr not in ("weight", "bias"):
            return False
    return True


def vjp_hooks(
    provider: ChunkedModelBatch, cotangents: torch.Tensor, *, pending: LayerPass | None,
    strict: bool,
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """G (N, P) from one hooked backward pass per chunk, and the parameters vmap had to take.

    ``pending``: the pass whose forward the provider's logits came from, if it is kept; it
    serves the first chunk. Raises ``RuntimeError`` if ``strict`` (``per_sample_method='hooks'``)
    and a parameter needed vmap.
    """
    grads = torch.empty(provider.num_samples, provider.num_params, dtype=provider.dtype,
                        device=provider.device)
    fallbacks: list[str] = []
    for rows in provider.chunks():
        if pending is not None:
            hooked, pending = pending, None
        else:
            hooked = LayerPass(provider.restricted(rows), "ghost")
        found = hooked.rows(cotangents[rows])
        if found.fallbacks and strict:
            raise RuntimeError(
                "per_sample_method='hooks': the nn.Linear hooks cannot account for every "
                f"trainable parameter ({found.fallbacks[0]}); use per_sample_method='vmap'"
            )
        fallbacks += found.fallbacks
        found.materialise(grads[rows])
    return grads, tuple(dict.fromkeys(fallbacks))
