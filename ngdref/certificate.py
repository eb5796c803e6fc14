r"""A certificate for per-sample rows: their G v against an independently computed G v.

The per-sample rows G (N, P) of a batch (row n = :math:`u_n^\top J_n`, the gradient of the
per-sample loss in the sum convention when :math:`u_n = \partial l_n / \partial z_n`) may
come from factors, hooks, ``vmap`` or a loop; each route can be wrong for a model it does not
understand. For a random :math:`v \in \mathbb{R}^P` the rows give :math:`r = G_{rows} v`, and
an independent route (forward-mode AD of the batched logits, or a double backward pass) gives

.. math:: r^*_n = u_n \cdot (J_n v).

If a row is wrong, :math:`(G_{rows} - G)_n v \ne 0` with probability one for a Gaussian v, so
the rows are accepted only when every :math:`|r_n - r^*_n|` is within the rounding of both
routes.

The bound
---------
Let u be the unit roundoff of the least precise arithmetic of the passes (float32's
:math:`2^{-24}` for a float64 model whose layer norm takes its variance in float32; TF32's
:math:`2^{-11}` for float32 convolutions on CUDA), L the number of operations of the forward
pass, and :math:`t_n = J_n v` (C,) the reference's tangents. Under the probabilistic model of
rounding (Higham and Mary, SIAM J. Sci. Comput. 2019: the relative errors of the individual
operations are independent, mean zero and at most u, so that k of them add up like
:math:`\sqrt{k}\,u`, not :math:`k u`), three roundings separate the two numbers:

1. The product :math:`g_n \cdot v` of the rows' route, a sum of P terms of random sign (v is
   Gaussian): its error :math:`\sum_i \delta_i S_i` over the partial sums :math:`S_i`, with
   :math:`E \sum_i S_i^2 \le P \|g_n\|^2 = E\|v\|^2 \|g_n\|^2`, is of size
   :math:`u \|g_n\| \|v\|`.
2. The rows' own rounding :math:`\delta g_n` (L operations in the backward pass, or in the
   factors), of size :math:`\sqrt{L}\,u\,\|u_n\|\,\|J_n\|_F`; v is drawn after the rows, so
   :math:`\delta g_n \cdot v` is of size :math:`\|\delta g_n\|`, and
   :math:`\|J_n\|_F \approx \|t_n\|` for a Gaussian v (:math:`E\|J_n v\|^2 = \|J_n\|_F^2`).
3. The reference's rounding: the tangent is carried through the same L operations, each
   adding a relative error of at most u: :math:`\sqrt{L}\,u\,\|u_n\|\,\|t_n\|` after the
   contraction with :math:`u_n` (done in float64).

Hence, per sample,

.. math:: |r_n - r^*_n| \le c\, u \,\big(\|g_n\| \|v\| + \sqrt{L}\,\|u_n\| \|t_n\|\big),

and, summed over samples,
:math:`\|r - r^*\| \le c\,u\,(\|G\|_F \|v\| + \sqrt{L}\,\|(\|u_n\|\|t_n\|)_n\|)`. The norms
:math:`\|g_n\|` come from the rows' squared norms (the diagonal of their Gram matrix, which a
Gram step forms anyway). Each bracketed term is a standard-deviation scale of a sum of
independent errors, so :data:`CONSTANT` c = 8 is a tail factor: by Hoeffding's inequality a
term exceeds c times its scale with probability at most :math:`2 e^{-c^2/2} < 3 \cdot 10^{-14}`
per sample, and N enters only through this union bound. On the models of the tests and the
tiny T5 / ViT / MLP (every route, float32 and float64) the measured :math:`|r_n - r^*_n|`
stays below 0.8 u times the bracket.

Detection: a row error :math:`\Delta_n` (P,) gives :math:`\Delta_n \cdot v \sim
\mathcal{N}(0, \|\Delta_n\|^2)`, so it is missed with probability at most
:math:`\sqrt{2/\pi}\, b_n / \|\Delta_n\|` for the bound :math:`b_n`; the bound is about
:math:`c\,u\,\sqrt{P}\,\|g_n\|`, so a relative error :math:`\epsilon` of a row is caught
unless :math:`\epsilon \lesssim c\,u\,\sqrt{P}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ngdref.checks import (
    check_finite,
    check_floating,
    check_int,
    check_ndim,
    check_real,
    namespace,
)

__all__ = [
    "CONSTANT",
    "Certificate",
    "RowsCertificateError",
    "certify_products",
    "product_bounds",
    "unit_roundoff",
]

#: c of the bound: see the module docstring
CONSTANT = 8.0


class RowsCertificateError(ValueError):
    """The per-sample rows disagree with an independent G v beyond the rounding bound.

    Attributes
    ----------
    error : float
        :math:`|r_n - r^*_n|` at the sample with the largest ratio to its bound.
    bound : float
        The bound at that sample.
    sample : int
        n, that sample.
    route : str
        How the reference G v was computed ("forward" or "double-backward").
    """

    def __init__(self, message: str, *, error: float, bound: float, sample: int,
                 route: str) -> None:
        super().__init__(message)
        self.error, self.bound, self.sample, self.route = error, bound, sample, route


@dataclass(frozen=True)
class Certificate:
    """A passed certificate: the worst sample's error and bound, and how it was computed.

    Attributes
    ----------
    error, bound : float
        :math:`|r_n - r^*_n|` and its bound at the sample n of the largest ratio.
    sample : int
        That n.
    route : str
        The reference's route ("forward" or "double-backward").
    unit_roundoff : float
        u of the bound.
    seconds : float
        Wall time of the certificate (0 where the caller did not time it).
    """

    error: float
    bound: float
    sample: int
    route: str
    unit_roundoff: float
    seconds: float = 0.0


def unit_roundoff(xp: Any, *dtypes: Any) -> float:
    """u = eps / 2 of the least precise of ``dtypes`` (real floating dtypes of ``xp``)."""
    if not dtypes:
        raise ValueError("unit_roundoff needs at least one dtype")
    return max(float(xp.finfo(dt).eps) for dt in dtypes) / 2


def product_bounds(
    row_sq_norms: Any,
    vector_norm: float,
    cotangent_norms: Any,
    tangent_norms: Any,
    *,
    unit_roundoff: float,
    depth: int,
    constant: float = CONSTANT,
) -> Any:
    r"""Per-sample rounding bounds of :math:`|r_n - r^*_n|` (module docstring).

    .. math:: b_n = c\,u\,\big(\|g_n\|\,\|v\| + \sqrt{L}\,\|u_n\|\,\|t_n\|\big)

    Parameters
    ----------
    row_sq_norms : array, shape (N,)
        :math:`\|g_n\|^2`, e.g. the diagonal of the rows' Gram matrix.
    vector_norm : float
        :math:`\|v\|`.
    cotangent_norms, tangent_norms : array, shape (N,)
        :math:`\|u_n\|` and :math:`\|t_n\| = \|J_n v\|`.
    unit_roundoff : float > 0
        u (:func:`unit_roundoff`).
    depth : int >= 1
        L, the operations of the forward pass (each rounds once).
    constant : float > 0
        c.

    Returns
    -------
    array, shape (N,), float64, in the namespace of the inputs.
    """
    xp = namespace(row_sq_norms=row_sq_norms, cotangent_norms=cotangent_norms,
                   tangent_norms=tangent_norms)
    n = row_sq_norms.shape[0] if row_sq_norms.ndim == 1 else -1
    for name, a in (("row_sq_norms", row_sq_norms), ("cotangent_norms", cotangent_norms),
                    ("tangent_norms", tangent_norms)):
        check_ndim(a, name, 1, "(N,)")
        check_floating(xp, a, name)
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} entries but row_sq_norms has {n}")
        check_finite(xp, a, name)
    check_real(vector_norm, "vector_norm")
    check_real(unit_roundoff, "unit_roundoff", positive=True)
    check_int(depth, "depth")
    check_real(constant, "constant", positive=True)
    f64 = xp.float64
    rows = xp.sqrt(xp.abs(xp.astype(row_sq_norms, f64)))
    reference = xp.astype(cotangent_norms, f64) * xp.astype(tangent_norms, f64)
    return (constant * unit_roundoff) * (rows * vector_norm + math.sqrt(depth) * reference)


def certify_products(
    products: Any,
    reference: Any,
    bounds: Any,
    *,
    route: str,
    unit_roundoff: float,
    first_sample: int = 0,
) -> Certificate:
    r"""Accept the rows' products :math:`r = G_{rows} v` if :math:`|r_n - r^*_n| \le b_n` for
    every n, else raise :class:`RowsCertificateError`.

    Parameters
    ----------
    products : array, shape (N,)
        r, from the rows under test.
    reference : array, shape (N,)
        r*, from the independent route.
    bounds : array, shape (N,)
        b (:func:`product_bounds`).
    route : str
        The reference's route, reported.
    unit_roundoff : float
        u of the bounds, reported.
    first_sample : int >= 0
        The batch index of entry 0 (a caller certifying a window of the batch), reported.

    Returns
    -------
    Certificate
        The worst sample's error and bound (``seconds`` 0).

    Raises
    ------
    RowsCertificateError
        Some :math:`|r_n - r^*_n| > b_n`, or r holds NaN or infinity where r* is finite.
    ngdref.NonFiniteError
        r* holds NaN or infinity (the model's forward pass, not the rows, is at fault).
    """
    xp = namespace(products=products, reference=reference, bounds=bounds)
    n = reference.shape[0] if reference.ndim == 1 else -1
    for name, a in (("products", products), ("reference", reference), ("bounds", bounds)):
        check_ndim(a, name, 1, "(N,)")
        check_floating(xp, a, name)
        if a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} entries but reference has {n}")
    check_int(first_sample, "first_sample", minimum=0)
    check_finite(xp, reference, "reference")
    check_finite(xp, bounds, "bounds")
    f64 = xp.float64
    errors = xp.abs(xp.astype(products, f64) - xp.astype(reference, f64))
    bounds = xp.astype(bounds, f64)
    inf = xp.full_like(errors, math.inf)
    errors = xp.where(xp.isfinite(errors), errors, inf)
    # the worst sample by error / bound; a zero bound (a zero row and cotangent) admits 0 only
    positive = bounds > 0
    ratios = xp.where(positive, errors / xp.where(positive, bounds, xp.ones_like(bounds)),
                      xp.where(errors > 0, inf, xp.zeros_like(errors)))
    i = int(xp.argmax(ratios))
    error, bound, worst = float(errors[i]), float(bounds[i]), i + first_sample
    if not float(ratios[i]) <= 1.0:
        bad = int(xp.sum(xp.astype(ratios > 1.0, xp.int64)))
        raise RowsCertificateError(
            f"per-sample rows failed their certificate: |(G_rows v)_n - (G v)_n| = "
            f"{error:.3e} at sample n = {worst} exceeds its rounding bound {bound:.3e} "
            f"({bad} of {n} samples beyond their bounds; G v by {route}, u = "
            f"{unit_roundoff:.2e}): these rows are not the per-sample gradients of this "
            "model and batch",
            error=error, bound=bound, sample=worst, route=route,
        )
    return Certificate(error, bound, worst, route, unit_roundoff)
