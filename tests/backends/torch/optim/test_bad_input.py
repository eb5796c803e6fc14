"""The optimisers refuse bad input naming the argument, and a refused step changes nothing."""

from __future__ import annotations

import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.kfac import EKFAC  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from tests.backends.torch.optim.cases import (  # noqa: E402
    IGNORE,
    ROUTE_OPTIMISERS,
    N,
    Problem,
    assert_refused,
    mlp_problem,
    t5_problem,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- bad input ------------------------------------------------------------------------------
CONSTRUCTOR_ERRORS = [
    (IEF, {"lr": -1.0}, ValueError, "lr"),
    (IEF, {"lr": math.nan}, ValueError, "lr"),
    (IEF, {"damping": -1e-3}, ValueError, "damping"),
    (NGD, {"damping": "1e-3"}, TypeError, "damping"),
    (EF, {"total_steps": None}, TypeError, "total_steps"),
    (SF, {"total_steps": None}, TypeError, "total_steps"),
    (EF, {"total_steps": 0}, ValueError, "total_steps"),
    (IEF, {"damping_mode": "rel"}, ValueError, "damping_mode"),
    (IEF, {"damping_space": "param"}, ValueError, "damping_space"),
    (
        IEF,
        {"damping_space": "parameter", "damping_mode": "levenberg_marquardt"},
        ValueError,
        "damping_mode",
    ),
    (IEF, {"damping_mode": "diagonal"}, ValueError, "damping_mode"),  # the retired name
    (IEF, {"dedup_rule": "pairs"}, ValueError, "dedup_rule"),
    (IEF, {"per_sample": "loops"}, ValueError, "per_sample"),
    (IEF, {"per_sample_method": "loops"}, ValueError, "per_sample_method"),
    (IEF, {"per_sample": "vmap", "per_sample_method": "ghost"}, ValueError, "per_sample"),
    (IEF, {"certify": "sometimes"}, ValueError, "certify"),
    (IEF, {"on_mismatch": "ignore"}, ValueError, "on_mismatch"),
    (IEF, {"mode": "training"}, ValueError, "mode"),
    (IEF, {"certify_samples": 0}, ValueError, "certify_samples"),
    (IEF, {"output_fn": "logits"}, TypeError, "output_fn"),
    (IEF, {"distributed": "yes"}, TypeError, "distributed"),
    (IEF, {"per_sample": "ghost", "chunk_size": 0}, ValueError, "chunk_size"),
    (IEF, {"chunk_size": 2.0}, ValueError, "chunk_size"),
    (IEF, {"dedup_threshold": 1.5}, ValueError, "dedup_threshold"),
    (IEF, {"reduction": "avg"}, ValueError, "reduction"),
    (SF, {"total_steps": 2, "num_samples": 0}, ValueError, "num_samples"),
    (SF, {"total_steps": 2, "seed": 1.5}, TypeError, "seed"),
    (NGD, {"cg_tol": 0.0}, ValueError, "cg_tol"),
    (IEF, {"loss": nn.CrossEntropyLoss()}, TypeError, "loss"),
    (IEF, {"model": lambda x: x}, TypeError, "model"),
]


@pytest.mark.parametrize(("cls", "kwargs", "error", "name"), CONSTRUCTOR_ERRORS)
def test_constructor_errors_name_the_argument(
    cls: type, kwargs: dict, error: type, name: str
) -> None:
    problem = mlp_problem()
    arguments = {"model": problem.model, "loss": problem.loss, "lr": 0.1, "damping": 1e-3, **kwargs}
    if arguments.get("total_steps", 0) is None:
        del arguments["total_steps"]  # the required argument left out
    model, loss = arguments.pop("model"), arguments.pop("loss")
    with pytest.raises(error, match=name):
        cls(model, loss, **arguments)


def test_model_without_trainable_parameters_is_refused() -> None:
    problem = mlp_problem()
    problem.model.requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        IEF(problem.model, problem.loss, lr=0.1, damping=1e-3)




def test_step_past_total_steps_is_refused() -> None:
    problem = mlp_problem()
    opt = EF(problem.model, problem.loss, lr=0.1, damping=1e-3, total_steps=1)
    opt.step(lambda: problem.batch)
    assert_refused(problem, opt, lambda: problem.batch, ValueError, "total_steps=1")


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        ("x", TypeError),
        ("(x,)", TypeError),
        ("(x, y, y)", TypeError),
        ("{'input': x}", TypeError),
        ("(x, y.tolist())", TypeError),
        ("({'input': x, 'labels': y}, y)", ValueError),
    ],
)
def test_malformed_batch_is_refused(returned: str, error: type) -> None:
    """Given as step(batch=...) or returned by the closure, the same refusal naming the batch."""
    problem = mlp_problem()
    x, y = problem.batch
    opt = IEF(problem.model, problem.loss, lr=0.1, damping=1e-3)
    batch = eval(returned, {"x": x, "y": y})
    assert_refused(problem, opt, {"closure": lambda: batch}, error, "batch")
    assert_refused(problem, opt, {"batch": batch}, error, "batch")


