"""The optimisers' per-sample options reach ``backends.TorchProvider`` through one function,
``backends.torch.optim.options.provider_keywords``, by name; the certificate and routes of
the rows reach the diagnostics; every option runs on the installed provider and gives the
step of the vmap route.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")

import backends.torch.optim.base as base  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from backends.torch.optim.options import provider_keywords  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402
from tests.backends.torch.optim.cases import ROUTE_OPTIMISERS, mlp_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: the optimisers' options at their defaults
DEFAULTS = {"output_fn": None, "per_sample": "auto", "chunk_size": None, "mode": "eval",
            "certify": "first", "on_mismatch": "raise", "certify_samples": None}


@pytest.mark.parametrize("route", ["auto", "ghost", "hooks", "vmap", "loop"])
def test_chunk_size_reaches_the_provider_with_every_route(route: str) -> None:
    # the provider runs the layer routes one hooked pass per chunk: nothing is remapped
    given = {**DEFAULTS, "per_sample": route, "chunk_size": 2}
    assert provider_keywords(given, 0) == {**given, "certify_seed": 0}


@pytest.mark.parametrize("step", [0, 7])
def test_the_provider_gets_every_option_by_name(step: int) -> None:
    given = {**DEFAULTS, "per_sample": "loop", "mode": "train", "certify": "always",
             "on_mismatch": "fallback", "certify_samples": 3}
    assert provider_keywords(given, step) == {**given, "certify_seed": step}
    TorchProvider(mlp_problem().model, mlp_problem().batch[0], **provider_keywords(given, step))


def test_the_deprecated_per_sample_method_warns_and_takes_the_same_step() -> None:
    steps = {}
    for keyword in ("per_sample", "per_sample_method"):
        problem = mlp_problem()
        if keyword == "per_sample":
            opt = IEF(problem.model, problem.loss, lr=0.5, damping=1e-3, per_sample="vmap")
        else:
            with pytest.warns(DeprecationWarning, match="per_sample_method is deprecated"):
                opt = IEF(problem.model, problem.loss, lr=0.5, damping=1e-3,
                          per_sample_method="vmap")
        assert opt.per_sample == "vmap"
        opt.step(batch=problem.batch)
        steps[keyword] = [p.detach().clone() for p in problem.model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(*steps.values(), strict=True))


# ---- the optimiser's wiring: the keywords each step's provider gets -------------------------
class _Recording(TorchProvider):
    """The installed provider, recording the keywords of each construction."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model: Any, inputs: Any, **keywords: Any) -> None:
        _Recording.calls.append(keywords)
        super().__init__(model, inputs, **keywords)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type:
    monkeypatch.setattr(base, "TorchProvider", _Recording)
    _Recording.calls = []
    return _Recording


@pytest.mark.parametrize("name", list(ROUTE_OPTIMISERS))
def test_each_step_passes_the_options_and_its_count_as_certify_seed(recording: type, name: str
                                                                    ) -> None:
    cls, given = ROUTE_OPTIMISERS[name]
    problem = mlp_problem()
    opt = cls(problem.model, problem.loss, certify="always", on_mismatch="fallback",
              certify_samples=2, mode="eval", **given)
    for _ in range(2):
        opt.step(batch=problem.batch)
    assert [c["certify_seed"] for c in recording.calls] == [0, 1]  # one provider per step
    assert all(c["certify"] == "always" and c["on_mismatch"] == "fallback"
               and c["certify_samples"] == 2 and c["per_sample"] == "auto"
               for c in recording.calls)


def test_the_rows_certificate_and_routes_reach_the_diagnostics_as_plain_data() -> None:
    for cls, extra in ((IEF, {}), (EF, {"total_steps": 2}), (SF, {"total_steps": 2}),
                       (NGD, {})):
        problem = mlp_problem()
        opt = cls(problem.model, problem.loss, lr=0.1, damping=1e-2, certify="always", **extra)
        opt.step(batch=problem.batch)
        d = opt.diagnostics
        certificate = d["certificate"]
        assert isinstance(certificate, dict) and 0 <= certificate["error"] <= certificate["bound"]
        assert set(d["routes"]) == {name for name, _ in problem.trainable}
        json.dumps({"certificate": certificate, "routes": d["routes"]})


@pytest.mark.parametrize(
    "given",
    [{"per_sample": "loop"}, {"certify": "always", "certify_samples": 2},
     {"certify": "always", "on_mismatch": "fallback"}, {"mode": "train"}, {}],
    ids=["loop", "certify-window", "fallback", "train-mode", "defaults"],
)
def test_the_installed_provider_takes_the_engines_options(given: dict) -> None:
    """The step equals the vmap route's, and the rows come certified (default "first": the
    first step is certified)."""
    problem, reference = mlp_problem(), mlp_problem()
    opt = IEF(problem.model, problem.loss, lr=0.5, damping=1e-3, **given)
    IEF(reference.model, reference.loss, lr=0.5, damping=1e-3,
        per_sample="vmap").step(batch=reference.batch)
    opt.step(batch=problem.batch)
    for a, b in zip(problem.model.parameters(), reference.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    certificate = opt.diagnostics["certificate"]
    assert isinstance(certificate, dict) and certificate["error"] <= certificate["bound"]
    assert opt.diagnostics["routes"] is not None
