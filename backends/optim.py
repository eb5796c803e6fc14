r"""The paper's optimisers as ``torch.optim.Optimizer`` subclasses: :class:`IEF`, :class:`EF`,
:class:`SF` (Algorithms 1-3 of Wu et al. 2024, exact) and exact :class:`NGD` (CG on the Fisher).

Every step takes one batch, builds a :class:`backends.TorchProvider` for the model's trainable
parameters theta (P,) (``requires_grad=True``: LoRA or prompt-tuning adapters), computes the
update with the :mod:`ngdref` math and writes

.. math:: \theta \leftarrow \theta - \eta_t\, d

back into the parameters in place. The update d and the step size eta_t are

=========  ==============================================================  =======================
class      d                                                               eta_t
=========  ==============================================================  =======================
``IEF``    G^T (G G^T + lambda I_N)^{-1} s   (Eq. 8)                        lr (constant)
``EF``     u / ||u||,  u = G^T (G G^T + lambda I_N)^{-1} 1   (Eq. 5)        lr (T - t) / T
``SF``     u / ||u||,  u = (F_SF + lambda I_P)^{-1} g   (Eq. 49)            lr (T - t) / T
``NGD``    (F + lambda I_P)^{-1} g by conjugate gradient on F v             lr (constant)
=========  ==============================================================  =======================

with G (N, P) the per-sample gradients, s_n = ||dl_n/dz_n||^2, g = G^T 1, t = 0, 1, ... the step
index and T = ``total_steps`` (EF and SF decay linearly to 0 and need the normalisation to
converge at all, as in the authors' code, SPEC §3). No momentum, no weight decay (the paper's
settings). As in the paper, the model runs in eval mode (dropout off) during the step.

Reduction and damping convention
--------------------------------
``reduction="sum"`` (default) is the paper's L = sum_n l_n. ``"mean"`` (torch and Hugging Face)
or a float R builds every quantity from the gradients of the R-scaled loss, as the authors'
code does (SPEC section 9): G -> R G, s -> R^2 s, g -> R g, SF's sampled rows G_hat -> R G_hat
(R, not sqrt(R)), F -> R F. So one damping number lambda damps EF, iEF and SF alike, and
means lambda / R^2 in the sum convention:

    iEF(lambda) = R iEF_sum(lambda / R^2),  EF(lambda) = EF_sum(lambda / R^2) / R,
    SF(lambda) = SF_sum(lambda / R^2) / R,  SF_sum(mu) = (G_hat^T G_hat + mu I_P)^{-1} g.

A mean-convention run with (lr', lambda') therefore takes the same steps as a sum-convention
run with (lr, lambda) when, with R = 1/N,

* IEF, ``damping_space="sample"``: lr' = N lr, lambda' = lambda / N^2 (the paper's settings are
  mean-convention numbers: its lr is N times, its damping N^2 times smaller than the sum ones);
* IEF, ``damping_space="parameter"``: lr' = N lr, lambda' = lambda;
* EF and SF (normalised): lr' = lr, lambda' = lambda / N^2;
* NGD: lr' = lr, lambda' = lambda / N (the same update: (F/N + lambda/N)^{-1} g/N).

Per-sample gradients
--------------------
``per_sample`` chooses how G (N, P) is obtained; every choice gives the same step (to rounding):

* ``"auto"`` (default): one forward and one backward pass with module hooks; per weight the
  ghost factors or the materialised per-layer rows, whichever :func:`backends.ghost.
  ghost_is_cheaper` says costs less (:mod:`backends.ghost_hooks`); G is never formed, the
  update is G^T c from the stored layer quantities;
* ``"ghost"``: the same with factors for every weight that allows them;
* ``"hooks"``: the same with materialised per-layer rows everywhere;
* ``"vmap"``: ``torch.func.vmap`` over samples, a dense (N, P) G.

Parameters no hook can account for fall back to ``vmap`` for those parameters alone, listed
in ``diagnostics["fallbacks"]`` (and warned about once).

Data parallel
-------------
Under ``torch.distributed`` (torchrun) each rank's closure returns its own shard and every
rank takes the step of the concatenated batch ("mean" divides by the global N); what is sent
is documented in :mod:`backends.distributed` and counted in ``diagnostics["bytes_sent"]``.

For a sequence loss (:class:`ngdref.SequenceSoftmaxCrossEntropy`) "mean" divides by the number
of sequences N, not of label tokens; a float R = 1/number-of-label-tokens reproduces Hugging
Face's token-mean loss for batches with that token count.

Usage
-----
The closure takes no argument and returns this step's batch, ``(inputs, targets)`` or, for
Hugging Face dict inputs, the dict with its ``"labels"``::

    opt = IEF(model, ngdref.SoftmaxCrossEntropy(), lr=1.0, damping=1e-8)
    for x, y in loader:
        loss = opt.step(lambda: (x, y))     # the batch loss before the update
        print(loss, opt.diagnostics)

    opt = EF(peft_t5, ngdref.SequenceSoftmaxCrossEntropy(32128), lr=0.01, damping=1e-7,
             reduction="mean", total_steps=len(loader) * epochs, dedup_threshold=0.99)
    for batch in loader:                    # input_ids, attention_mask, labels (-100 padded)
        opt.step(lambda: batch)
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ngdref
from ngdref.checks import check_choice, check_int, check_real
from ngdref.linalg import DAMPING_MODES, DEDUP_RULES
from ngdref.updates import DAMPING_SPACES, check_damping_options, ief_damping_weights

from .distributed import IgnoredShardLoss, communicator
from .ghost import stack_rows
from .torch_provider import TorchProvider

#: ``per_sample`` -> (TorchProvider's per_sample_method, layer_route)
PER_SAMPLE = {
    "auto": ("ghost", "auto"),
    "ghost": ("ghost", "ghost"),
    "hooks": ("ghost", "materialise"),
    "vmap": ("vmap", "auto"),
}

__all__ = ["EF", "IEF", "NGD", "SF"]

Batch = Any  # (inputs, targets), or a mapping of Hugging Face inputs holding "labels"


# ---- hyperparameter checks (shared by __init__ and load_state_dict) --------------------------
def _check_dedup(value: Any) -> None:
    if value is not None:
        check_real(value, "dedup_threshold", positive=True)
        if value > 1:
            raise ValueError(f"dedup_threshold must be None or in (0, 1], got {value}")


def _check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {type(value).__name__}")


#: hyperparameter -> its check; each optimiser keeps a subset in its (single) parameter group
_CHECKS: dict[str, Callable[[Any], None]] = {
    "lr": lambda v: check_real(v, "lr"),
    "damping": lambda v: check_real(v, "damping"),
    "reduction": lambda v: ngdref.reduction_factor(v, 1),
    "damping_mode": lambda v: check_choice(v, "damping_mode", DAMPING_MODES),
    "damping_space": lambda v: check_choice(v, "damping_space", DAMPING_SPACES),
    "dedup_threshold": _check_dedup,
    "dedup_rule": lambda v: check_choice(v, "dedup_rule", DEDUP_RULES),
    "total_steps": lambda v: check_int(v, "total_steps"),
    "num_samples": lambda v: check_int(v, "num_samples"),
    "seed": _check_seed,
    "cg_tol": lambda v: check_real(v, "cg_tol", positive=True),
    "cg_maxiter": lambda v: check_int(v, "cg_maxiter", optional=True),
}


def _split_batch(batch: Batch) -> tuple[Any, torch.Tensor | None]:
    """(inputs, targets) from what the closure returned; targets None: the provider's labels."""
    if isinstance(batch, Mapping):
        if "labels" not in batch:
            raise TypeError(
                "closure returned a mapping without 'labels': return (inputs, targets), or "
                "Hugging Face inputs holding their 'labels'"
            )
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        if not isinstance(targets, torch.Tensor):
            raise TypeError(
                f"closure returned targets of type {type(targets).__name__}; expected a "
                "torch.Tensor as the second entry of (inputs, targets)"
            )
        if isinstance(inputs, Mapping) and "labels" in inputs:
            raise ValueError(
                "closure returned both inputs['labels'] and targets: return one of them"
            )
        return inputs, targets
    raise TypeError(
        "closure must return (inputs, targets) or a mapping of Hugging Face inputs with "
        f"'labels', got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def _check_targets(
    loss: ngdref.LogitLoss, targets: Any, num_samples: int, *, sharded: bool = False
) -> bool:
    """Targets with one entry per sample; whether one label is not ignored (else an error
    unless ``sharded``: a distributed shard may be all ignored, the global batch may not)."""
    if not isinstance(targets, torch.Tensor) or targets.ndim == 0:
        raise TypeError(
            "targets must be a torch.Tensor with the samples on its first axis, got "
            f"{type(targets).__name__ if not isinstance(targets, torch.Tensor) else '0-d'}"
        )
    if targets.shape[0] != num_samples:
        raise ValueError(
            f"targets (the closure's labels) have {targets.shape[0]} samples but the inputs "
            f"have {num_samples}: the closure must return one label (row) per input sample"
        )
    ignore = getattr(loss, "ignore_index", None)
    labelled = ignore is None or not bool(torch.all(targets == ignore))
    if not labelled and not sharded:
        raise ValueError(
            f"targets: every label equals ignore_index={ignore}, so the batch has no loss and "
            "no gradient; the parameters were not changed"
        )
    return labelled


