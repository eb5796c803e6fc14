"""Logit-level losses: closed forms vs NumPy, finite differences, sampling (:ref:`conv-notation`,
:ref:`conv-sampling-keys`)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import ngdref
from tests.array_backends import BACKENDS, tolerance
from tests.cases import (
    CASES,
    IGNORE,
    ONE_PER_KIND,
    ids,
    np_softmax,
    np_value,
)

# Central differences with step h on a function whose third derivative is O(1)
# (logits O(1), bounded softmax/sigmoid derivatives): truncation ~ h^2/6 ~ 2e-11,
# rounding ~ eps * |l| / h ~ 1e-10 for |l| <= 5. 1e-7 leaves a 1000x margin
# while still catching any wrong term (whose size would be O(1e-2) or more).
FD_STEP = 1e-5
FD_ATOL = 1e-7


def _fd_columns(fn, logits: np.ndarray) -> np.ndarray:
    """d fn(z)_n / d z_nj for every n, j: column j of every sample at once.

    Valid because l_n (and e_n) depend on z_n only. Returns (N, C, *fn's trailing shape).
    """
    cols = []
    for j in range(logits.shape[1]):
        step = np.zeros_like(logits)
        step[:, j] = FD_STEP
        cols.append((fn(logits + step) - fn(logits - step)) / (2 * FD_STEP))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_value_matches_numpy_closed_form(case, backend):
    pr = case.build()
    a = pr.on(backend)
    value = backend.to_numpy(pr.loss.value(a.logits, a.targets))
    np.testing.assert_allclose(
        value, np_value(pr.kind, pr.logits, pr.targets, pr.vocab), **tolerance()
    )


def test_softmax_ce_value_is_stable_for_large_logits(backend):
    logits = np.array([[1000.0, 0.0, -1000.0], [-800.0, -801.0, -799.5], [3.0, 3.0, 3.0]])
    targets = np.array([1, 0, 2])
    m = logits.max(axis=1)
    expected = m + np.log(np.exp(logits - m[:, None]).sum(axis=1)) - logits[[0, 1, 2], targets]
    loss = ngdref.SoftmaxCrossEntropy()
    value = loss.value(backend.asarray(logits), backend.asarray(targets))
    assert np.all(np.isfinite(backend.to_numpy(value)))
    np.testing.assert_allclose(backend.to_numpy(value), expected, **tolerance())
    np.testing.assert_allclose(expected[2], np.log(3.0), **tolerance())


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_grad_and_hessian_match_closed_forms(case, backend):
    pr = case.build()
    a = pr.on(backend)
    np.testing.assert_allclose(
        backend.to_numpy(pr.loss.grad(a.logits, a.targets)), pr.logit_grads, **tolerance()
    )
    np.testing.assert_allclose(
        backend.to_numpy(pr.loss.hessian(a.logits, a.targets)), pr.logit_hessians, **tolerance()
    )


def _assert_value_and_grad(pr, backend, loss, targets, factors=(1, 1)):
    """loss.value_and_grad against NumPy's closed forms of the case, times ``factors``."""
    value, grad = loss.value_and_grad(pr.on(backend).logits, targets)
    expected = np_value(pr.kind, pr.logits, pr.targets, pr.vocab)
    np.testing.assert_allclose(backend.to_numpy(value), factors[0] * expected, **tolerance())
    np.testing.assert_allclose(backend.to_numpy(grad), factors[1] * pr.logit_grads, **tolerance())


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_value_and_grad_match_closed_forms(case, backend):
    # the softmax losses compute both from one softmax: each against NumPy's closed form
    pr = case.build()
    _assert_value_and_grad(pr, backend, pr.loss, pr.on(backend).targets)


SOFTMAX_CASES = [c for c in CASES if c.kind in ("ce", "seq")]


@pytest.mark.parametrize("overridden", ["value", "grad"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=ids(SOFTMAX_CASES))
def test_value_and_grad_takes_a_subclass_override(case, overridden, backend):
    # a user's subclass that changes one formula (here: doubles it) must get its own formula
    # from value_and_grad, which the optimisers call, not the base class's shared passes
    pr = case.build()
    base = type(pr.loss)
    doubled = type("Doubled", (base,), {
        overridden: lambda self, z, y: 2 * getattr(base, overridden)(self, z, y)})
    loss = copy.copy(pr.loss)  # the case's loss with its settings (vocab_size, ...)
    loss.__class__ = doubled
    factors = {"value": (2, 1), "grad": (1, 2)}[overridden]
    _assert_value_and_grad(pr, backend, loss, pr.on(backend).targets, factors)


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=ids(SOFTMAX_CASES))
def test_softmax_losses_take_32_bit_labels(case, backend):
    # the label gather needs the index dtype (int64 on torch): int32 targets are converted
    pr = case.build()
    labels = backend.xp.astype(pr.on(backend).targets, backend.xp.int32)
    _assert_value_and_grad(pr, backend, pr.loss, labels)


#: (derivative, the function it differentiates); fd's columns hold d f / d z_nj, so a
#: Hessian (N, C_i, C_j) = d e_ni / d z_nj is fd (N, C_j, C_i) with its last two axes swapped
DERIVATIVES = [("grad", "value"), ("hessian", "grad")]


@pytest.mark.parametrize(("derivative", "function"), DERIVATIVES, ids=["grad", "hessian"])
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_derivative_is_finite_difference(case, derivative, function, backend):
    pr = case.build()
    targets = pr.on(backend).targets

    def f(z):
        return backend.to_numpy(getattr(pr.loss, function)(backend.asarray(z), targets))

    fd = _fd_columns(f, pr.logits)  # (N, C) or (N, C_j, C_i)
    got = backend.to_numpy(getattr(pr.loss, derivative)(backend.asarray(pr.logits), targets))
    expected = fd if derivative == "grad" else np.swapaxes(fd, 1, 2)
    np.testing.assert_allclose(got, expected, rtol=0, atol=FD_ATOL)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_hessian_sqrt_factors_hessian(case, backend):
    pr = case.build()
    a = pr.on(backend)
    q = backend.to_numpy(pr.loss.hessian_sqrt(a.logits, a.targets))
    np.testing.assert_allclose(q @ np.swapaxes(q, 1, 2), pr.logit_hessians, **tolerance())


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_hessian_vp_is_hessian_times_vector(case, backend):
    pr = case.build()
    a = pr.on(backend)
    v = np.random.default_rng(99).standard_normal((pr.n, pr.c))
    hv = backend.to_numpy(pr.loss.hessian_vp(a.logits, a.targets, backend.asarray(v)))
    np.testing.assert_allclose(hv, np.einsum("nij,nj->ni", pr.logit_hessians, v), **tolerance())


def test_sequence_ce_is_sum_of_per_position_softmax_ce(backend):
    rng = np.random.default_rng(21)
    n, t, v = 5, 4, 6
    logits = rng.standard_normal((n, t * v))
    targets = rng.integers(0, v, size=(n, t))
    targets[0, 2:] = IGNORE
    targets[3, 0] = IGNORE
    seq = ngdref.SequenceSoftmaxCrossEntropy(v)
    z, y = backend.asarray(logits), backend.asarray(targets)
    value = backend.to_numpy(seq.value(z, y))
    grad = backend.to_numpy(seq.grad(z, y)).reshape(n, t, v)
    hessian = backend.to_numpy(seq.hessian(z, y))

    ce = ngdref.SoftmaxCrossEntropy()
    expected_value = np.zeros(n)
    expected_grad = np.zeros((n, t, v))
    expected_hessian = np.zeros((n, t * v, t * v))
    for j in range(t):
        kept = np.nonzero(targets[:, j] != IGNORE)[0]
        zj = backend.asarray(logits[kept, j * v : (j + 1) * v])
        yj = backend.asarray(targets[kept, j])
        expected_value[kept] += backend.to_numpy(ce.value(zj, yj))
        expected_grad[kept, j] = backend.to_numpy(ce.grad(zj, yj))
        block = backend.to_numpy(ce.hessian(zj, yj))
        expected_hessian[kept, j * v : (j + 1) * v, j * v : (j + 1) * v] = block
    np.testing.assert_allclose(value, expected_value, **tolerance())
    np.testing.assert_allclose(grad, expected_grad, **tolerance())
    np.testing.assert_allclose(hessian, expected_hessian, **tolerance())
    # ignored positions contribute nothing at all
    assert np.all(grad[0, 2:] == 0) and np.all(grad[3, 0] == 0)


def test_reduction_factor():
    assert ngdref.reduction_factor("sum", 32) == 1.0
    assert ngdref.reduction_factor("mean", 32) == 1.0 / 32
    assert ngdref.reduction_factor(0.25, 32) == 0.25
    assert ngdref.reduction_factor(3, 32) == 3.0


# ---- sampling ---------------------------------------------------------------
@pytest.mark.parametrize("case", ONE_PER_KIND, ids=ids(ONE_PER_KIND))
def test_sample_same_key_same_draws_on_every_backend(case, backend):
    pr = case.build()
    reference = next(b for b in BACKENDS if b.name == "numpy")
    ref = pr.on(reference)
    expected = pr.loss.sample(ref.logits, 1234, num_samples=7, targets=ref.targets)
    a = pr.on(backend)
    drawn = pr.loss.sample(a.logits, 1234, num_samples=7, targets=a.targets)
    assert tuple(drawn.shape) == (7, *pr.targets.shape)
    if pr.kind == "mse":  # Box-Muller normals: the same uniforms through the same formula
        np.testing.assert_allclose(backend.to_numpy(drawn), expected, **tolerance())
    else:
        np.testing.assert_array_equal(backend.to_numpy(drawn), expected)
    # a different key gives different draws; the same key again the same ones
    again = pr.loss.sample(a.logits, 1234, num_samples=7, targets=a.targets)
    np.testing.assert_array_equal(backend.to_numpy(again), backend.to_numpy(drawn))
    other = pr.loss.sample(a.logits, 4321, num_samples=7, targets=a.targets)
    assert not np.array_equal(backend.to_numpy(other), backend.to_numpy(drawn))


def test_categorical_sample_is_inverse_cdf_of_given_uniforms(backend):
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((6, 5))
    uniforms = rng.uniform(size=(50, 6))
    cdf = np.cumsum(np_softmax(logits), axis=1)
    # independent route: the first class whose cdf exceeds u
    expected = np.stack(
        [[np.searchsorted(cdf[n], u[n], side="right") for n in range(6)] for u in uniforms]
    )
    drawn = ngdref.SoftmaxCrossEntropy().sample(
        backend.asarray(logits), backend.asarray(uniforms), num_samples=50
    )
    np.testing.assert_array_equal(backend.to_numpy(drawn), expected)


def test_sequence_sample_keeps_ignored_positions(backend):
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((3, 2 * 4))
    targets = np.array([[1, IGNORE], [IGNORE, 2], [0, 3]])
    loss = ngdref.SequenceSoftmaxCrossEntropy(4)
    drawn = backend.to_numpy(
        loss.sample(backend.asarray(logits), 5, num_samples=9, targets=backend.asarray(targets))
    )
    assert drawn.shape == (9, 3, 2)
    ignored = np.broadcast_to(targets == IGNORE, drawn.shape)
    assert np.all(drawn[ignored] == IGNORE)
    assert np.all((drawn[~ignored] >= 0) & (drawn[~ignored] < 4))


# Monte Carlo: K = 20000 draws per sample. A frequency f of a category with
# probability p is Binomial(K, p)/K with standard error sqrt(p (1 - p) / K)
# (known exactly, not estimated); 5 standard errors bound each of the N*C
# frequencies with a per-entry false-alarm rate < 6e-7 (normal approximation),
# while a wrong sampler (e.g. off-by-one class, p of a neighbour) is off by many.
MC_DRAWS = 20000


def test_categorical_frequencies_match_softmax():
    rng = np.random.default_rng(17)
    logits = 1.5 * rng.standard_normal((4, 5))
    p = np_softmax(logits)
    drawn = ngdref.SoftmaxCrossEntropy().sample(logits, 2024, num_samples=MC_DRAWS)
    freq = np.stack([(drawn == c).mean(axis=0) for c in range(5)], axis=1)
    se = np.sqrt(p * (1 - p) / MC_DRAWS)
    assert np.all(np.abs(freq - p) <= 5 * se + 1e-12), np.max(np.abs(freq - p) / se)


def test_sigmoid_and_gaussian_samples_match_their_distributions():
    rng = np.random.default_rng(18)
    logits = rng.standard_normal((3, 2))
    sig = ngdref.SigmoidBinaryCrossEntropy().sample(logits, 7, num_samples=MC_DRAWS)
    p = 1 / (1 + np.exp(-logits))
    se = np.sqrt(p * (1 - p) / MC_DRAWS)
    assert set(np.unique(sig)) <= {0.0, 1.0}
    assert np.all(np.abs(sig.mean(axis=0) - p) <= 5 * se)
    # N(z, I): sample mean within 5 standard errors (1/sqrt(K)); the variance of a
    # sample variance of unit normals is 2/K, so 5 sqrt(2/K) bounds its error.
    gauss = ngdref.SquaredError().sample(logits, 7, num_samples=MC_DRAWS)
    assert np.all(np.abs(gauss.mean(axis=0) - logits) <= 5 / np.sqrt(MC_DRAWS))
    assert np.all(np.abs(gauss.var(axis=0) - 1.0) <= 5 * np.sqrt(2 / MC_DRAWS))
