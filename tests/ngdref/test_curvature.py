"""Dense curvature matrices vs loops over outer products; Fisher = GGN = E[sampled Fisher]."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import ngdref
from tests.cases import (
    CASES,
    IGNORE,
    assert_close_norm,
    ids,
    np_fisher,
    np_logit_grads,
    np_sum_outer,
    sum_rtol,
)


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_dense_matrices_match_loops_over_outer_products(case, backend):
    pr = case.build()
    a = pr.on(backend)
    g, s = pr.per_sample_grads, pr.logit_grad_sq_norms
    expected = {
        "fisher": np_fisher(pr.jacobians, pr.logit_hessians),
        "gn": sum(jn.T @ jn for jn in pr.jacobians),
        "ef": np_sum_outer(g),
        "ief": np_sum_outer(g, 1.0 / s),
    }
    actual = {
        "fisher": ngdref.fisher_matrix(a.jacobians, a.logit_hessians),
        "gn": ngdref.gn_matrix(a.jacobians),
        "ef": ngdref.ef_matrix(a.per_sample_grads),
        "ief": ngdref.ief_matrix(a.per_sample_grads, a.logit_grad_sq_norms),
    }
    # sums of N C^2 products: rounding <= terms eps sum_n ||A_n||_F^2 ||W_n||_F (sum_rtol)
    jac_sq = (pr.jacobians**2).sum(axis=(1, 2))
    bounds = {
        "fisher": sum_rtol(
            float(jac_sq @ np.linalg.norm(pr.logit_hessians, axis=(1, 2))), expected["fisher"],
            pr.n * pr.c**2,
        ),
        "gn": sum_rtol(float(jac_sq.sum()), expected["gn"], pr.n * pr.c),
        "ef": sum_rtol(float((g**2).sum()), expected["ef"], pr.n),
        "ief": sum_rtol(float((g**2).sum(axis=1) @ (1 / s)), expected["ief"], 2 * pr.n),
    }
    for name, matrix in actual.items():
        assert tuple(matrix.shape) == (pr.p, pr.p), name
        assert_close_norm(backend.to_numpy(matrix), expected[name], bounds[name])


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_ief_matrix_equals_its_logit_view(case, backend):
    """:ref:`conv-curvature`: F_iEF = sum_n J_n^T u_n u_n^T J_n with u_n = e_n / ||e_n||."""
    pr = case.build()
    a = pr.on(backend)
    via_logits = backend.to_numpy(ngdref.ief_matrix_logit(a.jacobians, a.logit_grads))
    via_grads = backend.to_numpy(ngdref.ief_matrix(a.per_sample_grads, a.logit_grad_sq_norms))
    u = pr.logit_grads / np.linalg.norm(pr.logit_grads, axis=1, keepdims=True)
    expected = np_fisher(pr.jacobians, u[:, :, None] * u[:, None, :])
    # u u^T has unit norm: rounding <= (N C^2 + C) eps sum_n ||J_n||_F^2
    rtol = sum_rtol(float((pr.jacobians**2).sum()), expected, pr.n * (pr.c**2 + pr.c))
    assert_close_norm(via_logits, via_grads, rtol)
    assert_close_norm(via_logits, expected, rtol)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_sf_matrix_matches_loop(num_samples, backend):
    rows = np.random.default_rng(5).standard_normal((4 * num_samples, 11))
    actual = ngdref.sf_matrix(backend.asarray(rows), num_samples=num_samples)
    expected = np_sum_outer(rows) / num_samples
    rtol = sum_rtol(float((rows**2).sum()) / num_samples, expected, len(rows))
    assert_close_norm(backend.to_numpy(actual), expected, rtol)


# ---- Fisher = GGN = E[sampled Fisher] -------------------------------------
def _enumerated_fisher(pr) -> np.ndarray:
    """sum_n J_n^T E_{y ~ p_n}[e_n(y) e_n(y)^T] J_n by exact enumeration of the labels.

    Independent of the Hessian closed forms: only the loss's gradient formula at
    every possible label and the model's probability of that label are used.
    """
    n, c, p = pr.jacobians.shape
    out = np.zeros((p, p))
    for i in range(n):
        z = pr.logits[i : i + 1]
        if pr.kind == "ce":
            probs = np.exp(z[0] - np.logaddexp.reduce(z[0]))
            outcomes = [(np.array([y]), probs[y]) for y in range(c)]
        elif pr.kind == "bce":
            q = 1 / (1 + np.exp(-z[0]))
            outcomes = [
                (np.array([bits], dtype=float), np.prod(np.where(bits, q, 1 - q)))
                for bits in itertools.product([0, 1], repeat=c)
            ]
        elif pr.kind == "seq":
            t = pr.targets.shape[1]
            v = pr.vocab
            kept = [j for j in range(t) if pr.targets[i, j] != IGNORE]
            logp = z[0].reshape(t, v) - np.logaddexp.reduce(z[0].reshape(t, v), axis=1)[:, None]
            outcomes = []
            for labels in itertools.product(range(v), repeat=len(kept)):
                y = pr.targets[i].copy()
                y[kept] = labels
                outcomes.append((y[None, :], np.exp(sum(logp[j, y[j]] for j in kept))))
        else:
            raise ValueError(pr.kind)
        total = sum(prob for _, prob in outcomes)
        assert abs(total - 1) < 1e-12
        m = np.zeros((c, c))
        for y, prob in outcomes:
            e = np_logit_grads(pr.kind, z, y, pr.vocab)[0]
            m += prob * np.outer(e, e)
        out += pr.jacobians[i].T @ m @ pr.jacobians[i]
    return out


ENUMERABLE = [c for c in CASES if c.kind in ("ce", "bce", "seq")]


@pytest.mark.parametrize("case", ENUMERABLE, ids=ids(ENUMERABLE))
def test_fisher_equals_ggn_by_enumeration(case, backend):
    """Fisher (expected outer product of sampled-label gradients) == GGN (loss Hessian)."""
    pr = case.build()
    a = pr.on(backend)
    ggn = ngdref.fisher_matrix(a.jacobians, pr.loss.hessian(a.logits, a.targets))
    expected = _enumerated_fisher(pr)
    # the enumeration sums C labels' outer products, each of norm <= ||e||^2 <= 2
    scale = 2 * float((pr.jacobians**2).sum(axis=(1, 2)).sum()) * pr.c
    assert_close_norm(backend.to_numpy(ggn), expected, sum_rtol(scale, expected, pr.n * pr.c**2))


# Monte Carlo check of E[F_SF] = F. With K draws per sample, F_SF = mean_k X_k with
# X_k = sum_n ghat_nk ghat_nk^T i.i.d. over k, so each entry's standard error is
# estimated by std_k(X_k)/sqrt(K) from the same draws. K = 4000 makes that estimate
# accurate to ~1-2% (K - 1 degrees of freedom, so a t-quantile ~ the normal one); a
# bound of 5 standard errors per entry has a false-alarm rate ~6e-7 per entry, i.e.
# ~1e-4 over the P (P + 1) / 2 = 210 distinct entries, and the draws are fixed by the
# key so the test is deterministic. A biased sampler moves some entry by more than
# ten standard errors at this K even when the bias is mild (labels drawn from
# softmax(0.8 z) instead of softmax(z)); a grossly wrong one by hundreds.
SF_DRAWS = 4000


@pytest.mark.parametrize("case", [CASES[0]], ids=[CASES[0].name])
def test_sampled_fisher_is_unbiased_monte_carlo(case, backend):
    pr = case.build()
    a = pr.on(backend)
    drawn = backend.to_numpy(pr.loss.sample(a.logits, 99, num_samples=SF_DRAWS))  # (K, N)
    probs = np.exp(pr.logits - np.logaddexp.reduce(pr.logits, axis=1)[:, None])
    onehots = np.eye(pr.c)[drawn]  # (K, N, C)
    rows = np.einsum("ncp,knc->knp", pr.jacobians, probs[None] - onehots)  # (K, N, P)
    sf = backend.to_numpy(
        ngdref.sf_matrix(backend.asarray(rows.reshape(-1, pr.p)), num_samples=SF_DRAWS)
    )
    per_draw = np.einsum("knp,knq->kpq", rows, rows)  # X_k
    mean = per_draw.mean(axis=0)
    rtol = sum_rtol(float((rows**2).sum()) / SF_DRAWS, mean, rows.size // pr.p)
    assert_close_norm(sf, mean, rtol)
    se = per_draw.std(axis=0, ddof=1) / np.sqrt(SF_DRAWS)
    fisher = np_fisher(pr.jacobians, pr.logit_hessians)
    z = np.abs(sf - fisher) / se
    assert np.all(z <= 5), f"max deviation {z.max():.2f} standard errors"
    # the check has power: the relative error is small but clearly nonzero
    assert 0 < np.abs(sf - fisher).max() < 0.1 * np.abs(fisher).max()
