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

Reduction convention
--------------------
``reduction="sum"`` (default) is the paper's L = sum_n l_n. ``"mean"`` (torch and Hugging Face)
or a float R multiply every per-sample quantity by R: G -> R G, s -> R^2 s, g -> R g,
F -> R F, F_SF -> R^2 F_SF (SF's rows are gradients of the reduced loss on sampled labels, as
in the paper and the authors' code, so one lambda damps EF, iEF and SF alike; see
:mod:`ngdref.directions`). A mean-convention run with (lr', lambda') takes the same steps as a
sum-convention run with (lr, lambda) when, with R = 1/N,

* IEF, ``damping_space="sample"``: lr' = N lr, lambda' = lambda / N^2 (the paper's settings are
  mean-convention numbers: its lr is N times, its damping N^2 times smaller than the sum ones);
* IEF, ``damping_space="parameter"``: lr' = N lr, lambda' = lambda;
* EF and SF: lr' = lr, lambda' = lambda / N^2;
* NGD: lr' = lr, lambda' = lambda / N (the same update: (F/N + lambda/N)^{-1} g/N).

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

import hashlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import ngdref
from backends.torch_provider import TorchProvider
from ngdref.linalg import DAMPING_MODES
from ngdref.updates import DAMPING_SPACES, check_damping_options, ief_damping_weights

__all__ = ["EF", "IEF", "NGD", "SF"]

Batch = Any  # (inputs, targets), or a mapping of Hugging Face inputs holding "labels"


# ---- hyperparameter checks (shared by __init__ and load_state_dict) --------------------------
def _real(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'>' if positive else '>='} 0, got {value}")


def _count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _check_dedup(value: Any) -> None:
    if value is not None:
        _real("dedup_threshold", value, positive=True)
        if value > 1:
            raise ValueError(f"dedup_threshold must be None or in (0, 1], got {value}")


def _optional_count(name: str, value: Any) -> None:
    if value is not None:
        _count(name, value)


def _check_seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {type(value).__name__}")


