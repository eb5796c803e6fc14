"""Where arrays and derivatives come from: Jacobian providers for :mod:`ngdref`.

Always available (array-API generic; stdlib and array_api_compat only):

- :class:`FiniteDifferenceProvider`: central differences of any ``fn(params, inputs)``;
- :class:`LinearProvider` and the toy problems of SPEC section 7, in closed form;
- the tanh MLP (:func:`mlp_init`, :func:`mlp_apply`) and its exact :class:`MLPProvider`.

Imported lazily, on first access, because they need torch: :class:`TorchProvider` and
:func:`default_output_fn` (a model's output -> its logits; ``backends.torch_provider``),
:class:`GhostRows` (``backends.ghost``: per-sample gradients as per-layer factors), the
optimisers :class:`IEF`, :class:`EF`, :class:`SF`, :class:`NGD`
(``backends.optim``) and :class:`KFAC`, :class:`EKFAC`, :class:`IEKFAC`
(``backends.kfac_optim``). :class:`JaxProvider` needs jax (``backends.jax``, which also holds
the optax transformations ``ief``, ``ef``, ``sf``). ``import backends`` never imports torch
or jax. The SciPy
``LinearOperator`` s :func:`curvature_operator`, :func:`kfac_operator`
(``backends.linear_operator``) are lazy too.
"""

from __future__ import annotations

import importlib
from typing import Any

from .analytic import (
    LeastSquaresToyClosedForm,
    LinearProvider,
    LogisticToyClosedForm,
    least_squares_toy,
    least_squares_toy_closed_form,
    logistic_toy,
    logistic_toy_closed_form,
)
from .finite_difference import FiniteDifferenceProvider, default_relative_step
from .mlp import MLPProvider, mlp_apply, mlp_init, mlp_num_params

#: attribute name -> the module that defines it (relative to this package: it is installed
#: as ``ngdref.backends``), imported on first access
_LAZY = {
    "TorchProvider": ".torch_provider",
    "default_output_fn": ".torch_provider",
    "GhostRows": ".ghost",
    "IEF": ".optim",
    "EF": ".optim",
    "SF": ".optim",
    "NGD": ".optim",
    "KFAC": ".kfac_optim",
    "EKFAC": ".kfac_optim",
    "IEKFAC": ".kfac_optim",
    "CurvatureOperator": ".linear_operator",
    "curvature_operator": ".linear_operator",
    "kfac_operator": ".linear_operator",
    "kfac_curvature_operator": ".linear_operator",
    "JaxProvider": ".jax.provider",
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
# does not import torch or jax either.


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
