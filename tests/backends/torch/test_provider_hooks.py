"""TorchProvider's layer routes ("auto", "hooks") on the models they must not get wrong, in
float64.

The layer routes read a layer's input and output gradient per call; where its samples lie is
found by provenance. A call on a tensor computed from constants whose leading axis happens to
have length N (a (T, d) table with T == N) is not per sample: its per-sample rows still sum to
the batch gradient, so only a per-sample reference can catch them. Expected values are
independent of the provider: row n is ``torch.autograd.grad`` of ``u_n . z_n`` through the
model's ordinary forward on the whole batch (the definition of ``J_n^T u_n``), and the vmap
route agrees with it.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from backends.torch.provider import TorchProvider  # noqa: E402
from tests.backends.torch.provider_cases import assert_close  # noqa: E402

T, D, C = 4, 3, 2  # table rows, features, classes


class _ConstantTable(nn.Module):
    """A trainable Linear on the batch and on a constant (T, D) table averaged over its rows.

    z_n = head(tanh(lin(x_n) + mean_t lin(table_t))): sample n depends on every table row
    equally, so a route that takes table row n as sample n's gives wrong rows.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, dtype=torch.float64)
        self.head = nn.Linear(D, C, dtype=torch.float64)

    def forward(self, x: Any) -> Any:
        table = torch.arange(T * D, dtype=x.dtype).reshape(T, D) / (T * D)
        return self.head(torch.tanh(self.lin(x) + self.lin(table).mean(0)))


def _problem(num_samples: int = T) -> tuple[nn.Module, Any, Any, Any]:
    torch.manual_seed(11)
    model = _ConstantTable()
    x = torch.randn(num_samples, D, dtype=torch.float64)
    u = torch.randn(num_samples, C, dtype=torch.float64)
    return model, x, u, _batch_autograd_rows(model, x, u)


def _batch_autograd_rows(model: nn.Module, x: Any, u: Any) -> Any:
    """Row n: d(u_n . z_n)/d theta through the ordinary forward of the whole batch."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(x.shape[0]):
        z = model(x)
        grads = torch.autograd.grad((z[n] * u[n]).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_reference_agrees_with_vmap() -> None:
    model, x, u, expected = _problem()
    assert_close(TorchProvider(model, x, per_sample="vmap").vjp(u), expected)


# N == T, and chunks of T samples (each chunk's pass sees a batch of T), and chunks of 2 != T
@pytest.mark.parametrize(("num_samples", "chunk_size"), [(T, None), (2 * T, T), (T, 2)])
def test_auto_gives_exact_rows_for_a_linear_on_a_constant_table(
    num_samples: int, chunk_size: Any
) -> None:
    model, x, u, expected = _problem(num_samples)
    provider = TorchProvider(model, x, chunk_size=chunk_size)
    assert_close(provider.vjp(u), expected)
    # the table's call is sample free; its output's mean is added to every sample (a capture)
    assert provider.fallbacks == () and provider.routes["lin.weight"] == "materialised"
    assert_close(provider.vjp(u), expected)  # a second call: a new forward pass
    assert_close(provider.per_sample_rows(u).gram(), expected @ expected.T)


class _ConstantGram(_ConstantTable):
    """The Linear's output on the constant table meets the batch through a matmul:
    h_n = lin(x_n) + x_n M / T with M = lin(table)^T lin(table) (D, D), which no hook can split
    per sample (the broadcast captures are sums and products, not matmuls)."""

    def forward(self, x: Any) -> Any:
        table = torch.arange(T * D, dtype=x.dtype).reshape(T, D) / (T * D)
        h = self.lin(table)
        return self.head(torch.tanh(self.lin(x) + x @ (h.T @ h) / T))


# "hooks" gives exact rows where the watch can split the table's term (a sum), and where it
# cannot (a matmul) the Linear's parameters fall through to vmap, reported, instead of taking
# table row n as sample n's
@pytest.mark.parametrize(("num_samples", "chunk_size"), [(T, None), (2 * T, T)])
def test_explicit_hooks_on_a_constant_table(num_samples: int, chunk_size: Any) -> None:
    model, x, u, expected = _problem(num_samples)
    provider = TorchProvider(model, x, chunk_size=chunk_size, per_sample="hooks")
    assert_close(provider.vjp(u), expected)
    torch.manual_seed(11)
    model = _ConstantGram()
    for route in ("hooks", "auto"):
        provider = TorchProvider(model, x, chunk_size=chunk_size, per_sample=route)
        assert_close(provider.vjp(u), _batch_autograd_rows(model, x, u))
        assert provider.routes["lin.weight"] == provider.routes["lin.bias"] == "vmap"
        assert any(f.startswith("lin.weight: whole-model vmap") for f in provider.fallbacks)


class _TiedEmbedding(nn.Module):
    """A Linear's weight that only a tied nn.Embedding uses: hooks get embedding factors."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(D, 5, bias=False, dtype=torch.float64)  # named first: hookable
        self.emb = nn.Embedding(5, D, dtype=torch.float64)
        self.emb.weight = self.head.weight

    def forward(self, tokens: Any) -> Any:
        return torch.tanh(self.emb(tokens)).sum(1)


def test_auto_on_a_linear_weight_that_only_an_embedding_uses() -> None:
    torch.manual_seed(12)
    model = _TiedEmbedding()
    tokens = torch.randint(0, 5, (T, 3))
    u = torch.randn(T, D, dtype=torch.float64)
    provider = TorchProvider(model, tokens)
    assert_close(provider.vjp(u), _batch_autograd_rows(model, tokens, u))
    assert provider.fallbacks == ()  # the embedding's factors carry the shared weight


class _TwiceCalled(nn.Module):
    """One Linear called twice per forward: its per-sample gradient sums both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, dtype=torch.float64)

    def forward(self, x: Any) -> Any:
        return self.lin(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_hooks_sum_the_calls_of_a_linear_called_twice(chunk_size: Any) -> None:
    torch.manual_seed(13)
    model = _TwiceCalled()
    x = torch.randn(2 * T, D, dtype=torch.float64)
    u = torch.randn(2 * T, D, dtype=torch.float64)
    provider = TorchProvider(model, x, chunk_size=chunk_size, per_sample="hooks")
    assert_close(provider.vjp(u), _batch_autograd_rows(model, x, u))
