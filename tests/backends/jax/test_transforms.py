"""The optax transformations ief, ef, sf (backends/jax/transforms.py) against ngdref updates of
independently computed inputs.

The per-sample gradients, s and Jacobians come from the zoo's loop of single-sample
``jax.grad`` / ``jax.jacfwd`` passes (:func:`tests.backends.jax.zoo.loop_reference`), SF's labels
are drawn here with ``loss.sample`` at the key blake2b("seed:t") computed here with hashlib, and
the expected step is ``-eta_t`` times the :mod:`ngdref` update of those inputs in the reduction
convention, normalised for EF and SF, with eta_t = lr (T - t) / T. ngdref's updates are checked
against dense solves elsewhere; what is under test here is everything around them (the rows'
order and scaling, s, the labels, the key, the learning rate, the normalisation, the state).

Tolerances: the per-sample route hands the test's own rows to the same ngdref function, so
the two differ by rounding only (``tests.array_backends.TOLERANCES`` per dtype). The model route
forms its rows by another autodiff route than the loop: float64 rounding, amplified by the
solve, bounded by :func:`tests.cases.gram_rtol` (Gram forms) and :func:`tests.cases.solve_rtol`.
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import ngdref  # noqa: E402
from backends.jax import ef, ief, sampling_key, sf  # noqa: E402
from tests.array_backends import tolerance  # noqa: E402
from tests.backends.jax.zoo import case, loop_reference  # noqa: E402
from tests.cases import assert_close_norm, gram_rtol, solve_rtol  # noqa: E402

# JAX truncating a float64 request to float32 (ngdref's solves reaching JAX arrays without
# jax_enable_x64) would be a silent loss of precision: here it is an error
pytestmark = pytest.mark.filterwarnings("error:Explicitly requested dtype float64")
LR = 0.5
DAMPING = 1e-3


def reference(name: str) -> Any:
    """The loop's float64 quantities (computed with 64-bit types on, kept as NumPy)."""
    with jax.enable_x64(True):
        return loop_reference(name)


def factor(reduction: str, n: int) -> float:
    return 1.0 / n if reduction == "mean" else 1.0


def tree_rows(rows: np.ndarray, params: Any) -> Any:
    """(N, P) rows as a pytree like ``params`` with a leading axis of samples."""
    unravel = ravel_pytree(params)[1]
    return jax.vmap(unravel)(jnp.asarray(rows, jax.tree.leaves(params)[0].dtype))


def flat(updates: Any) -> np.ndarray:
    return np.asarray(ravel_pytree(updates)[0])


def gram_update(method: str, rows: np.ndarray, s: np.ndarray, options: dict) -> np.ndarray:
    if method == "ief":
        return ngdref.ief_update(rows, s, **options)
    options = {k: v for k, v in options.items() if k != "damping_space"}
    return ngdref.ef_update(rows, **options)


def expected_step(u: np.ndarray, step: int, total: int | None) -> np.ndarray:
    if total is None:
        return -LR * u
    return -LR * (total - step) / total * u / np.linalg.norm(u)


# ---- iEF and EF from given per-sample gradients --------------------------------------------------
GRAM_OPTIONS = [
    {},
    {"damping_space": "parameter"},
    {"damping_mode": "relative", "damping": 1e-4},
    {"damping_mode": "levenberg_marquardt", "damping": 1e-2},
    {"damping_mode": "diagonal_only", "damping": 0.0},
    {"dedup_threshold": None, "dedup_rule": "greedy"},
]


def _transformation(method: str, options: dict, **model: Any) -> Any:
    options = {"damping": DAMPING, **options}
    if method == "ef":
        options.pop("damping_space", None)
        return ef(LR, total_steps=3, **options, **model)
    return ief(LR, **options, **model)


#: (method, options): EF has one damping space
GRAM_CASES = [
    (method, options) for method in ("ief", "ef") for options in GRAM_OPTIONS
    if method == "ief" or "damping_space" not in options
]


