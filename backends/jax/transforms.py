r"""The paper's exact optimisers as optax transformations: :func:`ief`, :func:`ef`, :func:`sf`.

Each returns an ``optax.GradientTransformationExtraArgs`` whose update is the whole step,
learning rate included (as ``optax.sgd``): ``optax.apply_updates(params, updates)`` performs

.. math:: \theta \leftarrow \theta - \eta_t\, d

=======  ================================================================  ==================
name     d                                                                 eta_t
=======  ================================================================  ==================
``ief``  G^T (G G^T + lambda I_N)^{-1} s   (Eq. 8)                          lr (constant)
``ef``   u / ||u||,  u = G^T (G G^T + lambda I_N)^{-1} 1   (Eq. 5)          lr (T - t) / T
``sf``   u / ||u||,  u = (F_SF + lambda I_P)^{-1} g   (Eq. 49)              lr (T - t) / T
=======  ================================================================  ==================

with the conventions of the torch optimisers ``backends.IEF``, ``EF``, ``SF``: the same
reduction and damping meaning, damping modes, duplicate filter (``dedup_threshold=0.99``,
``dedup_rule="all_pairs"`` by default), normalised linearly decaying steps for EF and SF and
the per-step sampling key (:mod:`backends.jax.steps`). The state counts the steps taken
(:class:`ExactState`), so t comes from it.

The batch comes in through ``update``'s extra arguments, in one of two ways:

* ``inputs=..., targets=...``: the model, ``apply_fn`` and ``loss`` given at construction, is
  differentiated per sample here (:mod:`backends.jax.kernels`), as the torch optimisers do
  with their model; required by ``sf`` (it draws labels from the model);
* ``per_sample_grads=...`` (a pytree like ``params`` whose leaves have a leading axis of N
  samples: row n is grad l_n in the **sum** convention, e.g. ``jax.vmap(jax.grad(l))``) and,
  for ``ief``, ``logit_grad_sq_norms=...`` s (N,); the reduction is applied here.

Everything P-sized runs on the device; the Gram solve and the logit-level loss math run on the
host in NumPy through ngdref (:mod:`backends.jax.host`), so a step works inside ``jax.jit``
and without ``jax_enable_x64`` (the N x N systems are float64 on the host). Under ``jax.jit`` an
error raised there (a singular system, a step past ``total_steps``, non-finite values) reaches
the caller as ``jax.errors.JaxRuntimeError`` ending with the original message; eagerly it is
raised as itself. Either way the parameters are not changed (the update is not returned).

Example (a jitted train step)::

    tx = backends.jax.ief(1.0, 1e-8, apply_fn=model.apply, loss=ngdref.SoftmaxCrossEntropy())
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, x, y):
        updates, state = tx.update(None, state, params, inputs=x, targets=y)
        return optax.apply_updates(params, updates), state
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import ngdref
from ngdref.checks import check_choice, check_int, check_real
from ngdref.linalg import DEDUP_RULES
from ngdref.updates import check_damping_options

from . import kernels
from .host import on_host
from .steps import StepSpec
from .trees import check_inputs, check_like, check_params, is_traced

__all__ = ["ExactState", "ef", "ief", "sf"]


class ExactState(NamedTuple):
    """The state of :func:`ief`, :func:`ef` and :func:`sf`: t, the steps taken (int32, ())."""

    count: jax.Array


# ---- construction ------------------------------------------------------------------------------
def _check_common(
    learning_rate: Any, damping: Any, reduction: Any, loss: Any, apply_fn: Any
) -> None:
    check_real(learning_rate, "learning_rate")
    check_real(damping, "damping")
    ngdref.reduction_factor(reduction, 1)  # raises on anything but "sum", "mean", R > 0
    if loss is not None and not isinstance(loss, ngdref.LogitLoss):
        raise TypeError(
            "loss must be an ngdref.LogitLoss (e.g. ngdref.SoftmaxCrossEntropy()), got "
            f"{type(loss).__name__}"
        )
    if apply_fn is not None and not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")


def _check_dedup(threshold: Any, rule: Any) -> None:
    """ngdref's own checks of the duplicate filter's options, run once at construction."""
    if threshold is None:
        check_choice(rule, "dedup_rule", DEDUP_RULES)
    else:
        ngdref.near_duplicate_mask(np.eye(1), threshold=threshold, rule=rule)


def _transformation(spec: StepSpec, apply_fn: kernels.ApplyFn | None) -> Any:
    def init(params: Any) -> ExactState:
        check_params(params)
        return ExactState(count=jnp.zeros([], jnp.int32))

    def update(
        updates: Any, state: ExactState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, ExactState]:
        if params is None:
            raise TypeError(f"{spec.method}: params is required (update(updates, state, params))")
        dtype = check_params(params)
        if updates is not None:
            check_like(updates, "updates", params, "params")
        if not is_traced(state.count):  # refuse a step past total_steps before any work
            spec.learning_rate_at(int(state.count))
        theta, unravel = ravel_pytree(params)
        result = jax.ShapeDtypeStruct(theta.shape, dtype)
        if extra_args.get("per_sample_grads") is not None:
            rows, sq_norms = _given_rows(spec, params, extra_args)
            step = on_host(spec.gram_step, result, state.count, rows, sq_norms)
        else:
            model = _Model(apply_fn, params, *_batch(spec, apply_fn, extra_args), dtype)
            if spec.method == "sf":
                step = _sf_step(spec, model, state.count, result)
            else:
                rows, sq_norms = model.rows(spec)
                step = on_host(spec.gram_step, result, state.count, rows, sq_norms)
        return unravel(step), ExactState(count=state.count + 1)

    return optax.GradientTransformationExtraArgs(init, update)


# ---- the batch ---------------------------------------------------------------------------------
def _given_rows(spec: StepSpec, params: Any, extra: dict[str, Any]) -> tuple[Any, Any]:
    """R G (N, P) and R^2 s (N,) (zeros for EF) from the given per-sample gradients."""
    if spec.method == "sf":
        raise TypeError(
            "sf draws its labels from the model at each step's sampling key: pass inputs= and "
            "targets= (with apply_fn and loss at construction), not per_sample_grads"
        )
    if extra.get("inputs") is not None:
        raise TypeError("pass either per_sample_grads or inputs and targets, not both")
    grads = extra["per_sample_grads"]
    leaves = jax.tree.leaves(grads)
    n = int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) > 0 else 0
    check_like(grads, "per_sample_grads", params, "params", leading=(n,))
    if n == 0:
        raise ValueError("per_sample_grads is an empty batch (N = 0)")
    rows = jax.vmap(lambda tree: ravel_pytree(tree)[0])(grads)
    factor = spec.factor(n)
    sq_norms = extra.get("logit_grad_sq_norms")
    if spec.method == "ief":
        if sq_norms is None:
            raise TypeError("ief needs logit_grad_sq_norms= (s_n = ||dl_n/dz_n||^2, (N,)) "
                            "with per_sample_grads")
        if tuple(getattr(sq_norms, "shape", ())) != (n,) or sq_norms.dtype != rows.dtype:
            raise ValueError(
                f"logit_grad_sq_norms must be an array of shape ({n},) and dtype {rows.dtype}, "
                f"got {getattr(sq_norms, 'shape', type(sq_norms).__name__)}"
            )
    else:
        sq_norms = jnp.zeros((n,), rows.dtype)  # EF does not use s
    return factor * rows, (factor * factor) * sq_norms


def _batch(spec: StepSpec, apply_fn: Any, extra: dict[str, Any]) -> tuple[Any, Any]:
    inputs, targets = extra.get("inputs"), extra.get("targets")
    if inputs is None or targets is None:
        given = "per_sample_grads= (and logit_grad_sq_norms= for ief) or " if (
            spec.method != "sf") else ""
        raise TypeError(f"{spec.method}: pass {given}inputs= and targets= to update")
    if apply_fn is None or spec.loss is None:
        raise TypeError(
            f"{spec.method}: update(inputs=, targets=) differentiates the model: build the "
            "transformation with apply_fn= and loss="
        )
    return inputs, targets


class _Model:
    """The model on one batch, traced or eager: logits, R e and the per-sample rows."""

    def __init__(
        self, apply_fn: Callable, params: Any, inputs: Any, targets: Any, dtype: np.dtype
    ) -> None:
        n = check_inputs(inputs, dtype)
        self.apply_fn, self.params, self.inputs, self.targets = apply_fn, params, inputs, targets
        z = kernels.batch_logits(apply_fn, params, inputs)
        if z.ndim not in (2, 3) or z.shape[0] != n or z.dtype != dtype:
            raise ValueError(
                f"apply_fn returned {z.dtype} logits of shape {tuple(z.shape)} for {n} samples; "
                f"expected (N, C) or (N, T, V) in the parameters' dtype {dtype}"
            )
        self.logits = jnp.reshape(z, (z.shape[0], -1))

    def vjp(self, cotangents: Any) -> Any:
        return kernels.per_sample_vjp(self.apply_fn, self.params, self.inputs, cotangents)

    def rows(self, spec: StepSpec) -> tuple[Any, Any]:
        """R G (N, P) and R^2 s (N,) of the true labels."""
        z = self.logits
        e = on_host(spec.logit_grads, jax.ShapeDtypeStruct(z.shape, z.dtype), z, self.targets)
        return self.vjp(e), jnp.sum(e * e, axis=1)


def _sf_step(spec: StepSpec, model: _Model, count: Any, result: Any) -> Any:
    z = model.logits
    k = spec.num_samples
    shapes = (jax.ShapeDtypeStruct(z.shape, z.dtype), jax.ShapeDtypeStruct((k, *z.shape), z.dtype))
    e, sampled_e = on_host(spec.sampled_logit_grads, shapes, z, model.targets, count)
    grad = kernels.summed_vjp(model.apply_fn, model.params, model.inputs, e)
    # rows k N .. (k + 1) N - 1 hold draw k (the layout of ngdref.sampled_grads)
    sampled = jnp.concatenate([model.vjp(sampled_e[i]) for i in range(k)], axis=0)
    return on_host(spec.sf_step, result, count, sampled, grad)


# ---- the factories -----------------------------------------------------------------------------
def ief(
    learning_rate: float,
    damping: float,
    *,
    apply_fn: kernels.ApplyFn | None = None,
    loss: ngdref.LogitLoss | None = None,
    reduction: str | float = "sum",
    damping_space: str = "sample",
    damping_mode: str = "absolute",
    dedup_threshold: float | None = 0.99,
    dedup_rule: str = "all_pairs",
) -> optax.GradientTransformationExtraArgs:
    r"""Improved empirical Fisher descent (Algorithm 1 of Wu et al. 2024), constant step.

    .. math:: \theta \leftarrow \theta - \eta\, G^\top (G G^\top + \lambda I_N)^{-1} s

    G (N, P) the per-sample gradients and s (N,) the squared norms of the logit gradients, both
    in the ``reduction`` convention (R G and R^2 s); with ``damping_space="parameter"`` the
    update is (F_iEF + lambda I_P)^{-1} g = G^T (G G^T + lambda diag(s))^{-1} s
    (:func:`ngdref.ief_update`).

    Parameters
    ----------
    learning_rate : float >= 0
        eta (torch's ``lr``).
    damping : float >= 0
        lambda.
    apply_fn : callable, optional
        ``apply_fn(params, inputs) -> logits`` (N, C) or (N, T, V); needed for
        ``update(..., inputs=, targets=)``.
    loss : ngdref.LogitLoss, optional
        The per-sample logit-level loss; needed with ``apply_fn``.
    reduction : {"sum", "mean"} or float
        R; under a mean (R = 1/N) the same steps as the sum convention take lr' = N lr and
        lambda' = lambda / N^2 (``damping_space="sample"``) or lambda' = lambda ("parameter").
    damping_space : {"sample", "parameter"}
    damping_mode : {"absolute", "relative", "diagonal_only", "levenberg_marquardt"}
        See :meth:`ngdref.linalg.DampedGram.solve`.
    dedup_threshold : float in (0, 1] or None
        Drop near-duplicate per-sample gradients (|cos| above it) before the solve; None keeps
        all.
    dedup_rule : {"all_pairs", "greedy"}

    Returns
    -------
    optax.GradientTransformationExtraArgs
        ``update(updates, state, params, *, inputs=, targets=)`` or ``update(updates, state,
        params, *, per_sample_grads=, logit_grad_sq_norms=)``; the values of ``updates`` are not
        used (its tree must be that of ``params``, or pass None).
    """
    _check_common(learning_rate, damping, reduction, loss, apply_fn)
    check_damping_options(damping_space, damping_mode)
    _check_dedup(dedup_threshold, dedup_rule)
    gram = {"damping_space": damping_space, "damping_mode": damping_mode,
            "dedup_threshold": dedup_threshold, "dedup_rule": dedup_rule}
    spec = StepSpec("ief", float(learning_rate), float(damping), reduction, None, gram, loss=loss)
    return _transformation(spec, apply_fn)


def ef(
    learning_rate: float,
    damping: float,
    *,
    total_steps: int,
    apply_fn: kernels.ApplyFn | None = None,
    loss: ngdref.LogitLoss | None = None,
    reduction: str | float = "sum",
    damping_mode: str = "absolute",
    dedup_threshold: float | None = 0.99,
    dedup_rule: str = "all_pairs",
) -> optax.GradientTransformationExtraArgs:
    r"""Empirical Fisher descent (Algorithm 2), normalised with a linearly decaying step.

    .. math::
        u = G^\top (G G^\top + \lambda I_N)^{-1} 1, \qquad
        \theta \leftarrow \theta - \eta \frac{T - t}{T} \frac{u}{\|u\|}

    Sample- and parameter-space damping coincide for EF. Under a mean reduction the same steps
    take lambda' = lambda / N^2 (lr unchanged: the step is normalised).

    Parameters
    ----------
    learning_rate : float >= 0
        eta, the length of the first step.
    damping : float >= 0
    total_steps : int >= 1
        T; the step t = T raises ``ValueError``.
    apply_fn, loss, reduction, damping_mode, dedup_threshold, dedup_rule
        As for :func:`ief`.

    Returns
    -------
    optax.GradientTransformationExtraArgs
        As for :func:`ief`; with ``per_sample_grads`` no ``logit_grad_sq_norms`` is needed.
    """
    _check_common(learning_rate, damping, reduction, loss, apply_fn)
    check_damping_options("sample", damping_mode)
    _check_dedup(dedup_threshold, dedup_rule)
    check_int(total_steps, "total_steps")
    gram = {"damping_mode": damping_mode, "dedup_threshold": dedup_threshold,
            "dedup_rule": dedup_rule}
    spec = StepSpec(
        "ef", float(learning_rate), float(damping), reduction, total_steps, gram, loss=loss
    )
    return _transformation(spec, apply_fn)


def sf(
    learning_rate: float,
    damping: float,
    *,
    total_steps: int,
    apply_fn: kernels.ApplyFn,
    loss: ngdref.LogitLoss,
    reduction: str | float = "sum",
    num_samples: int = 1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Sampled Fisher descent (Algorithm 3), normalised with a linearly decaying step.

    .. math::
        u = (F_{SF} + \lambda I_P)^{-1} g, \qquad
        \theta \leftarrow \theta - \eta \frac{T - t}{T} \frac{u}{\|u\|}

    F_SF = (1/K) sum_n sum_k grad(-log p_n(yhat_nk)) grad(...)^T with K labels per sample
    drawn from the model at step t with the key ``sampling_key(seed, t)``
    (:func:`backends.jax.steps.sampling_key`, the torch optimiser's key), then
    :func:`ngdref.sf_update`. The sampled rows are R times the sum-convention rows, so lambda
    means what it means for EF and iEF. Damping is in parameter space and must be > 0 unless
    N K >= P.

    Parameters
    ----------
    learning_rate : float >= 0
        eta, the length of the first step.
    damping : float >= 0
    total_steps : int >= 1
        T.
    apply_fn, loss
        The model and its loss (required: the labels are drawn from the model).
    reduction : {"sum", "mean"} or float
    num_samples : int >= 1
        K (the paper: 1).
    seed : int

    Returns
    -------
    optax.GradientTransformationExtraArgs
        ``update(updates, state, params, *, inputs=, targets=)``.
    """
    _check_common(learning_rate, damping, reduction, loss, apply_fn)
    if loss is None or apply_fn is None:
        raise TypeError("sf needs apply_fn= and loss=: it draws labels from the model")
    check_int(total_steps, "total_steps")
    check_int(num_samples, "num_samples")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    spec = StepSpec(
        "sf", float(learning_rate), float(damping), reduction, total_steps, {},
        num_samples=num_samples, seed=seed, loss=loss,
    )
    return _transformation(spec, apply_fn)
