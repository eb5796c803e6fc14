"""The PerSampleRows protocol: DenseRows against explicit NumPy products, and as_rows.

Expected values are plain NumPy float64 products (and Python-loop dot products for the
Gram matrices), not the code under test. Float64 products of P terms carry a relative
error at most P eps |a| |b| per entry (the standard dot-product bound), so they are
compared norm-wise with rtol = P eps times the ratio of the product of row norms to the
result's norm (1 for a Gram matrix's diagonal-dominated scale, bounded here by 10).
"""

from __future__ import annotations

import numpy as np
import pytest

import ngdref
from tests.cases import ProductsOnlyRows, assert_close_norm

EPS = np.finfo(np.float64).eps


def _data(n: int = 5, m: int = 3, p: int = 11, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, p)), rng.standard_normal((m, p)), rng.standard_normal(p)


def test_dense_rows_products_equal_numpy(backend):
    g, h, v = _data()
    rows = ngdref.as_rows(backend.asarray(g))
    assert isinstance(rows, ngdref.DenseRows)
    assert isinstance(rows, ngdref.PerSampleRows)
    assert rows.shape == g.shape
    gram_loop = np.array([[sum(a * b for a, b in zip(x, y, strict=True)) for y in g] for x in g])
    rtol = 10 * g.shape[1] * EPS
    assert_close_norm(backend.to_numpy(rows.gram()), gram_loop, rtol)
    assert_close_norm(backend.to_numpy(rows.cross_gram(backend.asarray(h))), g @ h.T, rtol)
    assert_close_norm(backend.to_numpy(rows.matvec(backend.asarray(v))), g @ v, rtol)
    w = np.arange(1.0, g.shape[0] + 1)
    assert_close_norm(backend.to_numpy(rows.rmatvec(backend.asarray(w))), g.T @ w, rtol)
    assert rows.gram().dtype == backend.xp.float64


def test_float32_rows_give_float64_grams_and_float32_rmatvec(backend):
    if backend.name not in ("numpy", "torch"):
        pytest.skip("float32 variant on numpy and torch")
    g, _, _ = _data(p=250_000)  # more than one 2**20-entry float64 block
    g32 = g.astype(np.float32)
    rows = ngdref.as_rows(backend.asarray(g32))
    gram = backend.to_numpy(rows.gram())
    assert gram.dtype == np.float64
    g64 = g32.astype(np.float64)  # the float32 rows, exactly, in float64
    assert_close_norm(gram, g64 @ g64.T, 10 * g.shape[1] * EPS)
    out = backend.to_numpy(rows.rmatvec(backend.asarray(np.ones(g.shape[0]))))
    assert out.dtype == np.float32


def test_cross_gram_with_a_non_dense_other_equals_numpy(backend):
    g, h, _ = _data()
    rows = ngdref.as_rows(backend.asarray(g))
    other = ProductsOnlyRows(backend.asarray(h))
    assert not isinstance(other, ngdref.DenseRows)
    assert ngdref.as_rows(other) is other  # a PerSampleRows passes through
    assert_close_norm(backend.to_numpy(rows.cross_gram(other)), g @ h.T, 10 * g.shape[1] * EPS)


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], "rows", 3.0])
def test_as_rows_refuses_what_is_neither_array_nor_rows(bad):
    with pytest.raises(TypeError, match="per_sample_grads must be an array"):
        ngdref.as_rows(bad)


def test_dense_rows_refuses_a_vector(backend):
    with pytest.raises(ValueError, match="per_sample_grads must have 2 axes"):
        ngdref.as_rows(backend.asarray(np.ones(3)))


def test_every_gram_form_accepts_rows_given_through_products_only(backend):
    """EF, iEF, SF, gram_update, DampedGram, the filter, the imbalance and sgd_update give
    the dense array's results from a PerSampleRows that is not a DenseRows. Both routes
    form the same float64 products, so they agree to the rounding of products of P terms
    amplified by the condition number of the damped Gram matrix (< 1e3 here): norm-wise
    within 10 P eps 1e3."""
    rng = np.random.default_rng(4)
    g = rng.standard_normal((6, 14))
    g[5] = 0.999 * g[4] + 1e-3 * rng.standard_normal(14)  # a near duplicate of row 4
    sampled = rng.standard_normal((6, 14))
    s = backend.asarray(rng.uniform(0.5, 2.0, 6))
    rtol = 10 * g.shape[1] * EPS * 1e3
    dense, hidden = backend.asarray(g), ProductsOnlyRows(backend.asarray(g))
    sampled_dense = backend.asarray(sampled)
    sampled_hidden = ProductsOnlyRows(sampled_dense)
    grad = backend.asarray(g.sum(axis=0))
    routes = {
        "ef": lambda r, _: ngdref.ef_update(r, damping=1e-3, dedup_threshold=0.99),
        "ief": lambda r, _: ngdref.ief_update(r, s, damping=1e-3, damping_mode="relative"),
        "gram_update": lambda r, _: ngdref.gram_update(r, s, damping=0.1)[0],
        "DampedGram": lambda r, _: ngdref.DampedGram(r).update(s, damping=0.1)[0],
        "sgd": lambda r, _: ngdref.sgd_update(r),
        "sf": lambda _, h: ngdref.sf_update(h, grad, damping=0.1),
    }
    for fn in routes.values():
        expected = backend.to_numpy(fn(dense, sampled_dense))
        got = backend.to_numpy(fn(hidden, sampled_hidden))
        assert_close_norm(got, expected, rtol)
    mask = backend.to_numpy(ngdref.near_duplicate_mask(hidden, threshold=0.99))
    assert mask.tolist() == [True] * 5 + [False]
    assert mask.tolist() == backend.to_numpy(
        ngdref.near_duplicate_mask(ngdref.gram_matrix(dense), threshold=0.99)
    ).tolist()
    for statistic in ("max_min", "tail_10"):
        assert ngdref.grad_norm_imbalance(hidden, statistic=statistic) == pytest.approx(
            ngdref.grad_norm_imbalance(dense, statistic=statistic), rel=rtol
        )


def test_directions_from_a_provider_whose_vjp_returns_rows(backend):
    """A provider may return PerSampleRows from vjp (the ghost route): directions gives the
    dense provider's EF, iEF, SF and SGD (the same products; rtol as above)."""
    from tests.cases import CASES, DenseProvider

    class RowsProvider(DenseProvider):
        def vjp(self, cotangents):
            return ProductsOnlyRows(super().vjp(cotangents))

    pr = CASES[0].build()
    a = pr.on(backend)
    options = {"damping": 0.1, "key": 3, "methods": ("sgd", "ef", "ief", "sf"),
               "dedup_threshold": 0.99, "reduction": "mean"}
    expected = ngdref.directions(pr.provider(backend), pr.loss, a.targets, **options)
    got = ngdref.directions(RowsProvider(a.jacobians, a.logits), pr.loss, a.targets, **options)
    for name in options["methods"]:
        assert_close_norm(
            backend.to_numpy(got[name]), backend.to_numpy(expected[name]), 10 * pr.p * EPS * 1e3
        )