@pytest.mark.parametrize(("method", "options"), GRAM_CASES,
                         ids=lambda o: o if isinstance(o, str) else "-".join(map(str, o.values())))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_step_from_per_sample_grads(method: str, reduction: str, options: dict, dtype: str) -> None:
    ref = reference("shared")
    rows = ref.per_sample_grads.astype(dtype)
    s = np.sum(ref.logit_grads**2, axis=1).astype(dtype)
    r = factor(reduction, rows.shape[0])
    full = {"damping": DAMPING, "dedup_threshold": 0.99, **options}
    u = gram_update(method, (r * rows).astype(dtype), (r * r * s).astype(dtype), full)
    with jax.enable_x64(dtype == "float64"):
        params = case("shared", dtype)
        tx = _transformation(method, {"reduction": reduction, **options})
        state = tx.init(params.params)
        extra = {"per_sample_grads": tree_rows(rows, params.params)}
        if method == "ief":
            extra["logit_grad_sq_norms"] = jnp.asarray(s)
        updates, state = tx.update(None, state, params.params, **extra)
        got = flat(updates)
    assert got.dtype == np.dtype(dtype) and int(state.count) == 1
    total = 3 if method == "ef" else None
    np.testing.assert_allclose(got, expected_step(u, 0, total), **tolerance(dtype))


# ---- the model route: per-sample gradients formed here ---------------------------------------
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("method", ["ief", "ef"])
@pytest.mark.parametrize("name", ["dense", "embed-tied", "attention"])
def test_step_from_the_model(name: str, method: str, reduction: str, x64: None) -> None:
    c, ref = case(name), reference(name)
    n = ref.logits.shape[0]
    r = factor(reduction, n)
    rows, s = r * ref.per_sample_grads, np.sum((r * ref.logit_grads) ** 2, axis=1)
    options = {"damping": DAMPING, "dedup_threshold": 0.99}
    u = gram_update(method, rows, s, options)
    tx = _transformation(method, {"reduction": reduction}, apply_fn=c.apply_fn, loss=c.loss)
    updates, _ = tx.update(None, tx.init(c.params), c.params, inputs=c.inputs, targets=c.targets)
    rhs = s if method == "ief" else np.ones(n)
    matrix = rows @ rows.T + DAMPING * np.eye(n)
    bound = gram_rtol(rows, matrix, np.linalg.solve(matrix, rhs))
    assert_close_norm(flat(updates), expected_step(u, 0, 3 if method == "ef" else None), bound)


def sampled_rows(name: str, reduction: str, seed: int, step: int, k: int) -> np.ndarray:
    """R G_hat (K N, P): labels drawn at blake2b("seed:step") (hashlib here), rows J_n^T e_hat."""
    c, ref = case(name), reference(name)
    key = int.from_bytes(hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest(),
                         "little")
    targets = np.asarray(c.targets)
    drawn = c.loss.sample(ref.logits, key, num_samples=k, targets=targets)
    r = factor(reduction, ref.logits.shape[0])
    e_hat = [r * c.loss.grad(ref.logits, drawn[i]) for i in range(k)]
    return np.concatenate([np.einsum("nc,ncp->np", e, ref.jacobians) for e in e_hat])


@pytest.mark.parametrize(("reduction", "k"), [("sum", 1), ("mean", 2)])
@pytest.mark.parametrize("name", ["dense", "embed-tied"])
def test_sf_steps_use_the_labels_of_each_steps_key(name: str, reduction: str, k: int,
                                                   x64: None) -> None:
    c, ref = case(name), reference(name)
    r = factor(reduction, ref.logits.shape[0])
    tx = sf(LR, DAMPING, total_steps=3, apply_fn=c.apply_fn, loss=c.loss, reduction=reduction,
            num_samples=k, seed=11)
    state = tx.init(c.params)
    grad = r * ref.per_sample_grads.sum(axis=0)
    for step in range(2):  # the same batch and parameters: only the key changes
        updates, state = tx.update(None, state, c.params, inputs=c.inputs, targets=c.targets)
        rows = sampled_rows(name, reduction, 11, step, k)
        u = ngdref.sf_update(rows, grad, damping=DAMPING, num_samples=k)
        matrix = rows.T @ rows / k + DAMPING * np.eye(grad.size)
        assert_close_norm(flat(updates), expected_step(u, step, 3), solve_rtol(matrix))


