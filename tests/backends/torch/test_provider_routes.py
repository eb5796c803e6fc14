"""TorchProvider's per-sample engine: the fall-through of every route, its report, the
certificate, the mode policy and the deprecated keywords, in float64.

Expected rows come from :func:`tests.backends.torch.per_sample.models.reference_rows`: a
Python loop of ``torch.autograd.grad`` on a deep copy of the model fed one sample at a time,
written without the code under test. Bound (float64): the routes and the loop differ by the
order of sums of at most a few hundred terms in these shallow models, c eps with c < 1e3, so
``torch.testing.assert_close`` at rtol 1e-10 and atol 1e-12 times the largest entry.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.layers import Linear  # noqa: E402
from backends.torch.per_sample.policy import LEDGER  # noqa: E402
from backends.torch.per_sample.semantics import PerSampleSemanticsError  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402
from ngdref.certificate import RowsCertificateError  # noqa: E402
from tests.backends.torch.per_sample.models import (  # noqa: E402
    LastStep,
    Pooled,
    ZeroStateCell,
    reference_rows,
)

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop")]
N = 4
LAYER = ("auto", "ghost", "hooks")


def dense(rows: Any) -> torch.Tensor:
    return rows.materialise() if hasattr(rows, "materialise") else ngdref.as_rows(rows).array


def close(got: Any, want: torch.Tensor) -> None:
    atol = 1e-12 * max(1.0, float(want.abs().max()))
    torch.testing.assert_close(dense(got), want, rtol=1e-10, atol=atol)


def _gru() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return LastStep(nn.GRU(3, 4, batch_first=True), 4, 3).double(), torch.randn(
        N, N, 3, dtype=torch.float64)


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(N, 3, dtype=torch.float64)


def _u(seed: int = 2) -> torch.Tensor:
    return torch.randn(N, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("route", ["auto", "ghost", "hooks", "vmap", "loop"])
def test_every_route_runs_a_gru_exactly_and_says_how(route: str) -> None:
    """torch.func cannot run nn.GRU: the GRU's parameters fall through to the loop (the
    layer routes keep the head's layer rows), every parameter's route and the reasons told."""
    model, x = _gru()
    provider = TorchProvider(model, x, per_sample=route)
    rows = provider.per_sample_rows(_u())
    close(rows, reference_rows(model, (x,), (0,), _u()))
    gru = [name for name in provider.param_names if name.startswith("rnn.")]
    assert set(provider.routes) == set(provider.param_names)
    assert {provider.routes[name] for name in gru} == {"loop"}
    assert provider.routes["head.weight"] == ("loop" if route in ("vmap", "loop") else
                                              "materialised" if route == "hooks" else "ghost")
    if route != "loop":  # the loop asked for is no fallback
        assert any("torch.func.vmap could not run" in f for f in provider.fallbacks)
    assert provider.certificate is not None


@pytest.mark.parametrize("route", LAYER)
def test_a_zero_state_cell_is_exact_by_its_layers(route: str) -> None:
    """h_0 = torch.zeros(N, hidden) is sample free: the first step's call of ``rec`` is a
    sample-free call whose output meets the batch in a sum (a capture), later calls are
    per sample; no fallback."""
    torch.manual_seed(3)
    model = ZeroStateCell(3, 4, 3).double()
    x = torch.randn(N, N, 3, dtype=torch.float64)
    provider = TorchProvider(model, x, per_sample=route)
    close(provider.per_sample_rows(_u()), reference_rows(model, (x,), (0,), _u()))
    assert provider.fallbacks == ()


class _SequenceFirst(nn.Module):
    """(N, T, d) -> a sequence-first encoder layer on (T, N, d) with T == N."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)
        self.inner = Pooled(layer, 4, 3, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(0, 1))


def test_sequence_first_attention_with_t_equal_n_gets_factors() -> None:
    """The batch axis 1 of every (T, N, d) call by provenance: factors for the attention's
    packed in_proj_weight, out_proj and the feed-forward Linears, no fallback."""
    torch.manual_seed(4)
    model = _SequenceFirst().double().eval()
    x = torch.randn(N, N, 4, dtype=torch.float64)
    provider = TorchProvider(model, x, per_sample="ghost")
    close(provider.per_sample_rows(_u()), reference_rows(model, (x,), (0,), _u()))
    assert provider.fallbacks == ()
    for name in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight"):
        assert provider.routes[f"inner.layer.{name}"] == "ghost"