#: hyperparameter -> its check; each optimiser keeps a subset in its (single) parameter group
_CHECKS: dict[str, Callable[[Any], None]] = {
    "lr": lambda v: _real("lr", v),
    "damping": lambda v: _real("damping", v),
    "reduction": lambda v: ngdref.reduction_factor(v, 1),
    "damping_mode": lambda v: _choice("damping_mode", v, DAMPING_MODES),
    "damping_space": lambda v: _choice("damping_space", v, DAMPING_SPACES),
    "dedup_threshold": _check_dedup,
    "total_steps": lambda v: _count("total_steps", v),
    "num_samples": lambda v: _count("num_samples", v),
    "seed": _check_seed,
    "cg_tol": lambda v: _real("cg_tol", v, positive=True),
    "cg_maxiter": lambda v: _optional_count("cg_maxiter", v),
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
        per_sample_method: str,
        chunk_size: int | None,
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
        self._provider_options = {
            "output_fn": output_fn,
            "per_sample_method": per_sample_method,
            "chunk_size": chunk_size,
        }
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
        normalisation; a zero u has no direction and leaves the parameters as they are) and
        ``grad_norm_imbalance`` (max_n ||grad l_n|| / min_n ||grad l_n||); IEF and EF add
        ``residual`` and ``kept``, NGD ``cg_iterations``.
        """
        if not callable(closure):
            raise TypeError(
                "closure is required: a callable with no arguments returning the batch, "
                "(inputs, targets) or Hugging Face inputs with 'labels'"
            )
        group = self.param_groups[0]
        self._check_hyperparameters(group)  # a scheduler or the user may have changed them
        lr = self._learning_rate(group)
        inputs, targets = _split_batch(closure())
        provider = TorchProvider(self._model, inputs, **self._provider_options)
        if provider.param_names != self._names:
            raise ValueError(
                "model: its trainable parameters changed since the optimiser was constructed "
                "(requires_grad was toggled); construct a new optimiser"
            )
        if targets is None:
            targets = provider.targets
        q = ngdref.batch_quantities(provider, self._loss, targets, reduction=group["reduction"])
        loss = q.factor * float(torch.sum(self._loss.value(q.logits, targets)))
        if not math.isfinite(loss):
            raise ngdref.NonFiniteError(
                f"loss is {loss} at step {self._step}; the parameters were not changed"
            )
        update, diagnostics = self._update(provider, targets, q, group)
        norm = float(torch.linalg.vector_norm(update))
        if not math.isfinite(norm):
            raise ngdref.NonFiniteError(
                f"update contains NaN or infinite values at step {self._step} (increase damping);"
                " the parameters were not changed"
            )
        if self._normalised and norm > 0:
            update = update / norm
        diagnostics = {
            "step": self._step,
            "loss": loss,
            "lr": lr,
            "update_norm": norm,
            "grad_norm_imbalance": ngdref.grad_norm_imbalance(q.per_sample_grads),
            **diagnostics,
        }
        with torch.no_grad():
            for param, piece in zip(
                group["params"], provider.unflatten(update).values(), strict=True
            ):
                param.add_(piece, alpha=-lr)
        self.diagnostics = diagnostics
        self._step += 1
        return loss

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        q: ngdref.BatchQuantities,
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
        "damping_space",
        "dedup_threshold",
    )

    def _check_hyperparameters(self, group: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(group)
        check_damping_options(group["damping_space"], group["damping_mode"])

    def _system(
        self, q: ngdref.BatchQuantities, damping_space: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The right-hand side b (N,) and sample weights W (N,) (None: the identity)."""
        raise NotImplementedError

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        q: ngdref.BatchQuantities,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        rhs, weights = self._system(q, group["damping_space"])
        update, solve = ngdref.gram_update(
            q.per_sample_grads,
            rhs,
            damping=group["damping"],
            damping_mode=group["damping_mode"],
            sample_weights=weights,
            dedup_threshold=group["dedup_threshold"],
        )
        kept = solve.kept
        # the interpolation condition G u = b of the undamped limit (Eq. 6-7), on the kept rows
        # (indexing with a mask copies G: skip it when the filter kept every row)
        rows, b = (
            (q.per_sample_grads, rhs) if bool(kept.all()) else (q.per_sample_grads[kept], rhs[kept])
        )
        misfit = ngdref.loss_reductions(rows, update) - b
        residual = float(torch.linalg.vector_norm(misfit) / torch.mean(b))
        return update, {"damping": solve.damping, "residual": residual, "kept": int(kept.sum())}


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
        See :func:`ngdref.linalg.solve_damped_gram`.
    damping_space : {"sample", "parameter"}
        "sample" is the paper's lambda I_N.
    dedup_threshold : float in (0, 1], optional
        Drop near-duplicate per-sample gradients (|cos| above it, keeping the larger) before
        the solve; the authors' training code uses 0.99. Default: keep all.
    reduction : {"sum", "mean"} or float
        R; see the module docstring for how lr and damping scale with it.
    output_fn, per_sample_method, chunk_size
        Passed to :class:`backends.TorchProvider`.

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
        dedup_threshold: float | None = None,
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_sample_method: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            model,
            loss,
            lr=lr,
            damping=damping,
            damping_mode=damping_mode,
            damping_space=damping_space,
            dedup_threshold=dedup_threshold,
            reduction=reduction,
            output_fn=output_fn,
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
        )

    def _system(
        self, q: ngdref.BatchQuantities, damping_space: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = q.logit_grad_sq_norms
        return s, ief_damping_weights(s, damping_space)


class EF(_GramOptimizer):
    r"""Empirical Fisher descent (Algorithm 2), normalised with a linearly decaying step.

    .. math::
        u = G^\top (G G^\top + \lambda I_N)^{-1} 1, \qquad
        \theta \leftarrow \theta - \eta \frac{T - t}{T} \frac{u}{\|u\|}

    t = 0, ..., T - 1 the step index and T = ``total_steps``. Sample- and parameter-space
    damping coincide for EF (push-through identity), so ``damping_space`` only names it.

    Parameters
    ----------
    model, loss, damping, damping_mode, damping_space, dedup_threshold, reduction,
    output_fn, per_sample_method, chunk_size
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
        damping_space: str = "sample",
        dedup_threshold: float | None = None,
        reduction: str | float = "sum",
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        per_sample_method: str = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            model,
            loss,
            lr=lr,
            damping=damping,
            total_steps=total_steps,
            damping_mode=damping_mode,
            damping_space=damping_space,
            dedup_threshold=dedup_threshold,
            reduction=reduction,
            output_fn=output_fn,
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
        )

    def _system(
        self, q: ngdref.BatchQuantities, damping_space: str
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ones_like(q.logit_grad_sq_norms), None


class SF(_LogitLossOptimizer):
    r"""Sampled Fisher descent (Algorithm 3), normalised with a linearly decaying step.

    .. math::
        u = (F_{SF} + \lambda I_P)^{-1} g, \qquad
        \theta \leftarrow \theta - \eta \frac{T - t}{T} \frac{u}{\|u\|}

    F_SF = (1/K) sum_n sum_k grad(-log p_n(yhat_nk)) grad(...)^T with K labels yhat_nk drawn
    per sample from the model's predictive distribution (:func:`ngdref.sampled_grads`, then
    :func:`ngdref.sf_update`); damping is in parameter space and must be > 0 unless
    N K >= P. The draw of step t uses the integer key :meth:`sampling_key` ``(t)``, a hash of
    (seed, t), so runs are reproducible and resume exactly from a state_dict.

    Parameters
    ----------
    model, loss, reduction, output_fn, per_sample_method, chunk_size
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
        per_sample_method: str = "auto",
        chunk_size: int | None = None,
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
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
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
        q: ngdref.BatchQuantities,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        rows = ngdref.sampled_grads(
            provider,
            self._loss,
            targets,
            self.sampling_key(self._step),
            num_samples=group["num_samples"],
            reduction=group["reduction"],
        )
        update = ngdref.sf_update(
            q.grad, rows, damping=group["damping"], num_samples=group["num_samples"]
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
    model, loss, reduction, output_fn, per_sample_method, chunk_size
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
        per_sample_method: str = "auto",
        chunk_size: int | None = None,
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
            per_sample_method=per_sample_method,
            chunk_size=chunk_size,
        )

    def _update(
        self,
        provider: TorchProvider,
        targets: torch.Tensor,
        q: ngdref.BatchQuantities,
        group: Mapping[str, Any],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        iterations = 0

        def count(_: torch.Tensor) -> None:
            nonlocal iterations
            iterations += 1

        fvp = ngdref.fisher_vp(provider, self._loss, targets, reduction=group["reduction"])
        update = ngdref.ngd_update_cg(
            fvp,
            q.grad,
            damping=group["damping"],
            tol=group["cg_tol"],
            maxiter=group["cg_maxiter"],
            callback=count,
        )
        return update, {"damping": group["damping"], "cg_iterations": iterations}
