"""The per-sample routes (vmap, auto, ghost, hooks) take the same optimiser steps."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from backends.torch.optim.methods import IEF  # noqa: E402
from tests.backends.torch.optim.cases import (  # noqa: E402
    CASES,
    PROBLEMS,
    ROUTE_OPTIMISERS,
    Problem,
    mlp_problem,
    take_step,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- per-sample routes ----------------------------------------------------------------------
# float64: the routes' Gram matrices, G^T c and g agree to ~1e-15 relative
# (tests/backends/torch/per_sample/test_layer_pass.py);
# the damped N x N solves (condition < 1e4 at these dampings) amplify that to < 1e-11, so the
# steps agree to the 1e-10 norm-wise. float32: eps32 = 1.2e-7 times the same
# amplification of about 10 for the well-damped MLP below: 1e-5.
ROUTE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _route_steps(problem_of: Callable[[], Problem], cls: type, options: dict, **extra: Any):
    steps = {}
    for route in ("vmap", "auto", "ghost", "hooks"):
        problem = problem_of()
        opt = cls(problem.model, problem.loss, per_sample=route, **options, **extra)
        steps[route] = take_step(problem, opt)
        assert opt.diagnostics["per_sample"] == route
    return steps


@pytest.mark.parametrize("method", list(ROUTE_OPTIMISERS))
@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_steps_equal_across_per_sample_routes(name: str, reduction: str, method: str) -> None:
    cls, options = ROUTE_OPTIMISERS[method]
    steps = _route_steps(PROBLEMS[name], cls, options, reduction=reduction)
    reference = steps["vmap"]
    for route, step in steps.items():
        error = float(torch.linalg.vector_norm(step - reference))
        assert error <= ROUTE_TOL[torch.float64] * float(torch.linalg.vector_norm(reference)), route


@pytest.mark.parametrize("method", list(ROUTE_OPTIMISERS))
def test_chunked_steps_equal_the_unchunked_step(method: str) -> None:
    # chunk_size=3 on N=4 samples: chunks of 3 and 1, each its own hooked (or vmap) pass;
    # the rows are stacked, so the step is the whole batch's, within the routes' tolerance
    cls, options = ROUTE_OPTIMISERS[method]
    reference = _route_steps(mlp_problem, cls, options)["vmap"]
    for route, step in _route_steps(mlp_problem, cls, options, chunk_size=3).items():
        error = float(torch.linalg.vector_norm(step - reference))
        assert error <= ROUTE_TOL[torch.float64] * float(torch.linalg.vector_norm(reference)), route


def test_float32_steps_equal_across_per_sample_routes() -> None:
    def problem32() -> Problem:
        problem = mlp_problem()
        problem.model.float()
        x, y = problem.batch
        problem.batch = (x.float(), y)
        return problem

    steps = _route_steps(problem32, IEF, {"lr": 0.5, "damping": 1e-1})
    reference = steps["vmap"]
    assert reference.dtype == torch.float32
    for route, step in steps.items():
        error = float(torch.linalg.vector_norm(step - reference))
        assert error <= ROUTE_TOL[torch.float32] * float(torch.linalg.vector_norm(reference)), route


class _Gain(nn.Module):
    """A module kind without a hook rule: its parameter takes the per-module vmap fallback."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, h: Any) -> Any:
        # a matmul: ``h * self.gain`` is a broadcast the ghost route splits without a fallback
        return h @ torch.diag(self.gain)


def test_a_fallback_is_reported_in_the_diagnostics_and_warned_once() -> None:
    problem = mlp_problem()
    problem.model = nn.Sequential(problem.model[0], _Gain(7), nn.Tanh(), problem.model[2])
    opt = IEF(problem.model, problem.loss, lr=0.1, damping=1e-3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            opt.step(lambda: problem.batch)
    said = [w for w in caught if "fallback routes" in str(w.message)]
    assert len(said) == 1 and "_Gain (1.gain)" in str(said[0].message)
    assert opt.diagnostics["fallbacks"] == ["_Gain (1.gain): per-module vmap"]


@pytest.mark.parametrize(
    ("cls", "options"), list(ROUTE_OPTIMISERS.values()), ids=list(ROUTE_OPTIMISERS)
)
def test_a_ghost_step_runs_the_model_forward_once(cls: type, options: dict) -> None:
    """iEF, EF and SF (K = 2 sampled labels) all backpropagate through one forward pass; the
    default certificate ("first") adds one forward-mode pass to the first step only."""
    problem = mlp_problem()
    calls = []
    handle = problem.model.register_forward_pre_hook(lambda module, args: calls.append(1))
    for certify, forwards in (("never", [1, 1]), ("first", [2, 1])):
        opt = cls(problem.model, problem.loss, per_sample="auto", certify=certify, **options)
        for expected in forwards:
            calls.clear()
            opt.step(lambda: problem.batch)
            assert len(calls) == expected, certify
    handle.remove()
