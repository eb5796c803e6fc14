"""The validation cases as data: small networks x losses, each runnable on every array library.

A :class:`Problem` is host (NumPy) data plus an array-API model function, so
the same problem can be moved to NumPy, array_api_strict, torch or CuPy and
handed to any provider that applies:

- ``exact``: the closed-form or hand-differentiated provider of the model
  (:class:`~backends.MLPProvider`, :class:`~backends.LinearProvider`);
- ``fd``: :class:`~backends.FiniteDifferenceProvider` on the same model function;
- ``torch-autograd``: :class:`~backends.TorchProvider` on a torch module
  computing the same function (:meth:`Problem.torch_module`): an
  ``nn.Linear``/``nn.Tanh`` stack holding theta in the same layout (routes
  "vmap" and "hooks"), or a module holding theta as one ``nn.Parameter`` and
  calling ``Problem.model`` on torch tensors (route "flat").

The reference of every comparison is ``exact`` on NumPy in float64.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, partial
from typing import Any

import array_api_compat
import numpy as np

import ngdref
from backends import FiniteDifferenceProvider, LinearProvider, MLPProvider, mlp_apply, mlp_init
from backends.arrays.adapters import from_numpy
from backends.arrays.analytic import LEAST_SQUARES_TOY_X, LOGISTIC_TOY_X


def _linear_apply(params: Any, inputs: Any, num_outputs: int) -> Any:
    """z = x W^T with W = reshape(params, (C, D)), the logits of ``LinearProvider.from_params``.

    Written out rather than built through the provider, whose input checks
    branch on array values and so cannot run under ``torch.func.vmap``.
    """
    xp = array_api_compat.array_namespace(params, inputs)
    weights = xp.reshape(params, (num_outputs, inputs.shape[1]))
    return xp.matmul(inputs, weights.T)


def _mlp_module(params: Any, sizes: tuple[int, ...]) -> Any:
    """``nn.Sequential(Linear, Tanh, ..., Linear)`` holding the flat ``params`` (torch, (P,)).

    ``named_parameters()`` order (W_1, b_1, W_2, ...) with each W row-major is
    the flat layout of :func:`backends.mlp_apply`, so theta is the same vector.
    """
    import torch
    from torch import nn

    layers: list[Any] = []
    offset = 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        linear = nn.Linear(n_in, n_out, dtype=params.dtype)
        with torch.no_grad():
            linear.weight.copy_(params[offset:offset + n_out * n_in].reshape(n_out, n_in))
            offset += n_out * n_in
            linear.bias.copy_(params[offset:offset + n_out])
            offset += n_out
        layers.append(linear)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).eval()


def _linear_module(params: Any, num_outputs: int) -> Any:
    """``nn.Linear(D, C, bias=False)`` whose weight is ``params`` (C * D,) row-major."""
    import torch
    from torch import nn

    d = params.shape[0] // num_outputs
    linear = nn.Linear(d, num_outputs, bias=False, dtype=params.dtype)
    with torch.no_grad():
        linear.weight.copy_(params.reshape(num_outputs, d))
    return linear.eval()


@cache
def _flat_module_class() -> type:
    from torch import nn

    class FlatParameterModule(nn.Module):
        """theta as one ``nn.Parameter``; ``forward(x) = fn(theta, x)`` on torch tensors."""

        def __init__(self, params: Any, fn: Callable[[Any, Any], Any]) -> None:
            super().__init__()
            self.theta = nn.Parameter(params.clone())
            self.fn = fn

        def forward(self, inputs: Any) -> Any:
            return self.fn(self.theta, inputs)

    return FlatParameterModule


@dataclass(frozen=True)
class Problem:
    """A model on one batch, as host data.

    Attributes
    ----------
    name : str
    loss : ngdref.LogitLoss
    params, inputs, targets : numpy arrays
    model : callable (params, inputs) -> logits
        Array-API code (runs on any namespace).
    exact : callable (params, inputs) -> JacobianProvider
        The exact provider of ``model``.
    damping : float
        lambda used for every update of this problem.
    torch_layers : callable (torch params (P,)) -> torch.nn.Module, optional
        A module of ``nn.Linear``/``nn.Tanh`` layers computing ``model`` with
        theta in the same layout (its ``named_parameters()`` concatenated).
    sizes : tuple of int, optional
        The layer sizes of an MLP problem (``backends.mlp_apply``), for models of other
        libraries holding the same weights (:mod:`validation.jax_rows`).
    """

    name: str
    loss: ngdref.LogitLoss
    params: np.ndarray
    inputs: np.ndarray
    targets: np.ndarray
    model: Callable[[Any, Any], Any]
    exact: Callable[[Any, Any], ngdref.JacobianProvider]
    damping: float = 1e-3
    notes: str = field(default="")
    torch_layers: Callable[[Any], Any] | None = None
    sizes: tuple[int, ...] | None = None

    def arrays(self, library: str, dtype: str = "float64") -> tuple[Any, Any, Any]:
        """params, inputs and targets in ``library`` (targets keep an integer dtype)."""
        targets_dtype = None if self.targets.dtype.kind in "iu" else dtype
        return (
            from_numpy(self.params, library, dtype=dtype),
            from_numpy(self.inputs, library, dtype=dtype),
            from_numpy(self.targets, library, dtype=targets_dtype),
        )

    def provider(self, kind: str, library: str, dtype: str = "float64") -> tuple[Any, Any]:
        """(provider, targets) of ``kind`` ("exact" or "fd") on ``library``."""
        params, inputs, targets = self.arrays(library, dtype)
        if kind == "exact":
            return self.exact(params, inputs), targets
        if kind == "fd":
            return FiniteDifferenceProvider(self.model, params, inputs), targets
        raise ValueError(f"kind must be 'exact' or 'fd', got {kind!r}")

    def torch_unavailable(self) -> str:
        """Why the torch-autograd runs cannot run here ('' when they can)."""
        try:
            import torch  # noqa: F401
        except ImportError as err:
            return f"torch is not importable ({err})"
        if self.torch_layers is None:
            return f"problem {self.name} has no torch module"
        return ""

    def torch_module(self, route: str = "vmap", dtype: str = "float64") -> Any:
        """A ``torch.nn.Module`` computing ``model`` with theta = ``params``.

        Parameters
        ----------
        route : {"vmap", "hooks", "flat"}
            "flat": theta as one ``nn.Parameter`` and ``model`` called on
            torch tensors; otherwise the ``nn.Linear``/``nn.Tanh`` stack of
            ``torch_layers``.
        dtype : str

        Returns
        -------
        torch.nn.Module
            In eval mode.
        """
        params = from_numpy(self.params, "torch", dtype=dtype)
        if route == "flat":
            return _flat_module_class()(params, self.model).eval()
        if self.torch_layers is None:
            raise ValueError(f"problem {self.name} has no torch module")
        return self.torch_layers(params)

    def torch_provider(self, route: str, dtype: str = "float64") -> tuple[Any, Any]:
        """(TorchProvider, targets) on :meth:`torch_module`; ``route`` as there.

        "vmap" and "flat" take per-sample gradients by ``torch.func.vmap``,
        "hooks" by ``nn.Linear`` hooks in one backward pass.
        """
        from backends import TorchProvider

        _, inputs, targets = self.arrays("torch", dtype)
        method = "hooks" if route == "hooks" else "vmap"
        model = self.torch_module(route, dtype)
        return TorchProvider(model, inputs, per_sample=method), targets


def _mlp_problem(
    name: str,
    sizes: tuple[int, ...],
    n: int,
    loss: ngdref.LogitLoss,
    targets: np.ndarray,
    seed: int,
) -> Problem:
    rng = np.random.default_rng(seed)
    return Problem(
        name=name,
        loss=loss,
        params=np.asarray(mlp_init(sizes, seed, np)),
        inputs=rng.standard_normal((n, sizes[0])),
        targets=targets,
        model=partial(mlp_apply, sizes=sizes),
        exact=partial(MLPProvider, sizes=sizes),
        torch_layers=partial(_mlp_module, sizes=sizes),
        sizes=sizes,
    )


def _toy(name: str, x: tuple[float, ...], loss: ngdref.LogitLoss, targets: list[float]) -> Problem:
    return Problem(
        name=name,
        loss=loss,
        params=np.array([1.5, -0.7]),
        inputs=np.array([[1.0, xi] for xi in x]),
        targets=np.array([[t] for t in targets]),
        model=partial(_linear_apply, num_outputs=1),
        exact=partial(LinearProvider.from_params, num_outputs=1),
        notes="P <= N*C: NGD and GN solve the 2 x 2 system directly",
        torch_layers=partial(_linear_module, num_outputs=1),
    )


def problems() -> list[Problem]:
    """The built-in small networks."""
    rng = np.random.default_rng(1)
    seq_targets = rng.integers(0, 3, size=(6, 2))
    seq_targets[0, 1] = seq_targets[3, 0] = -100  # ignored label positions
    lin_rng = np.random.default_rng(7)
    return [
        _mlp_problem("mlp-softmax-ce", (5, 8, 4), 6, ngdref.SoftmaxCrossEntropy(),
                     rng.integers(0, 4, size=6), seed=2),
        _mlp_problem("mlp-squared-error", (3, 6, 2), 5, ngdref.SquaredError(),
                     rng.standard_normal((5, 2)), seed=3),
        _mlp_problem("mlp-sigmoid-bce", (4, 5, 3), 5, ngdref.SigmoidBinaryCrossEntropy(),
                     rng.integers(0, 2, size=(5, 3)).astype(float), seed=4),
        _mlp_problem("mlp-sequence-ce", (4, 7, 6), 6,
                     ngdref.SequenceSoftmaxCrossEntropy(vocab_size=3), seq_targets, seed=5),
        Problem(
            name="linear-softmax-ce",
            loss=ngdref.SoftmaxCrossEntropy(),
            params=lin_rng.standard_normal(3 * 6),
            inputs=lin_rng.standard_normal((5, 6)),
            targets=lin_rng.integers(0, 3, size=5),
            model=partial(_linear_apply, num_outputs=3),
            exact=partial(LinearProvider.from_params, num_outputs=3),
            torch_layers=partial(_linear_module, num_outputs=3),
        ),
        _toy("least-squares-toy", LEAST_SQUARES_TOY_X, ngdref.SquaredError(), [0.0, 0.0]),
        _toy("logistic-toy", LOGISTIC_TOY_X, ngdref.SigmoidBinaryCrossEntropy(), [1.0, 0.0]),
    ]
