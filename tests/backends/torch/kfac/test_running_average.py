"""The K-FAC optimisers' running average across batches whose block structures differ.

A data-dependent branch can call a layer's weight outside its module (``F.linear`` on it),
so that batch's curvature has a diagonal block where the other had a Kronecker block: the
average must start again from the new batch (as a fresh optimiser would), not blend or zip
unrelated factors. The expected step is that of a fresh optimiser on the same parameters.
"""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC  # noqa: E402


class Branchy(nn.Module):
    """Its first layer runs as a module when x[0, 0] > 0, else functionally on its weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x[0, 0] > 0):
            h = self.lin(x)
        else:
            h = F.linear(x, self.lin.weight, self.lin.bias)
        return self.out(torch.tanh(h))


def _batch(sign: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x[0, 0] = sign * (abs(float(x[0, 0])) + 0.1)
    return x, torch.randint(0, 2, (6,), generator=g)


def _optimiser(cls: type, model: nn.Module) -> object:
    return cls(model, ngdref.SoftmaxCrossEntropy(), lr=0.1, damping=1e-2, running_average=0.5)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, IEKFAC], ids=lambda c: c.__name__)
@pytest.mark.parametrize(("second", "restarted"), [(-1.0, True), (1.0, False)],
                         ids=["other-structure", "same-structure"])
def test_a_new_block_structure_restarts_the_average(cls: type, second: float,
                                                    restarted: bool) -> None:
    torch.manual_seed(0)
    model = Branchy().double()
    opt = _optimiser(cls, model)
    opt.step(batch=_batch(1.0, 1))
    # a fresh optimiser at the same parameters and step (KFAC's labels are keyed by the step)
    # without the kept factors: no history to average with
    fresh_model = copy.deepcopy(model)
    fresh = _optimiser(cls, fresh_model)
    state = copy.deepcopy(opt.state_dict())
    del state["state"][0]["curvature"]
    fresh.load_state_dict(state)
    opt.step(batch=_batch(second, 2))
    assert opt.diagnostics["average_restarted"] is restarted
    fresh.step(batch=_batch(second, 2))
    same = all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh_model.parameters(),
                                                  strict=True))
    # restarted: exactly the fresh optimiser's step; blended: a different one
    assert same is restarted
