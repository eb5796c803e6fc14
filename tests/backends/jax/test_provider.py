"""JaxProvider (backends/jax/provider.py) on the layer zoo against independent routes.

Expected values come from :func:`tests.backends.jax.zoo.loop_reference` (a Python loop of
single-sample ``jax.grad`` / ``jax.jacfwd`` passes with the loss written in jax.numpy) and, for
the updates, from dense P x P solves in NumPy of the loop's quantities (:func:`dense_updates`,
no ngdref update code): every update the provider feeds through ``ngdref.directions`` (sgd,
ef, ief in both damping spaces, sf, gn, ngd) in float64. Bad input is in test_bad_input.py.

Tolerances: two float64 autodiff routes through one function differ by rounding only,
``tests.array_backends.TOLERANCES["float64"]``; the updates are damped solves, held to
:func:`tests.cases.solve_rtol` of their own matrix (2 * 10 * P * kappa * eps), which bounds
two backward-stable solves of one system plus the input rounding.
"""

from __future__ import annotations

from typing import Any

import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import ngdref  # noqa: E402
from backends.jax import JaxProvider  # noqa: E402
from tests.array_backends import tolerance  # noqa: E402
from tests.backends.jax.zoo import CASES, case, loop_reference  # noqa: E402
from tests.cases import assert_close_norm, np_damped_solve, solve_rtol  # noqa: E402
from validation.independent.references import sampled_logit_grads, sf_uniforms  # noqa: E402

pytestmark = pytest.mark.usefixtures("x64")
NAMES = list(CASES)
DAMPING = 1e-3


def provider_of(name: str, dtype: str = "float64") -> JaxProvider:
    c = case(name, dtype)
    return JaxProvider(c.apply_fn, c.params, c.inputs)


def close(actual: Any, expected: np.ndarray, dtype: str = "float64") -> None:
    np.testing.assert_allclose(np.asarray(actual), expected, **tolerance(dtype))


# ---- the provider contract ----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_logits_and_sizes(name: str) -> None:
    provider, ref = provider_of(name), loop_reference(name)
    close(provider.logits(), ref.logits)
    assert provider.num_params == ref.per_sample_grads.shape[1]
    assert provider.num_samples == ref.logits.shape[0]
    np.testing.assert_array_equal(
        np.asarray(provider.params_vector()), np.asarray(ravel_pytree(case(name).params)[0])
    )


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_grads_match_single_sample_grad_loop(name: str) -> None:
    provider, ref = provider_of(name), loop_reference(name)
    rows = provider.vjp(jnp.asarray(ref.logit_grads))
    assert isinstance(rows, jax.Array) and rows.dtype == jnp.float64
    close(rows, ref.per_sample_grads)


@pytest.mark.parametrize("name", NAMES)
def test_jacobian_matches_forward_mode_loop(name: str) -> None:
    close(provider_of(name).jacobian(), loop_reference(name).jacobians)


@pytest.mark.parametrize("name", NAMES)
def test_jvp_and_vjp_sum_match_the_loop_jacobians(name: str) -> None:
    provider, ref = provider_of(name), loop_reference(name)
    rng = np.random.default_rng(0)
    v = rng.standard_normal(provider.num_params)
    u = rng.standard_normal(ref.logits.shape)
    close(provider.jvp(jnp.asarray(v)), ref.jacobians @ v)
    close(provider.vjp_sum(jnp.asarray(u)), np.einsum("nc,ncp->p", u, ref.jacobians))


def test_results_stay_on_the_inputs_device() -> None:
    provider = provider_of("dense")
    device = next(iter(case("dense").inputs.devices()))
    u = jnp.ones(provider.logits().shape)
    for result in (provider.logits(), provider.vjp(u), provider.vjp_sum(u), provider.jacobian(),
                   provider.jvp(jnp.ones(provider.num_params))):
        assert isinstance(result, jax.Array) and result.devices() == {device}


def test_ravel_and_unravel_follow_ravel_pytree_order() -> None:
    provider = provider_of("attention")
    params = case("attention").params
    leaves = jax.tree.leaves(params)
    tree = jax.tree.unflatten(jax.tree.structure(params), [
        jnp.full(leaf.shape, i, leaf.dtype) for i, leaf in enumerate(leaves)])
    vector = provider.ravel(tree)
    expected = np.concatenate([np.full(leaf.size, i) for i, leaf in enumerate(leaves)])
    np.testing.assert_array_equal(np.asarray(vector), expected)
    back = provider.unravel(vector)
    assert all(bool(jnp.all(a == b)) for a, b in zip(
        jax.tree.leaves(back), jax.tree.leaves(tree), strict=True))


def test_float32_model_under_x64_stays_float32() -> None:
    provider, ref = provider_of("conv", "float32"), loop_reference("conv")
    rows = provider.vjp(jnp.asarray(ref.logit_grads, jnp.float32))
    assert provider.logits().dtype == rows.dtype == jnp.float32
    # the float32 case holds the float64 weights rounded to float32: float32 rounding of the
    # weights and of the arithmetic, within the float32 tolerance
    close(rows, ref.per_sample_grads, "float32")
    update = ngdref.directions(provider, case("conv").loss, case("conv", "float32").targets,
                               damping=DAMPING, methods=("ief",))["ief"]
    assert update.dtype == jnp.float32


# ---- every update against dense P x P solves of the loop's quantities ---------------------------
def dense_updates(name: str, uniforms: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """method -> (update, the damped matrix it solves), by dense NumPy float64 solves."""
    ref = loop_reference(name)
    c = case(name)
    g_rows, jac = ref.per_sample_grads, ref.jacobians
    s = np.sum(ref.logit_grads**2, axis=1)
    grad = g_rows.sum(axis=0)
    sampled = sampled_logit_grads(c.loss, ref.logits, np.asarray(c.targets), uniforms)[0]
    sampled_rows = np.einsum("nc,ncp->np", sampled, jac)
    eye = np.eye(grad.size)
    ef_matrix = g_rows.T @ g_rows
    matrices = {
        "ef": (ef_matrix, grad),
        "ief": (ef_matrix, g_rows.T @ s),  # push-through of G^T (G G^T + lambda)^-1 s
        "ief-param": (g_rows.T @ (g_rows / s[:, None]), grad),
        "sf": (sampled_rows.T @ sampled_rows, grad),
        "gn": (np.einsum("ncp,ncq->pq", jac, jac), grad),
        "ngd": (np.einsum("ncp,ncd,ndq->pq", jac, ref.logit_hessians, jac), grad),
    }
    out = {"sgd": (grad, eye)}
    for method, (matrix, rhs) in matrices.items():
        out[method] = (np_damped_solve(matrix, rhs, DAMPING), matrix + DAMPING * eye)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_every_update_matches_dense_solves(name: str) -> None:
    provider, c = provider_of(name), case(name)
    z = loop_reference(name).logits
    uniforms = sf_uniforms(c.loss, z.shape[0], z.shape[1])
    got = ngdref.directions(provider, c.loss, c.targets, damping=DAMPING, key=jnp.asarray(uniforms))
    got["ief-param"] = ngdref.directions(
        provider, c.loss, c.targets, damping=DAMPING, methods=("ief",), damping_space="parameter"
    )["ief"]
    for method, (expected, matrix) in dense_updates(name, uniforms).items():
        assert isinstance(got[method], jax.Array), method
        assert_close_norm(np.asarray(got[method]), expected, solve_rtol(matrix))
