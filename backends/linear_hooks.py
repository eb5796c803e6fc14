r"""Per-sample gradients of ``nn.Linear`` parameters by hooks, one batched backward pass:
the "hooks" route of :meth:`backends.TorchProvider.vjp`.

When every trainable parameter is the weight or bias of an ``nn.Linear`` (LoRA A/B
matrices, an MLP), per-sample vector-Jacobian products can be taken in one batched backward
pass, as the paper's code does: a forward hook keeps each layer's input ``a_n`` (N, ..., in),
a hook on its output receives ``g_n`` (N, ..., out) and the per-sample weight gradient is

.. math:: \nabla_W l_n = \sum_{\text{positions}} g_n a_n^\top, \qquad
          \nabla_b l_n = \sum_{\text{positions}} g_n .

The hooks exist only during that pass (module hooks and ``torch.func`` transforms do not
mix). Each pass also checks that the per-sample gradients sum to the ordinary gradient of
the same backward pass, which catches weights used outside their layer's forward (tied
weights) or layers that mix samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .torch_provider import TorchProvider

#: ``{linear: {"weight"|"bias": (offset, size)}}``: where each layer's parameters sit in theta
Slots = dict[nn.Module, dict[str, tuple[int, int]]]


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def find_linear_slots(
    model: nn.Module, param_names: tuple[str, ...], sizes: tuple[int, ...]
) -> Slots | None:
    """``{linear: {"weight"|"bias": (offset, size)}}``, None if a parameter is elsewhere."""
    slots: Slots = {}
    offset = 0
    for name, size in zip(param_names, sizes, strict=True):
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        if not _is_plain_linear(module) or attr not in ("weight", "bias"):
            return None
        slots.setdefault(module, {})[attr] = (offset, size)
        offset += size
    return slots


def vjp_hooks(provider: TorchProvider, cotangents: torch.Tensor) -> torch.Tensor | None:
    """One backward pass per chunk; hooks collect the per-sample Linear gradients (N, P).

    Returns None when "auto" chose hooks and the sum check failed.
    """
    out = []
    for rows in provider._slices():
        grads, total, failures = _hooks_pass(provider, provider._batch(rows), cotangents[rows])
        mismatch = (grads.sum(0) - total).norm()
        scale = grads.norm(dim=1).sum() + total.norm()
        tolerance = math.sqrt(torch.finfo(provider.dtype).eps) * scale
        if failures or not mismatch <= tolerance:  # written so that a NaN mismatch fails
            if provider._auto:
                return None
            raise RuntimeError(
                "per_sample_method='hooks': the per-sample gradients from the nn.Linear "
                "hooks do not add up to the batch gradient (a trainable weight is used "
                "outside its layer's forward, or a layer mixes samples"
                + (f"; {failures[0]}" if failures else "")
                + "); use per_sample_method='vmap'"
            )
        out.append(grads)
    return out[0] if len(out) == 1 else torch.cat(out)


def _hooks_pass(
    provider: TorchProvider, batch: Mapping[str, torch.Tensor], cotangents: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Per-sample gradients (n, P) from hooks, the batch gradient (P,), and failures."""
    if provider._pending is not None:  # the forward the provider's logits came from
        state, provider._pending = provider._pending, None
    else:
        state = hooks_forward(provider, batch)
    z, theta, grads, failures = state
    (total,) = torch.autograd.grad(z, theta, grad_outputs=cotangents)
    return grads, total, failures


def hooks_forward(
    provider: TorchProvider, batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """The forward of a hooks pass: logits with their graph, theta, the G buffer, failures."""
    slots_of = provider._linear_slots
    assert slots_of is not None
    n = next(iter(batch.values())).shape[0]
    grads = torch.zeros(n, provider.num_params, dtype=provider.dtype, device=provider.device)
    failures: list[str] = []

    def forward_hook(module: nn.Module, args: tuple, output: Any) -> None:
        a = args[0]
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if a.ndim < 2 or a.shape[0] != n:
            failures.append(f"an nn.Linear got an input of shape {tuple(a.shape)}")
            return
        a = a.detach().reshape(n, -1, a.shape[-1])
        slots = slots_of[module]

        def backward_hook(g: torch.Tensor) -> None:
            # per-sample dW = sum over positions of outer(output grad, input)
            g = g.reshape(n, -1, g.shape[-1])
            if "weight" in slots:
                off, size = slots["weight"]
                grads[:, off:off + size] += torch.bmm(g.transpose(1, 2), a).reshape(n, -1)
            if "bias" in slots:
                off, size = slots["bias"]
                grads[:, off:off + size] += g.sum(dim=1)

        output.register_hook(backward_hook)

    handles = [m.register_forward_hook(forward_hook) for m in slots_of]
    try:
        with provider._eval_mode(), torch.enable_grad():
            theta = provider._theta.detach().requires_grad_(True)
            z = provider._batch_logits(theta, batch)
    finally:
        for h in handles:
            h.remove()
    return z, theta, grads, failures
