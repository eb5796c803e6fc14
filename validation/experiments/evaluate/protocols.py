r"""One evaluation batch, scored under the "ngdref" or the authors' protocol.

Both protocols (:ref:`conv-evaluation`) take the SAME per-sample quantities of M samples, in the
sum convention (``G`` (M, P), ``s`` (M,), SF's sampled gradients ``G_hat`` (K M, P)) and scale
them by one reduction factor R, as the mean loss of the paper and the authors' code does: rows
R G, ``R^2 s``, sampled rows ``R G_hat`` (the gradient of the mean loss on sampled labels, R
times the sum-convention row, NOT sqrt(R)), ``g = R sum_n g_n`` and ``F = R sum_n J_n^T H_n
J_n``. One damping number then damps EF, iEF and SF alike (:ref:`conv-damping-reduction`).

=====================  ==========================================  ==========================
                       ``"ngdref"``                                ``"authors"``
=====================  ==========================================  ==========================
R                      1 / M (the mean over the batch)             1 / micro_batch (their
                                                                   micro-batch means of 40,
                                                                   rows concatenated unscaled)
damping                one number per method (EF, iEF, SF)         one lambda for all methods
duplicate filter       inside the EF / iEF solves (``ngdref``'s    before everything: every
                       ``dedup_threshold``, its default rule)      pair with ``|cos| > 0.95``
                                                                   drops its smaller-norm row
                                                                   (all pairs compared)
g (updates and gamma)  R times the sum of all M rows               R times the sum of the
                                                                   KEPT rows
imbalance              over all M rows                             over the kept rows
SF's sampled rows      all K M                                     near-duplicates
                                                                   (``|cos| > 0.99``) removed
                                                                   (``sf_duplicates``)
F in gamma             all M samples                               all M samples
=====================  ==========================================  ==========================

Two options of either protocol reproduce the authors' remaining conventions:
``damping_scale="sampled_max"`` reads every damping relative to the largest squared norm of
SF's kept sampled rows (their evaluator's negative damping, one scale per batch for every
method), and ``dedup_zero_rows="keep"`` keeps all-zero true rows through the duplicate filter
(their filter's cosines of a zero row are NaN, never above the threshold). Defaults:
"absolute" and "drop".

The authors' rules are those of ``update_generation`` and ``remove_J_C_duplicates`` in
``example_glue_sst2_preconditioner.py`` / ``glue_sst2_utils.py`` of their release. Their SF
filter scans the sampled rows in decreasing norm and removes every later row with
``|cos| > 0.99`` to the current one; it is written to MERGE the removed row into the kept one
(scale the kept row so that its squared norm is the pair's sum, which leaves
``G_hat^T G_hat`` unchanged for exact duplicates), but the accumulator aliases the reference
norms (``new_iJ_norm_sqr = iJ_norm_sqr``), so the scale-up test ``new > old`` is never true
and the released code DROPS the row. ``sf_duplicates="drop"`` (default) is what the released
code computes, ``"merge"`` what it was written to do.

Imbalance statistics (:func:`ngdref.grad_norm_imbalance`): ``"max_min"`` = max_n ||g_n|| /
min_n ||g_n|| (the authors' evaluation prints this), ``"tail_10"`` = mean of the largest
floor(M/10) norms over the mean of the smallest floor(M/10) (at least one; the authors'
optimiser logs this). Both are ratios, independent of R.

Solves: every update is the public ``ngdref`` function. EF and iEF share one
:class:`ngdref.DampedGram` per batch (the Gram matrix and the duplicate filter formed once,
one Cholesky factorisation per damping value), and SF's sampled rows have their own
DampedGram, so a damping sweep forms no Gram matrix twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import ngdref
from ngdref.kfac import KFAC_METHODS
from ngdref.quality import IMBALANCE_STATISTICS

if TYPE_CHECKING:
    import torch

    from backends.torch.kfac.curvature import KFACCurvature
    from backends.torch.provider import TorchProvider
    from validation.experiments.train.runner import Batch, Setup
from validation.experiments.evaluate.authors_sf import AUTHORS_SF_DEDUP_THRESHOLD, authors_sf_rows

__all__ = [
    "DAMPING_SCALES",
    "IMBALANCE_STATISTICS",
    "PROTOCOLS",
    "SF_DUPLICATES",
    "BatchScorer",
    "EvaluationError",
    "EvaluationProblem",
    "batch_rows",
    "batch_scorer",
    "evaluation_inputs",
    "evaluation_problem",
    "first_label_token",
    "score_batch",
    "sf_key",
    "with_context",
]

PROTOCOLS = ("ngdref", "authors")
SF_DUPLICATES = ("drop", "merge")
#: how a damping value is read: "absolute", or "sampled_max" (relative to the largest squared
#: norm of SF's kept sampled rows, the authors' evaluator's negative damping)
DAMPING_SCALES = ("absolute", "sampled_max")
class EvaluationError(ValueError):
    """Bad input to the evaluation framework; the message names the argument."""


@dataclass
class BatchScorer:
    """The R-scaled quantities of one batch under one protocol, and gamma of any update.

    Attributes
    ----------
    solver : ngdref.DampedGram
        Over R g_n of all M rows, with the protocol's duplicate filter (``solver.kept``);
        shared by the EF and iEF updates.
    sq_norms : torch.Tensor, shape (M,)
        R^2 s_n.
    grad : torch.Tensor, shape (P,)
        g: R times the sum of all rows ("ngdref") or of the kept rows ("authors").
    sampled : ngdref.DampedGram or None
        Of R times SF's sampled gradients ("authors": filtered, see
        :func:`authors_sf_rows`); its Gram matrix is formed once for every damping.
    form : ngdref.QuadraticForm
        v -> v^T F v with F = R sum over all M samples.
    num_samples : int
        K of ``sampled`` ("authors" after filtering: 1, as their code).
    imbalance : dict of str to float
        Both statistics, over all rows ("ngdref") or the kept rows ("authors").
    kept : int
        Rows the EF / iEF updates use.
    factor : float
        R.
    kfac : backends.torch.kfac.curvature.KFACCurvature or None
        The batch's K-FAC curvatures in the sum convention
        (:func:`validation.experiments.evaluate.kfac.batch_kfac_curvature`).
    scale : float
        What every damping value is multiplied by before use: 1 ("absolute"), or the
        largest squared norm of ``sampled``'s rows ("sampled_max", :func:`score_batch`).
    """

    solver: ngdref.DampedGram
    sq_norms: torch.Tensor
    grad: torch.Tensor
    sampled: ngdref.DampedGram | None
    form: ngdref.QuadraticForm
    num_samples: int
    imbalance: dict[str, float]
    kept: int
    factor: float = 1.0
    kfac: KFACCurvature | None = None
    scale: float = 1.0

    def gamma(self, update: torch.Tensor) -> float:
        r""":math:`\sqrt{d^\top F d} / |d^\top g|` with this batch's F and g."""
        return ngdref.gamma(update, self.grad, quadratic_form=self.form)

    def update(self, method: str, damping: float) -> torch.Tensor:
        """SGD's g, or EF's, iEF's, SF's or the K-FAC family's update at ``damping``.

        EF and iEF are damped in sample space. The K-FAC family's blocks approximate the
        EF-type matrix of the rows R g_n, R^2 K_sum, so lambda in the convention of R is
        lambda / R^2 in the sum convention, as for EF, iEF and SF (:ref:`conv-damping-reduction`):
        ``(K_sum + lambda / R^2 I)^-1 g`` (a positive multiple of ``(R^2 K_sum + lambda I)^-1 g``,
        the same gamma). ``damping`` is multiplied by ``scale`` first, for every method.
        """
        damping = damping * self.scale
        if method in KFAC_METHODS:
            if self.kfac is None:
                raise ValueError(f"method {method!r} needs the batch's K-FAC curvature")
            return self.kfac.inverse_apply(
                method, self.grad, damping=damping / (self.factor * self.factor)
            )
        if method == "sgd":
            return self.grad
        if method == "ef":
            return ngdref.ef_update(self.solver, damping=damping)
        if method == "ief":
            return ngdref.ief_update(self.solver, self.sq_norms, damping=damping)
        if method == "sf":
            if self.sampled is None:
                raise ValueError("method 'sf' needs the sampled gradients (with_sf=True)")
            return ngdref.sf_update(
                self.sampled, self.grad, damping=damping, num_samples=self.num_samples
            )
        raise ValueError(
            f"method must be one of sgd, ef, ief, sf, {', '.join(KFAC_METHODS)}, got {method!r}"
        )


