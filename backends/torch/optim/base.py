r"""The step the paper's optimisers share (:mod:`backends.torch.optim.methods`): one joint update of
all trainable parameters from one batch's per-sample rows, in the reduction convention, on one
process or data parallel, with its diagnostics; and the sample-space (Gram) solve of IEF and EF.

See :mod:`backends.torch.optim.methods` for the methods, the reduction and damping convention and
the ``per_sample`` routes (:data:`PER_SAMPLE`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

import ngdref
from ngdref.checks import check_choice, check_int, check_real
from ngdref.linalg import DAMPING_MODES, DEDUP_RULES
from ngdref.updates import DAMPING_SPACES, gram_solver

from ..distributed.comm import IgnoredShardLoss, communicator
from ..provider import TorchProvider
from .common import (
    Batch,
    StepOptions,
    _check_seed,
    _check_step_scale,
    _split_batch,
    _SteppedOptimizer,
)


class RowOptions(StepOptions, total=False):
    """The keyword options of :class:`backends.IEF`, ``EF``, ``SF`` and ``NGD`` beyond
    :class:`~backends.torch.optim.common.StepOptions`: how the per-sample rows are computed and
    shared. Documented in :class:`backends.IEF`; their defaults are those of
    :class:`_LogitLossOptimizer`'s ``__init__``.
    """

    per_sample: str
    per_sample_method: str | None
    chunk_size: int | None
    distributed: bool | None
    process_group: Any


class GramOptions(RowOptions, total=False):
    """IEF's and EF's options of the Gram solve (documented in :class:`backends.IEF`;
    defaults in :class:`_GramOptimizer`'s ``__init__``)."""

    damping_mode: str
    dedup_threshold: float | None
    dedup_rule: str


Group = Mapping[str, Any]  # the (single) parameter group: the hyperparameters and params
Update = tuple[torch.Tensor, dict[str, Any]]  # the update (P,) and the method's diagnostics

#: ``per_sample`` -> (TorchProvider's per_sample_method, layer_route)
PER_SAMPLE = {
    "auto": ("ghost", "auto"),
    "ghost": ("ghost", "ghost"),
    "hooks": ("ghost", "materialise"),
    "vmap": ("vmap", "auto"),
}



# ---- hyperparameter checks (shared by __init__ and load_state_dict) --------------------------
def _check_dedup(value: Any) -> None:
    if value is not None:
        check_real(value, "dedup_threshold", positive=True)
        if value > 1:
            raise ValueError(f"dedup_threshold must be None or in (0, 1], got {value}")



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
    "cg_tol": lambda v: v is None or check_real(v, "cg_tol", positive=True),
    "cg_maxiter": lambda v: check_int(v, "cg_maxiter", optional=True),
}


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


