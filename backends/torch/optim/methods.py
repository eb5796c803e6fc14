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
converge at all, as in the authors' code: see the conventions page, :ref:`conv-normalised-steps`).
No momentum, no weight decay (the paper's settings). As in the paper, the model runs in eval mode
(dropout off) during the step (``mode="eval"``, :ref:`conv-eval-mode`).

Reduction and damping convention
--------------------------------
``reduction="sum"`` (default) is the paper's L = sum_n l_n. ``"mean"`` (torch and Hugging Face)
or a float R builds every quantity from the gradients of the R-scaled loss, as the authors'
code does (:ref:`conv-damping-reduction`): G -> R G, s -> R^2 s, g -> R g, SF's sampled rows
G_hat -> R G_hat (R, not sqrt(R)), F -> R F. So one damping number lambda damps EF, iEF and SF
alike, and means lambda / R^2 in the sum convention:

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
  ghost factors or the materialised per-layer rows, whichever the layer registry's cost model
  (:func:`backends.torch.layers.cost.factor_cost`) says costs less
  (:mod:`backends.torch.per_sample.layer_pass`); G is never formed, the update is G^T c from
  the stored layer quantities;
* ``"ghost"``: the same with factors for every weight that allows them;
* ``"hooks"``: the same with materialised per-layer rows everywhere;
* ``"vmap"``: ``torch.func.vmap`` over samples, a dense (N, P) G (the loop where torch cannot
  run it);
* ``"loop"``: single-sample passes, for any model whose samples are independent.

A parameter the hooked pass cannot split falls through, by itself, to the per-module vmap,
the whole-model vmap and the loop; each fallback is listed in ``diagnostics["fallbacks"]``
(and warned about once), each parameter's route in ``diagnostics["routes"]``. ``certify``,
``on_mismatch`` and ``certify_samples`` check the rows against an independent G v
(``diagnostics["certificate"]``; :mod:`backends.torch.optim.options` documents every
option).

The options are passed to :class:`backends.TorchProvider` by one function,
:func:`backends.torch.optim.options.provider_keywords`.

Data parallel
-------------
Under ``torch.distributed`` (torchrun) each rank's closure returns its own shard and every
rank takes the step of the concatenated batch ("mean" divides by the global N); what is sent
is documented in :mod:`backends.torch.distributed.comm` and counted in
``diagnostics["bytes_sent"]``.

For a sequence loss (:class:`ngdref.SequenceSoftmaxCrossEntropy`) "mean" divides by the number
of sequences N, not of label tokens; a float R = 1/number-of-label-tokens reproduces Hugging
Face's token-mean loss for batches with that token count.

Usage
-----
Each step takes this step's batch, ``(inputs, targets)`` or, for Hugging Face dict inputs, the
dict with its ``"labels"``: given as ``step(batch=...)``, or returned by a closure of no
arguments, ``step(closure)``::

    opt = IEF(model, ngdref.SoftmaxCrossEntropy(), lr=1.0, damping=1e-8)
    for x, y in loader:
        loss = opt.step(batch=(x, y))       # the batch loss before the update
        print(loss, opt.diagnostics)

    opt = EF(peft_t5, ngdref.SequenceSoftmaxCrossEntropy(32128), lr=0.01, damping=1e-7,
             reduction="mean", total_steps=len(loader) * epochs, dedup_threshold=0.99)
    for batch in loader:                    # input_ids, attention_mask, labels (-100 padded)
        opt.step(lambda: batch)

A resumed run (``state_dict`` / ``load_state_dict``, the step count and SF's sampling keys
included) takes the steps of the uninterrupted one, bitwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

import ngdref
from ngdref.updates import check_damping_options, ief_damping_weights, median_damping

from ..per_sample.rows import GhostRows, stack_rows
from ..provider import TorchProvider
from .base import Group, Update, _Batch, _GramOptimizer, _LogitLossOptimizer
from .common import _given
from .options import OPTIONS, SF_DAMPING_MODES, SF_OPTIONS
from .options import PER_SAMPLE as PER_SAMPLE  # re-exported: the routes the provider runs
from .sf_rows import PairedRows, cross_gram_is_cheaper

__all__ = ["EF", "IEF", "NGD", "SF", "SF_DAMPING_MODES"]


class IEF(_GramOptimizer):
    r"""Improved empirical Fisher descent (Algorithm 1 of Wu et al. 2024), constant step.

    .. math::
        \theta \leftarrow \theta - \eta\, G^\top (G G^\top + \lambda I_N)^{-1} s

    with G (N, P) the per-sample gradients and s (N,) the squared norms of the logit-level
    gradients, both in the ``reduction`` convention (R G and R^2 s). With
    ``damping_space="parameter"`` the update is (F_iEF + lambda I_P)^{-1} g
    = G^T (G G^T + lambda diag(s))^{-1} s instead (:func:`ngdref.ief_update`). The paper's
    settings, mean convention: lr 50 or 100, damping 1e-7 or 1e-12.

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
        damping_space: str = "sample",
        damping_mode: str = "absolute",
        dedup_threshold: float | None = 0.99,
        dedup_rule: str = "all_pairs",
        reduction: str | float = "sum",
        per_sample: str = "auto",
        chunk_size: int | None = None,
        mode: str = "eval",
        certify: str = "first",
        on_mismatch: str = "raise",
        certify_samples: int | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        distributed: bool | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        per_sample_method: str | None = None,
    ) -> None:
        super().__init__(model, loss, _given(locals()))

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
    damping coincide for EF (push-through identity), so it takes no ``damping_space``. The
    paper's lr: 0.01 for T5 LoRA, 1 for prompt tuning.

    Attributes
    ----------
    diagnostics : dict
        After each step (see :meth:`step`); ``residual`` is ||G u - 1|| (0 in the undamped
        limit, Eq. 6).
    """

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
        per_sample: str = "auto",
        chunk_size: int | None = None,
        mode: str = "eval",
        certify: str = "first",
        on_mismatch: str = "raise",
        certify_samples: int | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        distributed: bool | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        per_sample_method: str | None = None,
    ) -> None:
        super().__init__(model, loss, _given(locals()))

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
    (R times the sum-convention rows under a reduction R, so that lambda means what it means
    for EF and iEF, :ref:`conv-sf-rows`) come from backward passes through the step's one
    forward pass, then :func:`ngdref.sf_update`. Damping is in parameter space and must be
    > 0 unless N K >= P. The key of step t, :meth:`sampling_key` ``(t)``, is the first 8 bytes
    (little-endian) of blake2b("seed:t"), so runs are reproducible, resume exactly from a
    state_dict, and draw fresh labels at every step.

    ``damping_mode="median"`` reads the authors' negative SF damping: lambda times the median
    squared norm of this step's true-label rows R g_n (the diagonal of their Gram matrix, which
    it costs) over the rows their duplicate filter keeps (every pair with absolute cosine above
    0.99 drops its smaller-norm row, all-zero rows stay), the lower middle value for an even
    count. It follows the gradients' scale from step to step.
    """

    _options = OPTIONS | SF_OPTIONS
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
        damping_mode: str = "absolute",
        reduction: str | float = "sum",
        per_sample: str = "auto",
        chunk_size: int | None = None,
        mode: str = "eval",
        certify: str = "first",
        on_mismatch: str = "raise",
        certify_samples: int | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        distributed: bool | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        per_sample_method: str | None = None,
    ) -> None:
        super().__init__(model, loss, _given(locals()))

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """As every optimiser's; a state from before ``damping_mode`` existed is "absolute"."""
        groups = state_dict.get("param_groups") if isinstance(state_dict, Mapping) else None
        if (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], Mapping)
                and "damping_mode" not in groups[0]):
            state_dict = {**state_dict, "param_groups": [{**groups[0], "damping_mode": "absolute"}]}
        super().load_state_dict(state_dict)

    def sampling_key(self, step: int) -> int:
        """The integer key (for :meth:`ngdref.LogitLoss.sample`) of the labels drawn at ``step``."""
        return ngdref.sampling_key(self.param_groups[0]["seed"], step)

    def _update(
        self, provider: TorchProvider, targets: torch.Tensor, batch: _Batch, group: Group
    ) -> Update:
        # labels drawn once from the forward pass of this step, their rows R G_hat by
        # backward passes through that same forward (K of them)
        k = group["num_samples"]
        loss = self._shard_loss
        key = self._comm.sampling_input(loss, batch.logits, self.sampling_key(self.steps_taken), k)
        drawn = loss.sample(batch.logits, key, num_samples=k, targets=targets)
        rows = [
            provider.per_sample_rows(
                batch.factor * loss.grad(batch.logits, drawn[i]), keep_graph=i < k - 1
            )
            for i in range(k)
        ]
        sampled = self._comm.rows(stack_rows(rows))
        damping = group["damping"]
        if group["damping_mode"] == "median":  # the authors' filter on the true rows
            damping = median_damping(batch.rows, damping)
        # local ghost rows choose per block (PairedRows); other rows as a whole
        if isinstance(batch.rows, GhostRows) or cross_gram_is_cheaper(
            batch.rows, sampled.shape[0]
        ):
            # g = G^T 1 never formed: A g from the cross-Gram, u from both sets of rows
            update = ngdref.sf_update(
                sampled, None, damping=damping, num_samples=k,
                per_sample_grads=_paired(batch.rows),
            )
        else:
            update = ngdref.sf_update(sampled, batch.grad, damping=damping, num_samples=k)
        return update, {"damping": damping}