@dataclass(frozen=True)
class _Batch:
    """One batch in the reduction convention: R e_n (N, C), s (N,), rows R G, g = R G^T 1."""

    logits: torch.Tensor
    factor: float
    logit_grads: torch.Tensor
    logit_grad_sq_norms: torch.Tensor
    rows: Any  # ngdref.PerSampleRows
    loss: float

    @functools.cached_property
    def grad(self) -> torch.Tensor:
        """g = G^T 1 (P,), formed only by the methods that need it (SF, NGD)."""
        return ngdref.sgd_update(self.rows)


class _LogitLossOptimizer(torch.optim.Optimizer):
    """Shared machinery: one joint update of all trainable parameters per step.

    Subclasses set :attr:`_hyperparameters` and implement :meth:`_update`.
    """

    #: names of the hyperparameters kept in the parameter group (and in the state_dict)
    _hyperparameters: tuple[str, ...] = ("lr", "damping", "reduction")
    #: EF and SF: d = u / ||u|| and lr decaying linearly to 0 over total_steps
    _normalised: bool = False

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        output_fn: Callable[[Any], torch.Tensor] | None,
        per_sample: str,
        per_sample_method: str | None,
        chunk_size: int | None,
        distributed: bool | None = None,
        process_group: Any = None,
        **hyperparameters: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(loss, ngdref.LogitLoss):
            raise TypeError(
                f"loss must be an ngdref.LogitLoss (e.g. ngdref.SoftmaxCrossEntropy()), "
                f"got {type(loss).__name__}"
            )
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(
                "model has no trainable parameters (none with requires_grad=True): "
                "there is nothing to optimise"
            )
        self._check_hyperparameters(hyperparameters)
        self._model = model
        self._loss = loss
        self._shard_loss: Any = loss  # this step's: IgnoredShardLoss for an all-ignored shard
        if per_sample_method is not None:  # the earlier name of per_sample
            per_sample = per_sample_method
        check_choice(per_sample, "per_sample", tuple(PER_SAMPLE))
        method, route = PER_SAMPLE[per_sample]
        if chunk_size is not None:  # only the vmap route processes the batch in chunks
            if per_sample in ("ghost", "hooks"):
                raise ValueError(
                    f"chunk_size must be None for per_sample={per_sample!r} (one forward and "
                    "one backward pass over the whole batch); use per_sample='vmap'"
                )
            method = "vmap"
        self.per_sample = per_sample
        self._provider_options = {
            "output_fn": output_fn,
            "per_sample_method": method,
            "layer_route": route,
            "chunk_size": chunk_size,
        }
        self._warned: set[str] = set()
        # torch.distributed: the batch is the union of the ranks' shards (backends.distributed)
        self._comm = communicator(distributed, process_group)
        self._names = tuple(name for name, _ in named)
        self._step = 0
        #: diagnostics of the last successful step (empty before the first), see :meth:`step`
        self.diagnostics: dict[str, Any] = {}
        super().__init__(named, hyperparameters)

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        given = set(group) - {"params", "param_names"}
        if given != set(self._hyperparameters):
            raise ValueError(
                f"{type(self).__name__} takes the hyperparameters {sorted(self._hyperparameters)},"
                f" got {sorted(given)}"
            )
        for name in self._hyperparameters:
            _CHECKS[name](group[name])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the update couples all trainable parameters."""
        if self.param_groups:
            raise ValueError(
                f"{type(self).__name__} updates all trainable parameters of its model jointly; "
                "add_param_group is not supported (set requires_grad before constructing it)"
            )
        super().add_param_group(param_group)

    # ---- the step ---------------------------------------------------------------------------
    def _learning_rate(self, group: Mapping[str, Any]) -> float:
        """eta_t: lr, or lr (T - t) / T for the normalised optimisers."""
        if not self._normalised:
            return group["lr"]
        total = group["total_steps"]
        if self._step >= total:
            raise ValueError(
                f"all total_steps={total} steps have been taken; the learning rate has decayed "
                "to 0 (construct the optimiser with a larger total_steps)"
            )
        return group["lr"] * ((total - self._step) / total)

    def step(self, closure: Callable[[], Batch]) -> float:  # type: ignore[override]
        r"""Take one step on the batch returned by ``closure()``.

        .. math:: \theta \leftarrow \theta - \eta_t\, d

        Parameters
        ----------
        closure : callable, () -> batch
            Returns ``(inputs, targets)`` (inputs as for :class:`backends.TorchProvider`: a
            tensor, or a mapping of keyword tensors; targets as the loss expects, e.g. (N,)
            class labels) or a mapping of Hugging Face inputs holding ``"labels"``.

        Returns
        -------
        float
            The batch loss R * sum_n l_n at the parameters before the update.

        Raises
        ------
        ValueError
            Past ``total_steps`` (EF, SF); non-finite logits, loss, gradients or update.
        ngdref.SingularMatrixError
            An undamped Gram (or P x P) system that is singular.
        ngdref.NotConvergedError
            NGD's conjugate gradient reached ``cg_maxiter`` first.

        The hyperparameters are read from ``param_groups[0]`` (and checked) at every step, so
        they may be changed between steps like any torch optimiser's, e.g. ``lr`` by a
        scheduler or ``reduction`` to 1 / (label tokens of the batch) for Hugging Face's
        token-mean convention.

        On any error the parameters, the step counter and :attr:`diagnostics` are unchanged.
        After a step :attr:`diagnostics` holds ``step`` (t), ``loss``, ``lr`` (eta_t),
        ``damping`` (the absolute lambda used), ``update_norm`` (||u||, before EF's and SF's
        normalisation; a zero u has no direction and leaves the parameters as they are),
        ``grad_norm_imbalance`` (max_n ||grad l_n|| / min_n ||grad l_n||), ``per_sample``
        (the route) and ``fallbacks`` (parameters whose per-sample gradients came from
        ``torch.func.vmap``, and why); IEF and EF add ``residual`` (||G u - b|| / mean(b) on
        the kept rows), ``kept``, ``solve_residual`` and ``condition`` (of the damped Gram
        solve, :class:`ngdref.linalg.GramSolve`), NGD ``cg_iterations``.
        """
        if not callable(closure):
            raise TypeError(
                "closure is required: a callable with no arguments returning the batch, "
                "(inputs, targets) or Hugging Face inputs with 'labels'"
            )
        group = self.param_groups[0]
        self._check_hyperparameters(group)  # a scheduler or the user may have changed them
        lr = self._learning_rate(group)
        comm = self._comm  # distributed: every rank raises if one does (comm.agree)
        with comm.agree(self._step):
            inputs, targets = _split_batch(closure())
            provider = TorchProvider(self._model, inputs, **self._provider_options)
            if provider.param_names != self._names:
                raise ValueError(
                    "model: its trainable parameters changed since the optimiser was "
                    "constructed (requires_grad was toggled); construct a new optimiser"
                )
            if targets is None:
                targets = provider.targets
            labelled = _check_targets(
                self._loss, targets, provider.num_samples, sharded=comm.sharded
            )
            comm.declare(provider.num_samples, labelled, group["params"], self._names)
        # a shard whose every label is ignored contributes zeros (the loss refuses such targets)
        self._shard_loss = self._loss if labelled else IgnoredShardLoss(self._loss)
        with comm.agree(self._step):
            batch = self._batch(provider, targets, group)
        batch = comm.share(batch)  # the global rows, s and loss
        update, diagnostics = self._update(provider, targets, batch, group)
        norm = float(torch.linalg.vector_norm(update))
        comm.check_update(norm, lr)
        if not math.isfinite(norm):
            raise ngdref.NonFiniteError(
                f"update contains NaN or infinite values at step {self._step} (increase damping);"
                " the parameters were not changed"
            )
        if self._normalised and norm > 0:
            update = update / norm
        fallbacks = list(getattr(batch.rows, "fallbacks", ()))
        diagnostics = {
            "step": self._step,
            "loss": batch.loss,
            "lr": lr,
            "update_norm": norm,
            "grad_norm_imbalance": ngdref.grad_norm_imbalance(batch.rows),
            "per_sample": self.per_sample,
            "fallbacks": fallbacks,
            **diagnostics,
            **comm.diagnostics(),
        }
        with torch.no_grad():
            for param, piece in zip(
                group["params"], provider.unflatten(update).values(), strict=True
            ):
                param.add_(piece, alpha=-lr)
        self.diagnostics = diagnostics
        self._step += 1
        self._warn(fallbacks)
        return batch.loss

    def _warn(self, fallbacks: list[str]) -> None:
        """Say once per optimiser which parameters took a vmap fallback."""
        new = [f for f in fallbacks if f not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"{type(self).__name__}(per_sample={self.per_sample!r}): per-sample gradients "
                "by torch.func.vmap for: " + "; ".join(new),
                stacklevel=3,
            )

    def _batch(
        self, provider: TorchProvider, targets: torch.Tensor, group: Mapping[str, Any]
    ) -> _Batch:
        """Logits, R e_n, s, the per-sample rows, g and the loss of one batch (checked)."""
        logits = provider.logits()
        factor = ngdref.reduction_factor(group["reduction"], self._comm.num_samples)
        loss = factor * float(torch.sum(self._shard_loss.value(logits, targets)))
        if not math.isfinite(loss):
            raise ngdref.NonFiniteError(
                f"loss is {loss} at step {self._step}; the parameters were not changed"
            )
        e = factor * self._shard_loss.grad(logits, targets)
        rows = provider.per_sample_rows(e, keep_graph=self._reuses_forward)
        return _Batch(logits, factor, e, torch.sum(e * e, dim=1), rows, loss)

    #: SF: the sampled labels' backward pass reuses the forward of the true labels
    _reuses_forward = False

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        batch: _Batch,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The update (P,) before normalisation, and the method's diagnostics."""
        raise NotImplementedError

    # ---- checkpoints ------------------------------------------------------------------------
    @property
    def steps_taken(self) -> int:
        """The number of successful steps, t of the next step."""
        return self._step

    def state_dict(self) -> dict[str, Any]:
        """torch's optimiser state (hyperparameters in ``param_groups``) plus ``"step"``."""
        state = super().state_dict()
        state["step"] = self._step
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the step counter and hyperparameters (all checked before anything changes)."""
        step = state_dict.get("step") if isinstance(state_dict, Mapping) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(
                f"state_dict must come from {type(self).__name__}.state_dict(): "
                f"its 'step' is {step!r}, expected an int >= 0"
            )
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1:
            raise ValueError("state_dict must hold exactly one parameter group in 'param_groups'")
        self._check_hyperparameters(groups[0])
        super().load_state_dict(dict(state_dict))
        self._step = step


class _GramOptimizer(_LogitLossOptimizer):
    r"""Sample-space (Gram) updates :math:`u = G^\top (G G^\top + \lambda W)^{-1} b`.

    Subclasses choose b and W in :meth:`_system`; the solve is :func:`ngdref.gram_update`.
    """

    _hyperparameters = (
        *_LogitLossOptimizer._hyperparameters,
        "damping_mode",
        "dedup_threshold",
        "dedup_rule",
    )

    def _system(
        self, batch: _Batch, group: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The right-hand side b (N,) and sample weights W (N,) (None: the identity)."""
        raise NotImplementedError

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        batch: _Batch,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        rhs, weights = self._system(batch, group)
        update, solve = ngdref.gram_update(
            batch.rows,
            rhs,
            damping=group["damping"],
            damping_mode=group["damping_mode"],
            sample_weights=weights,
            dedup_threshold=group["dedup_threshold"],
            dedup_rule=group["dedup_rule"],
        )
        kept = solve.kept
        # the interpolation condition G u = b of the undamped limit (Eq. 6-7) on the kept rows,
        # with G u = G G^T c = K c from the Gram matrix (no pass over G)
        b = rhs.to(torch.float64)
        misfit = (solve.gram @ solve.coefficients - b)[kept]
        residual = float(torch.linalg.vector_norm(misfit) / torch.mean(b[kept]))
        return update, {
            "damping": solve.damping,
            "residual": residual,
            "kept": int(kept.sum()),
            "solve_residual": solve.residual,
            "condition": solve.condition,
        }


