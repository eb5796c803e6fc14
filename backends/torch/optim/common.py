"""What every ``torch.optim.Optimizer`` of :mod:`backends` shares: the paper's optimisers
(:mod:`backends.torch.optim.methods`) and the K-FAC family (:mod:`backends.torch.optim.kfac`).

One home for the closure's batch ``(inputs, targets)`` or Hugging Face inputs with
``"labels"`` (:func:`_split_batch`), the checks of the model and the loss, the step counter
and its checkpoint (``state_dict`` holds torch's optimiser state plus ``"step"``).
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn

import ngdref

if TYPE_CHECKING:
    from typing import Required

Batch = Any  # (inputs, targets), or a mapping of Hugging Face inputs holding "labels"


class StepOptions(TypedDict, total=False):
    """The keyword options every optimiser of :mod:`backends` takes (``**options``).

    Their defaults live in one place, :class:`_SteppedOptimizer`'s ``__init__``.

    Attributes
    ----------
    lr : float >= 0, required
        eta; what it scales is the optimiser's (constant, or the first of a decaying step).
    damping : float >= 0, required
        lambda; what it damps is the optimiser's.
    reduction : {"sum", "mean"} or float
        R, default "sum" (the paper's L = sum_n l_n); see the optimiser's module docstring.
    output_fn : callable, optional
        Model output -> logits, passed to :class:`backends.TorchProvider`.
    """

    lr: Required[float]
    damping: Required[float]
    reduction: str | float
    output_fn: Callable[[Any], torch.Tensor] | None


def _check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {type(value).__name__}")


def _step_key(seed: int, step: int) -> int:
    """The sampling key of ``step``: the first 8 bytes (little-endian) of blake2b("seed:step")."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _check_step_scale(scale: float, lr: float, params: list[torch.Tensor], step: int) -> None:
    """Refuse a step multiplier the parameters' dtype cannot hold (torch would raise its raw
    'value cannot be converted to type float without overflow' inside ``add_``)."""
    largest = min(torch.finfo(p.dtype).max for p in params)
    if not abs(scale) <= largest:
        raise ngdref.NonFiniteError(
            f"lr: the step multiplier {scale:.3g} at step {step} (lr={lr:.3g}) overflows the "
            f"parameters' dtype (largest {largest:.3g}); lower lr. The parameters were not "
            "changed"
        )


def _split_batch(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    """(inputs, targets) from what the closure returned; targets None: the provider's labels."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                "closure returned a mapping without 'labels': return (inputs, targets), or "
                "Hugging Face inputs holding their 'labels'"
            )
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"closure returned targets of type {type(targets).__name__}; expected a "
                "torch.Tensor as the second entry of (inputs, targets)"
            )
        if isinstance(inputs, Mapping) and "labels" in inputs:
            raise ValueError(
                "closure returned both inputs['labels'] and targets: return one of them"
            )
        return inputs, targets
    raise TypeError(
        "closure must return (inputs, targets) or a mapping of Hugging Face inputs with "
        f"'labels', got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _trainable(model: Any, loss: Any) -> list[tuple[str, nn.Parameter]]:
    """The model's trainable ``(name, parameter)`` pairs, after checking model and loss."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(loss, ngdref.LogitLoss):
        raise TypeError(
            f"loss must be an ngdref.LogitLoss (e.g. ngdref.SoftmaxCrossEntropy()), "
            f"got {type(loss).__name__}"
        )
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "model has no trainable parameters (none with requires_grad=True): "
            "there is nothing to optimise"
        )
    return named


def _merged_signature(cls: type) -> inspect.Signature:
    """``cls(model, loss, *, ...)`` with every keyword its ``__init__`` chain takes by name.

    The shared options travel as typed ``**options`` from one ``__init__`` to the next (one
    home for their defaults); this spells them out for ``help()``, ``inspect.signature`` and
    editors: the shared ones first (lr, damping, ...), the method's own last.
    """
    params: dict[str, inspect.Parameter] = {}
    for klass in reversed(cls.__mro__[: cls.__mro__.index(_SteppedOptimizer) + 1]):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in list(inspect.signature(init).parameters.values())[1:]:  # without self
            if p.kind is not inspect.Parameter.VAR_KEYWORD:
                params[p.name] = p
    ordered = sorted(params.values(), key=lambda p: p.kind)  # positional before keyword-only
    return inspect.Signature(ordered)


class _SteppedOptimizer(torch.optim.Optimizer):
    """One parameter group of checked hyperparameters and a step counter in the checkpoint.

    Subclasses implement :meth:`_check_hyperparameters` and count ``self._step``.
    """

    _step: int
    #: names of the hyperparameters kept in the parameter group (and in the state_dict)
    _hyperparameters: tuple[str, ...] = ("lr", "damping", "reduction")
    #: whether the parameter group keeps the parameters' names (and the state_dict with it)
    _keeps_param_names: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__signature__ = _merged_signature(cls)

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        **hyperparameters: Any,
    ) -> None:
        """Check model, loss and the hyperparameters (:class:`StepOptions` and the
        method's own), then hold them in the single parameter group."""
        unknown = sorted(set(hyperparameters) - set(self._hyperparameters))
        if unknown:  # as Python says it of an explicit signature
            raise TypeError(
                f"{type(self).__name__}.__init__() got an unexpected keyword argument "
                f"{unknown[0]!r}"
            )
        named = _trainable(model, loss)
        group = {"lr": lr, "damping": damping, **hyperparameters, "reduction": reduction}
        self._check_hyperparameters(group)
        self._model, self._loss, self._output_fn = model, loss, output_fn
        self._step = 0
        #: diagnostics of the last successful step (empty before the first), see ``step``
        self.diagnostics: dict[str, Any] = {}
        params = named if self._keeps_param_names else [p for _, p in named]
        super().__init__(params, group)

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        """Raise on a hyperparameter of ``group`` out of its range."""
        raise NotImplementedError

    @property
    def steps_taken(self) -> int:
        """The number of successful steps, t of the next step."""
        return self._step

    def state_dict(self) -> dict[str, Any]:
        """torch's optimiser state (hyperparameters in ``param_groups``) plus ``"step"``."""
        return super().state_dict() | {"step": self._step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step counter and hyperparameters (all checked before anything changes)."""
        step = state_dict.get("step") if isinstance(state_dict, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"state_dict must come from {type(self).__name__}.state_dict(): "
                f"its 'step' is {step!r}, expected an int >= 0"
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("state_dict must hold exactly one parameter group in 'param_groups'")
        self._check_hyperparameters(groups[0])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "step"})
        self._step = step
