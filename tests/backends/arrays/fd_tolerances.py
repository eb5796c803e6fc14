"""Per-dtype tolerances for comparing a finite-difference result with an exact one (one place).

A central difference with the default relative step ``h = eps ** (1/3)`` (see
:func:`backends.arrays.finite_difference.default_relative_step`) has truncation error
``h^2 |f'''| / 6`` and rounding error about ``eps |f| / h``; both are
``O(eps ** (2/3))``: 3.7e-11 in float64 and 2.4e-5 in float32. The test
problems (linear models, tanh MLPs with LeCun initialisation, inputs of unit
scale) have logits and Jacobian entries of size up to about 10 and third
derivatives of size up to about 10, and the float32 rounding term also sees
the rounding of theta +- h and of the logits themselves. Measured worst
absolute errors (Jacobians and JVPs with ||v|| from 1e-6 to 1e6, the four
models of ``test_finite_difference.py``, 5 seeds, NumPy / array_api_strict /
torch): 5.7e-10 in float64 and 4.3e-4 in float32, for entries of size up to
5. The tolerances below leave a margin of about 17x (float64) and 5x (float32)
on the absolute term alone, and stay far below the error a wrong column, sign
or parameter layout causes (order 1e-1 on these problems).

Exact-versus-exact comparisons use :func:`tests.array_backends.tolerance` instead.
"""

from __future__ import annotations

#: (rtol, atol) per dtype name for a finite-difference result against an exact one.
FD_TOLERANCES = {"float64": (1e-7, 1e-8), "float32": (2e-3, 2e-3)}


def fd_tolerance(dtype: str = "float64") -> dict[str, float]:
    """``{"rtol": ..., "atol": ...}`` for ``numpy.testing.assert_allclose``."""
    rtol, atol = FD_TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}
