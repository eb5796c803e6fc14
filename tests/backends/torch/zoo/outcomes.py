"""Run one route on one zoo case and judge what came back: a value within its bound, or a
refusal by name that left the model as it was. Anything else is a failure: a wrong number,
an error from inside torch, an error that names nothing, a model changed by a refusal.
"""

from __future__ import annotations

import functools
import os
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import backends
import ngdref
from backends.torch.optim.methods import IEF
from backends.torch.provider import TorchProvider

from .case import Case
from .reference import trainable

#: the marks of every zoo test module: one intra-op thread (tiny models), and quiet about
#: torch.func's notices that an operator is batched by a slow loop (vmap still runs it)
MARKS = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
]

#: where a named refusal may come from: the project's own packages
_OWN = tuple(
    os.path.dirname(os.path.abspath(pkg.__file__)) + os.sep for pkg in (backends, ngdref)
)


@dataclass(frozen=True)
class Snapshot:
    """Copies of a model's parameters, buffers and train/eval flags, to compare bitwise."""

    tensors: dict[str, torch.Tensor]
    modes: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
        return cls(tensors, {n: m.training for n, m in model.named_modules()})

    def changed(self, model: nn.Module) -> set[str]:
        """Names of the parameters and buffers not bitwise equal, and of modules whose mode
        changed."""
        now = model.state_dict(keep_vars=True)
        out = {n for n, t in self.tensors.items() if not torch.equal(t, now[n].detach())}
        return out | {f"{n} (mode)" for n, m in model.named_modules()
                      if self.modes[n] != m.training}


@dataclass(frozen=True)
class Outcome:
    """What a route did: ``values`` (quantity -> array) or ``error``; ``changed`` (see
    :meth:`Snapshot.changed`) beyond what a successful step is meant to change."""

    values: dict[str, np.ndarray] | None
    error: BaseException | None
    changed: frozenset[str]


def run(case: Case, action: Callable[[nn.Module, Any, torch.Tensor], dict[str, Any]],
        *, may_change: frozenset[str] = frozenset()) -> Outcome:
    """Build the case afresh, run ``action(model, inputs, targets)`` and record the outcome.

    ``may_change``: the parameters a successful action is meant to change (a step's).
    """
    model, inputs, targets = case.build()
    before = Snapshot.of(model)
    try:
        values, error = action(model, inputs, targets), None
    except Exception as err:  # judged by judge_refusal: named, ours, nothing changed
        values, error = None, err
    changed = before.changed(model)
    if error is None:
        changed -= may_change
    return Outcome(values, error, frozenset(changed))


def origin(error: BaseException) -> str:
    """``file:line`` of the innermost frame that raised ``error``."""
    frames = traceback.extract_tb(error.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "<no traceback>"


def is_ours(error: BaseException) -> bool:
    """Raised by ngdref or backends code (not from inside torch or the zoo's own models), and
    of a type that is not torch's."""
    frames = traceback.extract_tb(error.__traceback__)
    return (
        bool(frames)
        and os.path.abspath(frames[-1].filename).startswith(_OWN)
        and not type(error).__module__.startswith("torch")
    )


def names_culprit(case: Case, model: nn.Module, message: str) -> bool:
    """The message names a trainable parameter (qualified name) or a class or option the case
    is about (``Case.covers``), as a whole word."""
    names = [n for n, _ in trainable(model)] + list(case.covers)
    return any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message) for name in names)


def judge_refusal(case: Case, outcome: Outcome) -> None:
    """A refusal must be ours, name the culprit and leave the model bitwise as it was."""
    err = outcome.error
    assert err is not None
    what = f"{type(err).__module__}.{type(err).__name__}: {str(err)[:300]}"
    assert is_ours(err), f"torch-internal error (raised at {origin(err)}): {what}"
    model, _, _ = case.build()
    assert names_culprit(case, model, str(err)), (
        f"refusal names neither a trainable parameter nor any of {case.covers}: {what}"
    )
    assert not outcome.changed, f"refused, but changed {sorted(outcome.changed)}: {what}"


def judge_value(name: str, got: np.ndarray, want: np.ndarray, bound: float) -> None:
    """||got - want|| <= bound, reported relative to ||want||."""
    err = float(np.linalg.norm(got - want))
    rel = err / max(float(np.linalg.norm(want)), np.finfo(np.float64).tiny)
    assert err <= bound, (
        f"silent wrong {name}: ||error|| = {err:.3e} (relative {rel:.1e}) > bound {bound:.3e}"
    )


def theta(model: nn.Module) -> np.ndarray:
    """The trainable parameters, flat, in ``named_parameters()`` order (dense)."""
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(model)]).numpy().copy()


def trained(case: Case) -> frozenset[str]:
    """The state_dict names a step may change: the trainable parameters under every name
    (a tied weight appears once in named_parameters but under each of its names here)."""
    model, _, _ = case.build()
    return frozenset(n for n, t in model.state_dict(keep_vars=True).items()
                     if isinstance(t, nn.Parameter) and t.requires_grad)


@functools.cache
def route_exists(kind: str, route: str) -> bool:
    """Whether ``TorchProvider(per_sample=route)`` (kind "rows") or the optimisers'
    ``per_sample=route`` (kind "steps") is accepted at all, tried on a plain nn.Linear."""
    model = nn.Linear(2, 2).double()
    x = torch.zeros(3, 2, dtype=torch.float64)
    try:
        if kind == "rows":
            TorchProvider(model, x, per_sample=route)
        else:
            IEF(model, ngdref.SoftmaxCrossEntropy(), lr=1.0, damping=1.0, per_sample=route)
    except ValueError as err:
        if "per_sample" in str(err):
            return False
        raise
    return True
