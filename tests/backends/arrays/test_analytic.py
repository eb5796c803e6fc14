"""LinearProvider, the provider defaults, and the toy problems (:ref:`conv-toys`).

Expected values come from other routes: the Kronecker product built by NumPy,
dense NumPy contractions of a Jacobian, the numbers printed on the conventions page,
and 2 x 2 closed forms derived by hand (``*_toy_closed_form``) against dense
linear algebra on the providers' Jacobians and the losses' derivatives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from backends.arrays.analytic import (
    LinearProvider,
    least_squares_toy,
    least_squares_toy_closed_form,
    logistic_toy,
    logistic_toy_closed_form,
)
from backends.arrays.mlp import MLPProvider, mlp_init
from ngdref.provider import JacobianProvider
from tests.array_backends import Backend, tolerance

# ---- LinearProvider against the Kronecker product ------------------------------------------

LINEAR_CASES = [
    # (C, D, N, bias)
    (1, 1, 1, False),
    (3, 4, 5, False),
    (2, 3, 4, True),
    (4, 2, 3, True),
]
LINEAR_IDS = [f"C{c}_D{d}_N{n}{'_bias' if b else ''}" for c, d, n, b in LINEAR_CASES]


def _linear_arrays(c: int, d: int, n: int, bias: bool) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(c * 100 + d * 10 + n)
    w, x = rng.normal(size=(c, d)), rng.normal(size=(n, d))
    b = rng.normal(size=c) if bias else None
    return w, x, b


def _kron_jacobian(w: np.ndarray, x: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """J_n = [I_C kron x_n^T | I_C] with np.kron, shape (N, C, P)."""
    c = w.shape[0]
    blocks = []
    for xn in x:
        jn = np.kron(np.eye(c), xn[None, :])
        blocks.append(jn if b is None else np.concatenate([jn, np.eye(c)], axis=1))
    return np.stack(blocks)


def _linear_provider(backend: Backend, w: Any, x: Any, b: Any) -> LinearProvider:
    bias = None if b is None else backend.asarray(b)
    return LinearProvider(backend.asarray(w), backend.asarray(x), bias)


@pytest.mark.parametrize(("c", "d", "n", "bias"), LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_jacobian_is_kron(c: int, d: int, n: int, bias: bool, backend: Backend) -> None:
    w, x, b = _linear_arrays(c, d, n, bias)
    provider = _linear_provider(backend, w, x, b)
    expected = _kron_jacobian(w, x, b)
    assert provider.num_params == expected.shape[2]
    np.testing.assert_allclose(backend.to_numpy(provider.jacobian()), expected, **tolerance())
    z = x @ w.T + (0.0 if b is None else b)
    np.testing.assert_allclose(backend.to_numpy(provider.logits()), z, **tolerance())
    # the logits are linear in theta with this very Jacobian: z_n = J_n theta
    theta = np.concatenate([w.ravel()] + ([] if b is None else [b]))
    np.testing.assert_allclose(np.einsum("ncp,p->nc", expected, theta), z, **tolerance())
    np.testing.assert_allclose(backend.to_numpy(provider.params), theta, **tolerance())


@pytest.mark.parametrize(("c", "d", "n", "bias"), LINEAR_CASES, ids=LINEAR_IDS)
def test_linear_jvp_vjp_against_dense(
    c: int, d: int, n: int, bias: bool, backend: Backend
) -> None:
    w, x, b = _linear_arrays(c, d, n, bias)
    provider = _linear_provider(backend, w, x, b)
    jac = _kron_jacobian(w, x, b)
    rng = np.random.default_rng(1)
    v, u = rng.normal(size=jac.shape[2]), rng.normal(size=(n, c))
    jv = backend.to_numpy(provider.jvp(backend.asarray(v)))
    jtu = backend.to_numpy(provider.vjp(backend.asarray(u)))
    np.testing.assert_allclose(jv, np.einsum("ncp,p->nc", jac, v), **tolerance())
    np.testing.assert_allclose(jtu, np.einsum("nc,ncp->np", u, jac), **tolerance())
    np.testing.assert_allclose(
        backend.to_numpy(provider.vjp_sum(backend.asarray(u))),
        np.einsum("nc,ncp->p", u, jac),
        **tolerance(),
    )
    # u^T (J v) = (J^T u)^T v, with both sides from the provider
    np.testing.assert_allclose(np.sum(u * jv), np.sum(jtu * v), **tolerance())


def test_linear_operations_are_closed_forms_not_defaults() -> None:
    for method in ("jacobian", "jvp", "vjp", "vjp_sum"):
        assert getattr(LinearProvider, method) is not getattr(JacobianProvider, method), method


def test_from_params_round_trip(backend: Backend) -> None:
    w, x, b = _linear_arrays(2, 3, 4, True)
    theta = np.concatenate([w.ravel(), b])
    provider = LinearProvider.from_params(backend.asarray(theta), backend.asarray(x), 2, bias=True)
    np.testing.assert_allclose(backend.to_numpy(provider.weights), w, **tolerance())
    np.testing.assert_allclose(backend.to_numpy(provider.bias), b, **tolerance())
    np.testing.assert_allclose(backend.to_numpy(provider.params), theta, **tolerance())


# ---- the defaults of JacobianProvider: one method given, the others derived ----------------


class _Wrapped(JacobianProvider):
    """Delegates logits and exactly one operation to an exact provider."""

    def __init__(self, base: JacobianProvider) -> None:
        self.base = base
        self.num_params = base.num_params

    def logits(self) -> Any:
        return self.base.logits()


class OnlyJacobian(_Wrapped):
    def jacobian(self) -> Any:
        return self.base.jacobian()


class OnlyJvp(_Wrapped):
    def jvp(self, vector: Any) -> Any:
        return self.base.jvp(vector)


class OnlyVjp(_Wrapped):
    def vjp(self, cotangents: Any) -> Any:
        return self.base.vjp(cotangents)


class Nothing(_Wrapped):
    pass


def _linear_base(backend: Backend) -> JacobianProvider:
    return _linear_provider(backend, *_linear_arrays(3, 2, 4, True))


def _mlp_base(backend: Backend) -> JacobianProvider:
    sizes = (3, 4, 2)
    x = np.random.default_rng(3).normal(size=(5, 3))
    return MLPProvider(mlp_init(sizes, 3, backend.xp), backend.asarray(x), sizes)


@pytest.mark.parametrize("make_base", [_linear_base, _mlp_base], ids=["linear", "mlp"])
@pytest.mark.parametrize("wrapper", [OnlyJacobian, OnlyJvp, OnlyVjp])
def test_default_derived_operations(
    wrapper: type[_Wrapped], make_base: Callable, backend: Backend
) -> None:
    base = make_base(backend)
    provider = wrapper(base)
    implemented = {m for m in ("jacobian", "jvp", "vjp") if provider._implements(m)}
    assert implemented == {wrapper.__name__.removeprefix("Only").lower()}
    # the reference: the base's own Jacobian, contracted by NumPy
    jac = backend.to_numpy(base.jacobian())
    n, c, p = jac.shape
    rng = np.random.default_rng(4)
    v, u = rng.normal(size=p), rng.normal(size=(n, c))
    assert provider.num_samples == n and provider.num_outputs == c
    got_jac = provider.jacobian()
    assert tuple(got_jac.shape) == (n, c, p)
    np.testing.assert_allclose(backend.to_numpy(got_jac), jac, **tolerance())
    np.testing.assert_allclose(
        backend.to_numpy(provider.jvp(backend.asarray(v))),
        np.einsum("ncp,p->nc", jac, v),
        **tolerance(),
    )
    np.testing.assert_allclose(
        backend.to_numpy(provider.vjp(backend.asarray(u))),
        np.einsum("nc,ncp->np", u, jac),
        **tolerance(),
    )
    np.testing.assert_allclose(
        backend.to_numpy(provider.vjp_sum(backend.asarray(u))),
        np.einsum("nc,ncp->p", u, jac),
        **tolerance(),
    )


def test_provider_without_operations(backend: Backend) -> None:
    provider = Nothing(_linear_base(backend))
    with pytest.raises(NotImplementedError, match="Nothing"):
        provider.jacobian()
    with pytest.raises(NotImplementedError, match="Nothing"):
        provider.vjp(backend.asarray(np.zeros((4, 3))))


@pytest.mark.parametrize("wrapper", [OnlyJacobian, OnlyJvp, OnlyVjp])
def test_default_derived_operations_check_shapes(
    wrapper: type[_Wrapped], backend: Backend
) -> None:
    provider = wrapper(_linear_base(backend))
    if wrapper is not OnlyJvp:
        with pytest.raises(ValueError, match="vector"):
            provider.jvp(backend.asarray(np.zeros(provider.num_params + 1)))
    if wrapper is not OnlyVjp:
        with pytest.raises(ValueError, match="cotangents"):
            provider.vjp(backend.asarray(np.zeros((4, 2))))


# ---- the toy problems: dense linear algebra on the providers vs closed forms ---------------


def _dense_quantities(
    provider: JacobianProvider, loss: Any, targets: Any, backend: Backend
) -> dict[str, Any]:
    """Curvatures and undamped updates from J, e and H by dense NumPy (not ngdref.updates)."""
    jac = backend.to_numpy(provider.jacobian())  # (N, C, P)
    z = provider.logits()
    e = backend.to_numpy(loss.grad(z, targets))  # (N, C)
    h = backend.to_numpy(loss.hessian(z, targets))  # (N, C, C)
    per_sample = np.einsum("ncp,nc->np", jac, e)  # G, rows J_n^T e_n
    s = np.sum(e * e, axis=1)
    g = per_sample.sum(axis=0)
    fisher = np.einsum("ncp,ncd,ndq->pq", jac, h, jac)
    gauss_newton = np.einsum("ncp,ncq->pq", jac, jac)
    gram = per_sample @ per_sample.T
    return {
        "loss": float(np.sum(backend.to_numpy(loss.value(z, targets)))),
        "logit_grads": e[:, 0],
        "per_sample_grads": per_sample,
        "grad": g,
        "fisher": fisher,
        "gauss_newton": gauss_newton,
        "empirical_fisher": per_sample.T @ per_sample,
        "ief_matrix": per_sample.T @ np.diag(1.0 / s) @ per_sample,
        "ngd": np.linalg.solve(fisher, g),
        "ef": per_sample.T @ np.linalg.solve(gram, np.ones(len(s))),
        "ief": per_sample.T @ np.linalg.solve(gram, s),
    }


THETAS = [(1.5, -0.7), (0.3, 2.0), (-1.0, 0.4), (2.0, -5.0)]


def test_least_squares_toy_spec_numbers(backend: Backend) -> None:
    """:ref:`conv-toys` at theta = (1.5, -0.7), from the provider and the loss."""
    provider, loss, targets = least_squares_toy((1.5, -0.7), backend.xp)
    dense = _dense_quantities(provider, loss, targets, backend)
    tol = tolerance()
    np.testing.assert_allclose(dense["fisher"], [[2.0, 1.0], [1.0, 1.0]], **tol)
    np.testing.assert_allclose(np.linalg.inv(dense["fisher"]), [[1.0, -1.0], [-1.0, 2.0]], **tol)
    # Eq. 20: F = G_hat = F_iEF for least squares
    np.testing.assert_allclose(dense["gauss_newton"], dense["fisher"], **tol)
    np.testing.assert_allclose(dense["ief_matrix"], dense["fisher"], **tol)
    np.testing.assert_allclose(dense["ngd"], [1.5, -0.7], **tol)
    np.testing.assert_allclose(dense["ief"], [1.5, -0.7], **tol)
    # the conventions page prints the EF direction to 4 decimals
    np.testing.assert_allclose(dense["ef"], [0.6667, 0.5833], atol=5e-5, rtol=0)
    np.testing.assert_allclose(dense["per_sample_grads"] @ dense["ef"], [1.0, 1.0], **tol)


def test_least_squares_closed_form_spec_numbers() -> None:
    closed = least_squares_toy_closed_form((1.5, -0.7))
    np.testing.assert_allclose(closed.fisher, [[2.0, 1.0], [1.0, 1.0]], **tolerance())
    np.testing.assert_allclose(closed.fisher_inv, [[1.0, -1.0], [-1.0, 2.0]], **tolerance())
    np.testing.assert_allclose(closed.ngd, [1.5, -0.7], **tolerance())
    np.testing.assert_allclose(closed.ief, [1.5, -0.7], **tolerance())
    np.testing.assert_allclose(closed.ef, [0.6667, 0.5833], atol=5e-5, rtol=0)
    np.testing.assert_allclose(
        np.asarray(closed.per_sample_grads) @ np.asarray(closed.ef), [1.0, 1.0], **tolerance()
    )
    np.testing.assert_allclose(closed.fisher @ np.asarray(closed.fisher_inv), np.eye(2), atol=0)


#: (toy, its closed form, {dense quantity: closed-form field}) beyond the SHARED names
SHARED = ("loss", "grad", "per_sample_grads", "fisher", "ngd", "ief", "ef")
TOYS = [
    (least_squares_toy, least_squares_toy_closed_form,
     {"logit_grads": "residuals", "empirical_fisher": "empirical_fisher"}),
    (logistic_toy, logistic_toy_closed_form,
     {"logit_grads": "logit_grads", "gauss_newton": "gauss_newton"}),
]


@pytest.mark.parametrize("theta", THETAS)
@pytest.mark.parametrize(
    ("toy", "closed_form", "fields"), TOYS, ids=["least_squares", "logistic"]
)
def test_toy_closed_form(
    toy: Callable[..., Any], closed_form: Callable[..., Any], fields: dict[str, str],
    theta: tuple[float, float], backend: Backend,
) -> None:
    provider, loss, targets = toy(theta, backend.xp)
    dense = _dense_quantities(provider, loss, targets, backend)
    closed = closed_form(theta)
    for name, field in {**fields, **{f: f for f in SHARED}}.items():
        np.testing.assert_allclose(dense[name], getattr(closed, field), **tolerance())


@pytest.mark.parametrize("theta", THETAS)
def test_logistic_toy_ief_is_gauss_newton_not_ngd(
    theta: tuple[float, float], backend: Backend
) -> None:
    provider, loss, targets = logistic_toy(theta, backend.xp)
    dense = _dense_quantities(provider, loss, targets, backend)
    closed = logistic_toy_closed_form(theta)
    tol = tolerance()
    # Eq. 18: for a scalar output F_iEF = G_hat
    np.testing.assert_allclose(dense["ief_matrix"], dense["gauss_newton"], **tol)
    np.testing.assert_allclose(
        np.linalg.solve(dense["gauss_newton"], dense["grad"]), closed.ief, **tol
    )
    # the conventions page, The toy problems in closed form: unlike least squares, iEF and NGD
    # differ here
    assert np.linalg.norm(np.subtract(closed.ngd, closed.ief)) > 1e-2 * np.linalg.norm(closed.ngd)


def test_toy_float32_and_theta_as_array(backend: Backend) -> None:
    xp = backend.xp
    theta = backend.asarray([1.5, -0.7])
    provider, loss, targets = least_squares_toy(theta, xp, dtype=xp.float32)
    assert provider.logits().dtype == xp.float32 and targets.dtype == xp.float32
    dense = _dense_quantities(provider, loss, targets, backend)
    np.testing.assert_allclose(dense["ngd"], [1.5, -0.7], **tolerance("float32"))
    _, _, labels = logistic_toy(theta, xp)
    np.testing.assert_array_equal(backend.to_numpy(labels), [[1.0], [0.0]])


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("w", "x", "b", "error", "name"),
    [
        (np.ones(3), np.ones((2, 3)), None, ValueError, "weights"),
        (np.ones((2, 3), dtype=np.int64), np.ones((2, 3)), None, TypeError, "weights"),
        (np.ones((2, 3)), np.ones((2, 4)), None, ValueError, "inputs"),
        (np.ones((2, 3)), np.ones(3), None, ValueError, "inputs"),
        (np.ones((2, 3)), np.ones((0, 3)), None, ValueError, "inputs"),
        (np.ones((2, 3)), np.ones((2, 3), dtype=np.float32), None, TypeError, "inputs"),
        (np.ones((2, 3)), np.full((2, 3), np.nan), None, ValueError, "inputs"),
        (np.ones((2, 3)), np.ones((2, 3)), np.ones(3), ValueError, "bias"),
        (np.ones((2, 3)), np.ones((2, 3)), np.ones((2, 1)), ValueError, "bias"),
        (np.ones((2, 3)), np.ones((2, 3)), np.ones(2, dtype=np.float32), TypeError, "bias"),
    ],
    ids=[
        "weights_1d", "weights_int", "inputs_width", "inputs_1d", "inputs_empty",
        "inputs_dtype", "inputs_nan", "bias_length", "bias_2d", "bias_dtype",
    ],
)
def test_linear_bad_input(
    w: np.ndarray, x: np.ndarray, b: Any, error: type, name: str, backend: Backend
) -> None:
    args = [backend.asarray(w, str(w.dtype)), backend.asarray(x, str(x.dtype))]
    bias = None if b is None else backend.asarray(b, str(b.dtype))
    with pytest.raises(error, match=name):
        LinearProvider(*args, bias)


def test_linear_mixed_namespaces() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="inputs"):
        LinearProvider(np.ones((2, 3)), torch.ones((2, 3), dtype=torch.float64))


def test_from_params_bad_input(backend: Backend) -> None:
    x = backend.asarray(np.ones((4, 3)))
    with pytest.raises(ValueError, match="params"):
        LinearProvider.from_params(backend.asarray(np.ones(7)), x, 2)
    with pytest.raises(ValueError, match="params"):
        LinearProvider.from_params(backend.asarray(np.ones((2, 3))), x, 2)
    with pytest.raises(ValueError, match="num_outputs"):
        LinearProvider.from_params(backend.asarray(np.ones(6)), x, 0)


def test_linear_bad_vector_and_cotangents(backend: Backend) -> None:
    provider = _linear_base(backend)
    with pytest.raises(ValueError, match="vector"):
        provider.jvp(backend.asarray(np.ones(provider.num_params - 1)))
    with pytest.raises(ValueError, match="cotangents"):
        provider.vjp(backend.asarray(np.ones((4, 2))))
    with pytest.raises(ValueError, match="cotangents"):
        provider.vjp_sum(backend.asarray(np.ones(3)))


@pytest.mark.parametrize("toy", [least_squares_toy, logistic_toy])
@pytest.mark.parametrize(
    ("theta", "error"),
    [((1.0, 2.0, 3.0), ValueError), ((1.0, float("nan")), ValueError), (3.0, TypeError)],
    ids=["three", "nan", "scalar"],
)
def test_toy_bad_theta(toy: Callable, theta: Any, error: type, backend: Backend) -> None:
    with pytest.raises(error, match="theta"):
        toy(theta, backend.xp)


def test_closed_form_bad_theta() -> None:
    with pytest.raises(ValueError, match="theta"):
        least_squares_toy_closed_form((1.0, -1.0))  # r_2 = 0: EF undefined
    with pytest.raises(ValueError, match="theta"):
        least_squares_toy_closed_form((0.0, 1.0))  # r_1 = 0
    with pytest.raises(ValueError, match="theta"):
        logistic_toy_closed_form((1.0,))
