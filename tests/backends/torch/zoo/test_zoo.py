r"""Every zoo case x every per-sample route x every quantity: exact, or refused by name.

Quantities and the API they go through, in float64:

- ``gram``, ``gv``, ``gtw``: G G^T, G v, G^T w of
  ``TorchProvider(model, inputs, per_sample=route, mode=case.mode).per_sample_rows(e)``
  (certified, ``certify="first"``), with e the reference's logit gradients (so the rows' only
  error is the route's);
- ``ief``, ``ef``, ``sf``: one step of ``backends.optim.IEF`` / ``EF`` / ``SF`` with
  ``per_sample=route``, lr = 1, no deduplication, damping from
  :func:`.reference.gram_damping` / :func:`.reference.sf_damping` (condition numbers at most
  N + 1), the parameter change compared with -d (IEF) or the unit direction (EF and SF: the
  first step of total_steps = 2 has eta_0 = lr); SF's K = 2 labels per sample are drawn by
  the reference from the optimiser's documented key (:func:`.reference.sampled_labels`).

Routes: "auto", "ghost", "hooks", "vmap" and "loop" as both APIs name them ("hooks": the
layer pass with materialised rows); a step route the optimisers do not accept yet is skipped.
Expected values and bounds: :mod:`.reference`.

A route passes when its value is within the bound, or when it raises an error of ngdref's
own (not from inside torch) whose message names a trainable parameter or the layer, with
the model's parameters, buffers and modes bitwise unchanged. A case without a per-sample
meaning (``Case.refuse``) passes only by refusing. Today's failures are listed, with their
reasons, in :data:`.defects.DEFECTS`, marked ``xfail(strict=True)``: a fix makes its entry
XPASS, and the entry must then go.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from backends.torch.optim.methods import EF, IEF, SF
from backends.torch.provider import TorchProvider

from .case import Case
from .defects import (
    DEFECTS,
    KFAC_METHODS,
    NO_ROUTE,
    ROUTES,
    ROW_QUANTITIES,
    STEP_QUANTITIES,
    params,
)
from .models import CASES
from .outcomes import MARKS, Outcome, judge_refusal, judge_value, route_exists, run, theta, trained
from .reference import (
    SF_SAMPLES,
    SF_SEED,
    bounds,
    expected,
    gram_damping,
    logit_grads,
    reference,
    sf_damping,
    vectors,
)

pytestmark = MARKS

#: optimiser and its options beyond lr, damping and per_sample
OPTIMISERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ief": (IEF, {"dedup_threshold": None}),
    "ef": (EF, {"dedup_threshold": None, "total_steps": 2}),
    "sf": (SF, {"total_steps": 2, "num_samples": SF_SAMPLES, "seed": SF_SEED}),
}


@functools.cache
def rows_outcome(name: str, route: str) -> Outcome:
    """G G^T, G v and G^T w of the provider's rows on route ``route`` (one run, three tests)."""
    case = CASES[name]

    def action(model: nn.Module, inputs: Any, targets: torch.Tensor) -> dict[str, Any]:
        provider = TorchProvider(model, inputs, per_sample=route, mode=case.mode)
        logits = provider.logits().numpy()
        e = logit_grads(case, logits, targets.numpy())
        if case.refuse is None:
            e = reference(name).logit_grads  # the same cotangents as the reference's
        v, w = vectors(case, provider.num_params)
        rows = provider.per_sample_rows(torch.from_numpy(e))
        return {
            "gram": rows.gram().numpy(),
            "gv": rows.matvec(torch.from_numpy(v)).numpy(),
            "gtw": rows.rmatvec(torch.from_numpy(w)).numpy(),
        }

    return run(case, action)


def _damping(case: Case, method: str) -> float:
    if case.refuse is not None:
        return 1.0  # any: the step must be refused
    ref = reference(case.name)
    if method == "sf":
        return sf_damping(ref.sampled_grads, SF_SAMPLES)
    return gram_damping(ref.grads)


def step_outcome(name: str, route: str, method: str) -> Outcome:
    """-(theta_after - theta_before) of one step with lr = 1."""
    case = CASES[name]
    cls, options = OPTIMISERS[method]

    def action(model: nn.Module, inputs: Any, targets: torch.Tensor) -> dict[str, Any]:
        opt = cls(model, case.loss(), lr=1.0, damping=_damping(case, method),
                  per_sample=route, mode=case.mode, **options)
        before = theta(model)
        with warnings.catch_warnings():  # the vmap-fallback notice: fallbacks are allowed
            warnings.simplefilter("ignore", UserWarning)
            opt.step(lambda: (inputs, targets))
        return {method: before - theta(model)}

    return run(case, action, may_change=trained(case))


def judge(case: Case, quantity: str, outcome: Outcome) -> None:
    """Exact within the bound, or refused by name with nothing changed."""
    if outcome.error is not None:
        judge_refusal(case, outcome)
        return
    if case.refuse is not None:
        pytest.fail(f"silently ran a model without per-sample meaning ({case.refuse})")
    assert not outcome.changed, f"changed {sorted(outcome.changed)}"
    ref = reference(case.name)
    model, _, _ = case.build()
    bound = bounds(ref, float(np.linalg.norm(theta(model))))[quantity]
    assert outcome.values is not None
    judge_value(quantity, outcome.values[quantity], expected(ref)[quantity], bound)


@pytest.mark.parametrize(("name", "route", "quantity"), params(CASES, ROW_QUANTITIES))
def test_rows(name: str, route: str, quantity: str) -> None:
    if not route_exists("rows", route):
        pytest.skip(f"TorchProvider has no per_sample={route!r} yet (issue 16)")
    judge(CASES[name], quantity, rows_outcome(name, route))


@pytest.mark.parametrize(("name", "route", "quantity"), params(CASES, STEP_QUANTITIES))
def test_step(name: str, route: str, quantity: str) -> None:
    if not route_exists("steps", route):
        pytest.skip(f"the optimisers have no per_sample={route!r} yet (issue 16)")
    judge(CASES[name], quantity, step_outcome(name, route, quantity))


def test_defects_name_real_runs() -> None:
    """Every entry of the defect table is a case, route and quantity of a test here or of
    the K-FAC tests (route "-")."""
    runs = {(route, q) for route in ROUTES for q in (*ROW_QUANTITIES, *STEP_QUANTITIES)}
    runs |= {(NO_ROUTE, method) for method in KFAC_METHODS}
    stale = [key for key in DEFECTS if key[0] not in CASES or key[1:] not in runs]
    assert not stale, f"defect entries for runs that do not exist: {stale}"
