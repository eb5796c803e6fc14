"""Parameters broadcast over the batch (backends/torch/per_sample/watch.py) against independent
routes.

Each model below reads parameters outside any hooked module's per-sample call: added to the batch,
multiplied into it, repeated over it, or looked up at a constant table. The float64 cases go through
:func:`tests.backends.torch.per_sample.test_layer_pass.check_against_the_loop` (single-sample
backward passes through the model's ordinary ``__call__``; its bound and its check that exactly the
expected fallbacks are named). A capture computed wrongly fails the Gram identities; one that is
refused when it should not be names an unexpected fallback.

float32 (T5 and ViT with every parameter trainable, against the vmap route in float32): both
routes carry a relative rounding error of order eps32 (6e-8) times the depth and the number
of terms summed per entry (T^2 attention terms, d_model features: well under 100 here), so
||K - K_vmap||_F <= 1e-5 ||K_vmap||_F.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.per_sample.layer_pass import ROUTES  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402
from tests.backends.torch.per_sample.test_layer_pass import ALL_CASES, Case, check_against_the_loop  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Broadcasts(nn.Module):
    """Its own parameters and a Linear's bias broadcast over the batch in every captured way."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.token = nn.Parameter(torch.randn(1, 1, 4))  # repeated over N, concatenated
        self.pos = nn.Parameter(torch.randn(3, 4))  # added without a leading axis, s + x
        self.gain = nn.Parameter(torch.randn(()))  # a 0-d scale, s * x
        self.table = nn.Embedding(5, 2)  # looked up at a constant (3, 2) table
        self.head = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:  # x (N, 2, 4)
        n = x.shape[0]
        h = torch.cat([self.token.repeat(n, 1, 1), x], dim=1)  # (N, 3, 4)
        h = self.pos + self.lin(h) + self.lin.bias  # the bias: its hook's rows plus a capture
        h = self.gain * torch.tanh(h)
        bias = self.table(torch.arange(6).reshape(3, 2) % 5).reshape(1, 3, 4)
        h = torch.tanh(h + torch.tanh(bias))  # a sample-free tensor derived from a table
        h = h * self.token.broadcast_to(n, 1, 4)
        return self.head(h).mean(dim=1)


class TableInMatmul(nn.Module):
    """A sample-free tensor from an embedding meets the batch in a matmul: not split."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:  # x (N, 4)
        return self.head(torch.tanh(x @ self.table(torch.arange(4))))


class LeadingN(nn.Module):
    """A (T, d) position table with T = N added to the batch: broadcast, not per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:  # x (N, T, 4), N = T = 4
        pos = self.table(torch.arange(x.shape[1]))  # (4, 4): its hook must not take it
        return self.head(torch.tanh(x + pos)).mean(dim=1)


class Both(nn.Module):
    """A weight broadcast into the batch and also used in a matmul inside its own module."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:  # x (N, 4)
        return self.head(torch.tanh(x * self.gain + x @ torch.diag(self.gain)))


class ChangedAfter(nn.Module):
    """A broadcast sum changed in place afterwards: the capture's output is no longer it."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:  # x (N, 4)
        h = x + self.pos
        h.mul_(torch.tanh(h.detach()) + 1.5)
        return self.head(torch.tanh(h))


def _build(cls: type[nn.Module], shape: tuple[int, ...]) -> Any:
    def build() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
        torch.manual_seed(11)
        x = torch.randn(*shape, dtype=torch.float64)
        return cls().double(), x, torch.randint(0, 3, (shape[0],)), ngdref.SoftmaxCrossEntropy()

    return build


CASES = {c.name: c for c in [
    Case("every_broadcast", _build(Broadcasts, (4, 2, 4))),
    Case("table_in_a_matmul", _build(TableInMatmul, (4, 4)), ("table.weight: whole-model",)),
    Case("position_table_as_long_as_the_batch", _build(LeadingN, (4, 4, 4))),
    Case("broadcast_and_matmul", _build(Both, (4, 4)), ("gain: whole-model vmap (used both",)),
    Case("broadcast_changed_in_place", _build(ChangedAfter, (4, 4)), ("pos: whole-model",)),
]}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(CASES))
def test_broadcast_parameters_equal_the_loop(name: str, route: str) -> None:
    check_against_the_loop(CASES[name], route)


@pytest.mark.parametrize("name", ["t5_all_parameters", "vit_all_parameters"])
def test_float32_all_parameters_agree_with_vmap_and_fall_back_nowhere(name: str) -> None:
    model, inputs, targets, loss = ALL_CASES[name].build()
    model = model.float().eval()
    inputs = {k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}
    ghost = TorchProvider(model, inputs, per_sample="ghost")
    u = loss.grad(ghost.logits(), targets)
    rows = ghost.per_sample_rows(u)
    ref = TorchProvider(model, inputs, per_sample="vmap").vjp(u)
    k = ref.double() @ ref.double().T
    assert rows.fallbacks == ()
    assert float(torch.linalg.norm(rows.gram() - k)) <= 1e-5 * float(torch.linalg.norm(k))
    w = torch.linspace(-1.0, 2.0, ref.shape[0])
    assert float(torch.linalg.norm(rows.rmatvec(w) - w @ ref)) <= 1e-5 * float(
        torch.linalg.norm(w.abs() @ torch.linalg.vector_norm(ref, dim=1)))
