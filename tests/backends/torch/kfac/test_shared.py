"""K-FAC (backends.torch.kfac.curvature and the K-FAC optimisers) on tied and shared parameters.

A parameter used by several modules has one block in which every use is summed. The
expected factors are formed here independently, from a Python loop of single-sample passes
in float64 that read each use's input and output gradient with ``retain_grad``:

    A = (1 / (N T)) sum_{n, uses, t} a a^T,    B = sum_n w_n sum_{uses, t} b b^T,
    D = sum_n w_n g_n * g_n  (the diagonal fallback, g_n the per-sample gradient)

with T the positions of all uses together and w_n = 1 (eKFAC) or 1 / s_n (ieKFAC). The
tolerance is 8 N eps relative: sums of N products of back-propagated values that the loop
and the batched hooks compute with the same kernels in another order.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.kfac.curvature import kfac_curvature, kfac_directions  # noqa: E402
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EPS = 2.0**-52
CE = ngdref.SoftmaxCrossEntropy()
N = 5


class TwinLinear(nn.Module):
    """z = head(tanh(second(tanh(first(x))))), ``second`` sharing ``first``'s weight (and bias,
    unless ``own_bias``)."""

    def __init__(self, own_bias: bool = False) -> None:
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.second.weight = self.first.weight
        if not own_bias:
            self.second.bias = self.first.bias
        self.uses = (self.first, self.second)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


class TwinEmbedding(nn.Module):
    """Two token positions looked up by two Embeddings sharing one weight, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Embedding(6, 4), nn.Embedding(6, 4)
        self.right.weight = self.left.weight
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.left(ids[:, 0]) + self.right(ids[:, 1])))


class TiedOutput(nn.Module):
    """An Embedding whose weight is also the output layer's (T5's tied lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(3, 4)
        self.lm_head = nn.Linear(4, 3, bias=False)
        self.lm_head.weight = self.shared.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.shared(ids).sum(dim=1)))


def _twin_linear() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return TwinLinear().double(), torch.randn(N, 4, dtype=torch.float64), torch.tensor(
        [0, 1, 2, 0, 1]
    )


def _twin_embedding() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.tensor([[0, 1], [2, 2], [3, 5], [1, 4], [5, 0]])
    return TwinEmbedding().double(), ids, torch.tensor([0, 1, 2, 0, 1])


def _tied_output() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.tensor([[0, 1], [2, 2], [1, 0], [1, 1], [2, 0]])
    return TiedOutput().double(), ids, torch.tensor([0, 1, 2, 0, 1])


def _weight(method: str, e: torch.Tensor) -> float:
    return 1.0 / float(torch.sum(e * e)) if method == "iekfac" else 1.0


def _dense_linear_factors(
    model: TwinLinear, x: torch.Tensor, y: torch.Tensor, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (with a ones column for the joint bias: d_in + 1), B and the bias block's B, by a loop
    of single-sample passes that keep each use's input and output gradient."""
    a_sum = torch.zeros(5, 5, dtype=torch.float64)
    b_sum = torch.zeros(4, 4, dtype=torch.float64)
    for n in range(x.shape[0]):
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def keep(_: nn.Module, args: tuple, out: torch.Tensor, seen: list = seen) -> None:
            out.retain_grad()
            seen.append((args[0], out))

        handles = [m.register_forward_hook(keep) for m in model.uses]
        z = model(x[n:n + 1])
        for h in handles:
            h.remove()
        e = CE.grad(z.detach(), y[n:n + 1])
        z.backward(e)
        w = _weight(method, e)
        for inp, out in seen:
            a = torch.cat([inp.detach()[0], torch.ones(1, dtype=torch.float64)])
            a_sum += torch.outer(a, a)
            b_sum += w * torch.outer(out.grad[0], out.grad[0])
        model.zero_grad()
    positions = x.shape[0] * len(model.uses)
    return a_sum / positions, b_sum, b_sum


def _close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return float(torch.linalg.norm(got - expected)) <= 8 * N * EPS * float(
        torch.linalg.norm(expected)
    )


@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_shared_linear_weight_has_one_block_summing_both_uses(method: str) -> None:
    model, x, y = _twin_linear()
    curvature = kfac_curvature(model, CE, x, y, methods=(method,))
    assert curvature.fallback == {}
    names = [b.name for b in curvature.blocks]
    assert names == ["first", "first.bias", "head", "head.bias"]  # one block per parameter
    a_ref, b_ref, bias_ref = _dense_linear_factors(model, x, y, method)
    weight, bias = curvature.blocks[0].factors[method], curvature.blocks[1].factors[method]
    assert _close(weight.input_factor, a_ref[:4, :4])
    assert _close(weight.grad_factor, b_ref)
    assert _close(bias.grad_factor, bias_ref)
    joint = kfac_curvature(model, CE, x, y, methods=(method,), bias="joint")
    assert [b.name for b in joint.blocks] == ["first", "head"]
    assert joint.blocks[0].shape == (4, 5)
    assert _close(joint.blocks[0].factors[method].input_factor, a_ref)


