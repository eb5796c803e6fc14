"""Optimiser checkpoints: a resumed run is bit-identical; a foreign state dict is refused."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from tests.backends.torch.optim.cases import N, mlp_problem  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- checkpoints ----------------------------------------------------------------------------
def make_optimizer(cls: type, model: nn.Module, **overrides: Any) -> Any:
    options = {"lr": 0.1, "damping": 1e-2}
    if cls in (EF, SF):
        options["total_steps"] = 4
    if cls is SF:
        options["seed"] = 3
    return cls(model, ngdref.SoftmaxCrossEntropy(), **{**options, **overrides})


@pytest.mark.parametrize("cls", [IEF, EF, SF, NGD])
def test_resume_from_state_dict_is_bit_identical(cls: type) -> None:
    generator = torch.Generator().manual_seed(1)
    data = [
        (
            torch.randn(N, 5, dtype=torch.float64, generator=generator),
            torch.randint(0, 3, (N,), generator=generator),
        )
        for _ in range(4)
    ]
    straight = mlp_problem().model
    opt = make_optimizer(cls, straight)
    for batch in data:
        opt.step(lambda b=batch: b)

    interrupted = mlp_problem().model
    first = make_optimizer(cls, interrupted)
    for batch in data[:2]:
        first.step(lambda b=batch: b)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    # a different lr (and seed) at construction: load_state_dict must restore the saved ones
    resumed_model = copy.deepcopy(interrupted)
    resumed = make_optimizer(cls, resumed_model, lr=7.0, **({"seed": 99} if cls is SF else {}))
    resumed.load_state_dict(saved)
    assert resumed.steps_taken == 2 and resumed.param_groups[0]["lr"] == 0.1
    for batch in data[2:]:
        resumed.step(lambda b=batch: b)
    for a, b in zip(straight.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_refuses_another_optimiser() -> None:
    model = mlp_problem().model
    state = make_optimizer(IEF, model).state_dict()
    ef = make_optimizer(EF, model)
    with pytest.raises(ValueError, match="hyperparameters"):
        ef.load_state_dict(state)
    with pytest.raises(ValueError, match="'step'"):
        make_optimizer(IEF, model).load_state_dict({k: v for k, v in state.items() if k != "step"})
    bad = copy.deepcopy(state)
    bad["param_groups"][0]["lr"] = -1.0
    opt = make_optimizer(IEF, model)
    with pytest.raises(ValueError, match="lr"):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["lr"] == 0.1
