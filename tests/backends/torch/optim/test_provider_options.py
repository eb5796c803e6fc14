"""The optimisers' per-sample options reach ``backends.TorchProvider`` through one function,
``backends.torch.optim.options.provider_keywords``; what the installed provider cannot honour
is refused by name, never dropped; the certificate and routes of the rows reach the
diagnostics.

The per-sample engine's provider (``per_sample``, ``mode``, ``certify``, ``on_mismatch``,
``certify_samples``, ``certify_seed``) is not on main yet: :class:`_EngineProvider` stands for
it here (today's provider behind the engine's keywords), and the strict xfails at the end say
what passes once the real one lands.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest

torch = pytest.importorskip("torch")

import backends.torch.optim.base as base  # noqa: E402
import backends.torch.optim.options as options  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from backends.torch.optim.options import provider_keywords  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402
from ngdref.certificate import Certificate  # noqa: E402
from tests.backends.torch.optim.cases import ROUTE_OPTIMISERS, mlp_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: the optimisers' options at their defaults
DEFAULTS = {"output_fn": None, "per_sample": "auto", "chunk_size": None, "mode": "eval",
            "certify": "first", "on_mismatch": "raise", "certify_samples": None}
#: the keywords of today's provider, and of the engine's (which keeps the old two as aliases)
TODAY = frozenset({"model", "inputs", "output_fn", "params", "chunk_size", "per_sample_method",
                   "layer_route"})
ENGINE = TODAY | {"per_sample", "mode", "certify", "on_mismatch", "certify_samples",
                  "certify_seed"}
#: per_sample -> today's (per_sample_method, layer_route), written out here
TODAY_ROUTES = {"auto": ("ghost", "auto"), "ghost": ("ghost", "ghost"),
                "hooks": ("ghost", "materialise"), "vmap": ("vmap", "auto")}


@pytest.mark.parametrize("route", list(TODAY_ROUTES))
def test_todays_provider_gets_the_route_as_its_two_keywords(route: str) -> None:
    keywords = provider_keywords({**DEFAULTS, "per_sample": route}, 4, TODAY)
    method, layer_route = TODAY_ROUTES[route]
    assert keywords == {"output_fn": None, "chunk_size": None, "per_sample_method": method,
                        "layer_route": layer_route}


def test_chunk_size_selects_vmap_and_is_refused_by_one_pass_routes() -> None:
    assert provider_keywords({**DEFAULTS, "chunk_size": 2}, 0, TODAY)["per_sample_method"] == "vmap"
    assert provider_keywords({**DEFAULTS, "chunk_size": 2}, 0, ENGINE)["per_sample"] == "vmap"
    for route in ("ghost", "hooks"):
        with pytest.raises(ValueError, match="chunk_size must be None"):
            provider_keywords({**DEFAULTS, "per_sample": route, "chunk_size": 2}, 0, ENGINE)


@pytest.mark.parametrize("step", [0, 7])
def test_the_engines_provider_gets_every_option_by_name(step: int) -> None:
    given = {**DEFAULTS, "per_sample": "loop", "mode": "train", "certify": "always",
             "on_mismatch": "fallback", "certify_samples": 3}
    keywords = provider_keywords(given, step, ENGINE)
    assert keywords == {**given, "certify_seed": step}


@pytest.mark.parametrize(
    ("option", "value"),
    [("per_sample", "loop"), ("mode", "train"), ("certify", "always"),
     ("on_mismatch", "fallback"), ("certify_samples", 4)],
)
def test_what_todays_provider_cannot_honour_is_refused_by_name(option: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"{option}={value!r} needs a TorchProvider"):
        provider_keywords({**DEFAULTS, option: value}, 0, TODAY)
    problem = mlp_problem()
    with pytest.raises(ValueError, match=f"{option}={value!r}"):
        IEF(problem.model, problem.loss, lr=0.1, damping=1e-3, **{option: value})


def test_certify_never_is_what_todays_provider_does() -> None:
    assert "certify" not in provider_keywords({**DEFAULTS, "certify": "never"}, 0, TODAY)


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


# ---- the optimiser's wiring, against a stand-in for the engine's provider -------------------
CERTIFICATE = Certificate(error=1e-17, bound=1e-14, sample=2, route="forward",
                          unit_roundoff=2.0**-53)


class _EngineProvider(TorchProvider):
    """Today's provider behind the engine's keywords: records them and returns rows that carry
    a certificate and their routes, as the engine's will."""

    calls: ClassVar[list[dict[str, Any]]] = []

    def __init__(self, model: Any, inputs: Any, *, per_sample: str, mode: str, certify: str,
                 on_mismatch: str, certify_samples: int | None, certify_seed: int,
                 **rest: Any) -> None:
        _EngineProvider.calls.append({
            "per_sample": per_sample, "mode": mode, "certify": certify,
            "on_mismatch": on_mismatch, "certify_samples": certify_samples,
            "certify_seed": certify_seed, **rest,
        })
        method, route = TODAY_ROUTES[per_sample]
        super().__init__(model, inputs, per_sample_method=method, layer_route=route, **rest)

    def per_sample_rows(self, cotangents: Any, *, keep_graph: bool = True) -> Any:
        rows = super().per_sample_rows(cotangents, keep_graph=keep_graph)
        rows.certificate = CERTIFICATE
        rows.routes = {name: "ghost" for name in self.param_names}
        return rows


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> type:
    monkeypatch.setattr(options, "TorchProvider", _EngineProvider)
    monkeypatch.setattr(base, "TorchProvider", _EngineProvider)
    _EngineProvider.calls = []
    return _EngineProvider


@pytest.mark.parametrize("name", list(ROUTE_OPTIMISERS))
def test_each_step_passes_the_options_and_its_count_as_certify_seed(engine: type, name: str
                                                                    ) -> None:
    cls, given = ROUTE_OPTIMISERS[name]
    problem = mlp_problem()
    opt = cls(problem.model, problem.loss, certify="always", on_mismatch="fallback",
              certify_samples=2, mode="eval", **given)
    for _ in range(2):
        opt.step(batch=problem.batch)
    assert [c["certify_seed"] for c in engine.calls] == [0, 1]  # one provider per step
    assert all(c["certify"] == "always" and c["on_mismatch"] == "fallback"
               and c["certify_samples"] == 2 and c["per_sample"] == "auto" for c in engine.calls)


def test_the_rows_certificate_and_routes_reach_the_diagnostics_as_plain_data(engine: type
                                                                             ) -> None:
    problem = mlp_problem()
    for cls, extra in ((IEF, {}), (EF, {"total_steps": 2}), (SF, {"total_steps": 2}),
                       (NGD, {})):
        opt = cls(problem.model, problem.loss, lr=0.1, damping=1e-2, **extra)
        opt.step(batch=problem.batch)
        d = opt.diagnostics
        assert d["certificate"] == dataclasses.asdict(CERTIFICATE)
        assert d["routes"] == {name: "ghost" for name, _ in problem.trainable}
        json.dumps({"certificate": d["certificate"], "routes": d["routes"]})


# ---- what passes once the engine's provider is on main --------------------------------------
ENGINE_BRANCH = pytest.mark.xfail(strict=True, reason="provider options land with the engine "
                                                      "branch")


@ENGINE_BRANCH
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
