"""The JAX rows of ``python -m validation``: :class:`backends.JaxProvider` on the array-API cases.

For every problem of :mod:`validation.cases`, against the reference ``exact[numpy]`` in float64:

- ``jax[float64]`` and ``jax[float32]``: the problem's own model function (array-API code, traced
  by JAX) differentiated by ``JaxProvider`` (``jax.vmap`` of ``jax.vjp``, ``jax.jacrev``,
  ``jax.jvp``), every quantity (Jacobian, per-sample gradients, s, every update, gamma) through
  ngdref on JAX arrays, with 64-bit types on for the runs only (``jax.enable_x64``);
- ``jax[flax-mlp]`` (the MLP problems): a Flax ``nn.Dense``/``tanh`` MLP holding the same weights
  in Flax's own layout (kernels (in, out), theta in ``ravel_pytree`` order: biases before
  kernels), its quantities mapped back to the layout of ``backends.mlp_apply``; and
  ``jax[flax-mlp] vs torch[vmap]``, the same values against the torch ``nn.Linear``/``nn.Tanh``
  MLP's (``torch-autograd[vmap]``) directly: the JAX MLP, the torch MLP and the NumPy MLP with
  the same weights give the same updates.

Tolerances: JAX's reverse and forward modes differentiate the same float64 function as the
hand-written derivatives in another order of operations, so rounding only, the bound of
``torch-autograd/float64`` (1e-9); float32 runs take the ``exact/float32`` bound (eps_32 times
the ~1e3 amplification of the damped solves, 2e-3). The rows are skipped, with the reason,
only when jax (or, for the Flax rows, flax; for the torch comparison, torch) is not installed.
"""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np

import ngdref
from validation.cases import Problem
from validation.crosscheck import (
    CG_TOLERANCES,
    RATIOS,
    TOLERANCES,
    Row,
    _checked_row,
    compare,
    compute,
    runs,
    variant_updates,
)
from validation.independent.references import sf_uniforms

__all__ = ["JAX_TOLERANCES", "jax_quantities", "jax_rows", "jax_unavailable"]

#: tolerance per run dtype (see the module docstring)
JAX_TOLERANCES = {
    "float64": TOLERANCES[("torch-autograd", "float64")],
    "float32": TOLERANCES[("exact", "float32")],
}
FLAX_MLP = "jax[flax-mlp]"
VS_TORCH = "jax[flax-mlp] vs torch[vmap]"


def jax_unavailable(*extra: str) -> str:
    """Why the JAX rows cannot run here ('' when they can): jax and optax, and ``extra``."""
    for module in ("jax", "optax", *extra):
        try:
            importlib.import_module(module)
        except ImportError:
            return f"{module} is not installed (pip install 'ngdref[jax]')"
    return ""


def jax_quantities(
    provider: Any, loss: ngdref.LogitLoss, targets: Any, *, damping: float, cg_tol: float
) -> dict[str, Any]:
    """Every compared quantity of a JAX provider, as NumPy arrays.

    The quantities of :func:`validation.crosscheck.quantities` (a small-output problem), with
    SF's uniforms of :func:`validation.independent.references.sf_uniforms` handed to ngdref as
    a JAX array in the logits' dtype, and the results copied to NumPy here.
    """
    import jax.numpy as jnp

    z = provider.logits()
    key = jnp.asarray(sf_uniforms(loss, z.shape[0], z.shape[1]), dtype=z.dtype)
    q = ngdref.batch_quantities(provider, loss, targets)
    updates = ngdref.directions(provider, loss, targets, damping=damping, key=key)
    updates.update(variant_updates(provider, loss, targets, damping, cg_tol))
    fvp = ngdref.fisher_vp(provider, loss, targets)
    arrays = {
        "jacobian": provider.jacobian(),
        "per_sample_grads": q.per_sample_grads,
        "s": q.logit_grad_sq_norms,
        **updates,
    }
    out: dict[str, Any] = {name: np.asarray(a) for name, a in arrays.items()}
    out["gamma_ratio"] = {
        m: ngdref.gamma_ratio(updates[m], q.grad, fisher_vp=fvp) for m in RATIOS
    }
    return out


def _arrays(problem: Problem, dtype: str) -> tuple[Any, Any, Any]:
    import jax.numpy as jnp

    targets = problem.targets if problem.targets.dtype.kind in "iu" else (
        problem.targets.astype(dtype))
    return (jnp.asarray(problem.params.astype(dtype)), jnp.asarray(problem.inputs.astype(dtype)),
            jnp.asarray(targets))


@dataclass(frozen=True)
class _ModelFunction:
    """A ``functools.partial`` model function, equal to another of the same function and
    keywords: ``jax.jit`` keys its compiled kernels on ``apply_fn``, and :func:`problems` builds
    new partials at every call, so a second run in one process reuses the first's kernels."""

    func: Callable[..., Any]
    keywords: tuple[tuple[str, Any], ...]

    def __call__(self, params: Any, inputs: Any) -> Any:
        return self.func(params, inputs, **dict(self.keywords))


