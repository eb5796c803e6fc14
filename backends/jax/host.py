r"""Run ngdref's math on the host in NumPy, from eager JAX code and from inside ``jax.jit``.

ngdref checks values with Python control flow (``if not bool(xp.all(...)): raise``) and
forms its N x N systems in float64, neither of which a traced JAX function can do (and
float64 needs ``jax_enable_x64``). The optax transformations therefore compute the large
quantities (logits, per-sample gradients, P-vectors) on the device and hand the small
logit-level and Gram-level work to the host: eagerly as a direct call on NumPy copies, so
that ngdref's exceptions surface as they are; under tracing through ``jax.pure_callback``,
where an exception raised on the host reaches the caller as a ``jax.errors.JaxRuntimeError``
whose message ends with the original exception's name and message. Both routes run the same
NumPy code and give the same numbers.

What crosses to the host: the (N, P) per-sample gradients (and SF's sampled rows), the
(N, C) logits and targets, and the (P,) step back. On a CPU this costs a copy; on a GPU it
is a device-to-host transfer of N P numbers per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .trees import is_traced

__all__ = ["on_host"]


def _conform(outputs: Any, results: Any) -> Any:
    """``outputs`` as NumPy arrays of the declared dtypes (checked shapes: nothing reshaped)."""

    def one(out: Any, spec: jax.ShapeDtypeStruct) -> np.ndarray:
        array = np.asarray(out, dtype=spec.dtype)
        if array.shape != tuple(spec.shape):  # a bug here, not a user error: say what
            raise AssertionError(f"host result has shape {array.shape}, expected {spec.shape}")
        return array

    return jax.tree.map(one, outputs, results)


def on_host(fn: Callable[..., Any], results: Any, *args: Any) -> Any:
    """``fn(*numpy_args)`` as JAX arrays of the shapes and dtypes of ``results``.

    Parameters
    ----------
    fn : callable
        Pure NumPy code (may raise); its return value has the tree of ``results``.
    results : pytree of jax.ShapeDtypeStruct
    *args : pytrees of arrays
        Passed to ``fn`` as NumPy arrays.

    Returns
    -------
    pytree of jax.Array
        Eagerly on the device of the largest JAX array in ``args``; under tracing wherever the
        traced computation runs.
    """
    def host(*arrays: Any) -> Any:
        # pure_callback hands over JAX arrays: ngdref on those would be JAX again (and without
        # jax_enable_x64 its float64 solves would silently be float32), so NumPy first
        return _conform(fn(*jax.tree.map(np.asarray, arrays)), results)

    if is_traced(args):
        return jax.pure_callback(host, results, *args)
    outputs = host(*args)
    arrays = [leaf for leaf in jax.tree.leaves(args) if isinstance(leaf, jax.Array)]
    # the data's device, not that of a step counter created on the default device
    largest = max(arrays, key=lambda a: a.size, default=None)
    return jax.device_put(outputs, None if largest is None else next(iter(largest.devices())))
