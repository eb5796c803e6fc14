r"""The passes behind :func:`backends.torch.kfac.curvature.kfac_curvature`, on the layer registry.

One forward pass records every call of a module of a registered layer kind
(:mod:`backends.torch.layers`: the same definition of each layer as the per-sample routes),
with the batch axis of its first argument taken from the provenance tracker
(:class:`backends.torch.per_sample.provenance.ProvenanceTracker`: the batch's tensors carry
their samples on axis 0, the model's parameters and buffers are sample free; a dimension of
length N is never evidence, so sequence-first (T, N, d) layers are read correctly even when
T == N). Then one backward pass per logit-space cotangent: the true-label logit gradients
e_n (which also give the batch gradient) and, for KFAC, a sampled label's (or the columns
of the logit Hessian's square root). Each pass gives, per trainable parameter, the parts of
its per-sample gradient in every use (:mod:`backends.torch.layers.parts`).

A parameter is *refused* (its block is then the diagonal of per-sample gradients from
another route, :func:`per_sample_grads`) when a module owning it has no layer kind or its
kind refuses it or one of its calls, when no recorded call uses it, or when its recorded
uses do not add up to the batch gradient autograd gives (a use outside any recorded call,
e.g. the weight of an embedding reused by ``F.linear``): sum_n g_n of the parts must equal
the batch gradient to within the rounding of the two sums, 8 eps m ||x||_F ||y||_F per part
(m terms per entry, :func:`backends.torch.layers.kronecker.batch_gradient`).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ngdref

from ..axes import BATCH_FIRST, BatchAxis
from ..layers.capture import Call, Recorder
from ..layers.kronecker import batch_gradient
from ..layers.parts import Grad
from ..per_sample.loop import loop_vjp_ranges
from ..per_sample.provenance import ProvenanceTracker, held_tensors
from ..provider import TorchProvider

__all__ = ["Passes", "per_sample_grads", "run_passes"]

#: multiple of m eps S allowed between the parts' sum and autograd's batch gradient
GRADIENT_CHECK = 8.0


@dataclass
class Passes:
    """What the forward and backward passes of :func:`kfac_curvature` recorded.

    Attributes
    ----------
    params : dict of str to nn.Parameter
        The trainable parameters, named (and ordered) as ``named_parameters()`` gives them.
    users : dict of nn.Parameter to list of Call
        The recorded calls of each parameter, in the order of its uses.
    refused : dict of str to str
        Parameter name -> why its recorded uses do not give its per-sample gradients.
    grad : torch.Tensor, shape (P,)
        g = sum_n grad l_n.
    loss : float
    logit_grad_sq_norms : torch.Tensor, shape (N,)
    rows : dict of str to list of torch.Tensor
        "true" / "sampled" -> the logit-space cotangents (N, C) of those backward passes.
    uses : dict of str to list of dict
        "true" / "sampled" -> per backward pass, parameter -> the parts of each use.
    leaks : list of str
        Values read into Python from tensors that carry samples (the tracker's leaks).
    """

    params: dict[str, nn.Parameter]
    users: dict[nn.Parameter, list[Call]]
    refused: dict[str, str]
    grad: torch.Tensor
    loss: float
    logit_grad_sq_norms: torch.Tensor
    rows: dict[str, list[torch.Tensor]]
    uses: dict[str, list[dict[nn.Parameter, list[Grad]]]] = field(default_factory=dict)
    leaks: list[str] = field(default_factory=list)


def _sampled_cotangents(
    loss: ngdref.LogitLoss, logits: torch.Tensor, targets: Any, key: int, kfac_fisher: str
) -> list[torch.Tensor]:
    """The logit-space rows of KFAC's backward passes: one draw, or the C columns of Q_n."""
    if kfac_fisher == "mc":
        drawn = loss.sample(logits, key, targets=targets)[0]
        return [loss.grad(logits, drawn)]
    try:
        root = loss.hessian_sqrt(logits, targets)
    except NotImplementedError:
        root = torch.linalg.cholesky(loss.hessian(logits, targets))
    return [root[:, :, c] for c in range(root.shape[-1])]


def _axis_function(tracker: ProvenanceTracker) -> Any:
    def axis(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> BatchAxis | str:
        first = args[0] if args else next(iter(kwargs.values()), None)
        state = tracker.axis_of(first)
        return state if isinstance(state, BatchAxis) else str(getattr(state, "reason", state))

    return axis


def _forward(provider: TorchProvider, params: dict[str, nn.Parameter]
             ) -> tuple[Recorder, torch.Tensor, list[str]]:
    """The recorded forward pass (in the provider's mode): the recorder, the logits (N, C),
    the leaks."""
    model, n = provider.model, provider.num_samples
    batched = provider.batch(slice(None))
    tracker = ProvenanceTracker(n, [(t, BATCH_FIRST) for t in batched.values()],
                                free=held_tensors(model))
    recorder = Recorder(model, _axis_function(tracker), n, mode=provider.mode)
    try:
        with provider.eval_mode(), torch.enable_grad(), recorder.recording(), tracker:
            z = provider.batch_logits(provider.theta, batched, params)
        leaks = list(tracker.leaks)
    finally:
        tracker.clear()
    if not z.requires_grad:
        raise ValueError("no trainable parameter of the model reaches its logits")
    return recorder, z, leaks


def _refusals(model: nn.Module, params: dict[str, nn.Parameter], recorder: Recorder,
              users: Mapping[nn.Parameter, list[Call]]) -> dict[str, str]:
    """Parameter name -> why its recorded uses cannot give its per-sample gradients."""
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for path, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((path, module))
    out = {}
    for name, p in params.items():
        mine = owners.get(id(p), [])
        refused = [(path, recorder.refused[m]) for path, m in mine if m in recorder.refused]
        if refused:
            path, reason = refused[0]
            out[name] = reason if len(mine) == 1 else f"used by {path!r}: {reason}"
        elif p not in users:
            out[name] = ("no recorded call of a layer kind uses it (it is used by functional "
                         "code, or not at all)")
    return out


def _check_sums(params: dict[str, nn.Parameter], uses: Mapping[nn.Parameter, list[Grad]],
                grads: Mapping[str, torch.Tensor], refused: dict[str, str]) -> None:
    """Refuse the parameters whose recorded uses do not add up to autograd's gradient."""
    for name, p in params.items():
        if name in refused or p not in uses:
            continue
        total, scale = batch_gradient(uses[p], tuple(p.shape))
        eps = torch.finfo(total.dtype).eps
        error = float(torch.linalg.vector_norm(total - grads[name].reshape(-1).to(total)))
        bound = GRADIENT_CHECK * eps * scale
        if not error <= bound:
            refused[name] = (
                f"its recorded layer calls do not account for its gradient (||difference|| "
                f"{error:.3g} > {bound:.3g}): it is used outside them too"
            )


def _dense(g: torch.Tensor) -> torch.Tensor:
    return g.to_dense() if g.is_sparse else g


def run_passes(
    provider: TorchProvider, loss: ngdref.LogitLoss, targets: Any, methods: tuple[str, ...],
    key: int, kfac_fisher: str,
) -> Passes:
    """One recorded forward, the true-label backward and (for "kfac") the sampled ones."""
    params = {n: p for n, p in provider.model.named_parameters() if p.requires_grad}
    recorder, z, leaks = _forward(provider, params)
    users = recorder.users()
    refused = _refusals(provider.model, params, recorder, users)
    logits = z.detach()
    values, e = loss.value_and_grad(logits, targets)
    value = float(torch.sum(values))
    rows = {"true": [e]}
    if "kfac" in methods:
        rows["sampled"] = _sampled_cotangents(loss, logits, targets, key, kfac_fisher)
    uses: dict[str, list[dict[nn.Parameter, list[Grad]]]] = {}
    passes = [(source, u) for source, us in rows.items() for u in us]
    grads: dict[str, torch.Tensor] = {}
    for i, (source, u) in enumerate(passes):
        wrt = list(params.values()) if i == 0 else []
        found, g = recorder.backward([z], [u], retain_graph=i < len(passes) - 1, inputs=wrt)
        uses.setdefault(source, []).append(found)
        if i == 0:
            grads = {name: _dense(t) for name, t in zip(params, g, strict=True)}
    grad = torch.cat([grads[name].reshape(-1) for name in params])
    if not bool(torch.isfinite(grad).all()):
        raise ngdref.NonFiniteError("grad: the batch gradient contains NaN or infinite values")
    _check_sums(params, uses["true"][0], grads, refused)
    return Passes(params, users, refused, grad, value, torch.sum(e * e, dim=1), rows, uses,
                  leaks)


class _SubBatches:
    """The provider as the loop route's ``BatchModel``: its batch sliced by rows, its
    functional call with the given parameters, its eval mode."""

    def __init__(self, provider: TorchProvider) -> None:
        self.provider = provider

    @property
    def num_samples(self) -> int:
        return self.provider.num_samples

    def params_vector(self) -> torch.Tensor:
        return self.provider.params_vector()

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.provider.unflatten(vector)

    def sub_batch_logits(self, params: Mapping[str, torch.Tensor], rows: slice) -> torch.Tensor:
        p = self.provider
        return p.batch_logits(p.theta, p.batch(rows), params)

    def module_mode(self) -> AbstractContextManager[None]:
        return self.provider.eval_mode()


def per_sample_grads(
    provider: TorchProvider, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
) -> tuple[list[torch.Tensor], str]:
    """Per-sample u_n^T J_n restricted to ``ranges`` of theta ((N, size) each), and the route:
    ``vmap`` over the samples, or, where torch.func cannot run the model (recurrent layers,
    batch-sized constants, data-dependent shapes), a loop of single-sample passes."""
    try:
        return provider.vjp_ranges(cotangents, ranges), "vmap"
    except Exception as err:  # torch.func's limits: the loop is exact for any model
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}" if str(err) else \
            type(err).__name__
    return loop_vjp_ranges(_SubBatches(provider), cotangents, ranges), f"loop (vmap: {why})"

