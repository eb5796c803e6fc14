r"""The step the paper's optimisers share (:mod:`backends.torch.optim.methods`): one joint update of
all trainable parameters from one batch's per-sample rows, in the reduction convention, on one
process or data parallel, with its diagnostics; and the sample-space (Gram) solve of IEF and EF.

See :mod:`backends.torch.optim.methods` for the methods, the reduction and damping convention and
the ``per_sample`` routes; :mod:`backends.torch.optim.options` for every option.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ngdref
from ngdref.updates import gram_solver

from ..distributed.comm import IgnoredShardLoss, communicator
from ..provider import TorchProvider
from .common import (
    Batch,
    _batch_source,
    _check_step_scale,
    _split_batch,
    _SteppedOptimizer,
)
from .options import provider_keywords

Group = Mapping[str, Any]  # the (single) parameter group: the hyperparameters and params
Update = tuple[torch.Tensor, dict[str, Any]]  # the update (P,) and the method's diagnostics

#: the options :func:`~backends.torch.optim.options.provider_keywords` turns into provider ones
_PROVIDER_OPTIONS = (
    "output_fn", "per_sample", "chunk_size", "mode", "certify", "on_mismatch", "certify_samples",
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
    #: how the rows were made: the provider's fallbacks, certificate and routes, plain data
    report: dict[str, Any]

    @functools.cached_property
    def grad(self) -> torch.Tensor:
        """g = G^T 1 (P,), formed only by the methods that need it (SF, NGD)."""
        return ngdref.sgd_update(self.rows)


class _LogitLossOptimizer(_SteppedOptimizer):
    """Shared machinery: one joint update of all trainable parameters per step.

    Subclasses spell out their keywords (:class:`~backends.torch.optim.common._SteppedOptimizer`)
    and implement :meth:`_update`.
    """

    #: EF and SF: d = u / ||u|| and lr decaying linearly to 0 over total_steps
    _normalised: bool = False

    _keeps_param_names = True

    def __init__(self, model: nn.Module, loss: ngdref.LogitLoss, options: Mapping[str, Any]
                 ) -> None:
        """The options of the per-sample rows and their provider, checked (the per-sample
        route refused now if the installed provider cannot run it)."""
        super().__init__(model, loss, options)
        self._shard_loss: Any = loss  # this step's: IgnoredShardLoss for an all-ignored shard
        route, alias = options["per_sample"], options["per_sample_method"]
        if alias is not None:
            warnings.warn(
                "per_sample_method is deprecated: pass per_sample (the same routes)",
                DeprecationWarning, stacklevel=3,
            )
            if route not in ("auto", alias):
                raise ValueError(
                    f"per_sample={route!r} and per_sample_method={alias!r} (its deprecated "
                    "name) disagree: pass per_sample only"
                )
            route = alias
        #: the per-sample route (the ``per_sample`` option)
        self.per_sample: str = route
        self._provider_options = {name: options[name] for name in _PROVIDER_OPTIONS}
        self._provider_options["per_sample"] = route
        provider_keywords(self._provider_options, 0)  # raises on what cannot run
        self._warned: set[str] = set()
        # torch.distributed: the batch is the union of the ranks' shards
        # (backends.torch.distributed.comm)
        self._comm = communicator(options["distributed"], options["process_group"])
        self._names = tuple(self.param_groups[0]["param_names"])

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
        if self.steps_taken >= total:
            raise ValueError(
                f"all total_steps={total} steps have been taken; the learning rate has decayed "
                "to 0 (construct the optimiser with a larger total_steps)"
            )
        return group["lr"] * ((total - self.steps_taken) / total)

    def step(  # type: ignore[override]
        self, closure: Callable[[], Batch] | None = None, *, batch: Batch | None = None
    ) -> float:
        r"""Take one step on one batch: ``step(batch=...)``, or ``step(closure)``.

        .. math:: \theta \leftarrow \theta - \eta_t\, d

        Parameters
        ----------
        closure : callable, () -> batch, optional
            Takes no argument and returns the batch; it neither computes the loss nor calls
            ``backward()`` (the optimiser runs its own passes).
        batch : optional
            ``(inputs, targets)`` (inputs as for :class:`backends.TorchProvider`: a tensor, or
            a mapping of keyword tensors; targets as the loss expects, e.g. (N,) class labels)
            or a mapping of Hugging Face inputs holding ``"labels"``. Exactly one of
            ``closure`` and ``batch``.

        Returns
        -------
        float
            The batch loss R * sum_n l_n at the parameters before the update.

        Raises
        ------
        TypeError
            Neither or both of ``closure`` and ``batch``; a malformed batch.
        ValueError
            Past ``total_steps`` (EF, SF); non-finite logits, loss, gradients or update.
        ngdref.SingularMatrixError
            An undamped Gram (or P x P) system that is singular.
        ngdref.NotConvergedError
            NGD's conjugate gradient reached ``cg_maxiter`` first.

        Notes
        -----
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
        (the route), ``fallbacks`` (parameters whose per-sample gradients took another
        route, and why), ``certificate`` (the rows' certificate as a dict of plain values,
        or None where none ran) and ``routes`` (the route of every parameter, where the
        provider reports them, else None); IEF and EF add ``residual`` (||G u - b|| /
        mean(b) on the kept rows), ``kept``, ``solve_residual`` and ``condition`` (of the
        damped Gram solve, :class:`ngdref.linalg.GramSolve`), NGD ``cg_iterations``.
        """
        source = _batch_source(closure, batch)
        group = self.param_groups[0]
        self._check_hyperparameters(group)  # a scheduler or the user may have changed them
        lr = self._learning_rate(group)
        comm = self._comm  # distributed: every rank raises if one does (comm.agree)
        provider, targets = self._open(source, group)
        with comm.agree(self.steps_taken):
            quantities = self._batch(provider, targets, group)
        quantities = comm.share(quantities)  # the global rows, s and loss
        update, diagnostics = self._update(provider, targets, quantities, group)
        norm = float(torch.linalg.vector_norm(update))
        comm.check_update(norm, lr)
        if not math.isfinite(norm):
            raise ngdref.NonFiniteError(
                f"update contains NaN or infinite values at step {self.steps_taken} (increase "
                "damping); the parameters were not changed"
            )
        # eta_t d = (eta_t / ||u||) u for EF and SF: folded into the write, no P-length u / ||u||
        scale = lr / norm if self._normalised and norm > 0 else lr
        _check_step_scale(scale, lr, group["params"], self.steps_taken)
        diagnostics = self._diagnostics(quantities, lr, norm, diagnostics)
        with torch.no_grad():
            for param, piece in zip(
                group["params"], provider.unflatten(update).values(), strict=True
            ):
                param.add_(piece, alpha=-scale)
        self.diagnostics = diagnostics
        self._joint_state["step"] += 1
        self._warn(diagnostics["fallbacks"])
        return quantities.loss

    def _diagnostics(
        self, batch: _Batch, lr: float, norm: float, method: dict[str, Any]
    ) -> dict[str, Any]:
        """The step's diagnostics (:meth:`step`), the method's own ones included."""
        rows = batch.rows
        imbalance = method.pop("grad_norm_imbalance", None)  # the Gram methods': their G G^T
        return {
            "step": self.steps_taken,
            "loss": batch.loss,
            "lr": lr,
            "update_norm": norm,
            "grad_norm_imbalance": (
                ngdref.grad_norm_imbalance(rows, zero_rows="inf")
                if imbalance is None else imbalance
            ),
            "per_sample": self.per_sample,
            **batch.report,
            **method,
            **self._comm.diagnostics(),
        }

    def _open(
        self, source: Callable[[], Batch], group: Mapping[str, Any]
    ) -> tuple[TorchProvider, torch.Tensor]:
        """The provider and targets of the step's batch (every rank agrees, or all raise);
        sets this step's loss for the shard."""
        comm = self._comm
        with comm.agree(self.steps_taken):
            inputs, targets = _split_batch(source())
            keywords = provider_keywords(self._provider_options, self.steps_taken)
            provider = TorchProvider(self._model, inputs, **keywords)
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
        """Say once per optimiser which parameters (or rows) took a fallback route, and why."""
        new = [f for f in fallbacks if f not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"{type(self).__name__}(per_sample={self.per_sample!r}): fallback routes: "
                + "; ".join(new),
                stacklevel=3,
            )

    def _batch(
        self, provider: TorchProvider, targets: torch.Tensor, group: Mapping[str, Any]
    ) -> _Batch:
        """Logits, R e_n, s, the per-sample rows, g and the loss of one batch (checked)."""
        logits = provider.logits()
        factor = ngdref.reduction_factor(group["reduction"], self._comm.num_samples)
        values, e = self._shard_loss.value_and_grad(logits, targets)
        loss = factor * float(torch.sum(values))
        if not math.isfinite(loss):
            raise ngdref.NonFiniteError(
                f"loss is {loss} at step {self.steps_taken}; the parameters were not changed"
            )
        e = factor * e
        rows = provider.per_sample_rows(e, keep_graph=self._reuses_forward)
        report = {"fallbacks": list(provider.fallbacks),
                  "certificate": _plain(provider.certificate),
                  "routes": _plain(provider.routes) or None}
        return _Batch(logits, factor, e, torch.sum(e * e, dim=1), rows, loss, report)

    #: SF: the sampled labels' backward pass reuses the forward of the true labels
    _reuses_forward = False

    def _update(
        self, provider: TorchProvider, targets: torch.Tensor, batch: _Batch, group: Group
    ) -> Update:
        """The update (P,) before normalisation, and the method's diagnostics."""
        raise NotImplementedError

def _plain(value: Any) -> Any:
    """``value`` as plain data for a JSON log: a dataclass (a certificate) as a dict, a mapping
    as a dict, a tuple as a list; None as it is."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _GramOptimizer(_LogitLossOptimizer):
    r"""Sample-space (Gram) updates :math:`u = G^\top (G G^\top + \lambda W)^{-1} b`.

    Subclasses choose b and W in :meth:`_system`; the solve is :func:`ngdref.gram_update`.
    """

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

