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

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .layer_pass import LayerPass

if TYPE_CHECKING:
    from ..provider import TorchProvider

__all__ = ["hookable", "vjp_hooks"]


def hookable(model: nn.Module, param_names: Sequence[str]) -> bool:
    """Whether every named parameter is the weight or bias of an ``nn.Linear`` (exact type)."""
    for name in param_names:
        path, _, attr = name.rpartition(".")
        if type(model.get_submodule(path)) is not nn.Linear or attr not in ("weight", "bias"):
            return False
    return True


def vjp_hooks(
    provider: TorchProvider, cotangents: torch.Tensor
) -> tuple[torch.Tensor, tuple[str, ...]]:
    """G (N, P) from one hooked backward pass per chunk, and the parameters vmap had to take.

    The provider's pending pass (the forward its logits came from) serves the first chunk.
    Raises ``RuntimeError`` for ``per_sample_method='hooks'`` when a parameter needed vmap.
    """
    grads = torch.empty(provider.num_samples, provider.num_params, dtype=provider.dtype,
                        device=provider.device)
    fallbacks: list[str] = []
    for rows in provider._slices():
        if provider._pending is not None:
            hooked, provider._pending = provider._pending, None
        else:
            hooked = LayerPass(_restricted(provider, rows), "ghost")
        found = hooked.rows(cotangents[rows])
        if found.fallbacks and not provider._auto:
            raise RuntimeError(
                "per_sample_method='hooks': the nn.Linear hooks cannot account for every "
                f"trainable parameter ({found.fallbacks[0]}); use per_sample_method='vmap'"
            )
        fallbacks += found.fallbacks
        found.materialise(grads[rows])
    return grads, tuple(dict.fromkeys(fallbacks))


def _restricted(provider: TorchProvider, rows: slice) -> TorchProvider:
    """The provider on the samples ``rows`` only, unchunked (a shallow copy: no forward)."""
    if rows == slice(0, provider.num_samples):
        return provider
    part = copy.copy(provider)
    part._batched = provider._batch(rows)
    part._n = rows.stop - rows.start
    part._logits = provider._logits[rows]
    part.chunk_size = None
    part._pending = None
    part.layer_pass = None
    return part
