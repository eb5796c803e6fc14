r"""The K-FAC family as ``torch.optim.Optimizer`` subclasses: :class:`KFAC`, :class:`EKFAC`,
:class:`IEKFAC` (Wu et al. 2024, App. D.2.2; the math in :mod:`ngdref.kfac`).

Every step takes one batch and writes

.. math:: \theta \leftarrow \theta - \eta\, (K + \tfrac{\lambda}{R} I)^{-1} g

with g = sum_n grad l_n, K the block-diagonal Kronecker-factored curvature of
the method (:func:`backends.torch.kfac.curvature.kfac_curvature`, sum convention) and R the
reduction factor (1 for ``reduction="sum"``, 1/N for ``"mean"``): a
mean-convention run with (lr', lambda') = (lr, R lambda) takes the steps of
a sum-convention run with (lr, lambda), since (R K + R lambda I)^-1 R g is the
same vector. Constant learning rate, no momentum, no weight decay, the model in eval mode
during the passes (``mode``, as for the other optimisers), as the paper's optimisers.

Factors are recomputed every step by default. ``update_interval=k`` recomputes
them every k-th step and reuses them in between (the gradient is always the
current batch's); ``running_average=beta`` in [0, 1) blends each recomputed
factor into the previous ones, F <- beta F_old + (1 - beta) F_new. The kept
factors travel in ``state_dict()`` (``state[0]["curvature"]``, next to the step
count, as saved: float64 in any model), so a resumed run takes the steps of the
uninterrupted one, bitwise; a state_dict without them (the earlier format)
recomputes them at the next step.

Parameters outside supported layers get the diagonal fallback of
:mod:`backends.torch.kfac.curvature`; their names and the reasons are in
``diagnostics["fallback"]`` after each step (``strict=True`` refuses them).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import ngdref
from ngdref import kfac as K

from ..kfac.curvature import KFACBlock, KFACCurvature, kfac_curvature
from ..provider import TorchProvider
from .common import (
    Batch,
    _batch_source,
    _check_step_scale,
    _given,
    _split_batch,
    _SteppedOptimizer,
)

__all__ = ["EKFAC", "IEKFAC", "KFAC"]


def _structure(curvature: KFACCurvature) -> list[tuple[Any, ...]]:
    """What two curvatures must share to be blended: each block's name, shape, positions in
    theta and form (Kronecker or diagonal)."""
    return [(b.name, b.shape, b.factors is None, tuple(b.index.tolist()))
            for b in curvature.blocks]


def _blend(old: KFACCurvature, new: KFACCurvature, beta: float) -> KFACCurvature:
    """beta old + (1 - beta) new, factor by factor (the two share one block structure)."""
    blocks = []
    for a, b in zip(old.blocks, new.blocks, strict=True):
        if b.factors is not None:
            factors = {
                m: K.KroneckerFactors(
                    None if f.input_factor is None
                    else beta * a.factors[m].input_factor + (1 - beta) * f.input_factor,
                    beta * a.factors[m].grad_factor + (1 - beta) * f.grad_factor,
                )
                for m, f in b.factors.items()
            }
            blocks.append(dataclasses.replace(b, factors=factors))
        else:
            diagonal = {m: beta * a.diagonal[m] + (1 - beta) * d for m, d in b.diagonal.items()}
            blocks.append(dataclasses.replace(b, diagonal=diagonal))
    return dataclasses.replace(new, blocks=blocks)


class _KFACOptimizer(_SteppedOptimizer):
    """Shared step of the three methods; subclasses set :attr:`method`.

    ``diagnostics`` after a step: step, loss, lr, damping, update_norm, refreshed, fallback,
    average_restarted (the batch gave another block structure, so the running average started
    again from it).
    """

    method = ""
    _exact_state = ("curvature",)

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        update_interval: int = 1,
        running_average: float = 0.0,
        damped_inverse: str = "exact",
        convention: str = "expand",
        normalisation: str = "mean",
        bias: str = "separate",
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        self._setup(model, loss, _given(locals()))

    def _setup(self, model: nn.Module, loss: ngdref.LogitLoss, options: dict[str, Any]) -> None:
        super().__init__(model, loss, options)
        self._strict = options["strict"]
        self._mode = options["mode"]  # the mode policy of every pass (construction option)
        #: the kept curvature (its factors: ``state[p0]["curvature"]``); None before a step
        self._curvature: KFACCurvature | None = None
        self._restarted = False  # the last refresh restarted the running average

    def _curvature_options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "convention": group["convention"],
            "normalisation": group["normalisation"],
            "bias": group["bias"],
            "mode": self._mode,
        }

    def _refresh(self, inputs: Any, targets: Any, group: Mapping[str, Any]) -> KFACCurvature:
        """This batch's curvature (blended into the kept one), with its gradient."""
        new = kfac_curvature(
            self._model, self._loss, inputs, targets, methods=(self.method,),
            output_fn=self._output_fn, strict=self._strict, **self._curvature_options(group),
        )
        beta = group["running_average"]
        self._restarted = False
        if self._curvature is not None and beta > 0:
            # a batch may give another block structure (a data-dependent branch that calls a
            # layer's weight outside its module takes the diagonal fallback): the average
            # starts again from this batch rather than blend unrelated factors
            self._restarted = _structure(self._curvature) != _structure(new)
            if not self._restarted:
                new = _blend(self._curvature, new, beta)
        return new

    def _stale(self, inputs: Any, targets: Any) -> KFACCurvature:
        """The kept factors with this batch's gradient and loss (one forward, one backward)."""
        provider = TorchProvider(self._model, inputs, output_fn=self._output_fn,
                                 mode=self._mode, certify="never")
        targets = provider.targets if targets is None else targets
        logits = provider.logits()
        values, e = self._loss.value_and_grad(logits, targets)
        grad, value = provider.vjp_sum(e), float(torch.sum(values))
        assert self._curvature is not None
        return dataclasses.replace(self._curvature, grad=grad, loss=value)

    def step(  # type: ignore[override]
        self, closure: Callable[[], Batch] | None = None, *, batch: Batch | None = None
    ) -> float:
        """Take one step on one batch, ``step(batch=...)`` or ``step(closure)``; the loss
        R sum_n l_n before it.

        The batch and the closure are as for :meth:`backends.IEF.step` (exactly one of them).
        On any error the parameters, the kept factors and the step counter are unchanged.
        """
        source = _batch_source(closure, batch)
        group = self.param_groups[0]
        self._check_hyperparameters(group)
        inputs, targets = _split_batch(source())
        step = self.steps_taken
        refresh = self._curvature is None or step % group["update_interval"] == 0
        curvature = (
            self._refresh(inputs, targets, group) if refresh else self._stale(inputs, targets)
        )
        factor = ngdref.reduction_factor(group["reduction"], _num_samples(inputs))
        loss = factor * curvature.loss
        if not math.isfinite(loss):
            raise ngdref.NonFiniteError(f"loss is {loss} at step {step}; nothing changed")
        update = curvature.inverse_apply(
            self.method, curvature.grad, damping=group["damping"] / factor,
            damped_inverse=group["damped_inverse"],
        )
        norm = float(torch.linalg.vector_norm(update))
        if not math.isfinite(norm):
            raise ngdref.NonFiniteError(
                f"update contains NaN or infinite values at step {step}; nothing changed"
            )
        _check_step_scale(group["lr"], group["lr"], group["params"], step)
        with torch.no_grad():
            for param, piece in zip(group["params"], _split(update, group["params"]), strict=True):
                param.add_(piece, alpha=-group["lr"])
        self.diagnostics = {
            "step": step, "loss": loss, "lr": group["lr"], "damping": group["damping"],
            "update_norm": norm, "refreshed": refresh, "fallback": dict(curvature.fallback),
            "average_restarted": refresh and self._restarted,
        }
        if refresh:
            self._curvature = curvature
            self._joint_state["curvature"] = _packed(curvature)
        self._joint_state["step"] = step + 1
        return loss

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the hyperparameters, the step count and the kept factors (a state_dict
        without factors, of the earlier format: the next step recomputes them)."""
        super().load_state_dict(state_dict)
        packed = self._joint_state.get("curvature")
        self._curvature = None if packed is None else _unpacked(packed)


def _packed(curvature: KFACCurvature) -> dict[str, Any]:
    """The kept part of ``curvature`` (its blocks' factors, diagonals and layout, every field
    of them) as dicts, lists and tensors, which ``torch.load(weights_only=True)`` reads; the
    batch's gradient and loss are not kept (a step replaces them)."""
    blocks = []
    for block in curvature.blocks:
        fields = _fields(block)
        fields["shape"] = list(block.shape)
        if block.factors is not None:
            fields["factors"] = {m: _fields(f) for m, f in block.factors.items()}
        blocks.append(fields)
    rest = {k: v for k, v in _fields(curvature).items() if k not in ("blocks", "grad", "loss")}
    return {"blocks": blocks, **rest, "fallback": dict(curvature.fallback)}


