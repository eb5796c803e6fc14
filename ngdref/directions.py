r"""Every update of the conventions page (:ref:`conv-updates`) from one provider, loss and batch.

:func:`batch_quantities` gathers what the updates consume (per-sample
gradients G, logit gradients e, s, g) with one vector-Jacobian product;
:func:`directions` turns them into the updates.

The reduction convention (:ref:`conv-reduction`), stated once: a reduction factor R
(sum convention R = 1, mean R = 1/N, or any factor) scales every logit-level
quantity, e -> R e and H -> R H, hence G -> R G, g -> R g, s -> R^2 s and
F -> R F. The sampled gradients of SF are gradients of the reduced loss on
sampled labels, R times their sum-convention rows (as in the paper and the
authors' code), so that one damping number lambda damps EF, iEF and SF alike:

    iEF(lambda) = R   iEF_sum(lambda / R^2)
    EF(lambda)  = 1/R EF_sum(lambda / R^2)
    SF(lambda)  = 1/R SF_sum(lambda / R^2)

i.e. a damping lambda under a mean means lambda / R^2 in the sum convention for
all three. GN and NGD use F -> R F (the Fisher of the reduced loss), so
GN/NGD(lambda) = GN/NGD_sum(lambda / R).
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass
from typing import Any

import array_api_compat

from ngdref.checks import check_choice
from ngdref.losses import LogitLoss, reduction_factor
from ngdref.ngd import gn_update, ngd_update, ngd_update_cg
from ngdref.provider import JacobianProvider
from ngdref.quality import fisher_vp
from ngdref.updates import (
    check_damping_options,
    ef_update,
    gram_solver,
    ief_update,
    sf_update,
    sgd_update,
)

__all__ = [
    "METHODS",
    "BatchQuantities",
    "batch_quantities",
    "directions",
    "sampled_grads",
    "sampling_key",
]

METHODS = ("sgd", "ef", "ief", "sf", "gn", "ngd")
NGD_SOLVERS = ("woodbury", "cg")


@dataclass(frozen=True)
class BatchQuantities:
    """Per-batch inputs of the updates, in one reduction convention.

    Attributes
    ----------
    logits : array (N, C)
    logit_grads : array (N, C)
        R e_n.
    logit_grad_sq_norms : array (N,)
        ||R e_n||^2.
    per_sample_grads : array (N, P) or PerSampleRows
        R grad l_n (whatever the provider's ``vjp`` returns).
    grad : array (P,)
        R g.
    factor : float
        R.
    """

    logits: Any
    logit_grads: Any
    logit_grad_sq_norms: Any
    per_sample_grads: Any
    grad: Any
    factor: float


def batch_quantities(
    provider: JacobianProvider, loss: LogitLoss, targets: Any, *, reduction: str | float = "sum"
) -> BatchQuantities:
    """Logits, logit gradients, s, per-sample gradients and g of one batch.

    Parameters
    ----------
    provider : JacobianProvider
    loss : LogitLoss
    targets : array
    reduction : {"sum", "mean"} or float
        See :func:`ngdref.losses.reduction_factor`.
    """
    logits = provider.logits()
    factor = reduction_factor(reduction, logits.shape[0])
    e = factor * loss.grad(logits, targets)
    xp = array_api_compat.array_namespace(e)
    per_sample = provider.vjp(e)
    return BatchQuantities(
        logits=logits,
        logit_grads=e,
        logit_grad_sq_norms=xp.sum(e * e, axis=1),
        per_sample_grads=per_sample,
        grad=sgd_update(per_sample),
        factor=factor,
    )


def sampling_key(seed: int, step: int) -> int:
    """The int sampling key of step ``step`` of a run seeded with ``seed``.

    The first 8 bytes, little-endian, of blake2b("seed:step") (digest size 8): every step
    draws fresh labels, a run is reproducible from its seed, and a resumed run draws the same
    labels as an uninterrupted one. The torch optimisers and the optax transformations key
    SF's labels (and K-FAC's sampled labels) with it; see the conventions page,
    :ref:`conv-sampling-keys`.

    Parameters
    ----------
    seed : int
    step : int >= 0

    Returns
    -------
    int
        In [0, 2**64), a key for :meth:`ngdref.LogitLoss.sample`.
    """
    for value, name in ((seed, "seed"), (step, "step")):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    digest = hashlib.blake2b(f"{int(seed)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _check_key(key: Any) -> Any:
    """An int seed (any integer type, as an int) or an array of uniforms, else TypeError."""
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, bool) or not array_api_compat.is_array_api_obj(key):
        raise TypeError(
            f"key must be an int seed or an array of uniforms in [0, 1) (see LogitLoss.sample), "
            f"got {type(key).__name__} {key!r}"
        )
    return key


def sampled_grads(
    provider: JacobianProvider,
    loss: LogitLoss,
    targets: Any,
    key: Any,
    *,
    num_samples: int = 1,
    reduction: str | float = "sum",
) -> Any:
    r"""Gradients of -log p_n(yhat_nk) for yhat_nk drawn from the model, (N*K, P).

    Rows k*N .. (k+1)*N - 1 hold draw k; each row is the gradient of the
    reduced loss, R times the sum-convention row (see the module docstring).
    ``key`` is the sampling key, an int seed or an array of uniforms
    (:meth:`ngdref.losses.LogitLoss.sample`).
    Feed to :func:`ngdref.updates.sf_update` with the same ``num_samples``.
    """
    key = _check_key(key)
    logits = provider.logits()
    factor = reduction_factor(reduction, logits.shape[0])
    drawn = loss.sample(logits, key, num_samples=num_samples, targets=targets)
    xp = array_api_compat.array_namespace(logits)
    rows = [provider.vjp(factor * loss.grad(logits, drawn[k, ...])) for k in range(num_samples)]
    if num_samples == 1:
        return rows[0]
    if not all(array_api_compat.is_array_api_obj(r) for r in rows):
        raise TypeError(
            "num_samples > 1 needs the provider's vjp to return arrays (its rows are stacked); "
            "this provider returns PerSampleRows: draw one sample per call instead"
        )
    return xp.concat(rows, axis=0)


def directions(
    provider: JacobianProvider,
    loss: LogitLoss,
    targets: Any,
    *,
    damping: float,
    methods: tuple[str, ...] = METHODS,
    key: Any = None,
    num_samples: int = 1,
    reduction: str | float = "sum",
    damping_space: str = "sample",
    damping_mode: str = "absolute",
    dedup_threshold: float | None = None,
    dedup_rule: str = "all_pairs",
    dedup_zero_rows: str = "drop",
    ngd_solver: str = "woodbury",
    cg_tol: float | None = None,
    cg_maxiter: int | None = None,
) -> dict[str, Any]:
    """All requested updates of one batch, by name.

    Parameters
    ----------
    provider, loss, targets
        The model on the batch, its logit-level loss and the targets.
    damping : float >= 0
        lambda for every method (iEF in ``damping_space``, EF in either, they agree; SF, GN and
        NGD in parameter space, where it must be > 0 unless N*C >= P). Under a
        ``reduction`` with factor R one lambda damps EF, iEF and SF alike, as
        in the paper: see the module docstring.
    methods : tuple of str
        Any of "sgd", "ef", "ief", "sf", "gn", "ngd".
    key : int or array
        The sampling key of SF's labels (required for "sf"): an int seed or an array
        of uniforms in [0, 1); see :meth:`ngdref.losses.LogitLoss.sample`.
    num_samples : int
        K draws per sample for SF.
    reduction : {"sum", "mean"} or float
        Convention of the loss (default the paper's sum).
    damping_space
        For iEF (EF's two damping spaces agree); see :func:`ngdref.updates.ief_update`.
    damping_mode, dedup_threshold, dedup_rule, dedup_zero_rows
        For EF and iEF; see :func:`ngdref.updates.ief_update`. EF and iEF share
        one :class:`~ngdref.linalg.DampedGram` (one Gram matrix and filter).
    ngd_solver : {"woodbury", "cg"}
        "woodbury" forms the (N, C, P) Jacobian (small models); "cg" is
        matrix-free with Fisher-vector products.
    cg_tol, cg_maxiter
        For ``ngd_solver="cg"``; ``cg_tol`` defaults by dtype
        (:func:`ngdref.cg.default_cg_tol`: 1e-10 for float64, 3.5e-4 for float32).

    Returns
    -------
    dict
        method name -> update (P,) in the provider's namespace.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods!r}")
    check_choice(ngd_solver, "ngd_solver", NGD_SOLVERS)
    if "sf" in methods:
        if key is None:
            raise ValueError(
                "key is required for method 'sf' (an int seed or an array of uniforms)"
            )
        key = _check_key(key)  # before any pass over the model
    q = batch_quantities(provider, loss, targets, reduction=reduction)
    gram_options = {"damping": damping, "damping_mode": damping_mode}
    out: dict[str, Any] = {}
    if "sgd" in methods:
        out["sgd"] = q.grad
    if "ef" in methods or "ief" in methods:
        check_damping_options(damping_space, damping_mode)
        solver = gram_solver(q.per_sample_grads, dedup_threshold, dedup_rule, dedup_zero_rows)
    if "ef" in methods:
        out["ef"] = ef_update(solver, **gram_options)
    if "ief" in methods:
        out["ief"] = ief_update(
            solver, q.logit_grad_sq_norms, damping_space=damping_space, **gram_options
        )
    if "sf" in methods:
        rows = sampled_grads(
            provider, loss, targets, key, num_samples=num_samples, reduction=reduction
        )
        out["sf"] = sf_update(rows, q.grad, damping=damping, num_samples=num_samples)
    if "gn" in methods or ("ngd" in methods and ngd_solver == "woodbury"):
        jacobians = provider.jacobian()
    if "gn" in methods:
        out["gn"] = gn_update(q.factor**0.5 * jacobians, q.grad, damping=damping)
    if "ngd" in methods:
        if ngd_solver == "woodbury":
            factors = loss.hessian_sqrt(q.logits, targets)
            out["ngd"] = ngd_update(q.factor**0.5 * jacobians, factors, q.grad, damping=damping)
        else:
            fvp = fisher_vp(provider, loss, targets, reduction=reduction)
            out["ngd"] = ngd_update_cg(fvp, q.grad, damping=damping, tol=cg_tol, maxiter=cg_maxiter)
    return out
