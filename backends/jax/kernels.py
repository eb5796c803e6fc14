r"""The jitted autodiff passes behind :class:`backends.jax.JaxProvider` and the optax
transformations: logits, per-sample and summed vector-Jacobian products, Jacobian-vector
products and per-sample Jacobians of ``apply_fn(params, inputs)``.

Conventions: ``apply_fn(params, inputs)`` returns the batch's logits (N, ...); the trailing
axes are flattened row-major to C, so (N, T, V) sequence logits become (N, T * V), position
then vocabulary (the layout of :class:`ngdref.SequenceSoftmaxCrossEntropy`). theta is
``ravel_pytree(params)[0]`` (P,). Sample n is evaluated as a batch of one,
``apply_fn(params, inputs[n:n+1])``, under ``jax.vmap``; a model whose output for one sample
depends on the others (batch norm in training mode) has no per-sample gradients and must not
be given here. Nothing is divided by N: every product is in the sum convention.

``apply_fn`` is a static argument of ``jax.jit``: pass the same function object at every
step (a new lambda per step compiles again).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

__all__ = [
    "batch_jvp",
    "batch_logits",
    "flat_logits",
    "per_sample_jacobian",
    "per_sample_vjp",
    "summed_vjp",
]

ApplyFn = Callable[[Any, Any], jax.Array]


def flat_logits(apply_fn: ApplyFn, params: Any, inputs: Any) -> jax.Array:
    """z (N, C): the model's output with its trailing axes flattened."""
    z = apply_fn(params, inputs)
    return jnp.reshape(z, (z.shape[0], -1))


def _sample_logits(apply_fn: ApplyFn, params: Any, sample: Any) -> jax.Array:
    """z_n (C,) of one sample (its leaves without the batch axis), as a batch of one."""
    batch = jax.tree.map(lambda leaf: leaf[None], sample)
    return jnp.reshape(apply_fn(params, batch), (-1,))


@partial(jax.jit, static_argnums=0)
def batch_logits(apply_fn: ApplyFn, params: Any, inputs: Any) -> jax.Array:
    """``apply_fn(params, inputs)`` as the model returns it (N, ...), jitted."""
    return apply_fn(params, inputs)


@partial(jax.jit, static_argnums=0)
def per_sample_vjp(apply_fn: ApplyFn, params: Any, inputs: Any, cotangents: jax.Array) -> Any:
    r"""Row n is :math:`J_n^\top u_n` (N, P): ``vmap`` over samples of ``jax.vjp``."""

    def one(sample: Any, u: jax.Array) -> jax.Array:
        _, pullback = jax.vjp(lambda p: _sample_logits(apply_fn, p, sample), params)
        return ravel_pytree(pullback(u)[0])[0]

    return jax.vmap(one)(inputs, cotangents)


@partial(jax.jit, static_argnums=0)
def summed_vjp(apply_fn: ApplyFn, params: Any, inputs: Any, cotangents: jax.Array) -> Any:
    r""":math:`\sum_n J_n^\top u_n` (P,): one reverse pass over the batch, no ``vmap``."""
    _, pullback = jax.vjp(lambda p: flat_logits(apply_fn, p, inputs), params)
    return ravel_pytree(pullback(cotangents)[0])[0]


@partial(jax.jit, static_argnums=0)
def batch_jvp(apply_fn: ApplyFn, params: Any, inputs: Any, vector: jax.Array) -> Any:
    r"""Row n is :math:`J_n v` (N, C): one forward-mode pass over the batch."""
    _, unravel = ravel_pytree(params)
    _, tangent = jax.jvp(
        lambda p: flat_logits(apply_fn, p, inputs), (params,), (unravel(vector),)
    )
    return tangent


@partial(jax.jit, static_argnums=0)
def per_sample_jacobian(apply_fn: ApplyFn, params: Any, inputs: Any) -> Any:
    r""":math:`J_n = \partial z_n / \partial \theta` (N, C, P): ``vmap`` of ``jax.jacrev``."""
    theta, unravel = ravel_pytree(params)

    def one(sample: Any) -> jax.Array:
        return jax.jacrev(lambda t: _sample_logits(apply_fn, unravel(t), sample))(theta)

    return jax.vmap(one)(inputs)
