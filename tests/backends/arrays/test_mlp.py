"""The tanh MLP: initialisation, forward pass, and the exact MLPProvider.

Expected values come from other routes: a per-sample NumPy loop over the
layers with its own index arithmetic for the forward pass, and
``torch.func.jacrev`` on a float64 torch re-implementation for the Jacobian.
(The finite-difference check of MLPProvider is in ``test_finite_difference.py``.)
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from backends.arrays.mlp import MLPProvider, mlp_apply, mlp_init, mlp_num_params
from tests.array_backends import Backend, tolerance

SIZES = [(3, 2), (3, 5, 2), (2, 4, 4, 3, 3), (4, 6, 5, 1)]
SIZE_IDS = ["-".join(map(str, s)) for s in SIZES]
NUM_SAMPLES = 5


def _inputs(sizes: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(NUM_SAMPLES, sizes[0]))


def _numpy_forward(theta: np.ndarray, x: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """One sample and one unit at a time, reading W_l[i, j] at offset + i * n_in + j."""
    out = np.empty((x.shape[0], sizes[-1]))
    for n, xn in enumerate(x):
        a = list(xn)
        offset = 0
        for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            bias_offset = offset + n_out * n_in
            z = [
                sum(theta[offset + i * n_in + j] * a[j] for j in range(n_in))
                + theta[bias_offset + i]
                for i in range(n_out)
            ]
            offset = bias_offset + n_out
            a = z if layer == len(sizes) - 2 else [math.tanh(zi) for zi in z]
        out[n] = a
    return out


def _provider(
    backend: Backend, sizes: tuple[int, ...], dtype: str = "float64", seed: int = 0
) -> MLPProvider:
    xp = backend.xp
    params = mlp_init(sizes, seed, xp, getattr(xp, dtype))
    return MLPProvider(params, backend.asarray(_inputs(sizes, seed), dtype), sizes)


# ---- initialisation and forward --------------------------------------------------------------


def test_num_params() -> None:
    assert mlp_num_params((3, 5, 4, 2)) == 5 * 4 + 4 * 6 + 2 * 5
    assert mlp_num_params([7, 1]) == 8


def test_init_is_reproducible_across_backends(backend: Backend) -> None:
    sizes = (3, 5, 2)
    reference = mlp_init(sizes, 42, np)
    params = mlp_init(sizes, 42, backend.xp)
    assert tuple(params.shape) == (mlp_num_params(sizes),)
    # the same Python floats on every backend: bitwise equal in float64
    np.testing.assert_array_equal(backend.to_numpy(params), reference)
    assert not np.array_equal(backend.to_numpy(mlp_init(sizes, 43, backend.xp)), reference)
    params32 = mlp_init(sizes, 42, backend.xp, backend.xp.float32)
    assert params32.dtype == backend.xp.float32
    np.testing.assert_array_equal(backend.to_numpy(params32), reference.astype(np.float32))


def test_init_scale() -> None:
    """Weights N(0, 1/fan_in), biases N(0, 0.01): check the sample moments of a wide layer.

    Deterministic (key 0). Honest bounds nonetheless: for 120000 weight draws the relative
    standard error of the sample variance is sqrt(2/n) = 0.4% (bound 3%, 7 sigma) and the
    standard error of the mean 1.4e-4 (bound 2.5e-3); for 300 bias draws the relative
    standard error of the variance is 8% (window +-30%, 3.7 sigma).
    """
    sizes = (400, 300, 2)
    theta = mlp_init(sizes, 0, np)
    w1 = theta[: 300 * 400]
    b1 = theta[300 * 400: 300 * 401]
    assert abs(np.var(w1) * 400 - 1.0) < 0.03
    assert abs(np.mean(w1)) < 2.5e-3
    assert 0.007 < np.var(b1) < 0.013


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_apply_matches_numpy_loop(sizes: tuple[int, ...], backend: Backend) -> None:
    theta = mlp_init(sizes, 1, np)
    x = _inputs(sizes, 1)
    logits = mlp_apply(backend.asarray(theta), backend.asarray(x), sizes)
    assert tuple(logits.shape) == (NUM_SAMPLES, sizes[-1])
    np.testing.assert_allclose(
        backend.to_numpy(logits), _numpy_forward(theta, x, sizes), **tolerance()
    )
    provider = _provider(backend, sizes, seed=1)
    np.testing.assert_allclose(
        backend.to_numpy(provider.logits()), backend.to_numpy(logits), **tolerance()
    )


# ---- the exact Jacobian against torch autograd -------------------------------------------


def _torch_jacobian(theta: np.ndarray, x: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """dz/dtheta (N, C, P) by torch.func.jacrev of an independent float64 torch forward."""
    torch = pytest.importorskip("torch")

    def forward(t: Any) -> Any:
        h = torch.from_numpy(x)
        offset = 0
        layers = list(itertools.pairwise(sizes))
        for layer, (n_in, n_out) in enumerate(layers):
            w = t[offset: offset + n_out * n_in].view(n_out, n_in)
            b = t[offset + n_out * n_in: offset + n_out * (n_in + 1)]
            offset += n_out * (n_in + 1)
            h = torch.nn.functional.linear(h, w, b)
            if layer < len(layers) - 1:
                h = torch.tanh(h)
        return h

    jac = torch.func.jacrev(forward)(torch.from_numpy(theta))
    assert jac.dtype == torch.float64
    return jac.numpy()


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_jacobian_matches_torch_autograd(sizes: tuple[int, ...], backend: Backend) -> None:
    expected = _torch_jacobian(mlp_init(sizes, 2, np), _inputs(sizes, 2), sizes)
    jac = _provider(backend, sizes, seed=2).jacobian()
    assert tuple(jac.shape) == expected.shape
    np.testing.assert_allclose(backend.to_numpy(jac), expected, **tolerance())


@pytest.mark.parametrize("sizes", SIZES, ids=SIZE_IDS)
def test_jvp_vjp_match_jacobian(sizes: tuple[int, ...], backend: Backend) -> None:
    provider = _provider(backend, sizes, seed=3)
    jac = backend.to_numpy(provider.jacobian())
    rng = np.random.default_rng(5)
    v = rng.normal(size=provider.num_params)
    u = rng.normal(size=(NUM_SAMPLES, sizes[-1]))
    jv = backend.to_numpy(provider.jvp(backend.asarray(v)))
    jtu = backend.to_numpy(provider.vjp(backend.asarray(u)))
    np.testing.assert_allclose(jv, np.einsum("ncp,p->nc", jac, v), **tolerance())
    np.testing.assert_allclose(jtu, np.einsum("nc,ncp->np", u, jac), **tolerance())
    np.testing.assert_allclose(
        backend.to_numpy(provider.vjp_sum(backend.asarray(u))), jtu.sum(axis=0), **tolerance()
    )
    # u^T (J v) = (J^T u)^T v: forward mode against reverse mode
    np.testing.assert_allclose(np.sum(u * jv), np.sum(jtu * v), **tolerance())


def test_vjp_matches_torch_per_sample_gradients() -> None:
    """J_n^T e_n is the gradient of the per-sample loss: a loop of single-sample backward passes."""
    torch = pytest.importorskip("torch")
    sizes = (3, 5, 4, 2)
    theta, x = mlp_init(sizes, 6, np), _inputs(sizes, 6)
    u = np.random.default_rng(6).normal(size=(NUM_SAMPLES, 2))
    expected = []
    for n in range(NUM_SAMPLES):
        t = torch.from_numpy(theta.copy()).requires_grad_(True)
        h = torch.from_numpy(x[n: n + 1])
        offset = 0
        for layer, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            w = t[offset: offset + n_out * n_in].view(n_out, n_in)
            b = t[offset + n_out * n_in: offset + n_out * (n_in + 1)]
            offset += n_out * (n_in + 1)
            h = h @ w.T + b
            if layer < len(sizes) - 2:
                h = torch.tanh(h)
        (h[0] * torch.from_numpy(u[n])).sum().backward()
        expected.append(t.grad.numpy())
    got = MLPProvider(theta, x, sizes).vjp(u)
    np.testing.assert_allclose(got, np.stack(expected), **tolerance())


def test_float32_against_float64(backend: Backend) -> None:
    sizes = (3, 5, 4, 2)
    p32 = _provider(backend, sizes, "float32", seed=4)
    p64 = _provider(backend, sizes, "float64", seed=4)
    jac32 = p32.jacobian()
    assert jac32.dtype == backend.xp.float32
    np.testing.assert_allclose(
        backend.to_numpy(jac32), backend.to_numpy(p64.jacobian()), **tolerance("float32")
    )
    u = np.random.default_rng(7).normal(size=(NUM_SAMPLES, 2))
    np.testing.assert_allclose(
        backend.to_numpy(p32.vjp(backend.asarray(u, "float32"))),
        backend.to_numpy(p64.vjp(backend.asarray(u))),
        **tolerance("float32"),
    )


# ---- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "error"),
    [([3], ValueError), ([3, 0], ValueError), ([3, 2.5], ValueError), (None, TypeError),
     ([3, True], ValueError)],
    ids=["one_entry", "zero", "float", "none", "bool"],
)
def test_bad_sizes(sizes: Any, error: type, backend: Backend) -> None:
    with pytest.raises(error, match="sizes"):
        mlp_init(sizes, 0, backend.xp)
    with pytest.raises(error, match="sizes"):
        mlp_num_params(sizes)


def test_bad_key(backend: Backend) -> None:
    with pytest.raises(TypeError, match="key"):
        mlp_init((3, 2), "seed", backend.xp)
    with pytest.raises(TypeError, match="key"):
        mlp_init((3, 2), 1.5, backend.xp)


@pytest.mark.parametrize(
    ("params", "inputs", "error", "name"),
    [
        (np.ones(7), np.ones((2, 3)), ValueError, "params"),
        (np.ones((1, 8)), np.ones((2, 3)), ValueError, "params"),
        (np.ones(8, dtype=np.int64), np.ones((2, 3)), TypeError, "params"),
        (np.ones(8), np.ones((2, 4)), ValueError, "inputs"),
        (np.ones(8), np.ones(3), ValueError, "inputs"),
        (np.ones(8), np.ones((2, 3), dtype=np.float32), TypeError, "inputs"),
    ],
    ids=["params_length", "params_2d", "params_int", "inputs_width", "inputs_1d", "inputs_dtype"],
)
def test_bad_model_input(
    params: np.ndarray, inputs: np.ndarray, error: type, name: str, backend: Backend
) -> None:
    p = backend.asarray(params, str(params.dtype))
    x = backend.asarray(inputs, str(inputs.dtype))
    with pytest.raises(error, match=name):
        mlp_apply(p, x, (3, 2))
    with pytest.raises(error, match=name):
        MLPProvider(p, x, (3, 2))


def test_provider_rejects_non_finite(backend: Backend) -> None:
    with pytest.raises(ValueError, match="params"):
        MLPProvider(backend.asarray(np.full(8, np.nan)), backend.asarray(np.ones((2, 3))), (3, 2))
    with pytest.raises(ValueError, match="inputs"):
        MLPProvider(backend.asarray(np.ones(8)), backend.asarray(np.full((2, 3), np.inf)), (3, 2))
    with pytest.raises(ValueError, match="inputs"):
        MLPProvider(backend.asarray(np.ones(8)), backend.asarray(np.ones((0, 3))), (3, 2))


def test_provider_bad_vector_and_cotangents(backend: Backend) -> None:
    provider = _provider(backend, (3, 5, 2))
    with pytest.raises(ValueError, match="vector"):
        provider.jvp(backend.asarray(np.ones(provider.num_params + 1)))
    with pytest.raises(ValueError, match="cotangents"):
        provider.vjp(backend.asarray(np.ones((NUM_SAMPLES, 3))))
    with pytest.raises(ValueError, match="cotangents"):
        provider.vjp_sum(backend.asarray(np.ones((NUM_SAMPLES + 1, 2))))
