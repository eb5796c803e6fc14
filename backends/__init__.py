"""Where arrays and derivatives come from: Jacobian providers for :mod:`ngdref`.

Always available (array-API generic; stdlib and array_api_compat only):

- :class:`FiniteDifferenceProvider`: central differences of any ``fn(params, inputs)``;
- :class:`LinearProvider` and the toy problems of SPEC section 7, in closed form;
- the tanh MLP (:func:`mlp_init`, :func:`mlp_apply`) and its exact :class:`MLPProvider`.

Imported lazily, on first access, because they need torch: :class:`TorchProvider`
(``backends.torch_provider``), :class:`GhostRows` (``backends.ghost``: per-sample gradients
as per-layer factors) and the optimisers :class:`IEF`, :class:`EF`,
:class:`SF`, :class:`NGD` (``backends.optim``). ``import backends`` never
imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from backends.analytic import (
    LeastSquaresToyClosedForm,
    LinearProvider,
    LogisticToyClosedForm,
    least_squares_toy,
    least_squares_toy_closed_form,
    logistic_toy,
    logistic_toy_closed_form,
)
from backends.finite_difference import FiniteDifferenceProvider, default_relative_step
from backends.mlp import MLPProvider, mlp_apply, mlp_init, mlp_num_params

#: attribute name -> the module that defines it, imported on first access
_LAZY = {
    "TorchProvider": "backends.torch_provider",
    "GhostRows": "backends.ghost",
    "IEF": "backends.optim",
    "EF": "backends.optim",
    "SF": "backends.optim",
    "NGD": "backends.optim",
}

__all__ = [
    "FiniteDifferenceProvider",
    "LeastSquaresToyClosedForm",
    "LinearProvider",
    "LogisticToyClosedForm",
    "MLPProvider",
    "default_relative_step",
    "least_squares_toy",
    "least_squares_toy_closed_form",
    "logistic_toy",
    "logistic_toy_closed_form",
    "mlp_apply",
    "mlp_init",
    "mlp_num_params",
]
# The lazy names are left out of __all__ so that ``from backends import *``
# does not import torch either.


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
