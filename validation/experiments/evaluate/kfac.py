r"""The K-FAC family (KFAC, eKFAC, ieKFAC; App. D.2.2) in the evaluation framework.

On each evaluation batch the K-FAC curvature of the M samples is built per micro-batch
(:func:`backends.torch.kfac.curvature.kfac_curvature`, sum convention, ``normalisation="mean"``,
``convention="expand"``, separate bias blocks, KFAC's B from one sampled label per sample)
and combined with :func:`backends.torch.kfac.curvature.merge_curvatures`, which is exact: the result
does not depend on the micro-batch size except through KFAC's label draws (micro-batch i draws with
the key ``SeedSequence([key, i])``). No eigenvalue correction: corrected curvatures cannot be
merged. The update of method m is

.. math:: d_m = (K_m + \lambda / R^2\, I)^{-1} g

with the batch's g (the same g as SGD, EF, iEF and SF: R times the sum of all rows, or of the
kept rows under the authors' protocol) and lambda in the convention of R, converted as for EF,
iEF and SF (:ref:`conv-damping-reduction`: the blocks approximate the EF-type matrix of the
rows R g_n, R^2 K_sum).
gamma uses the same Fisher quadratic form as the other methods
(:meth:`validation.experiments.evaluate.protocols.BatchScorer.update`).

The paper's claim (App. D.2.2): "ieKFAC has a similar approximation quality to the exact iEF
method, and a much better approximation quality than both KFAC and eKFAC in most training
stages". :func:`kfac_claim` tests it on an ``evaluation.json``; :func:`plot_kfac_ratios`
draws gamma_m / gamma_iEF over the checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ngdref.kfac import KFAC_METHODS

if TYPE_CHECKING:
    import torch

    import ngdref
    from backends.torch.kfac.curvature import KFACCurvature

__all__ = [
    "KFAC_RATIOS",
    "SIMILAR",
    "batch_kfac_curvature",
    "kfac_claim",
    "plot_kfac_ratios",
]

#: ratio name -> (numerator, denominator): the K-FAC family against exact iEF
KFAC_RATIOS: dict[str, tuple[str, str]] = {f"{m}/ief": (m, "ief") for m in KFAC_METHODS}
#: "similar" in the claim: gamma_ieKFAC / gamma_iEF within a factor of 2 of 1 (an ngdref
#: choice: the paper gives no number); "much better": gamma_m / gamma_ieKFAC >= 2
SIMILAR = 2.0


def _key(key: int, index: int) -> int:
    return int(np.random.SeedSequence([key, index]).generate_state(1, np.uint64)[0])


def batch_kfac_curvature(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    loss: ngdref.LogitLoss,
    targets: torch.Tensor,
    methods: Sequence[str],
    *,
    output_fn: Callable[[Any], torch.Tensor] | None,
    key: int,
    micro_batch: int | None,
) -> KFACCurvature:
    """The K-FAC curvature (sum convention) of one evaluation batch, merged over micro-batches.

    Parameters
    ----------
    model : torch.nn.Module
        The setup's model, parameters loaded (in the evaluation's dtype).
    inputs, loss, targets, output_fn
        The evaluation batch (M samples) under the evaluator's conventions
        (:func:`~validation.experiments.evaluate.protocols.evaluation_inputs`).
    methods : subset of ("kfac", "ekfac", "iekfac")
    key : int
        KFAC's label draws (micro-batch i: ``SeedSequence([key, i])``'s first word).
    micro_batch : int or None
        Samples per pass (None: all M in one).
    """
    from backends.torch.kfac.curvature import kfac_curvature, merge_curvatures

    size = int(targets.shape[0])
    step = size if micro_batch is None else int(micro_batch)
    parts = []
    for i, start in enumerate(range(0, size, step)):
        sl = slice(start, start + step)
        chunk = {k: v[sl] if hasattr(v, "shape") else v for k, v in inputs.items()}
        parts.append(kfac_curvature(
            model, loss, chunk, targets[sl], methods=tuple(methods), key=_key(key, i),
            output_fn=output_fn,
        ))
    return parts[0] if len(parts) == 1 else merge_curvatures(parts)


def _series(evaluation: dict[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    rows = [c["ratios"].get(name, {}) for c in evaluation["checkpoints"]]
    return (np.array([r.get("mean", np.nan) for r in rows], dtype=float),
            np.array([r.get("std", np.nan) for r in rows], dtype=float))


def kfac_claim(evaluation: dict[str, Any]) -> tuple[bool | None, str]:
    """Whether "ieKFAC ~ iEF, much better than KFAC and eKFAC" held on most checkpoints.

    Per checkpoint (means over the batches): ieKFAC ~ iEF when 1/SIMILAR <= gamma_ieKFAC /
    gamma_iEF <= SIMILAR; much better than m when gamma_m / gamma_ieKFAC >= SIMILAR. Held when
    both hold at more than half of the checkpoints. None when the ratios are missing.
    """
    ie, _ = _series(evaluation, "iekfac/ief")
    k, _ = _series(evaluation, "kfac/ief")
    e, _ = _series(evaluation, "ekfac/ief")
    if not ie.size or np.isnan(ie).all():
        return None, "no K-FAC gamma in the evaluation"
    similar = (ie >= 1 / SIMILAR) & (ie <= SIMILAR)
    better = (k / ie >= SIMILAR) & (e / ie >= SIMILAR)
    n = ie.size
    held = bool(similar.sum() > n / 2 and better.sum() > n / 2)
    text = (
        f"gamma_ieKFAC/gamma_iEF within [1/{SIMILAR:g}, {SIMILAR:g}] at {int(similar.sum())} of "
        f"{n} checkpoints (range {np.nanmin(ie):.3g} to {np.nanmax(ie):.3g}); KFAC and eKFAC "
        f">= {SIMILAR:g}x worse than ieKFAC at {int(better.sum())} of {n} (gamma_KFAC/gamma_iEF "
        f"{np.nanmin(k):.3g} to {np.nanmax(k):.3g}, gamma_eKFAC/gamma_iEF {np.nanmin(e):.3g} "
        f"to {np.nanmax(e):.3g})"
    )
    return held, text


def plot_kfac_ratios(
    evaluation: str | Path, out: str | Path, *, title: str | None = None
) -> list[Path]:
    """gamma_KFAC, gamma_eKFAC, gamma_ieKFAC over gamma_iEF at every checkpoint (log scale).

    As the paper's App. D.2.2 figure: the mean over the batches, error bars the std (clipped
    as :func:`validation.experiments.figures.plots.plot_gamma_ratios`), 1 marked (iEF's quality).
    Returns the written files (``out`` + .png / .pdf).
    """
    from validation.experiments.figures.plots import _figure, _log_yerr, _save, read_json

    data = read_json(evaluation)
    x = np.array([float(c["epoch"]) for c in data["checkpoints"]])
    fig, axes = _figure(1, width=5.0, height=3.6)
    ax = axes[0][0]
    styles = {"kfac/ief": ("tab:blue", "KFAC"), "ekfac/ief": ("tab:red", "eKFAC"),
              "iekfac/ief": ("tab:green", "ieKFAC")}
    for name, (color, label) in styles.items():
        mean, std = _series(data, name)
        if np.isnan(mean).all():
            continue
        ax.errorbar(x, mean, yerr=_log_yerr(mean, std), fmt="o-", ms=3.5, capsize=2.5,
                    color=color, label=rf"$\gamma_{{{label}}}/\gamma_{{iEF}}$")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint (epoch)")
    ax.set_ylabel("gamma ratio to exact iEF (mean +- std)")
    ax.legend(fontsize=8)
    return _save(fig, out, title)
