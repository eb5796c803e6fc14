"""Optimiser checkpoints: a resumed run is bit-identical to the uninterrupted one (the step
count, SF's and KFAC's sampling keys and the K-FAC family's factors travel in the state_dict),
a state_dict of the earlier format (a top-level "step") resumes too, a foreign one is refused.

Every resume goes through ``torch.save`` / ``torch.load(weights_only=True)`` into a fresh
optimiser constructed with different hyperparameters, which the state_dict must override.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from tests.backends.torch.optim.cases import N, mlp_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

STEPS, SAVED_AT = 5, 3
CE = ngdref.SoftmaxCrossEntropy()
#: (optimiser, its options); EF and SF's decay over total_steps needs the step count, SF's
#: and KFAC's labels need it in their keys
METHODS = {
    "IEF": (IEF, {}),
    "EF": (EF, {"total_steps": STEPS}),
    "SF": (SF, {"total_steps": STEPS, "seed": 3, "num_samples": 2}),
    "NGD": (NGD, {}),
}
#: the K-FAC family: factors recomputed every 2nd step (step 3, the first after the resume,
#: reuses the saved ones) and blended into a running average
KFAC_OPTIONS = {"update_interval": 2, "running_average": 0.5}


def _data(dtype: torch.dtype) -> list[tuple[Any, Any]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(N, 5, dtype=dtype, generator=generator),
         torch.randint(0, 3, (N,), generator=generator))
        for _ in range(STEPS)
    ]


def _model(dtype: torch.dtype) -> nn.Module:
    return mlp_problem().model.to(dtype)


def _saved(opt: Any) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _resumed_equals_straight(
    build: Callable[..., Any], dtype: torch.dtype, edit: Callable[[dict], dict] = lambda s: s
) -> bool:
    """Whether SAVED_AT steps, a save, ``edit`` of the saved state_dict, a load into a fresh
    optimiser (built with other hyperparameters: ``build(model, fresh=True)``) and the
    remaining steps give the uninterrupted run's parameters bitwise."""
    data = _data(dtype)
    straight = _model(dtype)
    opt = build(straight)
    for batch in data:
        opt.step(batch=batch)

    interrupted = _model(dtype)
    first = build(interrupted)
    for batch in data[:SAVED_AT]:
        first.step(batch=batch)
    saved = edit(_saved(first))
    model = copy.deepcopy(interrupted)
    resumed = build(model, fresh=True)
    resumed.load_state_dict(saved)
    assert resumed.steps_taken == SAVED_AT and resumed.param_groups[0]["lr"] == 0.1
    for batch in data[SAVED_AT:]:
        resumed.step(lambda b=batch: b)
    return all(torch.equal(a, b) for a, b in zip(straight.parameters(), model.parameters(),
                                                  strict=True))


def _method(cls: type, options: dict) -> Callable[..., Any]:
    """build(model, fresh=False): the optimiser; fresh: with another lr (and seed)."""

    def build(model: nn.Module, fresh: bool = False) -> Any:
        other = {"lr": 7.0, **({"seed": 99} if "seed" in options else {})} if fresh else {}
        return cls(model, CE, **{"lr": 0.1, "damping": 1e-2, **options, **other})

    return build


@pytest.mark.parametrize("name", list(METHODS))
def test_resume_from_state_dict_is_bit_identical(name: str) -> None:
    assert _resumed_equals_straight(_method(*METHODS[name]), torch.float64)


def _earlier_format(state: dict) -> dict:
    """The state_dict as the optimisers wrote it before the count moved into the state."""
    return {"state": {}, "param_groups": state["param_groups"], "step": SAVED_AT}


@pytest.mark.parametrize("name", list(METHODS))
def test_a_state_dict_of_the_earlier_format_resumes_bitwise(name: str) -> None:
    assert _resumed_equals_straight(_method(*METHODS[name]), torch.float64, _earlier_format)


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC, IEKFAC], ids=["KFAC", "EKFAC", "IEKFAC"])
def test_kfac_resume_keeps_the_factors_bitwise(cls: type, bias: str) -> None:
    """float32 parameters with float64 factors: the factors must come back uncast."""
    options = {**KFAC_OPTIONS, "bias": bias, **({"seed": 5} if cls is KFAC else {})}
    build = _method(cls, options)
    assert _resumed_equals_straight(build, torch.float32)
    # the test has power: without the saved factors (the earlier format) the resumed run
    # recomputes them from one batch, and differs
    assert not _resumed_equals_straight(build, torch.float32, _earlier_format)


def test_kfac_state_dict_of_the_earlier_format_recomputes_the_factors() -> None:
    """Without a running average and with a refresh every step, the earlier format (no
    factors) still resumes bitwise."""
    assert _resumed_equals_straight(_method(EKFAC, {}), torch.float64, _earlier_format)


def test_the_step_count_is_in_the_optimiser_state() -> None:
    model = mlp_problem().model
    opt = _method(SF, METHODS["SF"][1])(model)
    for batch in _data(torch.float64)[:2]:
        opt.step(batch=batch)
    state = opt.state_dict()
    assert "step" not in state and state["state"] == {0: {"step": 2}} and opt.steps_taken == 2
    kfac = _method(KFAC, KFAC_OPTIONS)(mlp_problem().model)
    kfac.step(batch=_data(torch.float64)[0])
    assert set(kfac.state_dict()["state"][0]) == {"step", "curvature"}


def test_load_state_dict_refuses_another_optimiser() -> None:
    model = mlp_problem().model
    state = _method(IEF, {})(model).state_dict()
    ef = _method(EF, {"total_steps": 4})(model)
    with pytest.raises(ValueError, match="hyperparameters"):
        ef.load_state_dict(state)
    without = {**state, "state": {}}
    with pytest.raises(ValueError, match="'step'"):
        _method(IEF, {})(model).load_state_dict(without)
    with pytest.raises(ValueError, match="one parameter group"):
        _method(IEF, {})(model).load_state_dict({"state": {}, "param_groups": []})
    bad = copy.deepcopy(state)
    bad["param_groups"][0]["lr"] = -1.0
    opt = _method(IEF, {})(model)
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1


def test_kept_curvature_survives_a_save_with_every_field() -> None:
    """Every field of the blocks travels, an eigenvalue-corrected block's eigenvalues too: the
    reloaded curvature applies its inverse bitwise as the original."""
    from backends.torch.kfac.curvature import kfac_curvature
    from backends.torch.optim.kfac import _packed, _unpacked

    model = _model(torch.float64)
    x, y = _data(torch.float64)[0]
    curvature = kfac_curvature(model, CE, x, y, methods=("ekfac",), eigenvalue_correction=True)
    corrected = [b for b in curvature.blocks if b.factors is not None]
    assert corrected and all(
        b.factors["ekfac"].corrected_eigenvalues is not None for b in corrected
    )
    buffer = io.BytesIO()
    torch.save(_packed(curvature), buffer)
    buffer.seek(0)
    loaded = _unpacked(torch.load(buffer, weights_only=True))
    v = torch.randn(curvature.num_params, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.inverse_apply("ekfac", v, damping=1e-2),
                       curvature.inverse_apply("ekfac", v, damping=1e-2))
    assert loaded.fallback == curvature.fallback and loaded.num_params == curvature.num_params