def test_shared_weight_with_own_biases_is_separate_or_refused_joint() -> None:
    torch.manual_seed(3)
    model = TwinLinear(own_bias=True).double()
    x, y = torch.randn(N, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    curvature = kfac_curvature(model, CE, x, y, methods=("ekfac",))
    assert [b.name for b in curvature.blocks] == [
        "first", "first.bias", "second.bias", "head", "head.bias"
    ]
    a_ref, b_ref, _ = _dense_linear_factors(model, x, y, "ekfac")
    assert _close(curvature.blocks[0].factors["ekfac"].input_factor, a_ref[:4, :4])
    assert _close(curvature.blocks[0].factors["ekfac"].grad_factor, b_ref)
    with pytest.raises(ValueError, match=re.escape("weight 'first.weight' is shared")):
        kfac_curvature(model, CE, x, y, methods=("ekfac",), bias="joint")


def _dense_diagonal(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, param: nn.Parameter, method: str
) -> torch.Tensor:
    """D = sum_n w_n g_n^2 of ``param`` from single-sample backward passes (every use summed
    by autograd)."""
    total = torch.zeros(param.numel(), dtype=torch.float64)
    for n in range(x.shape[0]):
        z = model(x[n:n + 1])
        e = CE.grad(z.detach(), y[n:n + 1])
        (g,) = torch.autograd.grad(z, [param], grad_outputs=e)
        total += _weight(method, e) * g.reshape(-1) ** 2
    return total


FALLBACK_CASES: list[tuple[str, Callable, str, str]] = [
    ("tied_output", _tied_output, "shared.weight",
     "no Kronecker factors: uses of different layouts (a lookup; outer products)"),
]


@pytest.mark.parametrize(("name", "build", "param", "reason"), FALLBACK_CASES,
                         ids=[c[0] for c in FALLBACK_CASES])
@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_shared_parameter_outside_supported_layers_falls_back_once(
    name: str, build: Callable, param: str, reason: str, method: str
) -> None:
    model, x, y = build()
    curvature = kfac_curvature(model, CE, x, y, methods=(method,))
    assert list(curvature.fallback) == [param]
    assert reason in curvature.fallback[param]
    block = next(b for b in curvature.blocks if b.name == param)
    assert sum(b.diagonal is not None for b in curvature.blocks) == 1
    expected = _dense_diagonal(model, x, y, model.get_parameter(param), method)
    assert _close(block.diagonal[method], expected)


@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_shared_embedding_weight_has_one_kronecker_block(method: str) -> None:
    """Both lookups' positions in one block: A = diag(counts) / (N T) over both uses, kept as
    its diagonal; B from every use's output gradients (loop of single-sample passes)."""
    model, ids, y = _twin_embedding()
    curvature = kfac_curvature(model, CE, ids, y, methods=(method,))
    assert curvature.fallback == {}
    block = curvature.blocks[0]
    assert (block.name, block.shape) == ("left", (4, 6))
    counts = torch.bincount(ids.reshape(-1), minlength=6).double() / ids.numel()
    factors = block.factors[method]
    assert factors.input_factor.shape == (6,) and _close(factors.input_factor, counts)
    b_sum = torch.zeros(4, 4, dtype=torch.float64)
    for n in range(N):
        outs: list[torch.Tensor] = []

        def keep(_: nn.Module, args: tuple, out: torch.Tensor, outs: list = outs) -> None:
            out.retain_grad()
            outs.append(out)

        handles = [m.register_forward_hook(keep) for m in (model.left, model.right)]
        z = model(ids[n:n + 1])
        for h in handles:
            h.remove()
        e = CE.grad(z.detach(), y[n:n + 1])
        z.backward(e)
        b_sum += _weight(method, e) * sum(o.grad[0][None].T @ o.grad[0][None] for o in outs)
        model.zero_grad()
    assert _close(factors.grad_factor, b_sum)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, IEKFAC], ids=lambda c: c.__name__)
@pytest.mark.parametrize("build", [_twin_linear, _twin_embedding, _tied_output],
                         ids=["twin_linear", "embeddings", "tied_output"])
def test_optimisers_step_on_shared_parameters(cls: type, build: Callable) -> None:
    model, x, y = build()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    options = {"kfac_fisher": "type-2"} if cls is KFAC else {}
    direction = kfac_directions(model, CE, x, y, damping=0.1, methods=(cls.method,), **options)
    cls(model, CE, lr=0.5, damping=0.1, **options).step(lambda: (x, y))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert after.shape == before.shape == direction[cls.method].shape  # tied: counted once
    expected = before - 0.5 * direction[cls.method]
    assert float(torch.linalg.norm(after - expected)) <= 64 * EPS * float(
        torch.linalg.norm(before)
    )
