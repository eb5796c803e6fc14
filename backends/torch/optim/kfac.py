r"""The K-FAC family as ``torch.optim.Optimizer`` subclasses: :class:`KFAC`, :class:`EKFAC`,
:class:`IEKFAC` (Wu et al. 2024, App. D.2.2; the math in :mod:`ngdref.kfac`).

Every step takes one batch and writes

.. math:: \theta \leftarrow \theta - \eta\, (K + \tfrac{\lambda}{R} I)^{-1} g

with g = sum_n grad l_n, K the block-diagonal Kronecker-factored curvature of
the method (:func:`backends.torch.kfac.curvature.kfac_curvature`, sum convention) and R the
reduction factor (1 for ``reduction="sum"``, 1/N for ``"mean"``): a
mean-convention run with (lr', lambda') = (lr, R lambda) takes the steps of
a sum-convention run with (lr, lambda), since (R K + R lambda I)^-1 R g is the
same vector. Constant learning rate, no momentum, no weight decay, model in eval
mode during the passes, as the paper's optimisers.

Factors are recomputed every step by default. ``update_interval=k`` recomputes
them every k-th step and reuses them in between (the gradient is always the
current batch's); ``running_average=beta`` in [0, 1) blends each recomputed
factor into the previous ones, F <- beta F_old + (1 - beta) F_new. The factors
are not part of :meth:`state_dict`: after loading, the next step recomputes them.

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
from ngdref.checks import check_choice, check_int, check_real

from ..kfac.curvature import BIAS_MODES, KFAC_FISHERS, KFACCurvature, kfac_curvature
from ..provider import TorchProvider
from .common import (
    _check_seed,
    _check_step_scale,
    _split_batch,
    _step_key,
    _SteppedOptimizer,
)

__all__ = ["EKFAC", "IEKFAC", "KFAC"]


def _beta(value: Any) -> None:
    check_real(value, "running_average")
    if value >= 1:
        raise ValueError(f"running_average must be in [0, 1), got {value}")


_CHECKS: dict[str, Callable[[Any], None]] = {
    "lr": lambda v: check_real(v, "lr"),
    "damping": lambda v: check_real(v, "damping"),
    "reduction": lambda v: ngdref.reduction_factor(v, 1),
    "update_interval": lambda v: check_int(v, "update_interval"),
    "running_average": _beta,
    "damped_inverse": lambda v: check_choice(v, "damped_inverse", K.DAMPED_INVERSES),
    "convention": lambda v: check_choice(v, "convention", K.CONVENTIONS),
    "normalisation": lambda v: check_choice(v, "normalisation", K.NORMALISATIONS),
    "bias": lambda v: check_choice(v, "bias", BIAS_MODES),
}


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

    ``diagnostics`` after a step: step, loss, lr, damping, update_norm, refreshed, fallback.
    """

    method = ""

    _hyperparameters = tuple(_CHECKS)

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        update_interval: int = 1,
        running_average: float = 0.0,
        damped_inverse: str = "exact",
        convention: str = "expand",
        normalisation: str = "mean",
        bias: str = "separate",
        strict: bool = False,
        **options: Any,
    ) -> None:
        """``options``: :class:`~backends.torch.optim.common.StepOptions` (and KFAC's own)."""
        super().__init__(
            model, loss, update_interval=update_interval, running_average=running_average,
            damped_inverse=damped_inverse, convention=convention, normalisation=normalisation,
            bias=bias, **options,
        )
        self._strict = strict
        self._curvature: KFACCurvature | None = None

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        for name, check in _CHECKS.items():
            check(group[name])

    def _curvature_options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "convention": group["convention"],
            "normalisation": group["normalisation"],
            "bias": group["bias"],
        }

    def _refresh(self, inputs: Any, targets: Any, group: Mapping[str, Any]) -> KFACCurvature:
        """This batch's curvature (blended into the previous one), with its gradient."""
        new = kfac_curvature(
            self._model, self._loss, inputs, targets, methods=(self.method,),
            output_fn=self._output_fn, strict=self._strict, **self._curvature_options(group),
        )
        beta = group["running_average"]
        if self._curvature is not None and beta > 0:
            new = _blend(self._curvature, new, beta)
        self._curvature = new
        return new

    def _stale(self, inputs: Any, targets: Any) -> KFACCurvature:
        """The kept factors with this batch's gradient and loss (one forward, one backward)."""
        provider = TorchProvider(self._model, inputs, output_fn=self._output_fn)
        targets = provider.targets if targets is None else targets
        logits = provider.logits()
        grad = provider.vjp_sum(self._loss.grad(logits, targets))
        value = float(torch.sum(self._loss.value(logits, targets)))
        assert self._curvature is not None
        return dataclasses.replace(self._curvature, grad=grad, loss=value)

    def step(self, closure: Callable[[], Any]) -> float:  # type: ignore[override]
        """Take one step on the batch ``closure()`` returns; the loss R sum_n l_n before it.

        The batch is ``(inputs, targets)`` or a mapping of Hugging Face inputs with
        ``"labels"``, as for :class:`backends.IEF`. On any error the parameters and the
        step counter are unchanged.
        """
        if not callable(closure):
            raise TypeError("closure is required: a callable returning (inputs, targets)")
        group = self.param_groups[0]
        self._check_hyperparameters(group)
        inputs, targets = _split_batch(closure())
        refresh = self._curvature is None or self._step % group["update_interval"] == 0
        curvature = (
            self._refresh(inputs, targets, group) if refresh else self._stale(inputs, targets)
        )
        factor = ngdref.reduction_factor(group["reduction"], _num_samples(inputs))
        loss = factor * curvature.loss
        if not math.isfinite(loss):
            raise ngdref.NonFiniteError(f"loss is {loss} at step {self._step}; nothing changed")
        update = curvature.inverse_apply(
            self.method, curvature.grad, damping=group["damping"] / factor,
            damped_inverse=group["damped_inverse"],
        )
        norm = float(torch.linalg.vector_norm(update))
        if not math.isfinite(norm):
            raise ngdref.NonFiniteError(
                f"update contains NaN or infinite values at step {self._step}; nothing changed"
            )
        _check_step_scale(group["lr"], group["lr"], group["params"], self._step)
        with torch.no_grad():
            for param, piece in zip(group["params"], _split(update, group["params"]), strict=True):
                param.add_(piece, alpha=-group["lr"])
        self.diagnostics = {
            "step": self._step, "loss": loss, "lr": group["lr"], "damping": group["damping"],
            "update_norm": norm, "refreshed": refresh, "fallback": dict(curvature.fallback),
        }
        self._step += 1
        return loss

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the hyperparameters and the step counter; the next step recomputes factors
        (they are not part of the state_dict)."""
        super().load_state_dict(state_dict)
        self._curvature = None


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

    Parameters
    ----------
    model : torch.nn.Module
    loss : ngdref.LogitLoss
    lr : float >= 0
    damping : float >= 0
        lambda, absolute, added to the Kronecker block (``damped_inverse="exact"``) or
        split by pi between the factors (``"pi"``).
    update_interval : int >= 1
    running_average : float in [0, 1)
    damped_inverse, convention, normalisation
        See :mod:`ngdref.kfac`.
    bias : {"separate", "joint"}
    reduction : "sum", "mean" or float
    output_fn, strict
        See :func:`backends.torch.kfac.curvature.kfac_curvature`.
    """

    method = "ekfac"


