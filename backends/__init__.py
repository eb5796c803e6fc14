"""Where arrays and derivatives come from: Jacobian providers for :mod:`ngdref`.

Always available (array-API generic; stdlib and array_api_compat only):

- :class:`FiniteDifferenceProvider`: central differences of any ``fn(params, inputs)``;
- :class:`LinearProvider` and the paper's toy problems (:ref:`conv-toys`), in closed form;
- the tanh MLP (:func:`mlp_init`, :func:`mlp_apply`) and its exact :class:`MLPProvider`.

Imported lazily, on first access, because they need torch: :class:`TorchProvider` and
:func:`default_output_fn` (a model's output -> its logits; ``backends.torch.provider``),
:class:`GhostRows` (``backends.torch.per_sample.rows``: per-sample gradients as per-layer factors),
the optimisers :class:`IEF`, :class:`EF`, :class:`SF`, :class:`NGD`
(``backends.torch.optim.methods``) and :class:`KFAC`, :class:`EKFAC`, :class:`IEKFAC`
(``backends.torch.optim.kfac``). :class:`JaxProvider` needs jax (``backends.jax``, which also
holds the optax transformations ``ief``, ``ef``, ``sf``). ``import backends`` never imports
torch or jax. The SciPy
``LinearOperator`` s :func:`curvature_operator`, :func:`kfac_operator`
(``backends.scipy.operators``) are lazy too.
"""

from __future__ import annotations

import importlib
from typing import Any

from .arrays.analytic import (
    LeastSquaresToyClosedForm,
    LinearProvider,
    LogisticToyClosedForm,
    least_squares_toy,
    least_squares_toy_closed_form,
    logistic_toy,
    logistic_toy_closed_form,
)
from .arrays.finite_difference import FiniteDifferenceProvider, default_relative_step
from .arrays.mlp import MLPProvider, mlp_apply, mlp_init, mlp_num_params

#: attribute name -> the module that defines it (relative to this package: it is installed
#: as ``ngdref.backends``), imported on first access
_LAZY = {
    "TorchProvider": ".torch.provider",
    "default_output_fn": ".torch.provider",
    "GhostRows": ".torch.per_sample.rows",
    "IEF": ".torch.optim.methods",
    "EF": ".torch.optim.methods",
    "SF": ".torch.optim.methods",
    "NGD": ".torch.optim.methods",
    "KFAC": ".torch.optim.kfac",
    "EKFAC": ".torch.optim.kfac",
    "IEKFAC": ".torch.optim.kfac",
    "CurvatureOperator": ".scipy.operators",
    "curvature_operator": ".scipy.operators",
    "kfac_operator": ".scipy.operators",
    "kfac_curvature_operator": ".scipy.operators",
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
