r"""A small tanh multilayer perceptron on a flat parameter vector, array-API generic.

For layer sizes ``sizes = (D, H_1, ..., H_{L-1}, C)`` the model is

.. math::
    a_0 = x_n, \quad
    z_l = W_l a_{l-1} + b_l, \quad
    a_l = \tanh(z_l) \ (l < L), \quad
    f(\theta, x_n) = z_L

with W_l of shape (sizes[l], sizes[l-1]). The flat parameter vector theta
holds, layer after layer, W_l flattened row-major and then b_l:
``theta = [vec(W_1), b_1, vec(W_2), b_2, ...]``, so
``P = sum_l sizes[l] * (sizes[l-1] + 1)``.

:func:`mlp_apply` is the forward pass, usable with any namespace and with
:class:`~backends.arrays.finite_difference.FiniteDifferenceProvider`;
:class:`MLPProvider` adds an exact hand-written backward and forward mode.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any

import array_api_compat

from ngdref.checks import EMPTY_BATCH, check_finite, check_floating, check_ndim, namespace
from ngdref.provider import JacobianProvider

__all__ = ["MLPProvider", "mlp_apply", "mlp_init", "mlp_num_params"]


def _check_sizes(sizes: Any) -> tuple[int, ...]:
    try:
        out = tuple(sizes)
    except TypeError as err:
        raise TypeError(f"sizes must be a sequence of ints, got {type(sizes).__name__}") from err
    if len(out) < 2:
        raise ValueError(f"sizes must have at least 2 entries (D, ..., C), got {out}")
    for s in out:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"sizes must hold ints >= 1, got {out}")
    return out


def mlp_num_params(sizes: Sequence[int]) -> int:
    """P = sum_l sizes[l] * (sizes[l-1] + 1), the length of the flat parameter vector."""
    sizes = _check_sizes(sizes)
    return sum(n_out * (n_in + 1) for n_in, n_out in itertools.pairwise(sizes))


def mlp_init(
    sizes: Sequence[int], key: int, xp: Any, dtype: Any = None, device: Any = None
) -> Any:
    r"""Random parameters, the same numbers on every backend for the same ``key``.

    Weights are N(0, 1 / fan_in) (LeCun initialisation, which keeps tanh
    units out of saturation); biases are N(0, 0.1^2), non-zero so that tests
    exercise them. The normals come from ``random.Random(key)``, the standard
    library's Mersenne Twister, then are converted to ``dtype``.

    Parameters
    ----------
    sizes : sequence of int, (D, H_1, ..., C)
    key : int
        The seed.
    xp : array namespace
    dtype : dtype of ``xp``, optional
        Default ``xp.float64``.
    device : device of ``xp``, optional

    Returns
    -------
    array, shape (P,)
        theta in the layout of the module docstring.
    """
    sizes = _check_sizes(sizes)
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"key must be an int seed, got {type(key).__name__}")
    rng = random.Random(key)
    values: list[float] = []
    for n_in, n_out in itertools.pairwise(sizes):
        scale = 1.0 / math.sqrt(n_in)
        values.extend(rng.gauss(0.0, scale) for _ in range(n_out * n_in))
        values.extend(rng.gauss(0.0, 0.1) for _ in range(n_out))
    dtype = xp.float64 if dtype is None else dtype
    return xp.asarray(values, dtype=dtype, device=device)


def _unflatten(xp: Any, params: Any, sizes: tuple[int, ...]) -> list[tuple[Any, Any]]:
    """[(W_l (out, in), b_l (out,)), ...] as views of ``params``."""
    layers = []
    offset = 0
    for n_in, n_out in itertools.pairwise(sizes):
        w = xp.reshape(params[offset:offset + n_out * n_in], (n_out, n_in))
        offset += n_out * n_in
        layers.append((w, params[offset:offset + n_out]))
        offset += n_out
    return layers


def _check_model(params: Any, inputs: Any, sizes: Any) -> tuple[Any, tuple[int, ...]]:
    """Validate (params, inputs, sizes); return the namespace and the sizes as a tuple."""
    sizes = _check_sizes(sizes)
    xp = namespace(params=params, inputs=inputs)
    check_ndim(params, "params", 1, "(P,)")
    check_floating(xp, params, "params")
    expected = mlp_num_params(sizes)
    if params.shape[0] != expected:
        raise ValueError(f"params has {params.shape[0]} entries but sizes={sizes} need {expected}")
    check_ndim(inputs, "inputs", 2, "(N, D)")
    if inputs.shape[1] != sizes[0]:
        raise ValueError(f"inputs has {inputs.shape[1]} columns but sizes[0] = {sizes[0]}")
    if inputs.dtype != params.dtype:
        raise TypeError(f"inputs has dtype {inputs.dtype} but params has dtype {params.dtype}")
    return xp, sizes


def _forward(xp: Any, layers: list[tuple[Any, Any]], inputs: Any) -> tuple[list[Any], Any]:
    """Activations [a_0, ..., a_{L-1}] and the logits z_L."""
    activations = [inputs]
    h = inputs
    for i, (w, b) in enumerate(layers):
        z = xp.matmul(h, w.T) + b
        if i == len(layers) - 1:
            return activations, z
        h = xp.tanh(z)
        activations.append(h)
    raise AssertionError("unreachable: an MLP has at least one layer")


def mlp_apply(params: Any, inputs: Any, sizes: Sequence[int]) -> Any:
    r"""The MLP's logits ``f(theta, x_n)`` for every row of ``inputs``.

    Parameters
    ----------
    params : array, shape (P,)
        theta in the layout of the module docstring.
    inputs : array, shape (N, D)
        The dtype of ``params``.
    sizes : sequence of int, (D, H_1, ..., C)

    Returns
    -------
    array, shape (N, C)
    """
    xp, sizes = _check_model(params, inputs, sizes)
    _, logits = _forward(xp, _unflatten(xp, params, sizes), inputs)
    return logits


class MLPProvider(JacobianProvider):
    r"""Exact per-sample Jacobians of the tanh MLP by hand-written backprop.

    With ``delta_l = dz_L / dz_l`` (the output's sensitivity to layer l's
    pre-activation; ``delta_L = I_C``,
    ``delta_{l-1} = (delta_l W_l) * (1 - a_{l-1}^2)``):

    .. math::
        \frac{\partial z_L}{\partial W_l} = \delta_l \otimes a_{l-1}, \quad
        \frac{\partial z_L}{\partial b_l} = \delta_l

    :meth:`vjp` runs the same recursion with one cotangent per sample instead of
    C, :meth:`jvp` the forward-mode recursion
    ``dz_l = W_l da_{l-1} + V_l a_{l-1} + c_l``, ``da_l = (1 - a_l^2) dz_l``.

    Parameters
    ----------
    params : array, shape (P,)
        theta in the layout of the module docstring; real floating, finite.
    inputs : array, shape (N, D)
        The dtype of ``params``.
    sizes : sequence of int, (D, H_1, ..., C)
    """

    def __init__(self, params: Any, inputs: Any, sizes: Sequence[int]) -> None:
        xp, sizes = _check_model(params, inputs, sizes)
        check_finite(xp, params, "params")
        check_finite(xp, inputs, "inputs")
        if inputs.shape[0] == 0:
            raise ValueError(f"inputs is {EMPTY_BATCH}")
        self._xp = xp
        self.params = params
        self.inputs = inputs
        self.sizes = sizes
        self.num_params = int(params.shape[0])
        self._layers = _unflatten(xp, params, sizes)
        self._activations, self._logits = _forward(xp, self._layers, inputs)

    def logits(self) -> Any:
        """z_L for every sample, shape (N, C)."""
        return self._logits

    def _backward(self, delta: Any, per_sample: bool) -> list[Any]:
        """Parameter gradients for output sensitivities ``delta`` (N, K, C) or (N, C).

        Returns the pieces [dW_1, db_1, dW_2, ...], each flattened over its
        parameters as the last axis: per sample (N, [K,] n) or summed (n,).
        """
        xp = self._xp
        pieces: list[Any] = []
        batch_shape = tuple(delta.shape[:-1])
        for i in range(len(self._layers) - 1, -1, -1):
            w, _ = self._layers[i]
            a_prev = self._activations[i]
            n_out, n_in = w.shape
            if per_sample:
                # a_prev (N, n_in) broadcast over the K cotangent axis, if any
                a = a_prev if delta.ndim == 2 else a_prev[:, None, :]
                outer = delta[..., :, None] * a[..., None, :]
                d_w = xp.reshape(outer, (*batch_shape, n_out * n_in))
                pieces.append(delta)
            else:
                d_w = xp.reshape(xp.matmul(delta.T, a_prev), (n_out * n_in,))
                pieces.append(xp.sum(delta, axis=0))
            pieces.append(d_w)
            if i > 0:
                a = a_prev if delta.ndim == 2 else a_prev[:, None, :]
                delta = xp.matmul(delta, w) * (1.0 - a * a)
        pieces.reverse()
        return pieces

    def jacobian(self) -> Any:
        r"""Per-sample Jacobians J_n, shape (N, C, P), by one backward pass with delta_L = I_C."""
        xp = self._xp
        n, c = self._logits.shape
        eye = xp.eye(c, dtype=self._logits.dtype, device=array_api_compat.device(self._logits))
        delta = xp.broadcast_to(eye[None, ...], (n, c, c))
        return xp.concat(self._backward(delta, per_sample=True), axis=2)

    def vjp(self, cotangents: Any) -> Any:
        r"""Per-sample J_n^T u_n, shape (N, P), by one backward pass with delta_L = u."""
        self._check_cotangents(cotangents)
        return self._xp.concat(self._backward(cotangents, per_sample=True), axis=1)

    def vjp_sum(self, cotangents: Any) -> Any:
        r"""sum_n J_n^T u_n, shape (P,): the backward pass of the summed loss."""
        self._check_cotangents(cotangents)
        return self._xp.concat(self._backward(cotangents, per_sample=False), axis=0)

    def jvp(self, vector: Any) -> Any:
        r"""J_n v, shape (N, C), by forward mode (tangent propagation)."""
        self._check_vector(vector)
        xp = self._xp
        tangent_layers = _unflatten(xp, vector, self.sizes)
        d_a = None
        for i, ((w, _), (v_w, v_b)) in enumerate(zip(self._layers, tangent_layers, strict=True)):
            a_prev = self._activations[i]
            d_z = xp.matmul(a_prev, v_w.T) + v_b
            if d_a is not None:
                d_z = d_z + xp.matmul(d_a, w.T)
            if i == len(self._layers) - 1:
                return d_z
            a = self._activations[i + 1]
            d_a = (1.0 - a * a) * d_z
        raise AssertionError("unreachable: an MLP has at least one layer")
