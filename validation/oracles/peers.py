r"""Independent oracles: peer libraries that nobody here wrote, against ngdref's products.

For a model on one batch, with random vectors V (P, 3):

=======================================  ==========================================================
oracle quantity                          compared with
=======================================  ==========================================================
``curvlinops.GGNLinearOperator``         :func:`ngdref.fisher_vp` (F = sum_n J_n^T H_n J_n)
``curvlinops.EFLinearOperator``          G^T G V from the reference per-sample gradients
                                         (:func:`ngdref.ef_matrix`); per token for sequences
``curvlinops.FisherMCLinearOperator``    :func:`ngdref.fisher_vp`, to Monte Carlo accuracy
                                         (sequences: with the ignored tokens kept)
``backpack.BatchGrad``                   the reference per-sample gradients G
``backpack.ggn_vector_product``          :func:`ngdref.fisher_vp`
``backpack.SqrtGGNExact``                :func:`ngdref.fisher_vp` (as V_bp^T (V_bp v))
=======================================  ==========================================================

Conventions bridged here (all of ngdref is in the paper's sum convention):

- every torch loss is built with ``reduction="sum"``, so neither library
  divides by N (curvlinops' ``_get_normalization_factor`` is 1 and its EF and
  MC-Fisher pseudo-losses use reduction factor 1);
- ``torch.nn.MSELoss(reduction="sum")`` is ``sum ||z - y||^2``, twice ngdref's
  ``0.5 ||z - y||^2``: its gradients are 2x, its GGN and MC Fisher 2x and its
  EF 4x ngdref's, and those factors are divided out explicitly;
- sequence losses (``ngdref.SequenceSoftmaxCrossEntropy``, T5): the logits
  (N, T*V) are viewed as (N, V, T) for ``CrossEntropyLoss(ignore_index=-100)``.
  The GGN is the same matrix (the per-sequence loss Hessian is block diagonal
  over tokens). curvlinops' EF flattens the tokens into the batch axis and so
  treats each token as a sample: it is sum_{n,t} g_nt g_nt^T with
  g_nt = J_nt^T e_nt the gradient of token t's loss alone, not ngdref's
  per-sequence EF sum_n (sum_t g_nt)(sum_t g_nt)^T. We reconstruct that
  per-token EF from ngdref quantities (one provider VJP per label position with
  the logit gradient restricted to that position) and compare it; the
  per-sequence EF's difference is reported as a note. curvlinops' MC sampler
  draws a label at every token, including ``ignore_index`` ones (its GGN and
  EF do respect the mask), so its MC Fisher estimates the Fisher with every
  position kept: it is compared with that (ngdref's Fisher with the ignored
  targets replaced by a valid id), and the masked Fisher's difference is a note.
- BackPACK runs on the models it supports (``nn.Linear``, ``nn.Conv2d``,
  ``nn.Tanh``, ``nn.Flatten`` stacks; not transformers), on a deep copy of the
  model (``extend`` installs hooks for good). ``SqrtGGNExact`` needs the loss
  module applied to the model output itself, so it is skipped for sequences.

Tolerances (relative Frobenius differences, one place:
:data:`validation.oracles.setup.TOLERANCES`):
products only, no solves, so float64 models agree to rounding, a few eps
times sqrt(N*C*P) terms, < 1e-12: 1e-10 leaves a margin. Hugging Face models
compute parts of their forward in float32 (T5LayerNorm's variance, ViT's
eager softmax), so any two routes through them differ by float32 rounding,
eps_32 = 1.2e-7 relative, amplified by the products: 1e-5. The MC Fisher's
tolerance is statistical, from the spread of curvlinops' own independent
estimates (not from ngdref's sampled gradients), see
:func:`validation.oracles.curvlinops.fisher_mc_tolerance`.

Modules: :mod:`validation.oracles.setup` (the check row, the setup, ngdref's
side), :mod:`validation.oracles.conversions` (the torch losses and models),
:mod:`validation.oracles.curvlinops` and :mod:`validation.oracles.backpack`
(the two libraries' checks); this one runs them.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable

from validation.independent.references import error_message
from validation.oracles.backpack import backpack_checks
from validation.oracles.curvlinops import curvlinops_checks
from validation.oracles.setup import (
    OracleCheck,
    OracleSetup,
    ngdref_fisher_products,
    random_vectors,
)

__all__ = ["oracle_checks", "oracles_skipped", "unavailable"]


def unavailable(library: str) -> str:
    """Why ``library`` ("curvlinops" or "backpack") cannot be imported ('' when it can)."""
    try:
        importlib.import_module(library)
        if library == "backpack":
            importlib.import_module("backpack.extensions")
    except Exception as err:  # an oracle's own missing dependency shows up here too
        return f"{library} is not importable ({type(err).__name__}: {err})"
    return ""


def oracle_checks(setup: OracleSetup) -> list[OracleCheck]:
    """Every applicable oracle on ``setup`` (skipped rows say why the others do not run).

    Parameters
    ----------
    setup : OracleSetup

    Returns
    -------
    list of OracleCheck
    """
    vectors = random_vectors(setup.per_sample_grads.shape[1])
    try:
        fisher = ngdref_fisher_products(setup, vectors)
    except Exception as err:  # the ngdref side failed: every comparison fails
        return [OracleCheck("ngdref.fisher_vp", "F v", math.nan, math.nan,
                            error=error_message(err))]
    checks: list[OracleCheck] = []
    reason = unavailable("curvlinops")
    if reason:
        checks.append(_missing("curvlinops", reason))
    else:
        checks += _guarded("curvlinops", lambda: curvlinops_checks(setup, vectors, fisher))
    reason = unavailable("backpack")
    if reason:
        checks.append(_missing("backpack", reason))
    elif not setup.backpack:
        checks.append(OracleCheck("backpack", "all", math.nan, math.nan,
                                  skipped="BackPACK does not support this model's modules"))
    else:
        with warnings.catch_warnings():
            # BackPACK's module hooks fire on outputs when the inputs need no
            # gradient, which is what we want; torch warns about it every time.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            checks += _guarded("backpack", lambda: backpack_checks(setup, vectors, fisher))
    return checks


def _missing(library: str, reason: str) -> OracleCheck:
    """A required oracle that cannot be imported: a failure (``--no-oracles`` opts out)."""
    return OracleCheck(library, "all", math.nan, math.nan,
                       error=f"{reason}; pass --no-oracles to run without the oracles")


def oracles_skipped() -> list[OracleCheck]:
    """The rows of a run with ``--no-oracles``."""
    return [OracleCheck(library, "all", math.nan, math.nan, skipped="--no-oracles")
            for library in ("curvlinops", "backpack")]


def _guarded(library: str, fn: Callable[[], list[OracleCheck]]) -> list[OracleCheck]:
    """``fn()``, or one failing check naming the exception if it raised."""
    try:
        return fn()
    except Exception as err:  # an oracle that crashes is a failed check, not a crashed suite
        return [OracleCheck(library, "all", math.nan, math.nan, error=error_message(err))]
