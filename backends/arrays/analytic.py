r"""Closed-form Jacobian providers: the linear model and the paper's toy problems
(App. B; the conventions page, :ref:`conv-toys`).

:class:`LinearProvider` is ``z_n = W x_n (+ b)`` with all four provider
operations written in closed form. The two toy problems of the paper's App. B
are linear models on the features ``(1, x_n)`` and come with their curvature
matrices and updates in closed form (plain Python floats), so that tests can
check the dense linear algebra of the library against numbers derived by hand:

- :func:`least_squares_toy` / :func:`least_squares_toy_closed_form`:
  ``z = theta_0 + theta_1 x`` on x = (0, 1), targets (0, 0), squared error.
- :func:`logistic_toy` / :func:`logistic_toy_closed_form`:
  ``p = sigmoid(theta_0 + theta_1 x)`` on x = (0, 2), labels (1, 0).

Everything is array-API generic (NumPy, array_api_strict, torch, CuPy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ngdref.checks import (
    EMPTY_BATCH,
    check_finite,
    check_floating,
    check_int,
    check_ndim,
    namespace,
)
from ngdref.losses import SigmoidBinaryCrossEntropy, SquaredError
from ngdref.provider import JacobianProvider

__all__ = [
    "LEAST_SQUARES_TOY_X",
    "LOGISTIC_TOY_X",
    "LeastSquaresToyClosedForm",
    "LinearProvider",
    "LogisticToyClosedForm",
    "least_squares_toy",
    "least_squares_toy_closed_form",
    "logistic_toy",
    "logistic_toy_closed_form",
]

Matrix2 = tuple[tuple[float, float], tuple[float, float]]
Vector2 = tuple[float, float]

#: inputs x_n of the least-squares toy (:ref:`conv-toys`); targets are (0, 0)
LEAST_SQUARES_TOY_X = (0.0, 1.0)
#: inputs x_n of the logistic toy (:ref:`conv-toys`); labels are (1, 0)
LOGISTIC_TOY_X = (0.0, 2.0)
_LOGISTIC_TOY_LABELS = (1.0, 0.0)


class LinearProvider(JacobianProvider):
    r"""The linear model ``z_n = W x_n + b`` in closed form.

    The parameter vector is ``theta = [vec(W), b]`` with W flattened row-major
    (entry (c, d) at index ``c * D + d``), followed by b when there is a bias:
    P = C * D, or C * D + C with a bias. Then

    .. math::
        J_n = [\, I_C \otimes x_n^\top \;|\; I_C \,], \quad
        J_n v = V x_n + v_b, \quad
        J_n^\top u_n = [\, \mathrm{vec}(u_n x_n^\top),\; u_n \,]

    where v = [vec(V), v_b]. No operation materialises more than its result.

    Parameters
    ----------
    weights : array, shape (C, D)
        W, real floating.
    inputs : array, shape (N, D)
        Rows x_n; the dtype of ``weights``.
    bias : array, shape (C,), optional
        b; the dtype of ``weights``. Without it the model has no bias parameters.
    """

    def __init__(self, weights: Any, inputs: Any, bias: Any = None) -> None:
        xp = namespace(weights=weights, inputs=inputs, bias=bias)
        check_ndim(weights, "weights", 2, "(C, D)")
        check_floating(xp, weights, "weights")
        check_finite(xp, weights, "weights")
        check_ndim(inputs, "inputs", 2, "(N, D)")
        if inputs.shape[0] == 0:
            raise ValueError(f"inputs is {EMPTY_BATCH}")
        if inputs.shape[1] != weights.shape[1]:
            raise ValueError(
                f"inputs has {inputs.shape[1]} columns but weights has {weights.shape[1]} "
                "(D must match)"
            )
        if inputs.dtype != weights.dtype:
            raise TypeError(
                f"inputs has dtype {inputs.dtype} but weights has dtype {weights.dtype}"
            )
        check_finite(xp, inputs, "inputs")
        c, d = weights.shape
        if bias is not None:
            check_ndim(bias, "bias", 1, "(C,)")
            if bias.shape[0] != c:
                raise ValueError(f"bias has {bias.shape[0]} entries but weights has {c} rows")
            if bias.dtype != weights.dtype:
                raise TypeError(
                    f"bias has dtype {bias.dtype} but weights has dtype {weights.dtype}"
                )
            check_finite(xp, bias, "bias")
        self._xp = xp
        self.weights = weights
        self.inputs = inputs
        self.bias = bias
        self.num_params = c * d + (c if bias is not None else 0)
        z = xp.matmul(inputs, weights.T)
        self._logits = z if bias is None else z + bias

    @classmethod
    def from_params(
        cls, params: Any, inputs: Any, num_outputs: int, *, bias: bool = False
    ) -> LinearProvider:
        """Build from a flat ``params`` (P,) laid out as ``[vec(W), b]`` (see the class).

        Parameters
        ----------
        params : array, shape (C * D,) or (C * D + C,) with ``bias=True``
        inputs : array, shape (N, D)
        num_outputs : int
            C.
        bias : bool
            Whether the last C entries of ``params`` are the bias.
        """
        xp = namespace(params=params, inputs=inputs)
        check_ndim(params, "params", 1, "(P,)")
        check_ndim(inputs, "inputs", 2, "(N, D)")
        check_int(num_outputs, "num_outputs")
        c, d = num_outputs, inputs.shape[1]
        expected = c * d + (c if bias else 0)
        if params.shape[0] != expected:
            raise ValueError(
                f"params has {params.shape[0]} entries but C={c}, D={d} and bias={bias} "
                f"need {expected}"
            )
        weights = xp.reshape(params[: c * d], (c, d))
        return cls(weights, inputs, params[c * d:] if bias else None)

    @property
    def params(self) -> Any:
        """theta = [vec(W), b], shape (P,)."""
        xp = self._xp
        flat = xp.reshape(self.weights, (-1,))
        return flat if self.bias is None else xp.concat([flat, self.bias])

    def logits(self) -> Any:
        """z_n = W x_n + b, shape (N, C)."""
        return self._logits

    def jacobian(self) -> Any:
        r"""J_n = [I_C kron x_n^T | I_C], shape (N, C, P)."""
        xp = self._xp
        n, d = self.inputs.shape
        c = self.weights.shape[0]
        eye = xp.eye(c, dtype=self.weights.dtype, device=array_api_compat.device(self.weights))
        # entry [n, c, c', d] = delta(c, c') x_{n,d}
        blocks = eye[None, :, :, None] * self.inputs[:, None, None, :]
        jac = xp.reshape(blocks, (n, c, c * d))
        if self.bias is None:
            return jac
        return xp.concat([jac, xp.broadcast_to(eye[None, ...], (n, c, c))], axis=2)

    def _split(self, vector: Any) -> tuple[Any, Any]:
        c, d = self.weights.shape
        v_weights = self._xp.reshape(vector[: c * d], (c, d))
        return v_weights, (vector[c * d:] if self.bias is not None else None)

    def jvp(self, vector: Any) -> Any:
        r"""J_n v = V x_n + v_b, shape (N, C), for v = [vec(V), v_b] (P,)."""
        self._check_vector(vector)
        v_weights, v_bias = self._split(vector)
        out = self._xp.matmul(self.inputs, v_weights.T)
        return out if v_bias is None else out + v_bias

    def vjp(self, cotangents: Any) -> Any:
        r"""Per-sample J_n^T u_n = [vec(u_n x_n^T), u_n], shape (N, P)."""
        self._check_cotangents(cotangents)
        xp = self._xp
        n, d = self.inputs.shape
        c = self.weights.shape[0]
        outer = xp.reshape(cotangents[:, :, None] * self.inputs[:, None, :], (n, c * d))
        return outer if self.bias is None else xp.concat([outer, cotangents], axis=1)

    def vjp_sum(self, cotangents: Any) -> Any:
        r"""sum_n J_n^T u_n = [vec(U^T X), U^T 1], shape (P,), for U (N, C)."""
        self._check_cotangents(cotangents)
        xp = self._xp
        flat = xp.reshape(xp.matmul(cotangents.T, self.inputs), (-1,))
        return flat if self.bias is None else xp.concat([flat, xp.sum(cotangents, axis=0)])


# ---- the toy problems (the conventions page, section The toy problems in closed form) ------------


def _theta_pair(theta: Any) -> Vector2:
    """theta as two Python floats, whatever it came as (sequence or array)."""
    if array_api_compat.is_array_api_obj(theta):
        if theta.ndim != 1:
            raise ValueError(f"theta must have shape (2,), got shape {tuple(theta.shape)}")
        values = [float(theta[i]) for i in range(theta.shape[0])]
    else:
        try:
            values = [float(t) for t in theta]
        except TypeError as err:
            raise TypeError(
                f"theta must be a sequence of two floats, got {type(theta).__name__}"
            ) from err
    if len(values) != 2:
        raise ValueError(f"theta must have 2 entries (theta_0, theta_1), got {len(values)}")
    if not all(math.isfinite(t) for t in values):
        raise ValueError(f"theta must be finite, got {values}")
    return values[0], values[1]


def _toy_provider(
    theta: Any, x: Sequence[float], xp: Any, dtype: Any, device: Any
) -> LinearProvider:
    """The model theta_0 + theta_1 x_n as a LinearProvider on the features (1, x_n)."""
    t0, t1 = _theta_pair(theta)
    dtype = xp.float64 if dtype is None else dtype
    weights = xp.asarray([[t0, t1]], dtype=dtype, device=device)
    inputs = xp.asarray([[1.0, xi] for xi in x], dtype=dtype, device=device)
    return LinearProvider(weights, inputs)


def least_squares_toy(
    theta: Any, xp: Any, *, dtype: Any = None, device: Any = None
) -> tuple[LinearProvider, SquaredError, Any]:
    r"""The least-squares toy at ``theta`` (:ref:`conv-toys`).

    .. math::
        z_n = \theta_0 + \theta_1 x_n, \quad x = (0, 1), \quad y = (0, 0), \quad
        L = \sum_n \tfrac12 (z_n - y_n)^2

    Parameters
    ----------
    theta : sequence of 2 floats, or array of shape (2,)
        (theta_0, theta_1); the provider's parameter vector in this order.
    xp : array namespace
        Where the arrays are created.
    dtype : dtype of ``xp``, optional
        Default ``xp.float64``.
    device : device of ``xp``, optional

    Returns
    -------
    provider : LinearProvider
        N = 2, C = 1, P = 2; ``J_n = (1, x_n)``.
    loss : SquaredError
    targets : array, shape (2, 1)
        Zeros.
    """
    provider = _toy_provider(theta, LEAST_SQUARES_TOY_X, xp, dtype, device)
    targets = xp.zeros((2, 1), dtype=provider.weights.dtype, device=device)
    return provider, SquaredError(), targets


def logistic_toy(
    theta: Any, xp: Any, *, dtype: Any = None, device: Any = None
) -> tuple[LinearProvider, SigmoidBinaryCrossEntropy, Any]:
    r"""The logistic toy at ``theta`` (:ref:`conv-toys`).

    .. math::
        z_n = \theta_0 + \theta_1 x_n, \quad x = (0, 2), \quad y = (1, 0), \quad
        l_n = \mathrm{softplus}(z_n) - y_n z_n

    Parameters and returns as :func:`least_squares_toy`; the loss is a
    :class:`~ngdref.losses.SigmoidBinaryCrossEntropy` (C = 1) and the targets
    are [[1], [0]].
    """
    provider = _toy_provider(theta, LOGISTIC_TOY_X, xp, dtype, device)
    targets = xp.asarray(
        [[y] for y in _LOGISTIC_TOY_LABELS], dtype=provider.weights.dtype, device=device
    )
    return provider, SigmoidBinaryCrossEntropy(), targets


def _inverse2(m: Matrix2) -> Matrix2:
    (a, b), (c, d) = m
    det = a * d - b * c
    return ((d / det, -b / det), (-c / det, a / det))


def _matvec2(m: Matrix2, v: Vector2) -> Vector2:
    return (m[0][0] * v[0] + m[0][1] * v[1], m[1][0] * v[0] + m[1][1] * v[1])


@dataclass(frozen=True)
class LeastSquaresToyClosedForm:
    r"""Closed forms of the least-squares toy (:ref:`conv-toys`), in the sum convention.

    With residuals r_1 = theta_0, r_2 = theta_0 + theta_1 and J_1 = (1, 0),
    J_2 = (1, 1):

    Attributes
    ----------
    residuals : (r_1, r_2)
        Also the logit gradients e_n; ``s_n = r_n^2``.
    loss : float
        L = (r_1^2 + r_2^2) / 2.
    grad : (2,)
        g = (r_1 + r_2, r_2).
    per_sample_grads : (2, 2)
        Rows r_n J_n.
    fisher : (2, 2)
        F = G_hat = F_iEF = [[2, 1], [1, 1]] whatever theta.
    fisher_inv : (2, 2)
        [[1, -1], [-1, 2]].
    empirical_fisher : (2, 2)
        F_EF = G^T G = [[r_1^2 + r_2^2, r_2^2], [r_2^2, r_2^2]].
    ngd : (2,)
        Undamped F^-1 g = theta (one unit step reaches the optimum).
    ief : (2,)
        Undamped iEF = theta.
    ef : (2,)
        Undamped EF G^-1 1 = (1/r_1, 1/r_2 - 1/r_1).
    """

    residuals: Vector2
    loss: float
    grad: Vector2
    per_sample_grads: Matrix2
    fisher: Matrix2
    fisher_inv: Matrix2
    empirical_fisher: Matrix2
    ngd: Vector2
    ief: Vector2
    ef: Vector2


def least_squares_toy_closed_form(theta: Any) -> LeastSquaresToyClosedForm:
    """Closed forms of the least-squares toy at ``theta`` (see :class:`LeastSquaresToyClosedForm`).

    Parameters
    ----------
    theta : sequence of 2 floats, or array of shape (2,)

    Raises
    ------
    ValueError
        If a residual is zero: the EF direction 1/r_n is undefined there.
    """
    t0, t1 = _theta_pair(theta)
    r1, r2 = t0, t0 + t1
    if r1 == 0.0 or r2 == 0.0:
        raise ValueError(
            f"theta={t0, t1} gives a zero residual (r_1={r1}, r_2={r2}): the EF update "
            "1/r_n is undefined"
        )
    return LeastSquaresToyClosedForm(
        residuals=(r1, r2),
        loss=0.5 * (r1 * r1 + r2 * r2),
        grad=(r1 + r2, r2),
        per_sample_grads=((r1, 0.0), (r2, r2)),
        fisher=((2.0, 1.0), (1.0, 1.0)),
        fisher_inv=((1.0, -1.0), (-1.0, 2.0)),
        empirical_fisher=((r1 * r1 + r2 * r2, r2 * r2), (r2 * r2, r2 * r2)),
        ngd=(t0, t1),
        ief=(t0, t1),
        ef=(1.0 / r1, 1.0 / r2 - 1.0 / r1),
    )


@dataclass(frozen=True)
class LogisticToyClosedForm:
    r"""Closed forms of the logistic toy (:ref:`conv-toys`), in the sum convention.

    With features phi_1 = (1, 0), phi_2 = (1, 2), z_n = theta^T phi_n,
    p_n = sigmoid(z_n), labels y = (1, 0):

    Attributes
    ----------
    probs : (p_1, p_2)
    logit_grads : (e_1, e_2)
        e_n = p_n - y_n; ``s_n = e_n^2``.
    loss : float
        L = sum_n softplus(z_n) - y_n z_n.
    grad : (2,)
        g = sum_n e_n phi_n.
    per_sample_grads : (2, 2)
        Rows e_n phi_n^T.
    fisher : (2, 2)
        F = sum_n p_n (1 - p_n) phi_n phi_n^T.
    gauss_newton : (2, 2)
        G_hat = sum_n phi_n phi_n^T = [[2, 2], [2, 4]] = F_iEF (C = 1, Eq. 18).
    ngd : (2,)
        Undamped F^-1 g.
    ief : (2,)
        Undamped iEF G^-1 s = G_hat^-1 g (G is square and invertible).
    ef : (2,)
        Undamped EF G^-1 1.
    """

    probs: Vector2
    logit_grads: Vector2
    loss: float
    grad: Vector2
    per_sample_grads: Matrix2
    fisher: Matrix2
    gauss_newton: Matrix2
    ngd: Vector2
    ief: Vector2
    ef: Vector2


def _softplus(z: float) -> float:
    return max(z, 0.0) + math.log1p(math.exp(-abs(z)))


def _sigmoid(z: float) -> float:
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    ez = math.exp(z)
    return ez / (1.0 + ez)


def logistic_toy_closed_form(theta: Any) -> LogisticToyClosedForm:
    """Closed forms of the logistic toy at ``theta`` (see :class:`LogisticToyClosedForm`).

    Parameters
    ----------
    theta : sequence of 2 floats, or array of shape (2,)
    """
    t0, t1 = _theta_pair(theta)
    x1, x2 = LOGISTIC_TOY_X
    y1, y2 = _LOGISTIC_TOY_LABELS
    z1, z2 = t0 + t1 * x1, t0 + t1 * x2
    p1, p2 = _sigmoid(z1), _sigmoid(z2)
    e1, e2 = p1 - y1, p2 - y2
    h1, h2 = p1 * (1.0 - p1), p2 * (1.0 - p2)
    per_sample = ((e1, e1 * x1), (e2, e2 * x2))
    grad = (e1 + e2, e1 * x1 + e2 * x2)
    fisher = (
        (h1 + h2, h1 * x1 + h2 * x2),
        (h1 * x1 + h2 * x2, h1 * x1 * x1 + h2 * x2 * x2),
    )
    gauss_newton = ((2.0, x1 + x2), (x1 + x2, x1 * x1 + x2 * x2))
    g_inv = _inverse2(per_sample)
    return LogisticToyClosedForm(
        probs=(p1, p2),
        logit_grads=(e1, e2),
        loss=_softplus(z1) - y1 * z1 + _softplus(z2) - y2 * z2,
        grad=grad,
        per_sample_grads=per_sample,
        fisher=fisher,
        gauss_newton=gauss_newton,
        ngd=_matvec2(_inverse2(fisher), grad),
        ief=_matvec2(g_inv, (e1 * e1, e2 * e2)),
        ef=_matvec2(g_inv, (1.0, 1.0)),
    )