class IEKFAC(_KFACOptimizer):
    """Improved empirical KFAC (Eq. 43): B = sum_n b_n^T b_n / s_n; parameters as :class:`EKFAC`."""

    method = "iekfac"


class KFAC(_KFACOptimizer):
    """KFAC: B from sampled labels' output gradients; parameters as :class:`EKFAC`, plus

    Parameters
    ----------
    kfac_fisher : {"mc", "type-2"}
        One label drawn per sample (seeded by ``seed`` and the step) or the exact expectation.
    seed : int
    """

    method = "kfac"
    _hyperparameters = (*_KFACOptimizer._hyperparameters, "kfac_fisher", "seed")

    def __init__(
        self, model: nn.Module, loss: ngdref.LogitLoss, *, kfac_fisher: str = "mc",
        seed: int = 0, **options: Any,
    ) -> None:
        super().__init__(model, loss, kfac_fisher=kfac_fisher, seed=seed, **options)

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(group)
        check_choice(group["kfac_fisher"], "kfac_fisher", KFAC_FISHERS)
        _check_seed(group["seed"])

    def _curvature_options(self, group: Mapping[str, Any]) -> dict[str, Any]:
        return super()._curvature_options(group) | {
            "kfac_fisher": group["kfac_fisher"],
            "key": _step_key(group["seed"], self._step),
        }
