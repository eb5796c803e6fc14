"""FiniteDifferenceProvider against exact providers, on every backend.

Expected values come from other routes than finite differences: the closed-form
:class:`~backends.arrays.analytic.LinearProvider`, the hand-written backprop of
:class:`~backends.arrays.mlp.MLPProvider` (itself checked against torch autograd in
``test_mlp.py``), dense NumPy contractions, and for the step rule a cubic whose
central difference has a known error.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np
import pytest

from backends.arrays.analytic import LinearProvider
from backends.arrays.finite_difference import FiniteDifferenceProvider, default_relative_step
from backends.arrays.mlp import MLPProvider, mlp_apply, mlp_init
from ngdref.provider import JacobianProvider
from tests.array_backends import Backend, tolerance
from tests.backends.arrays.fd_tolerances import fd_tolerance

# ---- cases: an exact provider and the same model as a plain function ------------------------


def _linear_fn(num_outputs: int, bias: bool) -> Callable[[Any, Any], Any]:
    """z = x W^T (+ b) from the flat [vec(W), b], written here, not taken from the provider."""

    def fn(params: Any, inputs: Any) -> Any:
        xp = array_api_compat.array_namespace(params)
        d = inputs.shape[1]
        w = xp.reshape(params[: num_outputs * d], (num_outputs, d))
        z = xp.matmul(inputs, w.T)
        return z + params[num_outputs * d:] if bias else z

    return fn


@dataclass(frozen=True)
class Case:
    """A model: flat params and inputs (NumPy), the function, and its exact provider."""

    name: str
    num_samples: int
    input_dim: int
    num_params: Callable[[], int]
    fn: Callable[[Any, Any], Any]
    exact: Callable[[Any, Any], JacobianProvider]
    init: Callable[[int], np.ndarray]

    def arrays(self, backend: Backend, dtype: str = "float64", seed: int = 0) -> tuple[Any, Any]:
        rng = np.random.default_rng(seed)
        inputs = rng.normal(size=(self.num_samples, self.input_dim))
        return backend.asarray(self.init(seed), dtype), backend.asarray(inputs, dtype)


def _linear_case(name: str, c: int, d: int, n: int, bias: bool) -> Case:
    p = c * d + (c if bias else 0)
    return Case(
        name=name,
        num_samples=n,
        input_dim=d,
        num_params=lambda: p,
        fn=_linear_fn(c, bias),
        exact=lambda params, inputs: LinearProvider.from_params(params, inputs, c, bias=bias),
        init=lambda seed: np.random.default_rng(seed + 100).normal(size=p),
    )


def _mlp_case(name: str, sizes: tuple[int, ...], n: int) -> Case:
    return Case(
        name=name,
        num_samples=n,
        input_dim=sizes[0],
        num_params=lambda: int(mlp_init(sizes, 0, np).shape[0]),
        fn=lambda params, inputs: mlp_apply(params, inputs, sizes),
        exact=lambda params, inputs: MLPProvider(params, inputs, sizes),
        init=lambda seed: mlp_init(sizes, seed, np),
    )


CASES = [
    _linear_case("linear", c=3, d=4, n=5, bias=False),
    _linear_case("linear_bias", c=2, d=3, n=4, bias=True),
    _mlp_case("mlp_1_hidden", (3, 5, 2), n=6),
    _mlp_case("mlp_3_hidden", (2, 4, 4, 3, 3), n=4),
]
CASE_IDS = [c.name for c in CASES]


def _providers(
    case: Case, backend: Backend, dtype: str = "float64", **kwargs: Any
) -> tuple[FiniteDifferenceProvider, JacobianProvider]:
    params, inputs = case.arrays(backend, dtype)
    return FiniteDifferenceProvider(case.fn, params, inputs, **kwargs), case.exact(params, inputs)


def _exact_jacobian(case: Case, backend: Backend) -> np.ndarray:
    """The float64 exact Jacobian (N, C, P) as NumPy."""
    params, inputs = case.arrays(backend, "float64")
    return backend.to_numpy(case.exact(params, inputs).jacobian())


# ---- agreement with the exact providers --------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jacobian_matches_exact_provider(case: Case, backend: Backend) -> None:
    fd, exact = _providers(case, backend)
    jac = fd.jacobian()
    assert tuple(jac.shape) == (case.num_samples, exact.num_outputs, case.num_params())
    assert array_api_compat.array_namespace(jac) is array_api_compat.array_namespace(fd.logits())
    np.testing.assert_allclose(
        backend.to_numpy(jac), backend.to_numpy(exact.jacobian()), **fd_tolerance()
    )
    np.testing.assert_allclose(
        backend.to_numpy(fd.logits()), backend.to_numpy(exact.logits()), **tolerance()
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jvp_matches_dense_product(case: Case, backend: Backend) -> None:
    fd, _ = _providers(case, backend)
    jac = _exact_jacobian(case, backend)
    v = np.random.default_rng(7).normal(size=case.num_params())
    expected = np.einsum("ncp,p->nc", jac, v)
    np.testing.assert_allclose(
        backend.to_numpy(fd.jvp(backend.asarray(v))), expected, **fd_tolerance()
    )
    # the step is scaled by 1/||v||: a tiny or a huge v gives the same directional derivative
    for scale in (1e-6, 1e6):
        np.testing.assert_allclose(
            backend.to_numpy(fd.jvp(backend.asarray(scale * v))) / scale,
            expected,
            **fd_tolerance(),
        )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_vjp_matches_dense_product(case: Case, backend: Backend) -> None:
    fd, _ = _providers(case, backend)
    jac = _exact_jacobian(case, backend)
    u = np.random.default_rng(8).normal(size=jac.shape[:2])
    expected = np.einsum("nc,ncp->np", u, jac)
    np.testing.assert_allclose(
        backend.to_numpy(fd.vjp(backend.asarray(u))), expected, **fd_tolerance()
    )
    np.testing.assert_allclose(
        backend.to_numpy(fd.vjp_sum(backend.asarray(u))), expected.sum(axis=0), **fd_tolerance()
    )


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_jvp_and_vjp_are_adjoint(case: Case, backend: Backend) -> None:
    """sum_n u_n^T (J_n v) = sum_n (J_n^T u_n)^T v, with jvp (a directional difference)
    and vjp (from the P-column Jacobian) taking different finite-difference routes."""
    fd, _ = _providers(case, backend)
    rng = np.random.default_rng(9)
    v = rng.normal(size=case.num_params())
    u = rng.normal(size=(case.num_samples, fd.num_outputs))
    lhs = float(np.sum(u * backend.to_numpy(fd.jvp(backend.asarray(v)))))
    rhs = float(np.sum(backend.to_numpy(fd.vjp(backend.asarray(u))) * v))
    np.testing.assert_allclose(lhs, rhs, **fd_tolerance())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_float32_against_float64_exact(case: Case, backend: Backend) -> None:
    fd, _ = _providers(case, backend, "float32")
    jac = fd.jacobian()
    assert jac.dtype == fd.logits().dtype
    assert "float32" in str(jac.dtype)
    expected = _exact_jacobian(case, backend)
    np.testing.assert_allclose(backend.to_numpy(jac), expected, **fd_tolerance("float32"))
    v = np.random.default_rng(10).normal(size=case.num_params())
    np.testing.assert_allclose(
        backend.to_numpy(fd.jvp(backend.asarray(v, "float32"))),
        np.einsum("ncp,p->nc", expected, v),
        **fd_tolerance("float32"),
    )


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 4, 100])
def test_chunk_size_does_not_change_vjp(chunk_size: int, backend: Backend) -> None:
    case = CASES[2]
    params, inputs = case.arrays(backend)
    u = backend.asarray(np.random.default_rng(11).normal(size=(case.num_samples, 2)))
    whole = FiniteDifferenceProvider(case.fn, params, inputs).vjp(u)
    chunked = FiniteDifferenceProvider(case.fn, params, inputs, chunk_size=chunk_size).vjp(u)
    assert tuple(chunked.shape) == tuple(whole.shape)
    np.testing.assert_allclose(backend.to_numpy(chunked), backend.to_numpy(whole), **tolerance())


# ---- the step rule, on a cubic whose central-difference error is known exactly ---------------


def _cube(params: Any, inputs: Any) -> Any:
    """z_{0,j} = theta_j^3 (N = 1, C = P): J = diag(3 theta^2)."""
    return (params * params * params)[None, :]


def test_jacobian_step_is_relative_and_scaled_by_theta(backend: Backend) -> None:
    """(f(t + h) - f(t - h)) / 2h = 3 t^2 + h^2 for f = t^3, with h_j = step * max(1, |t_j|)."""
    theta = np.array([0.5, -0.25, 0.0, 2.0, -4.0])
    fd = FiniteDifferenceProvider(_cube, backend.asarray(theta), None, step=0.1)
    h = 0.1 * np.maximum(1.0, np.abs(theta))
    np.testing.assert_allclose(
        backend.to_numpy(fd.jacobian())[0], np.diag(3 * theta**2 + h**2), rtol=1e-12, atol=1e-13
    )


def test_jvp_step_is_scaled_by_norm_of_v(backend: Backend) -> None:
    """Along v: (f(t + h v) - f(t - h v)) / 2h = 3 t^2 v + h^2 v^3, with
    h = step * max(1, max |t|) / ||v||."""
    theta = np.array([0.5, -2.0, 1.0])
    v = np.array([3.0, -1.0, 2.0])
    fd = FiniteDifferenceProvider(_cube, backend.asarray(theta), None, step=0.1)
    h = 0.1 * 2.0 / np.linalg.norm(v)
    np.testing.assert_allclose(
        backend.to_numpy(fd.jvp(backend.asarray(v)))[0],
        3 * theta**2 * v + h**2 * v**3,
        rtol=1e-12,
        atol=1e-13,
    )


def test_default_step_is_cube_root_of_eps(backend: Backend) -> None:
    xp = backend.xp
    assert default_relative_step(xp, xp.float64) == pytest.approx((2.0**-52) ** (1 / 3))
    assert default_relative_step(xp, xp.float32) == pytest.approx((2.0**-23) ** (1 / 3))
    # and it is the one used when no step is given
    theta = backend.asarray([0.5, 1.5])
    default = FiniteDifferenceProvider(_cube, theta, None).jacobian()
    explicit = FiniteDifferenceProvider(
        _cube, theta, None, step=(2.0**-52) ** (1 / 3)
    ).jacobian()
    np.testing.assert_array_equal(backend.to_numpy(default), backend.to_numpy(explicit))
    other = FiniteDifferenceProvider(_cube, theta, None, step=1e-3).jacobian()
    assert not np.array_equal(backend.to_numpy(default), backend.to_numpy(other))


def test_jvp_of_zero_vector_is_zero_without_calling_fn(backend: Backend) -> None:
    calls = []

    def fn(params: Any, inputs: Any) -> Any:
        calls.append(1)
        return _cube(params, inputs)

    fd = FiniteDifferenceProvider(fn, backend.asarray([1.0, 2.0]), None)
    out = fd.jvp(backend.asarray([0.0, 0.0]))
    assert len(calls) == 1
    np.testing.assert_array_equal(backend.to_numpy(out), np.zeros((1, 2)))


# ---- caching -------------------------------------------------------------------------------


def test_logits_and_jacobian_are_computed_once(backend: Backend) -> None:
    case = CASES[2]
    params, inputs = case.arrays(backend)
    calls = []

    def fn(p: Any, x: Any) -> Any:
        calls.append(1)
        return case.fn(p, x)

    fd = FiniteDifferenceProvider(fn, params, inputs)
    assert len(calls) == 1
    fd.logits()
    assert fd.num_samples == case.num_samples and fd.num_outputs == 2
    assert len(calls) == 1
    p = case.num_params()
    fd.jacobian()
    assert len(calls) == 1 + 2 * p
    u = backend.asarray(np.ones((case.num_samples, 2)))
    fd.vjp(u)
    fd.vjp_sum(u)
    fd.jacobian()
    assert len(calls) == 1 + 2 * p
    fd.jvp(backend.asarray(np.ones(p)))
    assert len(calls) == 3 + 2 * p


# ---- bad input: the exception type, and a message that names the argument --------------------


def _ok_fn(params: Any, inputs: Any) -> Any:
    return _cube(params, inputs)


@pytest.mark.parametrize(
    ("make_params", "error", "name"),
    [
        (lambda b: b.asarray([[1.0, 2.0]]), ValueError, "params"),
        (lambda b: b.asarray([1, 2], "int64"), TypeError, "params"),
        (lambda b: [1.0, 2.0], TypeError, "params"),
        (lambda b: b.asarray([1.0, float("nan")]), ValueError, "params"),
        (lambda b: b.asarray(np.zeros(0)), ValueError, "params"),
    ],
    ids=["2d", "int", "list", "nan", "empty"],
)
def test_bad_params(make_params: Callable, error: type, name: str, backend: Backend) -> None:
    with pytest.raises(error, match=name):
        FiniteDifferenceProvider(_ok_fn, make_params(backend), None)


@pytest.mark.parametrize(
    ("fn", "error"),
    [
        ("not callable", TypeError),
        (lambda p, x: p, ValueError),  # 1-D output
        (lambda p, x: p[None, None, :], ValueError),  # 3-D output
        (lambda p, x: [[1.0]], TypeError),  # not an array
        (lambda p, x: _cube(p, x) * float("nan"), ValueError),  # non-finite logits
    ],
    ids=["not_callable", "1d", "3d", "list", "non_finite"],
)
def test_bad_fn(fn: Any, error: type, backend: Backend) -> None:
    with pytest.raises(error, match="fn"):
        FiniteDifferenceProvider(fn, backend.asarray([1.0, 2.0]), None)


def test_fn_returning_another_dtype(backend: Backend) -> None:
    xp = backend.xp
    with pytest.raises(TypeError, match=r"fn\(params, inputs\).*dtype"):
        FiniteDifferenceProvider(
            lambda p, x: xp.astype(_cube(p, x), xp.float32), backend.asarray([1.0, 2.0]), None
        )


@pytest.mark.filterwarnings("ignore:invalid value encountered in log:RuntimeWarning")
def test_fn_non_finite_at_a_perturbed_point(backend: Backend) -> None:
    """log(theta) is finite at theta = 1e-12 but not at theta - h < 0."""
    xp = backend.xp
    fd = FiniteDifferenceProvider(
        lambda p, x: xp.log(p)[None, :], backend.asarray([1e-12, 1.0]), None
    )
    with pytest.raises(ValueError, match=r"fn\(params, inputs\).*NaN.*params - step \* e_0"):
        fd.jacobian()


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"step": 0.0}, ValueError, "step"),
        ({"step": -1e-3}, ValueError, "step"),
        ({"step": float("nan")}, ValueError, "step"),
        ({"step": "small"}, TypeError, "step"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"chunk_size": 2.5}, ValueError, "chunk_size"),
        ({"chunk_size": True}, ValueError, "chunk_size"),
    ],
)
def test_bad_options(kwargs: dict, error: type, name: str, backend: Backend) -> None:
    with pytest.raises(error, match=name):
        FiniteDifferenceProvider(_ok_fn, backend.asarray([1.0, 2.0]), None, **kwargs)


def test_bad_vector_and_cotangents(backend: Backend) -> None:
    fd = FiniteDifferenceProvider(_ok_fn, backend.asarray([1.0, 2.0]), None)
    with pytest.raises(ValueError, match="vector"):
        fd.jvp(backend.asarray([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="vector"):
        fd.jvp(backend.asarray([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="vector"):
        fd.jvp(backend.asarray([1.0, float("inf")]))
    with pytest.raises(ValueError, match="cotangents"):
        fd.vjp(backend.asarray([[1.0, 2.0, 3.0]]))
    with pytest.raises(TypeError, match="vector"):
        fd.jvp([1.0, 2.0])


def test_inputs_from_another_namespace() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="inputs"):
        FiniteDifferenceProvider(
            _ok_fn, torch.tensor([1.0, 2.0], dtype=torch.float64), np.ones((1, 2))
        )


# ---- the package ----------------------------------------------------------------------------


def test_import_backends_does_not_import_torch() -> None:
    code = (
        "import sys, backends\n"
        "from backends import *\n"
        "assert 'torch' not in sys.modules, 'backends imported torch'\n"
        "assert FiniteDifferenceProvider and LinearProvider and MLPProvider\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=_repo_root()
    )
    assert result.returncode == 0, result.stderr


def test_unknown_attribute_of_backends() -> None:
    import backends

    with pytest.raises(AttributeError, match="no_such_thing"):
        backends.no_such_thing  # noqa: B018


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("TorchProvider", "backends.torch.provider"),
        ("IEF", "backends.torch.optim.methods"),
        ("EF", "backends.torch.optim.methods"),
        ("SF", "backends.torch.optim.methods"),
        ("NGD", "backends.torch.optim.methods"),
    ],
)
def test_lazy_attributes(name: str, module: str) -> None:
    pytest.importorskip("torch")
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    import backends

    assert getattr(backends, name) is getattr(importlib.import_module(module), name)
    assert name in dir(backends)


def _repo_root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parents[3])
