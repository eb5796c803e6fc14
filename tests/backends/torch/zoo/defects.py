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


#: empty: every zoo run is exact or refused by name; a new defect gets an entry (case, route,
#: quantity) -> why, with a strict xfail, until it is fixed
DEFECTS: dict[tuple[str, str, str], str] = {}


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