@pytest.mark.parametrize("cls", [IEF, EKFAC], ids=["IEF", "EKFAC"])
@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        ({}, "step\\(\\) needs the batch"),
        ({"closure": "batch", "batch": "batch"}, "not both"),
        ({"closure": "batch"}, "closure must be a callable.*step\\(batch=...\\)"),
    ],
    ids=["neither", "both", "batch-as-closure"],
)
def test_step_takes_exactly_one_of_closure_and_batch(cls: type, arguments: dict, match: str
                                                     ) -> None:
    problem = mlp_problem()
    opt = cls(problem.model, problem.loss, lr=0.1, damping=1e-3)
    given = {k: problem.batch for k in arguments}
    if "batch" in arguments and "closure" in arguments:
        given["closure"] = lambda: problem.batch
    assert_refused(problem, opt, given, TypeError, match)


class _Sqrt(nn.Module):
    def forward(self, x: Any) -> Any:
        return torch.sqrt(x)


def test_non_finite_gradients_are_refused() -> None:
    torch.manual_seed(0)
    # zero first layer: sqrt(0) = 0 is finite but its derivative is infinite
    model = nn.Sequential(nn.Linear(3, 4), _Sqrt(), nn.Linear(4, 2)).double()
    nn.init.zeros_(model[0].weight)
    nn.init.zeros_(model[0].bias)
    x, y = torch.randn(N, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    problem = Problem(
        model, (x, y), y, ngdref.SoftmaxCrossEntropy(), 2, lambda c, r: c(x[r])[:, None, :]
    )
    for opt in (
        IEF(model, problem.loss, lr=0.1, damping=1e-3),
        NGD(model, problem.loss, lr=0.1, damping=1e-3),
    ):
        assert_refused(problem, opt, lambda: (x, y), ValueError, "per_sample_grads")


def test_non_finite_logits_are_refused() -> None:
    problem = mlp_problem()
    x, y = problem.batch
    x = x.clone()
    x[1, 0] = math.nan
    opt = SF(problem.model, problem.loss, lr=0.1, damping=1e-3, total_steps=2)
    assert_refused(problem, opt, lambda: (x, y), ValueError, "logits")


def test_unconverged_cg_does_not_step() -> None:
    problem = mlp_problem()
    opt = NGD(problem.model, problem.loss, lr=0.1, damping=1e-3, cg_maxiter=1)
    assert_refused(problem, opt, lambda: problem.batch, ngdref.NotConvergedError, "maxiter")


def test_hyperparameters_are_checked_at_every_step() -> None:
    problem = mlp_problem()
    opt = IEF(problem.model, problem.loss, lr=0.1, damping=1e-3)
    opt.param_groups[0]["lr"] = -1.0
    assert_refused(problem, opt, lambda: problem.batch, ValueError, "lr")
    opt.param_groups[0]["lr"] = 0.2
    opt.param_groups[0]["reduction"] = 0.125
    opt.step(lambda: problem.batch)
    assert opt.diagnostics["lr"] == 0.2
    x, y = problem.batch
    with torch.no_grad():
        loss = 0.125 * F.cross_entropy(problem.model(x), y, reduction="sum").item()
    assert opt.step(lambda: problem.batch) == pytest.approx(loss, rel=1e-13)


def test_add_param_group_is_refused() -> None:
    problem = mlp_problem()
    opt = IEF(problem.model, problem.loss, lr=0.1, damping=1e-3)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})



def _t5_all_ignored() -> tuple[Problem, Any]:
    problem = t5_problem()
    batch = dict(problem.batch, labels=torch.full_like(problem.targets, IGNORE))
    return problem, batch


BAD_BATCHES = {
    "empty batch": (lambda: (mlp_problem(), None), "empty", "inputs is an empty batch"),
    "labels and inputs disagree in N": (lambda: (mlp_problem(), None), "short", "have 3 samples"),
    "all labels ignored": (_t5_all_ignored, None, "every label equals ignore_index=-100"),
}


@pytest.mark.parametrize("route", ["auto", "vmap"])
@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_bad_batches_are_refused_naming_the_argument(case: str, route: str) -> None:
    build, kind, match = BAD_BATCHES[case]
    problem, batch = build()
    if kind == "empty":
        x, y = problem.batch
        batch = (x[:0], y[:0])
    elif kind == "short":
        x, y = problem.batch
        batch = (x, y[:3])
    for cls, options in ROUTE_OPTIMISERS.values():
        opt = cls(problem.model, problem.loss, per_sample=route, **options)
        assert_refused(problem, opt, lambda b=batch: b, ValueError, match)


def test_a_refused_kfac_step_keeps_its_factors() -> None:
    """An lr the float32 parameters cannot hold is refused after the factors were recomputed
    and blended: the kept factors, the count and the next step are those of a run that never
    tried it."""
    runs = []
    for attempt_failing_step in (False, True):
        problem = mlp_problem()
        problem.model.float()
        x, y = problem.batch
        batch = (x.float(), y)
        opt = EKFAC(problem.model, problem.loss, lr=0.1, damping=1e-2, running_average=0.5)
        opt.step(batch=batch)
        kept = opt.state_dict()["state"][0]["curvature"]
        if attempt_failing_step:
            opt.param_groups[0]["lr"] = 1e300
            assert_refused(problem, opt, {"batch": batch}, ngdref.NonFiniteError, "overflows")
            assert opt.state_dict()["state"][0]["curvature"] is kept
            opt.param_groups[0]["lr"] = 0.1
        opt.step(batch=batch)
        runs.append([p.detach().clone() for p in problem.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
