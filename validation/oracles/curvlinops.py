"""curvlinops' GGN, EF and Monte Carlo Fisher products against ngdref's.

``GGNLinearOperator`` against :func:`ngdref.fisher_vp`; ``EFLinearOperator``
against G^T G V from the reference per-sample gradients (per token for
sequences, as curvlinops treats each token as a sample); the mean of
:data:`MC_RUNS` independent ``FisherMCLinearOperator`` products against F V
(sequences: with the ignored tokens kept), to the statistical tolerance of
:func:`fisher_mc_tolerance`. Conventions: the docstring of
:mod:`validation.oracles.peers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import array_api_compat
import numpy as np

import ngdref
from validation.independent.references import relative
from validation.oracles.conversions import batch_size, output_model, torch_loss, trainable
from validation.oracles.setup import (
    OracleCheck,
    OracleSetup,
    ngdref_fisher_products,
    per_token_grads,
)

__all__ = ["MC_RUNS", "MC_SAMPLES", "MC_SIGMAS", "curvlinops_checks", "fisher_mc_tolerance"]

#: Monte Carlo draws per sample of curvlinops' FisherMCLinearOperator, in all
MC_SAMPLES = 2000
#: ... split over this many independent operators (seeds 1 .. MC_RUNS), whose
#: spread gives the standard error (see :func:`fisher_mc_tolerance`)
MC_RUNS = 16
#: the tolerance is this many (estimated) standard errors
MC_SIGMAS = 5.0


def fisher_mc_tolerance(products: np.ndarray, fisher: np.ndarray) -> float:
    r"""Relative tolerance of the mean of MC_RUNS independent MC Fisher products against F V.

    ``products`` (R, P, K) are curvlinops' own products X_r, each from
    MC_SAMPLES / R draws per sample with seed r: independent and unbiased for
    F V. Their spread s^2 = sum_r ||X_r - mean||^2 / (R - 1) estimates
    E||X_r - F V||^2 without reference to ngdref (a wrong F V does not widen
    it), so the standard error of the mean is sqrt(s^2 / R). The error of the
    mean is a sum of many independent terms: its norm concentrates near one
    standard error. With R - 1 = 15 degrees of freedom, s underestimates the
    true spread by more than a factor 0.59 with probability < 1% (chi^2_15),
    so MC_SIGMAS = 5 estimated errors are at least 3 true ones; the seeds are
    fixed, so the outcome is deterministic.
    """
    r = products.shape[0]
    mean = products.mean(axis=0)
    spread = float(np.sum((products - mean) ** 2)) / (r - 1)
    return MC_SIGMAS * math.sqrt(spread / r) / float(np.linalg.norm(fisher))


def curvlinops_checks(
    setup: OracleSetup, vectors: np.ndarray, fisher: np.ndarray
) -> list[OracleCheck]:
    """GGN, EF and MC Fisher rows of ``setup``; ``fisher`` is ngdref's F ``vectors``."""
    import torch
    from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator

    spec = torch_loss(setup.loss)
    model = output_model(setup.module, spec.to_loss_input)
    params = trainable(model)
    data = [(setup.inputs, setup.targets)]
    options: dict[str, Any] = {}
    if isinstance(setup.inputs, Mapping):
        options["batch_size_fn"] = batch_size
    v = torch.from_numpy(vectors)
    tol = setup.tolerance
    checks = []

    ggn = GGNLinearOperator(model, spec.module, params, data, **options)
    product = (ggn @ v).detach().numpy() / spec.scale
    checks.append(OracleCheck("curvlinops.GGNLinearOperator", "F v vs ngdref.fisher_vp",
                              relative(product, fisher), tol))

    ef = EFLinearOperator(model, spec.module, params, data, **options)
    ef_product = (ef @ v).detach().numpy() / spec.scale**2
    per_sample_ef = ngdref.ef_matrix(setup.per_sample_grads) @ vectors
    if setup.sequence:
        reference = ngdref.ef_matrix(per_token_grads(setup)) @ vectors
        checks.append(OracleCheck(
            "curvlinops.EFLinearOperator", "per-token EF v vs ngdref.ef_matrix(per-token G)",
            relative(ef_product, reference), tol,
            note="curvlinops' EF treats each token as a sample; ngdref's per-sequence EF "
            f"differs from it by {relative(ef_product, per_sample_ef):.2g} (a different matrix)",
        ))
    else:
        checks.append(OracleCheck("curvlinops.EFLinearOperator", "EF v vs ngdref.ef_matrix(G)",
                                  relative(ef_product, per_sample_ef), tol))

    def make_mc(seed: int) -> Any:
        return FisherMCLinearOperator(
            model, spec.module, params, data, mc_samples=MC_SAMPLES // MC_RUNS, seed=seed,
            check_deterministic=False, **options,
        )

    checks.append(_mc_fisher_check(setup, vectors, fisher, make_mc, spec.scale))
    return checks


def _mc_fisher_check(
    setup: OracleSetup, vectors: np.ndarray, fisher: np.ndarray,
    make_mc: Callable[[int], Any], scale: float,
) -> OracleCheck:
    """The mean of MC_RUNS independent curvlinops MC Fisher products against F V."""
    import torch

    v = torch.from_numpy(vectors)
    products = np.stack([
        (make_mc(seed) @ v).detach().numpy() / scale for seed in range(1, MC_RUNS + 1)
    ])
    mc_product = products.mean(axis=0)
    quantity = f"F_MC v ({MC_SAMPLES} draws) vs ngdref.fisher_vp"
    note = (f"tolerance = {MC_SIGMAS:g} standard errors from the spread of {MC_RUNS} "
            "independent curvlinops operators")
    if setup.sequence:
        # curvlinops draws a label at every token, ignore_index ones included: its
        # expectation is the Fisher of the sequence with every position kept
        targets = setup.provider_targets
        xp = array_api_compat.array_namespace(targets)
        targets = xp.where(targets == setup.loss.ignore_index, xp.zeros_like(targets), targets)
        masked = fisher
        fisher = ngdref_fisher_products(setup, vectors, targets)
        quantity += " (ignored tokens kept)"
        note += (
            "; curvlinops samples labels at ignore_index tokens too, so it is compared with "
            "the Fisher of all positions; the masked sequence Fisher differs from it by "
            f"{relative(mc_product, masked):.2g}"
        )
    return OracleCheck(
        "curvlinops.FisherMCLinearOperator", quantity, relative(mc_product, fisher),
        fisher_mc_tolerance(products, fisher), note=note,
    )