class IEF(_GramOptimizer):
    r"""Improved empirical Fisher descent (Algorithm 1 of Wu et al. 2024), constant step.

    .. math::
        \theta \leftarrow \theta - \eta\, G^\top (G G^\top + \lambda I_N)^{-1} s

    with G (N, P) the per-sample gradients and s (N,) the squared norms of the logit-level
    gradients, both in the ``reduction`` convention (R G and R^2 s). With
    ``damping_space="parameter"`` the update is (F_iEF + lambda I_P)^{-1} g
    = G^T (G G^T + lambda diag(s))^{-1} s instead (:func:`ngdref.ief_update`).

    Parameters
    ----------
    model : torch.nn.Module
        Its parameters with ``requires_grad=True`` are optimised (jointly, one group).
    loss : ngdref.LogitLoss
        The per-sample logit-level loss, e.g. ``ngdref.SoftmaxCrossEntropy()`` or
        ``ngdref.SequenceSoftmaxCrossEntropy(vocab_size)`` for a seq2seq model.
    lr : float >= 0
        eta, constant (the paper: 50 or 100 under the mean convention).
    damping : float >= 0
        lambda (the paper: 1e-7 or 1e-12 under the mean convention).
    damping_mode : {"absolute", "relative", "diagonal_only", "levenberg_marquardt"}
        See :meth:`ngdref.linalg.DampedGram.solve`.
    damping_space : {"sample", "parameter"}
        "sample" is the paper's lambda I_N.
    dedup_threshold : float in (0, 1] or None
        Drop near-duplicate per-sample gradients (|cos| above it) before the solve; 0.99 as
        in the authors' training code; None keeps all.
    dedup_rule : {"all_pairs", "greedy"}
        "all_pairs" (the authors'): every close pair drops its smaller-norm row.
    reduction : {"sum", "mean"} or float
        R; see the module docstring for how lr and damping scale with it.
    per_sample : {"auto", "ghost", "hooks", "vmap"}
        How the per-sample gradients are obtained (module docstring); all give the same step.
    per_sample_method : str, optional
        The earlier name of ``per_sample``.
    output_fn, chunk_size
        Passed to :class:`backends.TorchProvider`; ``chunk_size`` selects the vmap route.
    distributed : bool, optional
        None (default): when ``torch.distributed`` is initialised, the batch is the union of
        the ranks' shards and every rank takes the single-process step on it
        (:mod:`backends.distributed`); False: local steps; True: require it.
    process_group : torch.distributed.ProcessGroup, optional
        The ranks that share the batch (default: the whole world).

    Attributes
    ----------
    diagnostics : dict
        After each step (see :meth:`step`); ``residual`` is ||G u - s|| / mean(s) on the kept
        rows (0 in the undamped limit, Eq. 7) and ``kept`` the rows the filter kept.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        damping_mode: str = "absolute",
        damping_space: str = "sample",
        dedup_threshold: float | None = 0.99,
        dedup_rule: str = "all_pairs",
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_sample: str = "auto",
        per_sample_method: str | None = None,
        chunk_size: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            model,
            loss,
            lr=lr,
            damping=damping,
            damping_mode=damping_mode,
            damping_space=damping_space,
            dedup_threshold=dedup_threshold,
            dedup_rule=dedup_rule,
            reduction=reduction,
            output_fn=output_fn,
            per_sample=per_sample,
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
            distributed=distributed,
            process_group=process_group,
        )

    _hyperparameters = (*_GramOptimizer._hyperparameters, "damping_space")

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(group)
        check_damping_options(group["damping_space"], group["damping_mode"])

    def _system(
        self, batch: _Batch, group: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = batch.logit_grad_sq_norms
        return s, ief_damping_weights(s, group["damping_space"])


class EF(_GramOptimizer):
    r"""Empirical Fisher descent (Algorithm 2), normalised with a linearly decaying step.

    .. math::
        u = G^\top (G G^\top + \lambda I_N)^{-1} 1, \qquad
        \theta \leftarrow \theta - \eta \frac{T - t}{T} \frac{u}{\|u\|}

    t = 0, ..., T - 1 the step index and T = ``total_steps``. Sample- and parameter-space
    damping coincide for EF (push-through identity), so it takes no ``damping_space``.

    Parameters
    ----------
    model, loss, damping, damping_mode, dedup_threshold, dedup_rule, reduction,
    output_fn, per_sample, per_sample_method, chunk_size, distributed, process_group
        As for :class:`IEF`.
    lr : float >= 0
        eta, the step length of the first step (the paper: 0.01 for T5 LoRA, 1 for prompt
        tuning).
    total_steps : int >= 1
        T; a step beyond it raises ``ValueError``.

    Attributes
    ----------
    diagnostics : dict
        After each step (see :meth:`step`); ``residual`` is ||G u - 1|| (0 in the undamped
        limit, Eq. 6).
    """

    _hyperparameters = (*_GramOptimizer._hyperparameters, "total_steps")
    _normalised = True

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        total_steps: int,
        damping_mode: str = "absolute",
        dedup_threshold: float | None = 0.99,
        dedup_rule: str = "all_pairs",
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_sample: str = "auto",
        per_sample_method: str | None = None,
        chunk_size: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            model,
            loss,
            lr=lr,
            damping=damping,
            total_steps=total_steps,
            damping_mode=damping_mode,
            dedup_threshold=dedup_threshold,
            dedup_rule=dedup_rule,
            reduction=reduction,
            output_fn=output_fn,
            per_sample=per_sample,
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
            distributed=distributed,
            process_group=process_group,
        )

    def _system(
        self, batch: _Batch, group: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ones_like(batch.logit_grad_sq_norms), None


class SF(_LogitLossOptimizer):
    r"""Sampled Fisher descent (Algorithm 3), normalised with a linearly decaying step.

    .. math::
        u = (F_{SF} + \lambda I_P)^{-1} g, \qquad
        \theta \leftarrow \theta - \eta \frac{T - t}{T} \frac{u}{\|u\|}

    F_SF = (1/K) sum_n sum_k grad(-log p_n(yhat_nk)) grad(...)^T with K labels yhat_nk drawn
    per sample from the model's predictive distribution, once per step with
    ``loss.sample(logits, sampling_key(t), num_samples=K, targets=targets)``; their rows
    (R times the
    sum-convention rows under a reduction R, so that lambda means what it means for EF and
    iEF) come from backward passes through the step's one forward pass, then
    :func:`ngdref.sf_update`. Damping is in parameter space and must be > 0 unless
    N K >= P. The key of step t, :meth:`sampling_key` ``(t)``, is the first 8 bytes
    (little-endian) of blake2b("seed:t"), so runs are reproducible, resume exactly from a
    state_dict, and draw fresh labels at every step.

    Parameters
    ----------
    model, loss, reduction, output_fn, per_sample, per_sample_method, chunk_size, distributed,
    process_group
        As for :class:`IEF`.
    lr : float >= 0
        eta, the step length of the first step.
    damping : float >= 0
        lambda, absolute, in parameter space.
    total_steps : int >= 1
        T; a step beyond it raises ``ValueError``.
    num_samples : int >= 1
        K (the paper: 1).
    seed : int
    """

    _hyperparameters = (
        *_LogitLossOptimizer._hyperparameters,
        "total_steps",
        "num_samples",
        "seed",
    )
    _normalised = True
    _reuses_forward = True

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        total_steps: int,
        num_samples: int = 1,
        seed: int = 0,
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_sample: str = "auto",
        per_sample_method: str | None = None,
        chunk_size: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            model,
            loss,
            lr=lr,
            damping=damping,
            total_steps=total_steps,
            num_samples=num_samples,
            seed=seed,
            reduction=reduction,
            output_fn=output_fn,
            per_sample=per_sample,
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
            distributed=distributed,
            process_group=process_group,
        )

    def sampling_key(self, step: int) -> int:
        """The integer key (for :meth:`ngdref.LogitLoss.sample`) of the labels drawn at ``step``."""
        seed = self.param_groups[0]["seed"]
        digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        batch: _Batch,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        # labels drawn once from the forward pass of this step, their rows R G_hat by
        # backward passes through that same forward (K of them)
        k = group["num_samples"]
        loss = self._shard_loss
        key = self._comm.sampling_input(loss, batch.logits, self.sampling_key(self._step), k)
        drawn = loss.sample(batch.logits, key, num_samples=k, targets=targets)
        rows = [
            provider.per_sample_rows(
                batch.factor * loss.grad(batch.logits, drawn[i]), keep_graph=i < k - 1
            )
            for i in range(k)
        ]
        update = ngdref.sf_update(
            self._comm.rows(stack_rows(rows)), batch.grad, damping=group["damping"],
            num_samples=k,
        )
        return update, {"damping": group["damping"]}


class NGD(_LogitLossOptimizer):
    r"""Exact natural gradient descent by matrix-free conjugate gradient, constant step.

    .. math::
        \theta \leftarrow \theta - \eta\, (F + \lambda I_P)^{-1} g, \qquad
        F = R \sum_n J_n^\top H_n J_n

    CG (:func:`ngdref.ngd_update_cg`) on Fisher-vector products
    (:func:`ngdref.fisher_vp`: one jvp and one vjp per iteration, no P x P matrix) until
    ||(F + lambda I) u - g|| <= ``cg_tol`` ||g||; ``ngdref.NotConvergedError`` if ``cg_maxiter``
    is reached first (the parameters are then unchanged). Forward-mode AD is needed: load
    Hugging Face models with ``attn_implementation="eager"``.

    Parameters
    ----------
    model, loss, reduction, output_fn, per_sample, per_sample_method, chunk_size, distributed,
    process_group
        As for :class:`IEF`.
    lr : float >= 0
        eta, constant.
    damping : float >= 0
        lambda, absolute, in parameter space (0 gives the minimum-norm solution when g is in
        the range of F).
    cg_tol : float > 0
        Relative residual tolerance.
    cg_maxiter : int, optional
        Default 10 P.
    """

    _hyperparameters = (*_LogitLossOptimizer._hyperparameters, "cg_tol", "cg_maxiter")

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        cg_tol: float = 1e-10,
        cg_maxiter: int | None = None,
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_sample: str = "auto",
        per_sample_method: str | None = None,
        chunk_size: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__(
            model,
            loss,
            lr=lr,
            damping=damping,
            cg_tol=cg_tol,
            cg_maxiter=cg_maxiter,
            reduction=reduction,
            output_fn=output_fn,
            per_sample=per_sample,
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
            distributed=distributed,
            process_group=process_group,
        )

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        batch: _Batch,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        iterations = 0

        def count(_: torch.Tensor) -> None:
            nonlocal iterations
            iterations += 1

        fvp = self._comm.fisher_vp(
            ngdref.fisher_vp(provider, self._shard_loss, targets, reduction=batch.factor)
        )
        update = ngdref.ngd_update_cg(
            fvp,
            batch.grad,
            damping=group["damping"],
            tol=group["cg_tol"],
            maxiter=group["cg_maxiter"],
            callback=count,
        )
        return update, {"damping": group["damping"], "cg_iterations": iterations}
