"""ngdref.certificate on every array backend: the bound's formula, the comparison, refusals.

Expected values are written out in NumPy float64 from the formula
b_n = c u (||g_n|| ||v|| + sqrt(L) ||u_n|| ||t_n||); the same float64 operations in another
library agree to a few ulps (rtol 1e-15 of O(1) values; 1e-14 is used).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import ngdref
from ngdref.certificate import (
    CONSTANT,
    Certificate,
    RowsCertificateError,
    certify_products,
    product_bounds,
    unit_roundoff,
)
from tests.array_backends import Backend

RTOL = 1e-14
SQ_NORMS = np.array([4.0, 0.25, 9.0, 0.0])
U_NORMS = np.array([1.0, 2.0, 0.5, 0.0])
T_NORMS = np.array([3.0, 1.0, 2.0, 5.0])


def _bounds(backend: Backend, u: float = 2.0**-53, depth: int = 16) -> Any:
    return product_bounds(backend.asarray(SQ_NORMS), 3.0, backend.asarray(U_NORMS),
                          backend.asarray(T_NORMS), unit_roundoff=u, depth=depth)


def test_bounds_follow_the_formula(backend: Backend) -> None:
    expected = CONSTANT * 2.0**-53 * (np.sqrt(SQ_NORMS) * 3.0 + 4.0 * U_NORMS * T_NORMS)
    got = backend.to_numpy(_bounds(backend))
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=0)
    assert got[3] == 0  # a zero row with a zero cotangent admits no error at all


def test_unit_roundoff_is_the_least_precise_dtype(backend: Backend) -> None:
    xp = backend.xp
    assert unit_roundoff(xp, xp.float64) == 2.0**-53
    assert unit_roundoff(xp, xp.float64, xp.float32) == 2.0**-24


def test_products_within_their_bounds_pass_and_report_the_worst_sample(backend: Backend) -> None:
    bounds = backend.to_numpy(_bounds(backend, u=1e-4))  # offsets well above the values' ulps
    reference = np.array([1.0, -2.0, 0.5, 0.0])  # sample 3: a zero row and cotangent
    offsets = np.array([0.5, 0.9, -0.25, 0.0]) * bounds  # sample 1 is closest to its bound
    result = certify_products(backend.asarray(reference + offsets), backend.asarray(reference),
                              backend.asarray(bounds), route="forward", unit_roundoff=1e-4)
    assert isinstance(result, Certificate)
    assert result.sample == 1
    shifted = certify_products(backend.asarray(reference + offsets), backend.asarray(reference),
                               backend.asarray(bounds), route="forward", unit_roundoff=1e-4,
                               first_sample=7)
    assert shifted.sample == 8  # the caller's batch index of a window's entry 1
    assert result.route == "forward"
    assert math.isclose(result.bound, bounds[1], rel_tol=RTOL)
    assert math.isclose(result.error, abs(offsets[1]), rel_tol=1e-9)  # ulps of 2 vs 1e-3


@pytest.mark.parametrize(("sample", "excess"), [(0, 1.5), (2, 1e6), (3, 1e-300)])
def test_one_product_beyond_its_bound_raises_by_name(backend: Backend, sample: int,
                                                     excess: float) -> None:
    bounds = backend.to_numpy(_bounds(backend, u=1e-4))
    reference = np.array([1.0, -2.0, 0.5, 0.0])  # sample 3: a zero row and cotangent
    products = reference.copy()
    # the sample's error: 1.5 or 1e6 times its bound; sample 3 has bound 0 and error 1e-300
    products[sample] += excess * bounds[sample] if bounds[sample] > 0 else excess
    with pytest.raises(RowsCertificateError, match=f"at sample n = {sample} exceeds") as info:
        certify_products(backend.asarray(products), backend.asarray(reference),
                         backend.asarray(bounds), route="double-backward",
                         unit_roundoff=1e-4)
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.sample, err.route) == (sample, "double-backward")
    assert math.isclose(err.bound, bounds[sample], rel_tol=RTOL)
    assert err.error > err.bound


def test_non_finite_products_fail_and_a_non_finite_reference_is_named(backend: Backend) -> None:
    bounds = backend.asarray(backend.to_numpy(_bounds(backend)))
    finite = backend.asarray(np.ones(4))
    broken = backend.asarray(np.array([1.0, np.nan, 1.0, 1.0]))
    with pytest.raises(RowsCertificateError) as info:
        certify_products(broken, finite, bounds, route="forward", unit_roundoff=1e-16)
    assert info.value.sample == 1 and info.value.error == math.inf
    with pytest.raises(ngdref.NonFiniteError, match="reference"):
        certify_products(finite, broken, bounds, route="forward", unit_roundoff=1e-16)


BAD_BOUNDS = [  # (keyword overrides, exception, message)
    ({"row_sq_norms": np.ones(3)}, ValueError,
     "cotangent_norms has 4 entries but row_sq_norms has 3"),
    ({"cotangent_norms": np.ones(3)}, ValueError, "cotangent_norms has 3 entries but"),
    ({"tangent_norms": np.ones((4, 1))}, ValueError, r"tangent_norms must have 1 axes"),
    ({"tangent_norms": np.array([1.0, np.inf, 1.0, 1.0])}, ngdref.NonFiniteError,
     "tangent_norms"),
    ({"row_sq_norms": np.ones(4, dtype=np.int64)}, TypeError, "row_sq_norms must have a real"),
    ({"vector_norm": -1.0}, ValueError, "vector_norm must be finite and >= 0"),
    ({"unit_roundoff": 0.0}, ValueError, "unit_roundoff must be finite and > 0"),
    ({"depth": 0}, ValueError, "depth must be an int >= 1"),
    ({"constant": math.nan}, ValueError, "constant must be finite"),
]


@pytest.mark.parametrize(("override", "error", "message"), BAD_BOUNDS)
def test_bad_bound_input_is_refused_by_name(backend: Backend, override: dict, error: type,
                                            message: str) -> None:
    args = {"row_sq_norms": SQ_NORMS, "cotangent_norms": U_NORMS, "tangent_norms": T_NORMS,
            "vector_norm": 1.0, "unit_roundoff": 1e-16, "depth": 1, "constant": 8.0} | override
    for name in ("row_sq_norms", "cotangent_norms", "tangent_norms"):
        args[name] = backend.asarray(args[name])
    with pytest.raises(error, match=message):
        product_bounds(args.pop("row_sq_norms"), args.pop("vector_norm"),
                       args.pop("cotangent_norms"), args.pop("tangent_norms"), **args)


def test_bad_products_are_refused_by_name(backend: Backend) -> None:
    ones = backend.asarray(np.ones(4))
    with pytest.raises(ValueError, match="products has 3 entries but reference has 4"):
        certify_products(backend.asarray(np.ones(3)), ones, ones, route="forward",
                         unit_roundoff=1e-16)
    with pytest.raises(ValueError, match="first_sample must be an int >= 0"):
        certify_products(ones, ones, ones, route="forward", unit_roundoff=1e-16, first_sample=-1)
    with pytest.raises(ValueError, match="bounds must have 1 axes"):
        certify_products(ones, ones, backend.asarray(np.ones((4, 1))), route="forward",
                         unit_roundoff=1e-16)
