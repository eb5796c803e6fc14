"""The open defects of the per-sample engine on the zoo: ONE table (case, route, quantity) ->
why today's code fails that run. Each entry marks its test ``xfail(strict=True)``, so a fix
turns it into an XPASS failure until the entry is deleted: the table can only shrink.

Routes: "auto", "ghost", "hooks", "vmap", "loop" (:mod:`.test_zoo`), and "-" for the K-FAC
family, which has none (:mod:`.test_kfac_zoo`). Quantities: gram, gv, gtw (the rows),
ief, ef, sf (optimiser steps), kfac, ekfac, iekfac (the K-FAC optimisers' steps; "ekfac" also
marks the eKFAC curvature's blocks against the per-sample gradients).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pytest

ROUTES = ("auto", "ghost", "hooks", "vmap", "loop")
ROW_QUANTITIES = ("gram", "gv", "gtw")
STEP_QUANTITIES = ("ief", "ef", "sf")
KFAC_METHODS = ("kfac", "ekfac", "iekfac")
NO_ROUTE = "-"


def _family(cases: Iterable[str], runs: Iterable[tuple[str, str]], reason: str
            ) -> dict[tuple[str, str, str], str]:
    return {(case, route, quantity): reason for case in cases for route, quantity in runs}


def _defects() -> dict[tuple[str, str, str], str]:
    train = ("batch_norm1d_train", "batch_norm2d_train")
    return {
        # the optimisers take no mode option yet: they run a model the user put in train mode
        # under the eval policy (running statistics), where mode="train" must be refused
        **_family(train, [(r, q) for r in ROUTES for q in STEP_QUANTITIES],
                  "the optimisers have no mode option yet (issue 16.4): BatchNorm in train mode "
                  "runs on its running statistics"),
        **_family(train, [(NO_ROUTE, m) for m in KFAC_METHODS],
                  "the K-FAC optimisers have no mode option yet (issue 16.4)"),
    }


DEFECTS: dict[tuple[str, str, str], str] = _defects()


def params(cases: Mapping[str, Any] | Iterable[str], quantities: Iterable[str],
           routes: Iterable[str] = ROUTES) -> list[Any]:
    """pytest params (name, route, quantity), those in :data:`DEFECTS` marked xfail(strict)."""
    out = []
    for name in cases:
        for route in routes:
            for quantity in quantities:
                reason = DEFECTS.get((name, route, quantity))
                marks = () if reason is None else pytest.mark.xfail(strict=True, reason=reason)
                out.append(pytest.param(name, route, quantity, marks=marks,
                                        id=f"{name}-{route}-{quantity}"))
    return out