def _model_values(problem: Problem, dtype: str) -> dict[str, Any]:
    """The problem's array-API model function, differentiated by JAX."""
    from backends.jax import JaxProvider

    params, inputs, targets = _arrays(problem, dtype)
    model = problem.model
    if isinstance(model, partial) and not model.args:
        model = _ModelFunction(model.func, tuple(sorted(model.keywords.items())))
    provider = JaxProvider(model, params, inputs)
    return jax_quantities(provider, problem.loss, targets, damping=problem.damping,
                          cg_tol=CG_TOLERANCES[("exact", dtype)])


@cache
def _flax_mlp(sizes: tuple[int, ...]) -> Any:
    """``apply_fn(params, x)`` of a Flax linen MLP: Dense, tanh, ..., Dense (layer l is
    ``Dense_l``); one function per ``sizes``, so that its jitted kernels are reused."""
    import flax.linen as nn
    import jax.numpy as jnp

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x: Any) -> Any:
            for i, width in enumerate(sizes[1:]):
                x = nn.Dense(width)(x)
                x = jnp.tanh(x) if i < len(sizes) - 2 else x
            return x

    model = MLP()
    return lambda params, x: model.apply({"params": params}, x)


def _flax_tree(theta: np.ndarray, sizes: tuple[int, ...]) -> dict[str, Any]:
    """theta in the layout of ``backends.mlp_apply`` as Flax params (kernel = W^T)."""
    tree, offset = {}, 0
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = theta[offset:offset + n_out * n_in].reshape(n_out, n_in)
        offset += n_out * n_in
        tree[f"Dense_{i}"] = {"kernel": w.T, "bias": theta[offset:offset + n_out]}
        offset += n_out
    return tree


def _flax_values(problem: Problem) -> dict[str, Any]:
    """The Flax MLP with the problem's weights; quantities in the ``mlp_apply`` layout."""
    import jax
    from jax.flatten_util import ravel_pytree

    from backends.jax import JaxProvider

    sizes = problem.sizes
    theta, inputs, targets = _arrays(problem, "float64")
    params = jax.tree.map(jax.numpy.asarray, _flax_tree(np.asarray(theta), sizes))
    # Flax's theta holds mlp_apply's entry order[i] at position i
    order = np.asarray(ravel_pytree(_flax_tree(np.arange(theta.shape[0]), sizes))[0])
    provider = JaxProvider(_flax_mlp(sizes), params, inputs)
    values = jax_quantities(provider, problem.loss, targets, damping=problem.damping,
                            cg_tol=CG_TOLERANCES[("exact", "float64")])
    for name, value in values.items():
        if name not in ("s", "gamma_ratio"):  # the rest has theta on its last axis
            mapped = np.empty_like(value)
            mapped[..., order] = value
            values[name] = mapped
    return values


def _torch_reference_run() -> Any:
    return next(r for r in runs() if r.kind == "torch-autograd" and r.route == "vmap")


def _flax_rows(problem: Problem, reference: dict[str, Any]) -> list[Row]:
    tol = JAX_TOLERANCES["float64"]
    reason = jax_unavailable("flax")
    if reason:
        return [Row(problem.name, label, tol, {}, {}, skipped=reason)
                for label in (FLAX_MLP, VS_TORCH)]
    values: dict[str, Any] = {}

    def flax_values() -> dict[str, Any]:
        values.update(_flax_values(problem))
        return values

    rows = [_checked_row(problem.name, FLAX_MLP, tol, flax_values, reference)]
    reason = problem.torch_unavailable() or ("" if values else "the Flax MLP run failed")
    if reason:
        return [*rows, Row(problem.name, VS_TORCH, tol, {}, {}, skipped=reason)]
    start = time.perf_counter()
    torch_values = compute(problem, _torch_reference_run())
    return [*rows, Row(problem.name, VS_TORCH, tol, compare(values, torch_values),
                       values["gamma_ratio"], seconds=time.perf_counter() - start)]


def jax_rows(problem: Problem, reference: dict[str, Any]) -> list[Row]:
    """The JAX rows of ``problem`` against the reference values (module docstring)."""
    reason = jax_unavailable()
    labels = {"jax[float64]": "float64", "jax[float32]": "float32"}
    if reason:
        skipped = [Row(problem.name, label, JAX_TOLERANCES[d], {}, {}, skipped=reason)
                   for label, d in labels.items()]
        return skipped + ([Row(problem.name, FLAX_MLP, JAX_TOLERANCES["float64"], {}, {},
                               skipped=reason)] if problem.sizes else [])
    import jax

    with jax.enable_x64(True):  # for these runs only: ngdref's float64 solves need it
        rows = [
            _checked_row(problem.name, label, JAX_TOLERANCES[dtype],
                         lambda dtype=dtype: _model_values(problem, dtype), reference)
            for label, dtype in labels.items()
        ]
        if problem.sizes:
            rows += _flax_rows(problem, reference)
    return rows