class NGD(_LogitLossOptimizer):
    r"""Exact natural gradient descent by matrix-free conjugate gradient, constant step.

    .. math::
        \theta \leftarrow \theta - \eta\, (F + \lambda I_P)^{-1} g, \qquad
        F = R \sum_n J_n^\top H_n J_n

    CG (:func:`ngdref.ngd_update_cg`) on Fisher-vector products
    (:func:`ngdref.fisher_vp`: one jvp and one vjp per iteration, no P x P matrix) until
    ||(F + lambda I) u - g|| <= ``cg_tol`` ||g||; ``ngdref.NotConvergedError`` if ``cg_maxiter``
    is reached first (the parameters are then unchanged). The default tolerance follows the
    model's dtype: 1e-10 in float64, sqrt(eps) = 3.5e-4 in float32, below which a float32
    Fisher-vector product cannot take the true residual (:func:`ngdref.cg.default_cg_tol`).
    Forward-mode AD is needed: load Hugging Face models with ``attn_implementation="eager"``.
    The damping is absolute, in parameter space (0 gives the minimum-norm solution when g is in
    the range of F).
    """

    def __init__(
        self,
        model: nn.Module,
        loss: ngdref.LogitLoss,
        *,
        lr: float,
        damping: float,
        cg_tol: float | None = None,
        cg_maxiter: int | None = None,
        reduction: str | float = "sum",
        per_sample: str = "auto",
        chunk_size: int | None = None,
        mode: str = "eval",
        certify: str = "first",
        on_mismatch: str = "raise",
        certify_samples: int | None = None,
        output_fn: Callable[[Any], torch.Tensor] | None = None,
        distributed: bool | None = None,
        process_group: torch.distributed.ProcessGroup | None = None,
        per_sample_method: str | None = None,
    ) -> None:
        super().__init__(model, loss, _given(locals()))

    def _update(
        self, provider: TorchProvider, targets: torch.Tensor, batch: _Batch, group: Group
    ) -> Update:
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



def _paired(rows: Any) -> Any:
    """Local true-label GhostRows as :class:`~backends.torch.optim.sf_rows.PairedRows` (one product
    for u); distributed rows as they are."""
    return PairedRows.of(rows) if isinstance(rows, GhostRows) else rows
