r"""A :class:`ngdref.JacobianProvider` for any JAX model given as ``apply_fn(params, inputs)``.

The provider stands for ``z_n = f(theta, x_n)`` with theta (P,) =
``jax.flatten_util.ravel_pytree(params)[0]`` and the logits z_n (C,) of sample n:

=================  ==================  =================================================
method             shapes              how (:mod:`backends.jax.kernels`, jitted)
=================  ==================  =================================================
``logits()``       -> (N, C)           one forward pass, cached
``jvp(v)``         (P,) -> (N, C)      ``jax.jvp`` over the batch
``vjp(u)``         (N, C) -> (N, P)    ``jax.vmap`` over samples of ``jax.vjp``
``vjp_sum(u)``     (N, C) -> (P,)      one ``jax.vjp`` over the batch
``jacobian()``     -> (N, C, P)        ``jax.vmap`` over samples of ``jax.jacrev``
=================  ==================  =================================================

Every result is a JAX array on the device of ``params`` and ``inputs``, in the parameters'
dtype, in the paper's **sum** convention: with ``u = loss.grad(logits, targets)`` row n of
``vjp(u)`` is ``grad_theta l_n``, nothing divided by N. (N, T, V) sequence logits are
flattened to (N, T * V) (position, then vocabulary), the layout of
:class:`ngdref.SequenceSoftmaxCrossEntropy`.

Flax and Equinox models come in through their apply functions::

    JaxProvider(model.apply, variables, x)                             # flax.linen
    JaxProvider(lambda p, x: model.apply({"params": p, **state}, x),
                variables["params"], x)                               # only the "params"
    params, static = eqx.partition(model, eqx.is_inexact_array)         # equinox
    JaxProvider(lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, x)

64-bit types
    ngdref forms and solves its N x N systems in float64 whatever the rows' dtype. JAX
    without ``jax_enable_x64`` turns every float64 request into float32 (with a warning), so
    those solves would run in float32 while their singularity tests assume float64: the
    provider refuses to be built unless 64-bit types are on
    (``jax.config.update("jax_enable_x64", True)`` or ``with jax.enable_x64(True):``). A
    float32 model stays float32 under it. The optax transformations of
    :mod:`backends.jax.transforms` solve on the host in NumPy and do not need it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ngdref.checks import NonFiniteError
from ngdref.provider import JacobianProvider

from . import kernels
from .trees import check_finite_tree, check_inputs, check_like, check_params, is_traced

__all__ = ["JaxProvider", "require_x64"]


def require_x64() -> None:
    """Raise ``RuntimeError`` unless JAX's 64-bit types are on (see the module docstring)."""
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError(
            "jax_enable_x64 is off: JAX would turn ngdref's float64 Gram matrices and solves "
            "into float32 silently. Enable it with jax.config.update('jax_enable_x64', True) "
            "or `with jax.enable_x64(True):` (a float32 model stays float32); the optax "
            "transformations of backends.jax solve on the host and work without it"
        )


def _one_device(params: Any, inputs: Any) -> None:
    devices = {
        device
        for leaf in jax.tree.leaves((params, inputs))
        if isinstance(leaf, jax.Array)
        for device in leaf.devices()
    }
    if len(devices) > 1:
        raise ValueError(
            f"params and inputs are on several devices {sorted(map(str, devices))}: "
            "put them on one device"
        )


