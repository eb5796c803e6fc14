r"""Checks of the pytrees JAX code passes around: parameters, per-sample inputs and gradients.

theta (P,) is ``jax.flatten_util.ravel_pytree(params)[0]``: the leaves in JAX's tree order
(dict keys sorted, sequences in order), each flattened row-major. Every leaf of ``params``
must be a floating array of one dtype, float32 or float64 (a mixed tree would be promoted
by ``ravel_pytree``, silently). Per-sample trees hold one leaf per parameter leaf with a
leading axis of samples.

Every check names the argument and the leaf (``jax.tree_util.keystr``) and raises before
anything is computed. The structural checks (tree, shapes, dtypes) read no values, so they
also hold while JAX traces a function; the value checks (finiteness) need concrete arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ngdref.checks import NonFiniteError

__all__ = [
    "FLOAT_DTYPES",
    "check_finite_tree",
    "check_inputs",
    "check_like",
    "check_params",
    "is_traced",
    "num_samples",
]

#: the dtypes theta may have
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _leaves(tree: Any) -> list[tuple[str, Any]]:
    return [
        (jax.tree_util.keystr(path), leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _is_array(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def is_traced(*trees: Any) -> bool:
    """Whether a leaf of ``trees`` is a tracer (the caller runs under ``jax.jit``, ``vmap``...)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def check_params(params: Any, name: str = "params") -> np.dtype:
    """The one floating dtype of the leaves of ``params``, after checking them.

    Raises
    ------
    ValueError
        ``params`` has no leaves.
    TypeError
        A leaf that is not a JAX or NumPy array, not float32 / float64, or whose dtype
        differs from the first leaf's.
    """
    leaves = _leaves(params)
    if not leaves:
        raise ValueError(f"{name} has no array leaves: theta would be empty")
    first_path, first = leaves[0]
    for path, leaf in leaves:
        where = f"{name}{path}"
        if not _is_array(leaf):
            raise TypeError(
                f"{where} is a {type(leaf).__name__}; every leaf of {name} must be a JAX "
                "array (pass constants and non-trainable state through apply_fn instead)"
            )
        if np.dtype(leaf.dtype) not in FLOAT_DTYPES:
            raise TypeError(
                f"{where} has dtype {leaf.dtype}; every leaf of {name} must be float32 or "
                "float64 (pass integer state through apply_fn instead)"
            )
        if leaf.dtype != first.dtype:
            raise TypeError(
                f"{where} has dtype {leaf.dtype} but {name}{first_path} has {first.dtype}; "
                f"all leaves of {name} must share one dtype"
            )
    return np.dtype(first.dtype)


def check_like(
    tree: Any, name: str, reference: Any, reference_name: str, leading: tuple[int, ...] = ()
) -> None:
    """Raise unless ``tree`` has the structure of ``reference`` and each leaf its shape
    (after the ``leading`` axes) and dtype.

    Raises
    ------
    ValueError
        Another tree structure, or a leaf of another shape.
    TypeError
        A leaf that is not an array, or of another dtype.
    """
    structure, expected = jax.tree.structure(tree), jax.tree.structure(reference)
    if structure != expected:
        raise ValueError(
            f"{name} does not match the tree of {reference_name}: it has structure "
            f"{structure}, {reference_name} has {expected}"
        )
    for (path, leaf), (_, ref) in zip(_leaves(tree), _leaves(reference), strict=True):
        if not _is_array(leaf):
            raise TypeError(f"{name}{path} must be an array, got {type(leaf).__name__}")
        shape = (*leading, *ref.shape)
        if tuple(leaf.shape) != shape:
            raise ValueError(
                f"{name}{path} has shape {tuple(leaf.shape)} but {reference_name}{path} needs "
                f"{shape}" + (" (a leading axis of samples)" if leading else "")
            )
        if leaf.dtype != ref.dtype:
            raise TypeError(
                f"{name}{path} has dtype {leaf.dtype} but {reference_name}{path} has {ref.dtype}"
            )


def num_samples(inputs: Any, name: str = "inputs") -> int:
    """N, the common leading axis of the leaves of ``inputs`` (every leaf is per sample).

    Raises
    ------
    ValueError
        No leaves, a 0-d leaf, leaves with different leading axes, or N = 0.
    TypeError
        A leaf that is not a JAX or NumPy array.
    """
    leaves = _leaves(inputs)
    if not leaves:
        raise ValueError(f"{name} has no array leaves: there is no batch")
    sizes = {}
    for path, leaf in leaves:
        if not _is_array(leaf):
            raise TypeError(
                f"{name}{path} is a {type(leaf).__name__}; every leaf of {name} must be an "
                "array with the samples on its first axis (close over other values in apply_fn)"
            )
        if leaf.ndim == 0:
            raise ValueError(f"{name}{path} is 0-d; every leaf needs a leading axis of samples")
        sizes[path] = int(leaf.shape[0])
    (first_path, n), *_ = sizes.items()
    for path, size in sizes.items():
        if size != n:
            raise ValueError(
                f"{name}{path} has {size} samples on its first axis but {name}{first_path} "
                f"has {n}: every leaf of {name} is per sample"
            )
    if n == 0:
        raise ValueError(f"{name} is an empty batch (N = 0): at least one sample is needed")
    return n


def check_inputs(inputs: Any, dtype: np.dtype, name: str = "inputs") -> int:
    """N after :func:`num_samples`; floating leaves must have the parameters' ``dtype``
    (JAX would promote a float32 model on float64 inputs to float64 silently)."""
    n = num_samples(inputs, name)
    for path, leaf in _leaves(inputs):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != dtype:
            raise TypeError(
                f"{name}{path} has dtype {leaf.dtype} but params have {dtype}; cast the "
                "inputs or the parameters, nothing is converted here"
            )
    return n


def check_finite_tree(tree: Any, name: str) -> None:
    """Raise :class:`ngdref.NonFiniteError` naming the first floating leaf with a NaN or inf."""
    for path, leaf in _leaves(tree):
        if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
            raise NonFiniteError(f"{name}{path} contains NaN or infinite values")