def test_a_wrong_layer_kind_is_caught_by_the_certificate(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Linear's factors made wrong (b scaled by 1.01): "raise" refuses by name with the
    parameters bitwise unchanged, "fallback" redoes the rows by vmap and reports it."""
    model, x = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    factors = Linear.factors

    def wrong(self: Any, module: Any, inputs: Any, grads: Any, wanted: Any = None) -> Any:
        return factors(self, module, inputs, {k: 1.01 * g for k, g in grads.items()}, wanted)

    monkeypatch.setattr(Linear, "factors", wrong)
    with pytest.raises(RowsCertificateError):
        TorchProvider(model, x, certify="always").per_sample_rows(_u())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    provider = TorchProvider(model, x, certify="always", on_mismatch="fallback")
    rows = provider.per_sample_rows(_u())
    close(rows, reference_rows(model, (x,), (0,), _u()))
    assert provider.certified.route == "vmap"
    assert any("per_sample='auto'" in f and "failed their certificate" in f
               for f in provider.fallbacks)


def test_certify_first_certifies_once_per_structure() -> None:
    model, x = _mlp()
    LEDGER.forget(model)
    first = TorchProvider(model, x)
    first.per_sample_rows(_u())
    assert first.certificate is not None and first.certificate.route == "forward"
    again = TorchProvider(model, x)
    again.per_sample_rows(_u(5))
    assert again.certificate is None
    other = TorchProvider(model, torch.cat([x, x]))  # other input shapes: certified again
    other.per_sample_rows(torch.cat([_u(), _u()]))
    assert other.certificate is not None
    never = TorchProvider(model, x, certify="never")
    never.per_sample_rows(_u())
    assert never.certificate is None


class _Cube(torch.autograd.Function):
    """x^3 with a first-order backward only: no forward-mode rule, no double backward (a
    user's custom kernel), so the certificate has no reference pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class _Custom(nn.Module):
    """A Linear, the custom function, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(_Cube.apply(self.inner(x)))


def test_rows_that_cannot_be_certified_come_from_the_loop() -> None:
    torch.manual_seed(5)
    model = _Custom().double()
    x = torch.randn(N, 3, dtype=torch.float64)
    provider = TorchProvider(model, x, certify="always")
    close(provider.per_sample_rows(_u()), reference_rows(model, (x,), (0,), _u()))
    assert provider.certificate is None and provider.certified.route == "loop"
    assert set(provider.routes.values()) == {"loop"}
    assert any("the certificate cannot run" in f for f in provider.fallbacks)


def test_train_mode_semantics_are_refused_before_any_pass() -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(PerSampleSemanticsError, match=r"model\.1 \(BatchNorm1d\)"):
        TorchProvider(model, x, mode="train")
    assert calls == [] and all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model.train()
    provider = TorchProvider(model, x)  # the eval policy: running statistics
    close(provider.per_sample_rows(_u()), reference_rows(model, (x,), (0,), _u()))
    assert model.training and model[1].training  # the user's flags restored


@pytest.mark.parametrize(("old", "new"), [
    ({"per_sample_method": "vmap"}, "vmap"),
    ({"per_sample_method": "hooks"}, "hooks"),
    ({"per_sample_method": "ghost"}, "auto"),
    ({"per_sample_method": "ghost", "layer_route": "ghost"}, "ghost"),
    ({"per_sample_method": "ghost", "layer_route": "materialise"}, "hooks"),
    ({"per_sample_method": "loop"}, "loop"),
])
def test_the_deprecated_keywords_name_the_new_option(old: dict, new: str) -> None:
    model, x = _mlp()
    with pytest.warns(DeprecationWarning, match=f"use per_sample={new!r}"):
        provider = TorchProvider(model, x, **old)
    assert provider.per_sample == new and provider.certify == "never"


@pytest.mark.parametrize("route", ["vmap", "loop", *LAYER])
def test_chunks_change_nothing(route: str) -> None:
    model, x = _gru()
    whole = reference_rows(model, (x,), (0,), _u())
    provider = TorchProvider(model, x, per_sample=route, chunk_size=3)
    close(provider.per_sample_rows(_u()), whole)


def test_a_hooked_forward_torch_cannot_run_falls_back_whole(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """An error from inside torch in the hooked forward pass: the plain forward gives the
    logits, and every parameter's rows come from the whole-model routes, reported."""
    from backends.torch.per_sample import layer_pass

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a torch-internal failure")

    monkeypatch.setattr(layer_pass.LayerPass, "_forward", broken)
    model, x = _mlp()
    provider = TorchProvider(model, x)
    close(provider.per_sample_rows(_u()), reference_rows(model, (x,), (0,), _u()))
    assert set(provider.routes.values()) == {"vmap"}
    assert any("a torch-internal failure" in f for f in provider.fallbacks)
