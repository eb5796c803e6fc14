r"""The paper's evaluation framework (Wu et al. 2024, Sec. 6 and App. F;
:ref:`conv-evaluation`).

For every epoch checkpoint of a baseline run (``epoch-0`` = the initial model, then each epoch
end), B random batches of M training samples (no augmentation; the same rows for every
checkpoint) are drawn. On each batch the SGD, EF, iEF and SF updates are computed from the same
per-sample gradients, and each is scored with the approximation-quality indicator (Eq. 15)

.. math::
    \gamma(d) = \frac{\sqrt{d^\top F d}}{|d^\top g|}, \qquad
    F = R \sum_n J_n^\top H_n J_n, \quad g = R \sum_n \nabla_\theta l_n

where F and g come from the SAME batch (F by the matrix-free
:func:`ngdref.fisher_quadratic_form`, no matrix is formed). Reported per checkpoint: the mean
and std over the B batches of gamma_EF/gamma_SGD, gamma_iEF/gamma_SGD, gamma_SF/gamma_iEF and
gamma_SF/gamma_EF (both, as the paper's caption is ambiguous), of the gradient-norm imbalance under
two statistics (``max_min``: max_n ||grad l_n|| / min_n ||grad l_n||, printed by the authors'
evaluator; ``tail_10``: mean of the largest tenth over the mean of the smallest tenth, logged
by their optimiser) and of the rows kept by the duplicate filter. Ratios below 1 mean "better
than SGD" (or than the denominator's method).

Two protocols (:mod:`validation.experiments.evaluate.protocols` has the table): ``"ngdref"`` (R =
1/M, a damping per method, the duplicate filter inside the EF and iEF solves) and ``"authors"``
(their evaluator: micro-batch means of 40 concatenated unscaled, R = 1/40; one lambda for all
methods; g and the imbalance from the rows kept by their all-pairs filter at 0.95; SF's
near-duplicate sampled rows removed). Under both, SF's sampled rows are R times the
sum-convention rows, so one lambda damps EF, iEF and SF alike (:ref:`conv-sf-rows`).

Precision: the model is cast to float64 for the evaluation (``dtype``), whatever the run
trained in. gamma is a measurement; float32 per-sample gradients of a well-fitted model
underflow, which made the max/min imbalance of the float32 digits run read 4.7e15.

The updates (:ref:`conv-updates`; Gram forms, damping in sample space for EF and iEF)::

    SGD  g = G^T 1
    EF   G^T (G G^T + lambda_EF I)^{-1} 1                       (Eq. 5)
    iEF  G^T (G G^T + lambda_iEF I)^{-1} s                      (Eq. 8)
    SF   (F_SF + lambda_SF I_P)^{-1} g, one sampled label per sample (K = 1, Eq. 49)

EF and iEF drop near-duplicate per-sample gradients (``|cos| > dedup_threshold``, 0.95 as
in the authors' evaluator, keeping the larger-norm row).

The K-FAC family (App. D.2.2; ``methods`` "kfac", "ekfac", "iekfac", scored by default;
:mod:`validation.experiments.evaluate.kfac`)::

    KFAC, eKFAC, ieKFAC   (K_m + lambda_m / R^2 I)^{-1} g,  K_m block-diagonal Kronecker
                          factored in the sum convention, built per micro-batch and merged

with the same g and F; their ratios are gamma_m / gamma_iEF ("kfac/ief", "ekfac/ief",
"iekfac/ief"). Damping convention: the blocks approximate the EF-type matrix of the rows R g_n,
i.e. R^2 K_sum, so lambda (the convention of R) is lambda / R^2 in the sum convention, as for
EF, iEF and SF (:ref:`conv-damping-reduction`). (The training optimisers
:mod:`backends.torch.optim.kfac` damp R K_sum instead, lambda / R; a mean-loss optimiser's
lambda is not the evaluation's.) They cost one forward and two backward passes per micro-batch
(true and sampled labels; a per-sample gradient pass for parameters outside supported layers):
1.2x the exact methods' time on a digits MLP checkpoint.

Conventions
-----------
Reduction
    Every per-sample quantity is that of the loss ``R * sum_n l_n``. "ngdref": R = 1/M by
    default (``reduction="mean"``), the Hugging Face mean of the loss the evaluator keeps;
    for T5 the token mean over the first label tokens, 1/M; ``reduction="sum"`` or a float
    select another, and micro-batching is a memory bound only. "authors": R = 1/micro_batch.
    gamma ratios and the imbalance do not depend on R; the damping values do: lambda in the
    convention R is lambda / R^2 in the sum convention for EF, iEF and SF alike
    (:ref:`conv-damping-reduction`).
    The raw gamma values scale as R^{-1/2}.
T5: only the first label token
    As the authors' evaluator, the T5 logits are those of the first label position only
    (C = vocabulary size) and the targets are the first label tokens (the label word's first
    token; the EOS and padding are dropped): the per-sample loss is
    ``l_n = CE(logits_n[0], labels_n[0])``. Training uses label word + EOS.
Eval mode
    Every pass runs with dropout off (:class:`backends.TorchProvider` does this).
Randomness
    Batch b's rows are ``numpy.random.default_rng([seed, b]).choice(num_train, M,
    replace=False)`` (:func:`batch_rows`): the same for every checkpoint and damping. SF's
    sampled labels come from the integer key :func:`sf_key` (seed, the checkpoint's step, b),
    so they are the same in :func:`evaluate_run` and :func:`sweep_run` for one checkpoint.

Files
-----
``run_dir/evaluation.json`` (:func:`evaluate_run`)::

    {"settings": {...every argument...},
     "checkpoints": [{"name": "epoch-0", "epoch": 0, "step": 0,
                      "ratios": {"ef/sgd": {"mean": m, "std": s, "values": [B floats]},
                                 "ief/sgd": ..., "sf/ief": ..., "sf/ef": ...,
                                 "kfac/ief": ..., "ekfac/ief": ..., "iekfac/ief": ...},
                      "imbalance": {"max_min": {"mean": m, "std": s, "values": [B floats]},
                                    "tail_10": {...}},
                      "rows_kept": {"mean": m, "std": s, "values": [B floats]},
                      "gamma": {"sgd": {"mean": m, "std": s}, "ef": ..., "ief": ..., "sf": ...}},
                     ...]}

``run_dir/sweep.json`` (:func:`sweep_run`)::

    {"settings": {...},
     "checkpoints": [{"name": "epoch-0", "epoch": 0, "dampings": [D floats],
                      "ratios": {"ef/sgd": {"mean": [D floats], "std": [D floats]}, ...}}, ...]}

std is the population standard deviation (ddof = 0) over the B batches. Both files are
rewritten atomically after each checkpoint, and a rerun with the same settings skips the
checkpoints already in the file (resume). Non-finite values (a sweep's singular solve, a zero
d^T g) are written as JSON NaN / Infinity.

Command line::

    python -m validation.experiments train mlp --out runs/digits-adam   # makes the run
    python -m validation.experiments evaluate runs/digits-adam --batches 100
    python -m validation.experiments evaluate runs/digits-adam --protocol authors \
        --damping 1e-7 --checkpoints first,last
    python -m validation.experiments sweep runs/digits-adam --dampings 1e-12,1e-9,1e-6,1e-3,1
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from validation.experiments.evaluate.checkpoint import evaluate_checkpoint, sweep_checkpoint
from validation.experiments.evaluate.protocols import (
    EvaluationError,
    EvaluationProblem,
    batch_rows,
    evaluation_problem,
    first_label_token,
    sf_key,
)
from validation.experiments.evaluate.rounds import over_checkpoints
from validation.experiments.evaluate.settings import (
    DEFAULT_BATCHES,
    DEFAULT_METHODS,
    DEFAULT_SWEEP_BATCHES,
    DEFAULT_SWEEP_DAMPINGS,
    EVALUATION_FILE,
    METHODS,
    RATIOS,
    SWEEP_FILE,
    CommonOptions,
    common_settings,
    damping_value,
    resolve_checkpoints,
    resolve_damping,
    resolve_methods,
    resolve_progress,
    settings_json,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from validation.experiments.train.runner import Setup

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_METHODS",
    "DEFAULT_SWEEP_BATCHES",
    "DEFAULT_SWEEP_DAMPINGS",
    "EVALUATION_FILE",
    "METHODS",
    "RATIOS",
    "SWEEP_FILE",
    "EvaluationError",
    "EvaluationProblem",
    "batch_rows",
    "evaluate_run",
    "evaluation_problem",
    "first_label_token",
    "resolve_checkpoints",
    "sf_key",
    "sweep_run",
]


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    batches: int = DEFAULT_BATCHES,
    damping: float | Mapping[str, float] | None = None,
    methods: Iterable[str] | str = DEFAULT_METHODS,
    checkpoints: str | int | Sequence[str | int] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Unpack[CommonOptions],
) -> dict[str, Any]:
    r"""Score SGD, EF, iEF and SF with gamma (Eq. 15) at the epoch checkpoints of a run.

    For each checkpoint and each of B batches of M training rows (:func:`batch_rows`):

    .. math::
        \gamma(d) = \frac{\sqrt{d^\top F d}}{|d^\top g|}, \quad
        d \in \{g,\; G^\top(GG^\top + \lambda_{EF} I)^{-1} 1,\;
        G^\top(GG^\top + \lambda_{iEF} I)^{-1} s,\; (F_{SF} + \lambda_{SF} I)^{-1} g\}

    with G, s, g, F and F_SF all from that batch, R-scaled as the protocol says
    (:mod:`validation.experiments.evaluate.protocols`). Writes ``run_dir/evaluation.json`` after
    each checkpoint (atomically) and skips the checkpoints it already holds when rerun with the
    same settings. ``protocol``, ``batch_size``, ``micro_batch``, ``seed``, ``dedup_threshold``,
    ``reduction``, ``num_samples``, ``dtype``, ``sf_duplicates``, ``damping_scale``,
    ``dedup_zero_rows`` and ``device`` are the keywords shared with :func:`sweep_run`
    (``**options``, :class:`~validation.experiments.evaluate.settings.CommonOptions`).

    Parameters
    ----------
    run_dir : path
        A run directory of the training runner (``config.json``, ``checkpoints/epoch-K.pt``).
    protocol : {"ngdref", "authors"}
        "ngdref": R = 1/M, a damping per method, the duplicate filter inside the EF / iEF
        solves. "authors": the authors' evaluator (R = 1/micro_batch, one lambda, g and the
        imbalance from the rows kept by their all-pairs filter, SF's near-duplicate sampled
        rows removed).
    batches : int
        B, batches per checkpoint (the paper: 100; default :data:`DEFAULT_BATCHES`).
    batch_size : int
        M, training rows per batch (the paper: 160); at most the training split's size.
    micro_batch : int
        Samples per forward/backward pass (the authors: 40). Under "ngdref" a memory bound
        only; under "authors" also R = 1/micro_batch, and M must be a multiple of it.
    seed : int >= 0
        Fixes the batches (the same for every checkpoint) and SF's sampled labels.
    damping : float or dict, optional
        lambda (the convention of R): a number for every damped method, or
        ``{"ef": .., "ief": .., "sf": .., "kfac": .., ...}`` (missing keys take the defaults;
        "authors" refuses different values). Defaults (:mod:`.settings`):
        ``DEFAULT_DAMPING`` ("ngdref"), ``AUTHORS_DAMPING`` for all ("authors").
    dedup_threshold : float or None
        Rows with ``|cos| >`` this to a larger-norm row are dropped (0.95 by default, the
        authors' evaluator); None keeps all.
    methods : iterable of str
        Subset of ("sgd", "ef", "ief", "sf", "kfac", "ekfac", "iekfac") (default all); only
        the ratios whose two methods are present are reported.
    checkpoints : optional
        See :func:`resolve_checkpoints` (default: every epoch checkpoint).
    reduction : {"mean", "sum"} or float, optional
        R under "ngdref" (default "mean", 1/M); must be unset under "authors".
    num_samples : int
        K, sampled labels per sample for SF (the paper: 1).
    dtype : {"float64", "float32"}
        The model is cast to this for the evaluation (default float64: gamma is a
        measurement, and float32 per-sample gradients underflow late in training).
    sf_duplicates : {"drop", "merge"}
        "authors" only: SF's near-duplicate sampled rows dropped (what the released code
        computes) or merged (what it was written to do); see the protocols module.
    damping_scale : {"absolute", "sampled_max"}
        "sampled_max": every damping (EF, iEF, SF, the K-FAC family) is lambda times the
        largest squared norm of the batch's SF rows as the protocol keeps them, the
        authors' evaluator's reading of a negative damping (their ``damping < 0``); SF's
        rows are then computed even when "sf" is not among ``methods``. Default "absolute".
    dedup_zero_rows : {"drop", "keep"}
        Whether the true rows' duplicate filter drops all-zero rows (default "drop"); the
        authors' keeps them, which changes ``rows_kept`` and makes the max/min imbalance
        +inf.
    device : str or torch.device, optional
        Where the model runs ("cpu", "cuda", "auto").
    overwrite : bool
        Start afresh even if ``evaluation.json`` exists (otherwise its settings must match).
    progress : bool, optional
        A tqdm bar over batches and a line per checkpoint on stderr (default: when stderr
        is a terminal, as ``train``).

    Returns
    -------
    dict
        The content of ``evaluation.json`` (module docstring).

    Raises
    ------
    EvaluationError
        Bad arguments (the message names them), a run without epoch checkpoints, an unknown
        checkpoint, ``batch_size`` larger than the training split, or an ``evaluation.json``
        written with other settings.
    FileNotFoundError
        ``run_dir`` has no ``config.json``.
    ngdref.SingularMatrixError
        A damped system is singular (e.g. SF with damping 0); the message names the batch.
    """
    settings = common_settings(batches=batches, **options)
    settings["damping"] = resolve_damping(damping, settings["protocol"])
    settings["methods"] = list(resolve_methods(methods))
    settings = settings_json(settings)

    def process(setup: Setup, info: Any, advance: Callable[[], None]) -> tuple[dict, str]:
        entry = evaluate_checkpoint(setup, info, settings, advance)
        summary = "  ".join(
            f"{name} {r['mean']:.3g}±{r['std']:.2g}" for name, r in entry["ratios"].items()
        )
        imb = "  ".join(
            f"imbalance {k} {v['mean']:.3g}" for k, v in entry["imbalance"].items()
        )
        return entry, f"{summary}  {imb}  [{settings['batches']} batches"

    return over_checkpoints(
        "evaluate", run_dir, checkpoints, settings, EVALUATION_FILE, overwrite,
        resolve_progress(progress), process,
    )


def sweep_run(
    run_dir: str | os.PathLike[str],
    *,
    dampings: Sequence[float] = DEFAULT_SWEEP_DAMPINGS,
    batches: int = DEFAULT_SWEEP_BATCHES,
    checkpoints: str | int | Sequence[str | int] | None = "first,middle,last",
    overwrite: bool = False,
    progress: bool | None = None,
    **options: Unpack[CommonOptions],
) -> dict[str, Any]:
    r"""The ratios of :func:`evaluate_run` over a damping grid (one lambda for every method).

    For every lambda in ``dampings`` and each batch:

    .. math::
        \frac{\gamma(d_{EF}(\lambda))}{\gamma(g)},\;
        \frac{\gamma(d_{iEF}(\lambda))}{\gamma(g)},\;
        \frac{\gamma(d_{SF}(\lambda))}{\gamma(d_{iEF}(\lambda))},\;
        \frac{\gamma(d_{SF}(\lambda))}{\gamma(d_{EF}(\lambda))}

    and gamma_m / gamma_iEF of the K-FAC family (m = KFAC, eKFAC, ieKFAC), whose factors are
    formed once per batch and whose damping is converted as in :func:`evaluate_run`.
    G, s, g, the sampled gradients and the Fisher's quadratic form are computed once per
    batch, and so are G G^T (one :class:`ngdref.DampedGram`) and the sampled Gram matrix;
    each lambda costs one M x M Cholesky factorisation per Gram matrix, the solves and one
    Jacobian-vector product per method. At a lambda of the
    grid the numbers equal :func:`evaluate_run`'s with ``damping=lambda`` (same protocol,
    batches and SF draws). A singular solve gives NaN for that batch and lambda (counted in
    the progress line) instead of stopping the sweep. Writes ``run_dir/sweep.json`` (module
    docstring) after each checkpoint; reruns with the same settings skip the checkpoints
    already there.

    Parameters
    ----------
    run_dir : path
    dampings : sequence of float >= 0
        The grid, in the convention of the protocol's R (default 1e-12, 1e-11, ..., 1e2).
    batches : int
        B per checkpoint (default :data:`DEFAULT_SWEEP_BATCHES`).
    protocol, batch_size, micro_batch, seed, dedup_threshold, reduction, num_samples, dtype,
    sf_duplicates, damping_scale, dedup_zero_rows, device, overwrite, progress
        As in :func:`evaluate_run`.
    checkpoints : optional
        Default "first,middle,last" (the first, middle and last epoch checkpoints);
        see :func:`resolve_checkpoints`.

    Returns
    -------
    dict
        The content of ``sweep.json``.

    Raises
    ------
    EvaluationError
        As :func:`evaluate_run`, and an empty or negative ``dampings``.
    """
    if isinstance(dampings, (str, bytes)) or not isinstance(dampings, Iterable):
        raise EvaluationError(f"dampings must be a sequence of numbers >= 0, got {dampings!r}")
    grid = [damping_value(f"dampings[{k}]", v) for k, v in enumerate(dampings)]
    if not grid:
        raise EvaluationError("dampings is empty: give at least one damping value")
    settings = common_settings(batches=batches, **options)
    settings = settings_json({"dampings": grid, **settings})

    def process(setup: Setup, info: Any, advance: Callable[[], None]) -> tuple[dict, str]:
        entry, singular = sweep_checkpoint(setup, info, settings, advance)
        best = []
        for name in ("ef/sgd", "ief/sgd"):
            means = np.asarray(entry["ratios"][name]["mean"])
            if np.isfinite(means).any():
                k = int(np.nanargmin(means))
                best.append(f"min {name} {means[k]:.3g} at {grid[k]:.0e}")
        note = f"{singular} singular solves -> NaN, " if singular else ""
        return entry, (
            f"{'  '.join(best)}  [{len(grid)} dampings x {settings['batches']} batches, {note}"
        ).rstrip(", ")

    return over_checkpoints(
        "sweep", run_dir, checkpoints, settings, SWEEP_FILE, overwrite,
        resolve_progress(progress), process,
    )
