r"""A Jacobian provider for any function of a flat parameter vector, by central differences.

``FiniteDifferenceProvider(fn, params, inputs)`` stands for the model
``z = fn(params, inputs)`` (N, C) evaluated at ``params`` (P,). It needs nothing
but forward evaluations, so it is the route of last resort and the independent
check of every autodiff or hand-written provider:

.. math::
    J_{n,:,j} \approx \frac{f_n(\theta + h_j e_j) - f_n(\theta - h_j e_j)}
                           {(\theta_j + h_j) - (\theta_j - h_j)},
    \qquad
    J_n v \approx \frac{f_n(\theta + h v) - f_n(\theta - h v)}{2 h}.

The code is array-API generic: it runs unchanged on NumPy, array_api_strict,
torch and CuPy arrays, on the device of ``params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat

from ngdref.checks import (
    check_array,
    check_finite,
    check_floating,
    check_int,
    check_real,
    namespace,
)
from ngdref.provider import JacobianProvider

__all__ = ["FiniteDifferenceProvider", "default_relative_step"]


def default_relative_step(xp: Any, dtype: Any) -> float:
    r"""The default relative step ``eps ** (1/3)`` of a floating dtype.

    The error of a central difference with step h is about
    ``h^2 |f'''| / 6`` (truncation) plus ``eps |f| / h`` (rounding of the two
    evaluations); their sum is smallest at ``h ~ (3 eps |f| / |f'''|)^{1/3}``.
    With f and its third derivative of comparable size on the scale of the
    parameters, that is ``h = eps^{1/3}`` times that scale, and both error terms
    are then ``O(eps^{2/3})``: about 4e-11 in float64 and 2e-5 in float32.

    Parameters
    ----------
    xp : array namespace
    dtype : a real floating dtype of ``xp``

    Returns
    -------
    float
    """
    return float(xp.finfo(dtype).eps) ** (1.0 / 3.0)


class FiniteDifferenceProvider(JacobianProvider):
    r"""Per-sample logit Jacobians of ``fn(params, inputs)`` by central differences.

    .. math::
        J_{n,:,j} \approx \frac{z_n(\theta + h_j e_j) - z_n(\theta - h_j e_j)}{2 h_j},
        \qquad h_j = h_{\mathrm{rel}} \max(1, |\theta_j|)

    Parameters
    ----------
    fn : callable ``(params, inputs) -> logits``
        The model. ``params`` is a flat vector (P,); the result is an array of
        shape (N, C) in the namespace, dtype and device of ``params``. It must
        be a pure function: it is called 2P + 1 times for :meth:`jacobian`.
    params : array, shape (P,)
        theta, a real floating vector.
    inputs : any
        Passed to ``fn`` unchanged (e.g. the batch x, shape (N, D)). If it is an
        array it must share the namespace and device of ``params``.
    step : float, optional
        The relative step ``h_rel`` > 0. Column j of :meth:`jacobian` moves
        theta_j by ``h_rel * max(1, |theta_j|)``; :meth:`jvp` moves theta by a
        vector of norm ``h_rel * max(1, max_j |theta_j|)``. Default
        ``eps ** (1/3)`` of the dtype of ``params`` (see
        :func:`default_relative_step`).
    chunk_size : int, optional
        Samples per block in :meth:`vjp`; bounds the temporaries of the
        contraction. Each row J_n^T u_n is computed on its own, so the result
        does not depend on it. Default: all samples in one block.

    Notes
    -----
    Accuracy is ``O(eps^{2/3})`` relative (about 1e-10 in float64, 1e-5 in
    float32 for well-scaled models), not machine precision: compare it with
    exact routes at a finite-difference tolerance.

    The logits ``fn(params, inputs)`` are computed once, at construction, and
    the Jacobian once, at its first use (:meth:`jacobian`, :meth:`vjp`,
    :meth:`vjp_sum`); both are cached. :meth:`jvp` does not use the cache: it
    is one central difference along v (two calls of ``fn``).
    """

    def __init__(
        self,
        fn: Callable[[Any, Any], Any],
        params: Any,
        inputs: Any,
        *,
        step: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable as fn(params, inputs), got {type(fn).__name__}")
        xp = namespace(params=params)
        check_array(
            xp, params, "params", 1, "(P,)", empty="empty (P = 0): at least one parameter is needed"
        )
        if array_api_compat.is_array_api_obj(inputs):
            namespace(params=params, inputs=inputs)
        if step is None:
            step = default_relative_step(xp, params.dtype)
        else:
            step = check_real(step, "step", positive=True)
        check_int(chunk_size, "chunk_size", optional=True)

        self._xp = xp
        self._fn = fn
        self._params = params
        self._inputs = inputs
        self._step = float(step)
        self._chunk_size = chunk_size
        self._jacobian: Any = None
        self.num_params = int(params.shape[0])
        self._logits = self._evaluate(params, "at params")

    # ---- helpers ------------------------------------------------------------
    def _evaluate(self, theta: Any, where: str) -> Any:
        """``fn(theta, inputs)`` after checking it is a finite (N, C) array like ``params``."""
        z = self._fn(theta, self._inputs)
        if not array_api_compat.is_array_api_obj(z):
            raise TypeError(
                f"fn(params, inputs) must return an array, got {type(z).__name__} ({where})"
            )
        if array_api_compat.array_namespace(z) is not self._xp:
            raise TypeError(
                "fn(params, inputs) must return an array of the namespace of params "
                f"({self._xp.__name__}), got {array_api_compat.array_namespace(z).__name__}"
            )
        if z.ndim != 2:
            raise ValueError(
                f"fn(params, inputs) must return logits of shape (N, C), got shape "
                f"{tuple(z.shape)} ({where})"
            )
        if z.dtype != self._params.dtype:
            raise TypeError(
                f"fn(params, inputs) returned logits of dtype {z.dtype} but params has dtype "
                f"{self._params.dtype}"
            )
        if hasattr(self, "_logits") and tuple(z.shape) != tuple(self._logits.shape):
            raise ValueError(
                f"fn(params, inputs) returned shape {tuple(z.shape)} {where}, but "
                f"{tuple(self._logits.shape)} at params"
            )
        if not bool(self._xp.all(self._xp.isfinite(z))):
            raise ValueError(
                f"fn(params, inputs) returned logits containing NaN or infinite values ({where})"
            )
        return z

    # ---- the provider protocol -------------------------------------------------
    def logits(self) -> Any:
        """Logits z = fn(params, inputs), shape (N, C) (cached)."""
        return self._logits

    def jacobian(self) -> Any:
        r"""Per-sample Jacobians J_n by P central differences, shape (N, C, P) (cached).

        .. math::
            J_{n,:,j} = \frac{z_n(\theta^+_j) - z_n(\theta^-_j)}
                             {\theta^+_{j,j} - \theta^-_{j,j}},
            \quad \theta^\pm_j = \theta \pm h_j e_j

        The denominator is the difference of the perturbed parameters as
        stored, not 2 h_j: it is the step the function actually saw.
        """
        if self._jacobian is None:
            xp = self._xp
            theta = self._params
            h = self._step * xp.maximum(xp.abs(theta), 1.0)
            plus = theta + h
            minus = theta - h
            denominators = plus - minus
            index = xp.arange(self.num_params, device=array_api_compat.device(theta))
            columns = []
            for j in range(self.num_params):
                hit = index == j
                z_plus = self._evaluate(xp.where(hit, plus, theta), f"at params + step * e_{j}")
                z_minus = self._evaluate(xp.where(hit, minus, theta), f"at params - step * e_{j}")
                columns.append((z_plus - z_minus) / denominators[j])
            self._jacobian = xp.stack(columns, axis=2)
        return self._jacobian

    def jvp(self, vector: Any) -> Any:
        r"""J_n v by one central difference along v, shape (N, C).

        .. math::
            J_n v \approx \frac{z_n(\theta + h v) - z_n(\theta - h v)}{2 h}, \quad
            h = h_{\mathrm{rel}} \max(1, \max_j |\theta_j|) / \|v\|_2

        so the perturbation h v has norm ``h_rel * max(1, max_j |theta_j|)``
        whatever the scale of v. Two calls of ``fn``; zero for v = 0.

        Parameters
        ----------
        vector : array, shape (P,)
        """
        self._check_vector(vector)
        xp = self._xp
        check_floating(xp, vector, "vector")
        check_finite(xp, vector, "vector")
        norm = float(xp.sqrt(xp.sum(vector * vector)))
        if norm == 0.0:
            return xp.zeros_like(self._logits)
        theta = self._params
        h = self._step * max(1.0, float(xp.max(xp.abs(theta)))) / norm
        z_plus = self._evaluate(theta + h * vector, "at params + step * vector")
        z_minus = self._evaluate(theta - h * vector, "at params - step * vector")
        return (z_plus - z_minus) / (2.0 * h)

    def vjp(self, cotangents: Any) -> Any:
        r"""Per-sample J_n^T u_n from the finite-difference Jacobian, shape (N, P).

        Parameters
        ----------
        cotangents : array, shape (N, C)
            u; row n multiplies J_n.
        """
        self._check_cotangents(cotangents)
        xp = self._xp
        jac = self.jacobian()
        n = jac.shape[0]
        chunk = n if self._chunk_size is None else self._chunk_size
        blocks = []
        for start in range(0, n, chunk):
            # slices stay in bounds: the array API leaves out-of-bounds stops unspecified
            stop = min(start + chunk, n)
            product = xp.matmul(cotangents[start:stop, None, :], jac[start:stop, ...])
            blocks.append(product[:, 0, :])
        return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=0)
