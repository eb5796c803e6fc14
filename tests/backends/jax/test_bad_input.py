"""Bad input to JaxProvider and to the optax transformations is refused by name, before any work.

Each case is data: a name, what to build or call, the exception type and a pattern the message
must contain (the argument, and the leaf where there is one). The transformations are
functional, so "nothing changed" means: no update was returned and the state is the one given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ngdref  # noqa: E402
from backends.jax import JaxProvider, ef, ief, sf  # noqa: E402

# JAX truncating a float64 request to float32 (ngdref's solves reaching JAX arrays without
# jax_enable_x64) would be a silent loss of precision: here it is an error
pytestmark = pytest.mark.filterwarnings("error:Explicitly requested dtype float64")


def mlp(params: dict, x: Any) -> Any:
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def params_of(dtype: Any = jnp.float64) -> dict:
    rng = np.random.default_rng(0)
    return {"w1": jnp.asarray(rng.standard_normal((3, 4)), dtype),
            "w2": jnp.asarray(rng.standard_normal((4, 2)), dtype)}


def inputs_of(dtype: Any = jnp.float64, n: int = 5) -> Any:
    return jnp.asarray(np.random.default_rng(1).standard_normal((n, 3)), dtype)


def with_leaf(tree: dict, key: str, value: Any) -> dict:
    return {**tree, key: value}


# ---- JaxProvider ---------------------------------------------------------------------------------
def _nan_logits(p: dict, x: Any) -> Any:
    return mlp(p, x) * jnp.nan


#: name -> (a thunk building the provider under 64-bit types, error type, message pattern)
PROVIDER_CASES: dict[str, tuple[Callable[[], Any], type, str]] = {
    "apply_fn not callable": (
        lambda: JaxProvider("mlp", params_of(), inputs_of()), TypeError, "apply_fn must be"),
    "integer leaf": (
        lambda: JaxProvider(mlp, with_leaf(params_of(), "step", jnp.asarray(3)), inputs_of()),
        TypeError, r"params\['step'\] has dtype int"),
    "mixed dtypes": (
        lambda: JaxProvider(mlp, with_leaf(params_of(), "w2", params_of(jnp.float32)["w2"]),
                            inputs_of()),
        TypeError, r"params\['w2'\] has dtype float32 but params\['w1'\] has float64"),
    "python float leaf": (
        lambda: JaxProvider(mlp, with_leaf(params_of(), "scale", 1.0), inputs_of()),
        TypeError, r"params\['scale'\] is a float"),
    "empty params": (lambda: JaxProvider(mlp, {}, inputs_of()), ValueError, "params has no"),
    "nan in params": (
        lambda: JaxProvider(mlp, with_leaf(params_of(), "w1", params_of()["w1"].at[0, 0].set(
            jnp.nan)), inputs_of()),
        ngdref.NonFiniteError, r"params\['w1'\] contains NaN"),
    "inf in inputs": (
        lambda: JaxProvider(mlp, params_of(), inputs_of().at[2, 1].set(jnp.inf)),
        ngdref.NonFiniteError, "inputs contains NaN or infinite"),
    "inputs of another dtype": (
        lambda: JaxProvider(mlp, params_of(), inputs_of(jnp.float32)),
        TypeError, "inputs has dtype float32 but params have float64"),
    "inputs with different leading axes": (
        lambda: JaxProvider(lambda p, b: mlp(p, b["x"]), params_of(),
                            {"x": inputs_of(), "mask": jnp.ones(4)}),
        ValueError, r"inputs\['x'\] has 5 samples"),
    "0-d inputs": (lambda: JaxProvider(mlp, params_of(), jnp.asarray(1.0)), ValueError, "0-d"),
    "empty batch": (
        lambda: JaxProvider(mlp, params_of(), inputs_of(n=0)), ValueError, "empty batch"),
    "logits without a batch axis": (
        lambda: JaxProvider(lambda p, x: mlp(p, x).sum(axis=0), params_of(), inputs_of()),
        ValueError, r"apply_fn returned shape \(2,\)"),
    "logits of another dtype": (
        lambda: JaxProvider(lambda p, x: mlp(p, x).astype(jnp.float32), params_of(),
                            inputs_of()),
        TypeError, "logits of dtype float32 but params have float64"),
    "nan logits": (
        lambda: JaxProvider(_nan_logits, params_of(), inputs_of()),
        ngdref.NonFiniteError, "logits"),
    "traced params": (
        lambda: jax.jit(lambda p: JaxProvider(mlp, p, inputs_of()).logits())(params_of()),
        TypeError, "traced params or inputs"),
}


@pytest.mark.parametrize("name", list(PROVIDER_CASES))
def test_provider_refuses(name: str, x64: None) -> None:
    build, error, pattern = PROVIDER_CASES[name]
    with pytest.raises(error, match=pattern):
        build()


def test_provider_refuses_without_x64() -> None:
    with pytest.raises(RuntimeError, match="jax_enable_x64 is off"):
        JaxProvider(mlp, params_of(jnp.float32), inputs_of(jnp.float32))


#: name -> (a call on a valid float64 provider, error type, message pattern)
CALL_CASES: dict[str, tuple[Callable[[JaxProvider], Any], type, str]] = {
    "ravel of another tree": (
        lambda p: p.ravel({"w1": params_of()["w1"]}, name="update"), ValueError,
        "update does not match the tree of params"),
    "ravel of another leaf shape": (
        lambda p: p.ravel(with_leaf(params_of(), "w2", jnp.ones((2, 4)))), ValueError,
        r"tree\['w2'\] has shape \(2, 4\) but params\['w2'\] needs \(4, 2\)"),
    "unravel of a short vector": (
        lambda p: p.unravel(jnp.ones(3)), ValueError, "vector has 3 entries"),
    "vjp of wrong shape": (
        lambda p: p.vjp(jnp.ones((5, 3))), ValueError, "cotangents must have the logits' shape"),
    "vjp of another dtype": (
        lambda p: p.vjp(jnp.ones((5, 2), jnp.float32)), TypeError, "cotangents has dtype"),
    "vjp of NaN": (
        lambda p: p.vjp(jnp.full((5, 2), jnp.nan)), ngdref.NonFiniteError, "cotangents"),
    "vjp of a NumPy array": (
        lambda p: p.vjp_sum(np.ones((5, 2))), TypeError, "namespace"),
    "jvp of wrong length": (lambda p: p.jvp(jnp.ones(4)), ValueError, "vector has 4 entries"),
}


@pytest.mark.parametrize("name", list(CALL_CASES))
def test_provider_calls_refuse(name: str, x64: None) -> None:
    call, error, pattern = CALL_CASES[name]
    with pytest.raises(error, match=pattern):
        call(JaxProvider(mlp, params_of(), inputs_of()))


# ---- the optax transformations -------------------------------------------------------------------
CE = ngdref.SoftmaxCrossEntropy()

#: name -> (a thunk building a transformation, error type, message pattern)
OPTION_CASES: dict[str, tuple[Callable[[], Any], type, str]] = {
    "negative learning rate": (lambda: ief(-1.0, 1e-3), ValueError, "learning_rate"),
    "damping not a number": (lambda: ief(1.0, "small"), TypeError, "damping"),
    "unknown reduction": (lambda: ief(1.0, 1e-3, reduction="avg"), ValueError, "reduction"),
    "unknown damping space": (
        lambda: ief(1.0, 1e-3, damping_space="logit"), ValueError, "damping_space"),
    "sample-space mode in parameter space": (
        lambda: ief(1.0, 1e-3, damping_space="parameter", damping_mode="diagonal_only"),
        ValueError, "diagonal_only"),
    "dedup threshold above 1": (
        lambda: ef(1.0, 1e-3, total_steps=2, dedup_threshold=1.5), ValueError,
        "dedup_threshold"),
    "unknown dedup rule": (lambda: ief(1.0, 1e-3, dedup_rule="first"), ValueError, "dedup_rule"),
    "total_steps 0": (lambda: ef(1.0, 1e-3, total_steps=0), ValueError, "total_steps"),
    "loss of another kind": (lambda: ief(1.0, 1e-3, loss="ce"), TypeError, "loss must be"),
    "apply_fn not callable": (lambda: ief(1.0, 1e-3, apply_fn=3), TypeError, "apply_fn"),
    "sf without a model": (
        lambda: sf(1.0, 1e-3, total_steps=2, apply_fn=None, loss=CE), TypeError, "apply_fn"),
    "sf num_samples 0": (
        lambda: sf(1.0, 1e-3, total_steps=2, apply_fn=mlp, loss=CE, num_samples=0),
        ValueError, "num_samples"),
    "sf seed a bool": (
        lambda: sf(1.0, 1e-3, total_steps=2, apply_fn=mlp, loss=CE, seed=True),
        TypeError, "seed must be an int"),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_transformation_options_refused_at_construction(name: str) -> None:
    build, error, pattern = OPTION_CASES[name]
    with pytest.raises(error, match=pattern):
        build()


def _grads(n: int = 5, dtype: Any = jnp.float32) -> dict:
    return jax.tree.map(lambda a: jnp.ones((n, *a.shape), dtype), params_of(jnp.float32))


TARGETS = jnp.asarray([0, 1, 1, 0, 1])
MODEL = {"apply_fn": mlp, "loss": CE}

#: name -> (transformation, extra arguments of update, error type, pattern); float32, no x64
UPDATE_CASES: dict[str, tuple[Any, dict, type, str]] = {
    "neither batch nor gradients": (ief(1.0, 1e-3, **MODEL), {}, TypeError, "inputs= and"),
    "both batch and gradients": (
        ief(1.0, 1e-3, **MODEL), {"per_sample_grads": _grads(), "inputs": inputs_of(jnp.float32),
                                  "targets": TARGETS, "logit_grad_sq_norms": jnp.ones(5)},
        TypeError, "not both"),
    "batch without a model": (
        ief(1.0, 1e-3), {"inputs": inputs_of(jnp.float32), "targets": TARGETS}, TypeError,
        "apply_fn= and loss="),
    "gradients of another tree": (
        ief(1.0, 1e-3), {"per_sample_grads": {"w1": _grads()["w1"]},
                         "logit_grad_sq_norms": jnp.ones(5)},
        ValueError, "per_sample_grads does not match the tree of params"),
    "gradients without a sample axis": (
        ef(1.0, 1e-3, total_steps=2), {"per_sample_grads": params_of(jnp.float32)},
        ValueError, r"per_sample_grads\[.w1.\] has shape \(3, 4\) but params\[.w1.\] needs"),
    "gradients of another dtype": (
        ef(1.0, 1e-3, total_steps=2), {"per_sample_grads": _grads(dtype=jnp.float16)},
        TypeError, r"per_sample_grads\['w1'\] has dtype float16 but params\['w1'\] has float32"),
    "ief gradients without s": (
        ief(1.0, 1e-3), {"per_sample_grads": _grads()}, TypeError, "logit_grad_sq_norms"),
    "s of the wrong length": (
        ief(1.0, 1e-3), {"per_sample_grads": _grads(), "logit_grad_sq_norms": jnp.ones(4)},
        ValueError, r"logit_grad_sq_norms must be an array of shape \(5,\)"),
    "sf from gradients": (
        sf(1.0, 1e-3, total_steps=2, **MODEL), {"per_sample_grads": _grads()}, TypeError,
        "sf draws its labels"),
    "labels out of range": (
        ief(1.0, 1e-3, **MODEL), {"inputs": inputs_of(jnp.float32), "targets": TARGETS + 5},
        ValueError, "targets must be class labels"),
    "logits without a batch axis": (
        ief(1.0, 1e-3, apply_fn=lambda p, x: mlp(p, x).sum(axis=0), loss=CE),
        {"inputs": inputs_of(jnp.float32), "targets": TARGETS}, ValueError,
        r"logits of shape \(2,\) for 5 samples"),
    "non-finite inputs": (
        ief(1.0, 1e-3, **MODEL), {"inputs": inputs_of(jnp.float32).at[0, 0].set(jnp.nan),
                                  "targets": TARGETS},
        ngdref.NonFiniteError, "logits contains NaN"),
    "singular undamped system": (
        ef(1.0, 0.0, total_steps=2, dedup_threshold=None), {"per_sample_grads": _grads()},
        ngdref.SingularMatrixError, "singular"),
}


@pytest.mark.parametrize("name", list(UPDATE_CASES))
def test_update_refuses_eagerly(name: str) -> None:
    tx, extra, error, pattern = UPDATE_CASES[name]
    params = params_of(jnp.float32)
    state = tx.init(params)
    with pytest.raises(error, match=pattern):
        tx.update(None, state, params, **extra)
    assert int(state.count) == 0


def test_update_needs_params_and_a_matching_updates_tree() -> None:
    tx = ief(1.0, 1e-3, **MODEL)
    params = params_of(jnp.float32)
    state = tx.init(params)
    batch = {"inputs": inputs_of(jnp.float32), "targets": TARGETS}
    with pytest.raises(TypeError, match="params is required"):
        tx.update(params, state, None, **batch)
    with pytest.raises(ValueError, match="updates does not match the tree of params"):
        tx.update({"w1": params["w1"]}, state, params, **batch)


def test_step_past_total_steps_refused_eagerly_and_under_jit() -> None:
    tx = ef(1.0, 1e-3, total_steps=1, **MODEL)
    params = params_of(jnp.float32)
    batch = {"inputs": inputs_of(jnp.float32), "targets": TARGETS}
    state = tx.init(params)
    _, state = tx.update(None, state, params, **batch)
    with pytest.raises(ValueError, match="all total_steps=1 steps have been taken"):
        tx.update(None, state, params, **batch)
    # under jit the host's ValueError comes back inside JAX's runtime error, message intact
    step = jax.jit(lambda p, s: tx.update(None, s, p, **batch))
    with pytest.raises(jax.errors.JaxRuntimeError, match="ValueError: all total_steps=1 steps"):
        jax.block_until_ready(step(params, state))


def test_ngdref_refuses_jax_arrays_without_64_bit_types() -> None:
    """Without x64 JAX turns float64 into float32: ngdref's float64 solves would silently run
    in float32 (with float64 singularity thresholds), so the math core refuses by name."""
    grads, s = jnp.ones((3, 4)), jnp.ones(3)
    with pytest.raises(TypeError, match="jax_enable_x64"):
        ngdref.ief_update(grads, s, damping=1e-3)