def _authors_sampled(sampled: torch.Tensor, duplicates: str) -> ngdref.DampedGram:
    """SF's rows after the authors' filter (their Gram matrix is formed twice per batch: to
    filter, then for the solves)."""
    import torch

    gram = ngdref.gram_matrix(sampled).cpu().numpy()
    index, scale = authors_sf_rows(gram, AUTHORS_SF_DEDUP_THRESHOLD, duplicates)
    idx = torch.as_tensor(index, device=sampled.device)
    weight = torch.as_tensor(scale, dtype=sampled.dtype, device=sampled.device)
    return ngdref.DampedGram(sampled[idx] * weight[:, None], rows_name="sampled_grads")


def score_batch(
    per_sample_grads: torch.Tensor,
    logit_grad_sq_norms: torch.Tensor,
    sampled_grads: torch.Tensor | None,
    form_sum: Callable[[float], ngdref.QuadraticForm],
    *,
    protocol: str,
    factor: float,
    dedup_threshold: float | None,
    num_samples: int,
    sf_duplicates: str = "drop",
    damping_scale: str = "absolute",
    dedup_zero_rows: str = "drop",
) -> BatchScorer:
    r"""A :class:`BatchScorer` from sum-convention quantities (module docstring's table).

    Parameters
    ----------
    per_sample_grads, logit_grad_sq_norms, sampled_grads
        G (M, P), s (M,), G_hat (K M, P) in the sum convention (R = 1).
    form_sum : callable
        ``form_sum(R)`` -> the Fisher's quadratic form with factor R over all M samples.
    protocol : {"ngdref", "authors"}
    factor : float
        R.
    dedup_threshold : float or None
        The true rows' all-pairs filter threshold (None: off).
    num_samples : int
        K.
    sf_duplicates : {"drop", "merge"}
        "authors" only, see :func:`authors_sf_rows`.
    damping_scale : {"absolute", "sampled_max"}
        "absolute": each damping as given. "sampled_max": every method's damping lambda
        (EF, iEF, SF and the K-FAC family alike) is read relative to the batch's sampled
        rows, :math:`\lambda \max_k \|R \hat g_k\|^2` over SF's rows as kept here (the
        largest diagonal entry of their Gram matrix), as the authors' evaluator reads a
        negative damping. Needs ``sampled_grads``.
    dedup_zero_rows : {"drop", "keep"}
        Whether the true rows' duplicate filter drops all-zero rows (the authors' keeps them;
        :func:`ngdref.near_duplicate_mask`).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if damping_scale not in DAMPING_SCALES:
        raise ValueError(f"damping_scale must be one of {DAMPING_SCALES}, got {damping_scale!r}")
    if damping_scale == "sampled_max" and sampled_grads is None:
        raise ValueError("damping_scale='sampled_max' needs the sampled gradients")
    r = float(factor)
    rows, s = r * per_sample_grads, (r * r) * logit_grad_sq_norms
    solver = ngdref.DampedGram(
        rows, dedup_threshold=dedup_threshold, dedup_rule="all_pairs",
        dedup_zero_rows=dedup_zero_rows, rows_name="per_sample_grads",
    )
    kept = solver.kept if protocol == "authors" else None
    grad = rows.sum(dim=0) if kept is None else rows[kept].sum(dim=0)
    stats = {  # +inf when a row in the denominator is zero (a sample fitted exactly)
        k: ngdref.grad_norm_imbalance(rows, statistic=k, kept=kept, zero_rows="inf")
        for k in IMBALANCE_STATISTICS
    }
    sampled = None
    if sampled_grads is not None:
        if protocol == "authors":
            sampled, num_samples = _authors_sampled(r * sampled_grads, sf_duplicates), 1
        else:
            sampled = ngdref.DampedGram(r * sampled_grads, rows_name="sampled_grads")
    scale = 1.0
    if damping_scale == "sampled_max":
        scale = float(sampled.gram.diagonal().max())
    return BatchScorer(
        solver, s, grad, sampled, form_sum(r), num_samples, stats, int(solver.kept.sum()), r,
        scale=scale,
    )


# ---- batches, keys and the per-batch problem ----------------------------------------------
def batch_rows(seed: int, index: int, num_train: int, batch_size: int) -> np.ndarray:
    """Training rows of evaluation batch ``index``: M distinct rows, fixed by (seed, index).

    ``numpy.random.default_rng([seed, index]).choice(num_train, batch_size, replace=False)``;
    independent of the checkpoint, so every checkpoint sees the same batches.
    """
    rng = np.random.default_rng([seed, index])
    return rng.choice(num_train, size=batch_size, replace=False)


def sf_key(seed: int, step: int, index: int) -> int:
    """Integer key of SF's sampled labels on batch ``index`` of the checkpoint at ``step``.

    ``numpy.random.SeedSequence([seed, step, index])``'s first 64-bit word; passed to
    :meth:`ngdref.LogitLoss.sample` (Python's Mersenne Twister draws the uniforms).
    """
    state = np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)
    return int(state[0])


def first_label_token(output: Any) -> torch.Tensor:
    """T5 logits of the first label position only: ``output.logits[:, 0]``, (N, V)."""
    from backends.torch.provider import default_output_fn

    return default_output_fn(output)[:, 0]


@dataclass(frozen=True)
class EvaluationProblem:
    """The model on one evaluation batch, as the framework scores it.

    Attributes
    ----------
    provider : backends.TorchProvider
        The model (eval mode) on the batch; ``chunk_size`` = the micro-batch.
    loss : ngdref.LogitLoss
        The per-sample loss: softmax CE (T5: over the vocabulary at the first label position).
    targets : torch.Tensor, shape (M,)
        Class labels (T5: the first label tokens).
    factor : float
        R, the reduction factor of every per-sample quantity.
    """

    provider: TorchProvider
    loss: ngdref.LogitLoss
    targets: torch.Tensor
    factor: float


def evaluation_inputs(
    setup: Setup, batch: Batch
) -> tuple[dict[str, Any], ngdref.LogitLoss, torch.Tensor, Callable[[Any], torch.Tensor] | None]:
    """(inputs, loss, targets, output_fn) of a batch under the evaluator's conventions.

    Float inputs are cast to the model's dtype; T5: the first label position only (see
    :func:`evaluation_problem`).

    Raises
    ------
    EvaluationError
        If a T5 sample's first label position is padding (-100).
    """
    from validation.experiments.train.runner import IGNORE_INDEX

    if isinstance(setup.loss, ngdref.SequenceSoftmaxCrossEntropy):
        targets = batch.targets[:, 0]
        if bool((targets == IGNORE_INDEX).any()):
            raise EvaluationError(
                "batch: a sample's first label token is padding (-100); the evaluator scores "
                "the first label token of every sample"
            )
        loss: ngdref.LogitLoss = ngdref.SoftmaxCrossEntropy()
        output_fn: Callable[[Any], torch.Tensor] | None = first_label_token
    else:
        targets, loss, output_fn = batch.targets, setup.loss, setup.output_fn
    dtype = next(p for _, p in setup.trainable).dtype
    inputs = {  # float inputs follow the model (a float64 evaluation of a float32 run)
        k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.inputs.items()
    }
    return inputs, loss, targets, output_fn


def evaluation_problem(
    setup: Setup, batch: Batch, *, micro_batch: int | None = 40, reduction: str | float = "mean"
) -> EvaluationProblem:
    r"""The provider, loss, targets and R of one batch under the evaluator's conventions.

    For a T5 setup (sequence loss) only the first label position is kept:

    .. math:: l_n = -\log \mathrm{softmax}(z_{n,0})[y_{n,0}]

    with :math:`z_{n,0}` the teacher-forced logits of the first label position; other setups
    use their own loss and logits.

    Parameters
    ----------
    setup : Setup
        From :func:`validation.experiments.train.runner.build_setup`, parameters loaded.
    batch : Batch
        E.g. ``setup.train.make(rows)`` (no generator: no augmentation).
    micro_batch : int, optional
        Samples per forward/backward pass (memory bound; the results do not depend on it).
    reduction : {"mean", "sum"} or float
        R = 1/M, 1 or the given factor.

    Raises
    ------
    EvaluationError
        If a T5 sample's first label position is padding (-100).
    """
    from backends.torch.provider import TorchProvider

    inputs, loss, targets, output_fn = evaluation_inputs(setup, batch)
    provider = TorchProvider(
        setup.model,
        inputs,
        output_fn=output_fn,
        chunk_size=micro_batch,
        per_sample=setup.config["train"]["per_sample"],
    )
    factor = ngdref.reduction_factor(reduction, batch.size)
    return EvaluationProblem(provider, loss, targets, factor)


def batch_scorer(
    setup: Setup,
    rows: np.ndarray,
    *,
    key: int,
    settings: Mapping[str, Any],
    with_sf: bool,
    kfac_methods: tuple[str, ...] = (),
) -> BatchScorer:
    """The batch's sum-convention quantities, scored under ``settings["protocol"]``.

    ``kfac_methods``: also the batch's K-FAC curvatures of these methods
    (:func:`validation.experiments.evaluate.kfac.batch_kfac_curvature`, KFAC's labels from
    ``key``).
    """
    protocol = settings["protocol"]
    batch = setup.train.make(rows)
    problem = evaluation_problem(
        setup, batch, micro_batch=settings["micro_batch"], reduction="sum"
    )
    p, loss, y = problem.provider, problem.loss, problem.targets
    k = settings["num_samples"]
    q = ngdref.batch_quantities(p, loss, y, reduction="sum")
    sampled = ngdref.sampled_grads(p, loss, y, key, num_samples=k) if with_sf else None
    if protocol == "authors":
        factor = 1.0 / settings["micro_batch"]
    else:
        factor = ngdref.reduction_factor(settings["reduction"], len(rows))

    def form(r: float) -> ngdref.QuadraticForm:
        return ngdref.fisher_quadratic_form(p, loss, y, reduction=r)

    scorer = score_batch(
        q.per_sample_grads, q.logit_grad_sq_norms, sampled, form, protocol=protocol,
        factor=factor, dedup_threshold=settings["dedup_threshold"], num_samples=k,
        sf_duplicates=settings.get("sf_duplicates", "drop"),
        damping_scale=settings.get("damping_scale", "absolute"),
        dedup_zero_rows=settings.get("dedup_zero_rows", "drop"),
    )
    if kfac_methods:
        from validation.experiments.evaluate.kfac import batch_kfac_curvature

        inputs, kfac_loss, targets, output_fn = evaluation_inputs(setup, batch)
        scorer.kfac = batch_kfac_curvature(
            setup.model, inputs, kfac_loss, targets, kfac_methods, output_fn=output_fn, key=key,
            micro_batch=settings["micro_batch"],
        )
    return scorer


def with_context(exc: Exception, where: str) -> Exception:
    """The same exception type with ``where`` prefixed (callers catch by type)."""
    try:
        return type(exc)(f"{where}: {exc}")
    except TypeError:  # a type whose constructor takes other arguments
        return RuntimeError(f"{where}: {type(exc).__name__}: {exc}")