def test_host_code_gets_numpy_arrays_eagerly_and_under_jit() -> None:
    from backends.jax.host import on_host

    seen = []

    def host(x: Any) -> Any:
        seen.append(type(x))
        return 2 * x

    x = jnp.arange(3.0)
    result = jax.ShapeDtypeStruct(x.shape, x.dtype)
    eager = on_host(host, result, x)
    jitted = jax.jit(lambda v: on_host(host, result, v))(x)
    assert seen == [np.ndarray, np.ndarray]
    assert isinstance(eager, jax.Array) and eager.devices() == x.devices()
    np.testing.assert_array_equal(np.asarray(jitted), [0.0, 2.0, 4.0])


# ---- normalised, linearly decaying steps; the state ----------------------------------------------
def test_ef_steps_decay_linearly_to_total_steps_then_refuse() -> None:
    ref = reference("dense")
    c = case("dense", "float32")
    rows = ref.per_sample_grads.astype(np.float32)
    tx = ef(LR, DAMPING, total_steps=3)
    state = tx.init(c.params)
    u = ngdref.ef_update(rows, damping=DAMPING, dedup_threshold=0.99)
    for step in range(3):
        updates, state = tx.update(None, state, c.params,
                                   per_sample_grads=tree_rows(rows, c.params))
        got = flat(updates)
        np.testing.assert_allclose(np.linalg.norm(got), LR * (3 - step) / 3, rtol=1e-6)
        np.testing.assert_allclose(got, expected_step(u, step, 3), **tolerance("float32"))
    with pytest.raises(ValueError, match="all total_steps=3 steps"):
        tx.update(None, state, c.params, per_sample_grads=tree_rows(rows, c.params))


def test_jitted_train_steps_equal_eager_steps() -> None:
    """Three steps of each transformation, float32 without 64-bit types, eager and jitted."""
    c = case("attention", "float32")
    for tx in (ief(LR, DAMPING, apply_fn=c.apply_fn, loss=c.loss),
               ef(LR, DAMPING, total_steps=3, apply_fn=c.apply_fn, loss=c.loss),
               sf(LR, DAMPING, total_steps=3, apply_fn=c.apply_fn, loss=c.loss, seed=3)):

        def train_step(params: Any, state: Any, inputs: Any, targets: Any, tx: Any = tx) -> Any:
            updates, state = tx.update(None, state, params, inputs=inputs, targets=targets)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(train_step)
        eager = (c.params, tx.init(c.params))
        compiled = eager
        for _ in range(3):
            eager = train_step(*eager, c.inputs, c.targets)
            compiled = jitted(*compiled, c.inputs, c.targets)
        assert int(compiled[1].count) == 3
        # one route through XLA may fuse the per-sample passes differently: float32 rounding,
        # amplified by the solves (damping 1e-3 against O(1) Gram entries)
        np.testing.assert_allclose(flat(compiled[0]), flat(eager[0]), rtol=1e-4, atol=1e-5)


# ---- conventions shared with the torch optimisers ---------------------------------------------
@pytest.mark.parametrize("space", ["sample", "parameter"])
def test_mean_reduction_takes_the_sum_conventions_steps(space: str, x64: None) -> None:
    """iEF: lr' = N lr and lambda' = lambda / N^2 ("sample") or lambda ("parameter");
    EF: the same lr and lambda' = lambda / N^2."""
    c = case("dense")
    n = c.targets.shape[0]
    batch = {"inputs": c.inputs, "targets": c.targets}
    model = {"apply_fn": c.apply_fn, "loss": c.loss}

    def step(tx: Any) -> np.ndarray:
        return flat(tx.update(None, tx.init(c.params), c.params, **batch)[0])

    mean_damping = DAMPING / n**2 if space == "sample" else DAMPING
    summed = step(ief(LR, DAMPING, damping_space=space, **model))
    mean = step(ief(n * LR, mean_damping, damping_space=space, reduction="mean", **model))
    np.testing.assert_allclose(mean, summed, **tolerance())
    summed = step(ef(LR, DAMPING, total_steps=2, **model))
    mean = step(ef(LR, DAMPING / n**2, total_steps=2, reduction="mean", **model))
    np.testing.assert_allclose(mean, summed, **tolerance())


