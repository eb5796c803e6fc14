"""What every ``torch.optim.Optimizer`` of :mod:`backends` shares: the paper's optimisers
(:mod:`backends.torch.optim.methods`) and the K-FAC family (:mod:`backends.torch.optim.kfac`).

One home for the construction from the explicit keywords of an optimiser's signature (checked
by :data:`backends.torch.optim.options.OPTIONS`), the batch of a step (``step(batch=...)`` or a
closure returning it: :func:`_batch_source`, :func:`_split_batch`), the checks of the model and
the loss, and the step counter in torch's optimiser state.

The state
---------
The optimisers take one joint update of all their parameters, so, as ``torch.optim.LBFGS``,
they keep their state on the first parameter: ``opt.state[p0]["step"]`` is the number of steps
taken (``state_dict()["state"][0]["step"]``), next to whatever the method keeps (the K-FAC
family's factors). A ``state_dict`` of the earlier format, with the count as a top-level
``"step"``, loads as it did.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

import ngdref

from .options import OPTIONS, Option, document

Batch = Any  # (inputs, targets), or a mapping of Hugging Face inputs holding "labels"


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


def _batch_source(closure: Any, batch: Any) -> Callable[[], Batch]:
    """The step's batch as a call: ``batch`` itself, or ``closure`` (exactly one of them)."""
    if closure is not None and batch is not None:
        raise TypeError(
            "step() takes either batch= or a closure returning the batch, not both"
        )
    if batch is not None:
        return lambda: batch
    if closure is None:
        raise TypeError(
            "step() needs the batch: step(batch=(inputs, targets)), or step(closure) with a "
            "closure of no arguments returning it"
        )
    if not callable(closure):
        raise TypeError(
            f"closure must be a callable of no arguments returning the batch, got "
            f"{type(closure).__name__}; pass the batch itself as step(batch=...)"
        )
    return closure


def _split_batch(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    """(inputs, targets) of the step's batch; targets None: the provider's labels."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                "batch is a mapping without 'labels': step(batch=...) and a closure give "
                "(inputs, targets), or Hugging Face inputs holding their 'labels'"
            )
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"batch holds targets of type {type(targets).__name__}; expected a "
                "torch.Tensor as the second entry of (inputs, targets)"
            )
        if isinstance(inputs, Mapping) and "labels" in inputs:
            raise ValueError("batch holds both inputs['labels'] and targets: give one of them")
        return inputs, targets
    raise TypeError(
        "batch (step(batch=...), or what the closure returned) must be (inputs, targets) or a "
        f"mapping of Hugging Face inputs with 'labels', got {type(batch).__name__}"
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


def _given(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword options of an explicit ``__init__`` from its ``locals()`` at entry (so that
    each keyword is written once there, in the signature)."""
    return {k: v for k, v in arguments.items() if k not in ("self", "model", "loss", "__class__")}


class _SteppedOptimizer(torch.optim.Optimizer):
    """One parameter group of checked hyperparameters, and the step counter in torch's state.

    A public subclass spells its keywords out in ``__init__`` and passes them on with
    ``super().__init__(model, loss, _given(locals()))``; its :attr:`_hyperparameters` (the
    options :data:`~backends.torch.optim.options.OPTIONS` marks so, in signature order) and
    its docstring's ``Parameters`` follow from that signature.
    """

    #: the table the options are checked and documented by
    _options: ClassVar[Mapping[str, Option]] = OPTIONS
    #: the options kept in the parameter group (and the state_dict), set per public class
    _hyperparameters: ClassVar[tuple[str, ...]] = ()
    #: whether the parameter group keeps the parameters' names (and the state_dict with it)
    _keeps_param_names: ClassVar[bool] = False
    #: state entries restored by load_state_dict exactly as saved (torch would cast their
    #: tensors to the parameters' dtype: the K-FAC factors are float64 in any model)
    _exact_state: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = list(inspect.signature(cls).parameters)[2:]  # after model, loss
        # a user's subclass with keywords of its own keeps its parent's hyperparameters
        if not cls.__name__.startswith("_") and set(names) <= set(cls._options):
            cls._hyperparameters = tuple(n for n in names if cls._options[n].hyperparameter)
            document(cls, cls._options)

    def __init__(self, model: nn.Module, loss: ngdref.LogitLoss, options: Mapping[str, Any]
                 ) -> None:
        """Check model, loss and every option, then hold the hyperparameters in the single
        parameter group and a step count of 0 in the state."""
        named = _trainable(model, loss)
        for name, value in options.items():
            check = self._options[name].check
            if check is not None:
                check(value)
        group = {name: options[name] for name in self._hyperparameters}
        self._check_hyperparameters(group)
        self._model, self._loss = model, loss
        self._output_fn = options["output_fn"]
        #: diagnostics of the last successful step (empty before the first), see ``step``
        self.diagnostics: dict[str, Any] = {}
        params = named if self._keeps_param_names else [p for _, p in named]
        super().__init__(params, group)
        self._joint_state["step"] = 0

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        """Raise, naming it, on a hyperparameter of ``group`` that is missing, unknown or out of
        its range (at construction, at every step and on loading a state_dict)."""
        given = set(group) - {"params", "param_names"}
        if given != set(self._hyperparameters):
            raise ValueError(
                f"{type(self).__name__} takes the hyperparameters {sorted(self._hyperparameters)},"
                f" got {sorted(given)}"
            )
        for name in self._hyperparameters:
            self._options[name].check(group[name])  # type: ignore[misc]

    @property
    def _joint_state(self) -> dict[str, Any]:
        """The optimiser's state, kept on its first parameter (as torch.optim.LBFGS keeps it)."""
        return self.state[self.param_groups[0]["params"][0]]

    @property
    def steps_taken(self) -> int:
        """The number of successful steps, t of the next step (``state[p0]["step"]``)."""
        return self._joint_state["step"]

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the hyperparameters and the state (all checked before anything changes).

        A ``state_dict`` of the earlier format (the step count as a top-level ``"step"``)
        loads too; the K-FAC family's factors are restored as saved, moved to the parameters'
        device.
        """
        state_dict = _current_format(state_dict, type(self).__name__)
        groups = state_dict["param_groups"]
        self._check_hyperparameters(groups[0])
        first = state_dict["state"][groups[0]["params"][0]]
        exact = {k: first[k] for k in self._exact_state if k in first}
        cast = {k: v for k, v in first.items() if k not in exact}
        state = {**state_dict["state"], groups[0]["params"][0]: cast}
        super().load_state_dict({**state_dict, "state": state})
        device = self.param_groups[0]["params"][0].device
        self._joint_state.update({k: _to_device(v, device) for k, v in exact.items()})


def _current_format(state_dict: Any, owner: str) -> dict[str, Any]:
    """``state_dict`` with its step count in the first parameter's state (moved there from the
    top-level ``"step"`` of the earlier format), after checking its layout."""
    groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
    if (not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], Mapping)
            or not groups[0].get("params")):
        raise ValueError(
            f"state_dict must come from {owner}.state_dict(): it must hold exactly one "
            "parameter group in 'param_groups'"
        )
    first = groups[0]["params"][0]
    state = dict(state_dict.get("state") or {})
    own = dict(state.get(first, {}))
    if "step" in state_dict and "step" not in own:  # the earlier format
        own["step"] = state_dict["step"]
    step = own.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(
            f"state_dict must come from {owner}.state_dict(): its 'step' (state[{first}]"
            f"['step']) is {step!r}, expected an int >= 0"
        )
    state[first] = own
    return {k: v for k, v in state_dict.items() if k != "step"} | {"state": state}


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in dicts, lists and tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value
