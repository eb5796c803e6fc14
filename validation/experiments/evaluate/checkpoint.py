r"""One checkpoint's scores: B batches, the updates of each method, gamma and its ratios.

For batch b of the checkpoint (rows :func:`~validation.experiments.evaluate.protocols.batch_rows`,
SF's labels from :func:`~validation.experiments.evaluate.protocols.sf_key`), one
:func:`~validation.experiments.evaluate.protocols.batch_scorer` forms G, s, g, the sampled gradients
and the Fisher's quadratic form once, and every method's update d is scored with

.. math::
    \gamma(d) = \frac{\sqrt{d^\top F d}}{|d^\top g|}.

:func:`evaluate_checkpoint` does it at one damping per method (an ``evaluation.json`` entry),
:func:`sweep_checkpoint` over a damping grid (a ``sweep.json`` entry); the file formats are in
:mod:`validation.experiments.evaluate.framework`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

import ngdref
from ngdref.kfac import KFAC_METHODS
from validation.experiments.evaluate.protocols import (
    IMBALANCE_STATISTICS,
    batch_rows,
    batch_scorer,
    sf_key,
    with_context,
)
from validation.experiments.evaluate.settings import RATIOS, summarize

if TYPE_CHECKING:
    from validation.experiments.train.runner import CheckpointInfo, Setup

__all__ = ["evaluate_checkpoint", "sweep_checkpoint"]


def evaluate_checkpoint(
    setup: Setup,
    info: CheckpointInfo,
    settings: Mapping[str, Any],
    advance: Callable[[], None],
) -> dict[str, Any]:
    """The ``evaluation.json`` entry of one checkpoint (its model already loaded in ``setup``).

    gamma of every method in ``settings["methods"]`` at ``settings["damping"]`` on each of the
    B batches; the ratios, the imbalance statistics and the rows kept summarised over them.
    ``advance()`` is called after each batch.
    """
    methods = tuple(settings["methods"])
    damping = settings["damping"]
    gammas: dict[str, list[float]] = {m: [] for m in methods}
    imbalance: dict[str, list[float]] = {k: [] for k in IMBALANCE_STATISTICS}
    kept: list[float] = []
    seed = settings["seed"]
    for b in range(settings["batches"]):
        rows = batch_rows(seed, b, len(setup.train), settings["batch_size"])
        try:
            state = batch_scorer(
                setup, rows, key=sf_key(seed, info.step, b), settings=settings,
                with_sf="sf" in methods or settings.get("damping_scale") == "sampled_max",
                kfac_methods=tuple(m for m in methods if m in KFAC_METHODS),
            )
            for method in methods:
                update = state.update(method, damping.get(method, 0.0))
                gammas[method].append(state.gamma(update))
        except (ngdref.SingularMatrixError, ngdref.NonFiniteError, ValueError) as exc:
            raise with_context(exc, f"checkpoint {info.name}, batch {b}") from exc
        for k in IMBALANCE_STATISTICS:
            imbalance[k].append(state.imbalance[k])
        kept.append(state.kept)
        advance()
    with np.errstate(divide="ignore", invalid="ignore"):  # gamma 0 or inf: inf, NaN
        ratios = {
            name: summarize(np.asarray(gammas[num]) / np.asarray(gammas[den]))
            for name, (num, den) in RATIOS.items()
            if num in methods and den in methods
        }
    return {
        "name": info.name,
        "epoch": info.epoch,
        "step": info.step,
        "ratios": ratios,
        "imbalance": {k: summarize(v) for k, v in imbalance.items()},
        "rows_kept": summarize(kept),
        "gamma": {
            m: {k: v for k, v in summarize(gammas[m]).items() if k != "values"} for m in methods
        },
    }


def sweep_checkpoint(
    setup: Setup,
    info: CheckpointInfo,
    settings: Mapping[str, Any],
    advance: Callable[[], None],
) -> tuple[dict[str, Any], int]:
    """The ``sweep.json`` entry of one checkpoint and its count of singular solves.

    Every ratio at every lambda of ``settings["dampings"]`` on each of the B batches (a
    singular solve gives NaN for that batch and lambda), then mean and std over the batches.
    ``advance()`` is called after each batch.
    """
    dampings, batches, seed = settings["dampings"], settings["batches"], settings["seed"]
    values = {name: np.full((len(dampings), batches), np.nan) for name in RATIOS}
    singular = 0
    for b in range(batches):
        rows = batch_rows(seed, b, len(setup.train), settings["batch_size"])
        try:
            state = batch_scorer(
                setup, rows, key=sf_key(seed, info.step, b), settings=settings, with_sf=True,
                kfac_methods=KFAC_METHODS,
            )
        except (ngdref.NonFiniteError, ValueError) as exc:
            raise with_context(exc, f"checkpoint {info.name}, batch {b}") from exc
        gamma_sgd = state.gamma(state.grad)
        for k, lam in enumerate(dampings):
            gamma: dict[str, float] = {"sgd": gamma_sgd}
            for method in ("ef", "ief", "sf", *KFAC_METHODS):
                try:  # the batch's Gram matrices and K-FAC factors are formed once
                    gamma[method] = state.gamma(state.update(method, lam))
                except ngdref.SingularMatrixError:
                    gamma[method] = math.nan
                    singular += 1
            with np.errstate(divide="ignore", invalid="ignore"):  # gamma 0 or inf: inf, NaN
                for name, (num, den) in RATIOS.items():
                    values[name][k, b] = np.float64(gamma[num]) / gamma[den]
        advance()
    with np.errstate(invalid="ignore"):
        ratios = {
            name: {
                "mean": [float(x) for x in np.mean(v, axis=1)],
                "std": [float(x) for x in np.std(v, axis=1)],
            }
            for name, v in values.items()
        }
    entry = {"name": info.name, "epoch": info.epoch, "dampings": list(dampings), "ratios": ratios}
    return entry, singular