def _unpacked(packed: Mapping[str, Any]) -> KFACCurvature:
    """The curvature :func:`_packed` kept, without a batch's gradient and loss (empty, NaN)."""
    blocks = []
    for fields in packed["blocks"]:
        factors = fields["factors"]
        if factors is not None:
            factors = {m: K.KroneckerFactors(**f) for m, f in factors.items()}
        blocks.append(KFACBlock(**{**fields, "shape": tuple(fields["shape"]), "factors": factors}))
    rest = {k: v for k, v in packed.items() if k != "blocks"}
    return KFACCurvature(blocks, torch.empty(0), math.nan, **rest)


def _fields(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)}


def _num_samples(inputs: Any) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[0]


def _split(vector: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [
        piece.view_as(p)
        for piece, p in zip(torch.split(vector, [p.numel() for p in params]), params, strict=True)
    ]


class EKFAC(_KFACOptimizer):
    """Empirical KFAC: B from the true labels' output gradients (the block-diagonal EF).

    lambda is absolute, added to each Kronecker block (``damped_inverse="exact"``) or split by
    pi between its factors (``"pi"``); the curvature is
    :func:`backends.torch.kfac.curvature.kfac_curvature`'s.
    """

    method = "ekfac"


class IEKFAC(_KFACOptimizer):
    """Improved empirical KFAC (Eq. 43): B = sum_n b_n^T b_n / s_n; lambda as for :class:`EKFAC`.
    """

    method = "iekfac"


class KFAC(_KFACOptimizer):
    """KFAC: B from the output gradients of sampled labels (or their expectation); lambda as
    for :class:`EKFAC`."""

    method = "kfac"

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        kfac_fisher: str = "mc",
        seed: int = 0,
        update_interval: int = 1,
        running_average: float = 0.0,
        damped_inverse: str = "exact",
        convention: str = "expand",
        normalisation: str = "mean",
        bias: str = "separate",
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        mode: str = "eval",
        strict: bool = False,
    ) -> None:
        self._setup(model, loss, _given(locals()))

    def _curvature_options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return super()._curvature_options(group) | {
            "kfac_fisher": group["kfac_fisher"],
            "key": ngdref.sampling_key(group["seed"], self.steps_taken),
        }