class JaxProvider(JacobianProvider):
    r"""Per-sample logit Jacobians of ``apply_fn(params, inputs)`` over the leaves of ``params``.

    .. math::
        z_n = f(\theta, x_n) \in \mathbb{R}^C, \quad
        J_n = \partial z_n / \partial \theta \in \mathbb{R}^{C \times P}, \quad
        \theta = \mathrm{ravel\_pytree}(\mathrm{params})

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, inputs) -> logits`` of shape (N, C) or (N, T, V), traceable by JAX
        (e.g. a flax ``model.apply``); a static argument of ``jax.jit``, so reuse one function
        object across providers to compile once.
    params : pytree of JAX arrays
        Every leaf float32, or every leaf float64; all of them form theta. Finite.
    inputs : JAX array or pytree of arrays
        One batch of N samples: every leaf has N on its first axis (close over anything that
        is not per sample in ``apply_fn``); floating leaves have the parameters' dtype and are
        finite.

    Attributes
    ----------
    num_params : int
        P.
    dtype : numpy.dtype
        The dtype of theta and of every result.

    Raises
    ------
    RuntimeError
        ``jax_enable_x64`` is off (module docstring).
    TypeError
        Traced arguments (the provider is built eagerly; inside ``jax.jit`` use the optax
        transformations), a leaf that is not a float32/float64 array, mixed dtypes, logits
        of another dtype than the parameters.
    ValueError
        Leaves of ``inputs`` with different leading axes, logits that are not (N, C) or
        (N, T, V), arguments on several devices.
    ngdref.NonFiniteError
        NaN or infinity in ``params``, ``inputs`` or the logits.
    """

    def __init__(self, apply_fn: kernels.ApplyFn, params: Any, inputs: Any) -> None:
        if not callable(apply_fn):
            raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
        require_x64()
        if is_traced(params, inputs):
            raise TypeError(
                "JaxProvider got traced params or inputs: it checks values and is built "
                "outside jax.jit; inside a jitted step use the optax transformations of "
                "backends.jax (ief, ef, sf)"
            )
        self.dtype = check_params(params)
        n = check_inputs(inputs, self.dtype)
        check_finite_tree(params, "params")
        check_finite_tree(inputs, "inputs")
        _one_device(params, inputs)
        self.apply_fn, self.params, self.inputs = apply_fn, params, inputs
        self._theta, self._unravel = ravel_pytree(params)
        self.num_params = int(self._theta.shape[0])
        self._logits = self._checked_logits(kernels.batch_logits(apply_fn, params, inputs), n)

    def _checked_logits(self, z: Any, n: int) -> jax.Array:
        if not isinstance(z, jax.Array):
            raise TypeError(f"apply_fn must return a JAX array, got {type(z).__name__}")
        if z.ndim not in (2, 3) or z.shape[0] != n:
            raise ValueError(
                f"apply_fn returned shape {tuple(z.shape)} for a batch of {n}: logits must be "
                "(N, C) or (N, T, V) with the samples first"
            )
        if z.dtype != self.dtype:
            raise TypeError(
                f"apply_fn returned logits of dtype {z.dtype} but params have {self.dtype}: "
                "the model must compute in its parameters' dtype"
            )
        if not bool(jnp.all(jnp.isfinite(z))):
            raise NonFiniteError(
                "logits: the model output contains NaN or infinite values at these parameters "
                "and inputs"
            )
        return jnp.reshape(z, (n, -1))

    # ------------------------------------------------------------------ theta <-> params
    def params_vector(self) -> jax.Array:
        """theta (P,), ``ravel_pytree(params)[0]``."""
        return self._theta

    def ravel(self, tree: Any, name: str = "tree") -> jax.Array:
        """A pytree shaped like ``params`` as a vector (P,) in theta's order."""
        check_like(tree, name, self.params, "params")
        return ravel_pytree(tree)[0]

    def unravel(self, vector: Any) -> Any:
        """A vector (P,) (an update, say) as a pytree shaped like ``params``."""
        self._check_vector(vector)
        return self._unravel(vector)

    # ---------------------------------------------------------------------- operations
    def logits(self) -> jax.Array:
        """Logits z (N, C), computed once at construction."""
        return self._logits

    @property
    def num_samples(self) -> int:
        """N, the batch size."""
        return int(self._logits.shape[0])

    def jvp(self, vector: Any) -> jax.Array:
        r"""Row n is :math:`J_n v`; shape (N, C), for v (P,) of theta's dtype."""
        self._check_vector(vector)
        return kernels.batch_jvp(self.apply_fn, self.params, self.inputs, vector)

    def vjp(self, cotangents: Any) -> jax.Array:
        r"""Row n is :math:`J_n^\top u_n`; shape (N, P), for u (N, C) of the logits' dtype.

        With ``u = loss.grad(logits, targets)`` row n is grad_theta l_n (sum convention).
        """
        self._check_cotangents(cotangents)
        return kernels.per_sample_vjp(self.apply_fn, self.params, self.inputs, cotangents)

    def vjp_sum(self, cotangents: Any) -> jax.Array:
        r""":math:`\sum_n J_n^\top u_n`; shape (P,), by one reverse pass over the batch."""
        self._check_cotangents(cotangents)
        return kernels.summed_vjp(self.apply_fn, self.params, self.inputs, cotangents)

    def jacobian(self) -> jax.Array:
        r""":math:`J_n`; shape (N, C, P)."""
        return kernels.per_sample_jacobian(self.apply_fn, self.params, self.inputs)