class _LogitLossOptimizer(_SteppedOptimizer):
    """Shared machinery: one joint update of all trainable parameters per step.

    Subclasses set :attr:`_hyperparameters` and implement :meth:`_update`.
    """

    #: EF and SF: d = u / ||u|| and lr decaying linearly to 0 over total_steps
    _normalised: bool = False

    _keeps_param_names = True

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        per_sample: str = "auto",
        per_sample_method: str | None = None,
        chunk_size: int | None = None,
        distributed: bool | None = None,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        """The defaults of :class:`RowOptions`; ``options``: :class:`StepOptions` and the
        method's hyperparameters."""
        super().__init__(model, loss, **options)
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
            "output_fn": self._output_fn,
            "per_sample_method": method,
            "layer_route": route,
            "chunk_size": chunk_size,
        }
        self._warned: set[str] = set()
        # torch.distributed: the batch is the union of the ranks' shards
        # (backends.torch.distributed.comm)
        self._comm = communicator(distributed, process_group)
        self._names = tuple(self.param_groups[0]["param_names"])

    #: checks of this class that replace :data:`_CHECKS`' of the same name
    _own_checks: ClassVar[Mapping[str, Callable[[Any], None]]] = {}

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        given = set(group) - {"params", "param_names"}
        if given != set(self._hyperparameters):
            raise ValueError(
                f"{type(self).__name__} takes the hyperparameters {sorted(self._hyperparameters)},"
                f" got {sorted(given)}"
            )
        checks = {**_CHECKS, **self._own_checks}
        for name in self._hyperparameters:
            checks[name](group[name])

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
        ``grad_norm_imbalance`` (max_n ||grad l_n|| / min_n ||grad l_n||; +inf when some
        sample's gradient is exactly zero, e.g. every label of it ignored), ``per_sample``
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
        provider, targets = self._open(closure, group)
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
        # eta_t d = (eta_t / ||u||) u for EF and SF: folded into the write, no P-length u / ||u||
        scale = lr / norm if self._normalised and norm > 0 else lr
        _check_step_scale(scale, lr, group["params"], self._step)
        fallbacks = list(getattr(batch.rows, "fallbacks", ()))
        imbalance = diagnostics.pop("grad_norm_imbalance", None)  # the Gram methods': their G G^T
        diagnostics = {
            "step": self._step,
            "loss": batch.loss,
            "lr": lr,
            "update_norm": norm,
            "grad_norm_imbalance": (
                ngdref.grad_norm_imbalance(batch.rows, zero_rows="inf")
                if imbalance is None else imbalance
            ),
            "per_sample": self.per_sample,
            "fallbacks": fallbacks,
            **diagnostics,
            **comm.diagnostics(),
        }
        with torch.no_grad():
            for param, piece in zip(
                group["params"], provider.unflatten(update).values(), strict=True
            ):
                param.add_(piece, alpha=-scale)
        self.diagnostics = diagnostics
        self._step += 1
        self._warn(fallbacks)
        return batch.loss

    def _open(
        self, closure: Callable[[], Batch], group: Mapping[str, Any]
    ) -> tuple[TorchProvider, torch.Tensor]:
        """The provider and targets of the closure's batch (every rank agrees, or all raise);
        sets this step's loss for the shard."""
        comm = self._comm
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
        return provider, targets

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
        self, provider: TorchProvider, targets: torch.Tensor, batch: _Batch, group: Group
    ) -> Update:
        """The update (P,) before normalisation, and the method's diagnostics."""
        raise NotImplementedError

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

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        damping_mode: str = "absolute",
        dedup_threshold: float | None = 0.99,
        dedup_rule: str = "all_pairs",
        **options: Any,
    ) -> None:
        """The defaults of :class:`GramOptions`."""
        super().__init__(
            model, loss, damping_mode=damping_mode, dedup_threshold=dedup_threshold,
            dedup_rule=dedup_rule, **options,
        )

    def _system(
        self, batch: _Batch, group: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The right-hand side b (N,) and sample weights W (N,) (None: the identity)."""
        raise NotImplementedError

    def _update(
        self, provider: TorchProvider, targets: torch.Tensor, batch: _Batch, group: Group
    ) -> Update:
        rhs, weights = self._system(batch, group)
        solver = gram_solver(batch.rows, group["dedup_threshold"], group["dedup_rule"])
        update, solve = ngdref.gram_update(
            solver,
            rhs,
            damping=group["damping"],
            damping_mode=group["damping_mode"],
            sample_weights=weights,
        )
        kept = solve.kept
        # the interpolation condition G u = b of the undamped limit (Eq. 6-7) on the kept rows,
        # with G u = G G^T c = K c from the Gram matrix (no pass over G)
        b = rhs.to(torch.float64)
        misfit = (solve.gram @ solve.coefficients - b)[kept]
        residual = float(torch.linalg.vector_norm(misfit) / torch.mean(b[kept]))
        return update, {
            # its G G^T, not again; +inf when a sample's gradient is zero (step docstring)
            "grad_norm_imbalance": ngdref.grad_norm_imbalance(solver, zero_rows="inf"),
            "damping": solve.damping,
            "residual": residual,
            "kept": int(kept.sum()),
            "solve_residual": solve.residual,
            "condition": solve.condition,
        }

