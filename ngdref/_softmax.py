r"""Softmax kernels over the last axis, shared by the softmax losses of :mod:`ngdref.losses`.

Every function takes the array namespace ``xp`` of its arrays and works over the last axis
of z (..., V). Each one shifts by the maximum first, so exp never overflows, and each is
written to make as few passes over the (..., V) array as it can: at a real vocabulary (T5's
32128 tokens) the loss is a measurable part of an optimiser step.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

__all__ = ["categorical", "cross_entropy", "diag_embed", "eye_like", "minus_one_hot", "softmax"]


def eye_like(xp: Any, z: Any) -> Any:
    """The (V, V) identity in z's dtype and on its device."""
    return xp.eye(z.shape[-1], dtype=z.dtype, device=array_api_compat.device(z))


def diag_embed(xp: Any, d: Any) -> Any:
    """(N, C) -> (N, C, C) with ``d`` on the diagonals."""
    return d[:, :, None] * eye_like(xp, d)


def softmax(xp: Any, z: Any) -> Any:
    r""":math:`p = e^{z - m} / \sum_v e^{z_v - m}`, m = max_v z_v."""
    e = xp.exp(z - xp.max(z, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def minus_one_hot(xp: Any, p: Any, labels: Any) -> Any:
    """``p - onehot(labels)`` (..., V) for integer ``labels`` (...): 1 subtracted where
    the label is (the same numbers as subtracting a one-hot array, without forming it)."""
    hit = labels[..., None] == xp.arange(p.shape[-1], device=array_api_compat.device(labels))
    return xp.where(hit, p - 1.0, p)


def cross_entropy(xp: Any, z: Any, labels: Any, *, grad: bool) -> tuple[Any, Any]:
    r"""The cross-entropy of z (..., V) at integer ``labels`` (...), and its gradient.

    .. math::
        l = -\log \mathrm{softmax}(z)[y] = \log \sum_v e^{z_v - m} - (z_y - m), \qquad
        \frac{\partial l}{\partial z} = \mathrm{softmax}(z) - \mathrm{onehot}(y)

    with m = max_v z_v; both from one shift, one exp and one sum over v. Returns
    ``(l, e)``: l (...), e (..., V), or None when ``grad`` is False.
    """
    shifted = z - xp.max(z, axis=-1, keepdims=True)
    exp = xp.exp(shifted)
    total = xp.sum(exp, axis=-1, keepdims=True)
    picked = xp.take_along_axis(shifted, _indices(xp, labels)[..., None], axis=-1)
    value = (xp.log(total) - picked)[..., 0]
    return value, (minus_one_hot(xp, exp / total, labels) if grad else None)


def _indices(xp: Any, labels: Any) -> Any:
    """``labels`` in the namespace's index dtype: torch's gather takes int64 only, and JAX
    without 64-bit types has no int64 (asking for it warns)."""
    dtype = xp.__array_namespace_info__().default_dtypes()["indexing"]
    return labels if labels.dtype == dtype else xp.astype(labels, dtype)


def categorical(xp: Any, probs: Any, uniforms: Any) -> Any:
    """Inverse-CDF draw: one label per uniform. probs (..., C), uniforms (K, ...)."""
    cdf = xp.cumulative_sum(probs, axis=-1)
    below = xp.astype(cdf[None, ...] <= uniforms[..., None], xp.int64)
    # Rounding can leave cdf[-1] slightly below 1: clip to the last class.
    return xp.clip(xp.sum(below, axis=-1), max=probs.shape[-1] - 1)