def test_duplicate_filter_drops_a_repeated_sample(x64: None) -> None:
    """A sample given twice: with the filter the step is that of the batch without the copy,
    G^T (G G^T + lambda I)^-1 s over the distinct rows, solved densely here."""
    ref = reference("dense")
    rows = np.concatenate([ref.per_sample_grads, ref.per_sample_grads[1:2]])
    s = np.sum(ref.logit_grads**2, axis=1)
    s = np.concatenate([s, s[1:2]])
    params = case("dense").params
    tx = ief(LR, DAMPING, dedup_threshold=0.99)
    updates, _ = tx.update(None, tx.init(params), params, per_sample_grads=tree_rows(
        rows, params), logit_grad_sq_norms=jnp.asarray(s))
    distinct, s_distinct = rows[:-1], s[:-1]
    matrix = distinct @ distinct.T + DAMPING * np.eye(len(s_distinct))
    c = np.linalg.solve(matrix, s_distinct)
    assert_close_norm(flat(updates), -LR * distinct.T @ c, gram_rtol(distinct, matrix, c))


def test_sampling_key_is_the_torch_optimisers_key() -> None:
    torch = pytest.importorskip("torch")
    import backends

    opt = backends.SF(torch.nn.Linear(2, 2), ngdref.SoftmaxCrossEntropy(), lr=1.0, damping=1.0,
                      total_steps=2, seed=7)
    assert [sampling_key(7, t) for t in range(4)] == [opt.sampling_key(t) for t in range(4)]


@pytest.mark.parametrize(("ours", "theirs"), [(ief, "IEF"), (ef, "EF"), (sf, "SF")])
def test_defaults_are_the_torch_optimisers_defaults(ours: Any, theirs: str) -> None:
    pytest.importorskip("torch")
    import backends

    signature = inspect.signature(getattr(backends, theirs))
    torch_defaults = {
        name: p.default for name, p in signature.parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    defaults = {
        name: p.default for name, p in inspect.signature(ours).parameters.items()
        if p.default is not inspect.Parameter.empty and name not in ("apply_fn", "loss")
    }
    assert defaults and defaults.items() <= torch_defaults.items()


def _gpus() -> list[Any]:
    try:
        return jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jax installation
        return []


@pytest.mark.skipif(not _gpus(), reason="no GPU visible to JAX (jax[cuda12] and a device)")
def test_on_a_gpu_results_stay_there_and_agree_with_the_cpu(x64: None) -> None:
    from backends.jax import JaxProvider

    c, gpu = case("dense"), _gpus()[0]
    params, inputs = jax.device_put((c.params, c.inputs), gpu)
    provider = JaxProvider(c.apply_fn, params, inputs)
    d = ngdref.directions(provider, c.loss, jax.device_put(c.targets, gpu), damping=DAMPING,
                          methods=("ief",))["ief"]
    tx = ief(LR, DAMPING, apply_fn=c.apply_fn, loss=c.loss)
    step = jax.jit(lambda p, s: tx.update(None, s, p, inputs=inputs, targets=c.targets))
    updates, _ = step(params, tx.init(params))
    assert d.devices() == {gpu}
    assert all(leaf.devices() == {gpu} for leaf in jax.tree.leaves(updates))
    # against the loop's rows on the CPU: float64 rounding of two routes, amplified by the solve
    ref = reference("dense")
    rows, s = ref.per_sample_grads, np.sum(ref.logit_grads**2, axis=1)
    matrix = rows @ rows.T + DAMPING * np.eye(len(s))
    bound = gram_rtol(rows, matrix, np.linalg.solve(matrix, s))
    expected = -LR * ngdref.ief_update(rows, s, damping=DAMPING, dedup_threshold=0.99)
    assert_close_norm(flat(updates), expected, bound)
    assert_close_norm(-LR * np.asarray(d), expected, bound)
