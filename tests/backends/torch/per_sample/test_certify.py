"""The rows certificate: it passes every correct route and catches every wrong row.

Correct rows: dense tensors, ``ngdref.DenseRows``, ``GhostRows`` from today's
``TorchProvider(..., per_sample_method="ghost")``, ``vmap`` rows and loop rows, on the tiny
MLP / CNN / T5 (LoRA, prompt tuning) / ViT (LoRA) of tests/torch_provider_cases.py and on the
recurrent and control-flow models of :mod:`models`, float32 and float64, with the reference
G v by forward mode and by double backward. The bound is the one of ngdref.certificate (its
derivation is there); nothing here is fitted.

Wrong rows, each of which the certificate must refuse with a ``RowsCertificateError`` naming
the sample: one row off by 1e-3 relative in float64 and 1e-2 in float32 (a random direction
drawn independently of v; the miss probability is sqrt(2/pi) b_n / ||Delta_n||, below 1e-3 for
these models: b_n / ||g_n|| <= 8 u (sqrt(P) + sqrt(L) ||u_n|| ||t_n|| / ||g_n||) ~ 1e-5 in
float32), a swapped pair of rows, one ghost factor off for one sample, and sequence-first rows
grouped along the wrong batch axis with T == N.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.inputs import POSITIONAL, hf_models, split_inputs  # noqa: E402
from backends.torch.per_sample.certify import certify_rows  # noqa: E402
from backends.torch.per_sample.loop import loop_vjp  # noqa: E402
from backends.torch.per_sample.policy import Ledger, certified_rows, structure_key  # noqa: E402
from backends.torch.provider import TorchProvider, default_output_fn  # noqa: E402
from ngdref.certificate import RowsCertificateError  # noqa: E402
from tests.backends.torch.per_sample.models import (  # noqa: E402
    CASES,
    Adapter,
    Case,
    Pooled,
    build,
    reference_rows,
)

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop")]

DTYPES = [torch.float32, torch.float64]
#: relative size of the corruption of one row, per dtype (the issue's figures)
CORRUPTION = {torch.float32: 1e-2, torch.float64: 1e-3}
#: reference routes a case cannot take (torch has no rule), with "auto" taking the other
NO_FORWARD = {("lstm-batch-first-T=N", torch.float32), ("lstm-seq-first", torch.float32)}
NO_DOUBLE_BACKWARD = {("tied-frozen-sparse-padded-embedding-d=N", None)}


def _unsupported(table: set, name: str, dtype: torch.dtype) -> bool:
    return (name, dtype) in table or (name, None) in table


def _model_case(case: Case, dtype: torch.dtype) -> tuple[Adapter, torch.Tensor, torch.Tensor]:
    """Adapter, cotangents u (N, C) and loop rows G of a case of :mod:`models`."""
    model, inputs, axes = build(case, dtype)
    adapter = Adapter(model, inputs, axes)
    with adapter.module_mode():
        z = adapter.sub_batch_logits(adapter.unflatten(adapter.params_vector()), slice(None))
    u = torch.randn(z.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return adapter, u, loop_vjp(adapter, u)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loop_rows_pass_by_every_reference_route(case: Case, dtype: torch.dtype) -> None:
    adapter, u, rows = _model_case(case, dtype)
    auto = certify_rows(adapter, rows, u)
    expected = "double-backward" if _unsupported(NO_FORWARD, case.name, dtype) else "forward"
    assert auto.route == expected
    assert auto.error <= auto.bound
    for route, table in (("forward", NO_FORWARD), ("double-backward", NO_DOUBLE_BACKWARD)):
        if _unsupported(table, case.name, dtype):
            with pytest.raises((NotImplementedError, RuntimeError)):
                certify_rows(adapter, rows, u, route=route)
        else:
            assert certify_rows(adapter, rows, u, route=route).route == route


# ---- rows of today's provider on the tiny models -------------------------------------------------
def _provider_case(name: str, dtype: torch.dtype) -> tuple[Any, Adapter, Any, torch.Tensor]:
    """(model, provider inputs, adapter, cotangents R dl/dz) of a TorchProvider test case."""
    from tests.backends.torch.provider_cases import case

    c = case(name)
    model = copy.deepcopy(c.model).to(dtype)  # the cases are cached: never cast them

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if torch.is_floating_point(t) else t

    inputs = cast(c.inputs) if isinstance(c.inputs, torch.Tensor) else {
        k: cast(v) for k, v in c.inputs.items()}
    batch = split_inputs(hf_models(model), inputs, torch.device("cpu"))
    if batch.positional:
        adapter = Adapter(model, (batch.batched[POSITIONAL],), (0,))
    else:
        adapter = Adapter(model, (), (), kwargs=batch.batched, output_fn=default_output_fn)
    with adapter.module_mode(), torch.no_grad():
        logits = adapter.sub_batch_logits(adapter.unflatten(adapter.params_vector()),
                                          slice(None))
    return model, inputs, adapter, c.loss.grad(logits, c.targets)


ROUTES: dict[str, Callable[[Any, Any, Adapter, torch.Tensor], Any]] = {
    "ghost": lambda m, x, a, u: TorchProvider(
        m, x, per_sample="auto", certify="never").per_sample_rows(u),
    "ghost-factors": lambda m, x, a, u: TorchProvider(
        m, x, per_sample="ghost", certify="never").per_sample_rows(u),
    "vmap-tensor": lambda m, x, a, u: TorchProvider(
        m, x, per_sample="vmap", certify="never").vjp(u),
    "loop-DenseRows": lambda m, x, a, u: ngdref.as_rows(loop_vjp(a, u)),
}
PROVIDER_CASES = ["mlp_ce", "cnn", "t5_lora", "t5_prompt", "vit_lora"]


@pytest.mark.parametrize("reference", ["forward", "double-backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("name", PROVIDER_CASES)
def test_provider_rows_pass(name: str, route: str, dtype: torch.dtype, reference: str) -> None:
    model, inputs, adapter, u = _provider_case(name, dtype)
    rows = ROUTES[route](model, inputs, adapter, u)
    result = certify_rows(adapter, rows, u, route=reference)
    assert result.route == reference
    assert result.error <= result.bound
    # T5's layer norm and ViT's softmax run in float32 inside a float64 model
    low = dtype == torch.float32 or name.startswith(("t5", "vit"))
    assert result.unit_roundoff == (2.0**-24 if low else 2.0**-53)


# ---- wrong rows ----------------------------------------------------------------------------------
def _scaled_row(rows: torch.Tensor, n: int, relative: float) -> torch.Tensor:
    """rows with row n moved by ``relative`` ||row n|| along a random unit direction."""
    direction = torch.randn(rows.shape[1], dtype=rows.dtype,
                            generator=torch.Generator().manual_seed(99))
    bad = rows.clone()
    bad[n] += relative * rows[n].norm() * direction / direction.norm()
    return bad


def _swapped(rows: torch.Tensor, n: int, m: int) -> torch.Tensor:
    bad = rows.clone()
    bad[[n, m]] = rows[[m, n]]
    return bad


CORRUPT_CASES = [c for c in CASES if c.name in (
    "mlp-dropout", "encoder-seq-first-T=d=N", "lstm-batch-first-T=N", "gru-packed",
    "zero-state-cell-T=N", "tied-frozen-sparse-padded-embedding-d=N")]


@pytest.mark.parametrize("reference", ["auto", "forward", "double-backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CORRUPT_CASES, ids=[c.name for c in CORRUPT_CASES])
def test_one_wrong_row_is_caught_and_named(case: Case, dtype: torch.dtype, reference: str) -> None:
    table = {"forward": NO_FORWARD, "double-backward": NO_DOUBLE_BACKWARD}.get(reference, set())
    if _unsupported(table, case.name, dtype):
        pytest.skip(f"torch has no {reference} rule for this model")
    adapter, u, rows = _model_case(case, dtype)
    for n in (0, 3):
        bad = _scaled_row(rows, n, CORRUPTION[dtype])
        with pytest.raises(RowsCertificateError, match=f"at sample n = {n} ") as info:
            certify_rows(adapter, bad, u, route=reference)
        assert info.value.error > info.value.bound
    with pytest.raises(RowsCertificateError) as info:
        certify_rows(adapter, _swapped(rows, 1, 4), u, route=reference)
    assert info.value.sample in (1, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["mlp_ce", "t5_lora", "vit_lora"])
def test_one_wrong_ghost_factor_is_caught(name: str, dtype: torch.dtype) -> None:
    """The output gradients b of one sample off by the corruption in every factor block (the
    factor part of its row off by that much, relatively)."""
    model, inputs, adapter, u = _provider_case(name, dtype)
    rows = ROUTES["ghost-factors"](model, inputs, adapter, u)
    assert rows.factors, "layer_route='ghost' keeps factors for these models"
    certify_rows(adapter, rows, u)
    # T5 and ViT compute parts of a float64 model in float32: their certificate is float32's
    relative = CORRUPTION[torch.float32 if name != "mlp_ce" else dtype]
    for block in rows.factors:
        block.b[2] *= 1 + relative
    with pytest.raises(RowsCertificateError, match="at sample n = 2 "):
        certify_rows(adapter, rows, u)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_window_of_samples_certifies_those_samples(dtype: torch.dtype) -> None:
    """samples=k: the reference pass runs on k consecutive samples (from a seeded offset); a
    wrong row inside is caught and named by its batch index, one outside is not seen."""
    adapter, u, rows = _model_case(CASES[0], dtype)
    calls = []
    original = adapter.sub_batch_logits
    adapter.sub_batch_logits = lambda p, r: calls.append(r) or original(p, r)  # type: ignore
    assert certify_rows(adapter, rows, u, samples=2, seed=3).sample in range(5)
    (window,) = calls
    assert window.stop - window.start == 2
    inside, outside = window.start + 1, (window.stop % 5)
    with pytest.raises(RowsCertificateError, match=f"at sample n = {inside} "):
        certify_rows(adapter, _scaled_row(rows, inside, CORRUPTION[dtype]), u, samples=2, seed=3)
    certify_rows(adapter, _scaled_row(rows, outside, CORRUPTION[dtype]), u, samples=2, seed=3)
    assert calls[1] == calls[2] == window  # the same window for the same seed


class _SequenceFirst(nn.Module):
    """Linear -> tanh on (T, N, d), the mean over T, a Linear head: sequence-first."""

    def __init__(self, d: int, h: int, c: int) -> None:
        super().__init__()
        self.first = nn.Linear(d, h)
        self.pool = Pooled(nn.Tanh(), h, c, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.first(x))


def _grouped_rows(model: _SequenceFirst, x: torch.Tensor, u: torch.Tensor,
                  axis: int) -> torch.Tensor:
    """Per-sample rows with the first layer's factors a (T, N, d), b (T, N, h) summed over the
    other axis than ``axis`` (1: the right samples; 0: the positions taken for samples); the
    head's rows by the single-sample loop."""
    captured = {}
    handle = model.first.register_forward_hook(
        lambda m, args, out: captured.update(a=args[0], out=out))
    z = model(x)
    handle.remove()
    (b,) = torch.autograd.grad(z, captured["out"], grad_outputs=u)
    a = captured["a"]
    weight = torch.einsum("tnh,tnd->nhd" if axis == 1 else "tnh,tnd->thd", b, a)
    bias = b.sum(dim=0 if axis == 1 else 1)
    head = reference_rows(model, (x,), (1,), u)[:, weight[0].numel() + bias.shape[1]:]
    return torch.cat([weight.reshape(weight.shape[0], -1), bias, head], dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_from_the_wrong_batch_axis_are_caught(dtype: torch.dtype) -> None:
    """T == N: rows grouped along the positions have the right shape and the right sum
    G^T 1 (the full gradient), only the rows are wrong."""
    torch.manual_seed(0)
    n = 5
    model = _SequenceFirst(3, 4, 2).to(dtype).eval()
    x = torch.randn(n, n, 3, dtype=dtype)  # (T, N, d), T == N
    u = torch.randn(n, 2, dtype=dtype)
    right, wrong = (_grouped_rows(model, x, u, axis) for axis in (1, 0))
    torch.testing.assert_close(right, reference_rows(model, (x,), (1,), u))  # the construction
    torch.testing.assert_close(wrong.sum(0), right.sum(0))
    adapter = Adapter(model, (x,), (1,))
    certify_rows(adapter, right, u)
    for reference in ("forward", "double-backward"):
        with pytest.raises(RowsCertificateError):
            certify_rows(adapter, wrong, u, route=reference)


def test_verdict_on_the_ghost_rows_of_a_sequence_first_encoder_is_the_truth() -> None:
    """nn.TransformerEncoderLayer(batch_first=False) with T == N: the batch axis by
    provenance gives factors for every layer, no fallback, and the certificate passes them; a
    row set of the old shape-based route (the samples taken from axis 0) it refuses."""
    torch.manual_seed(0)
    n = 5
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=7, dropout=0.0)
    model = nn.Sequential()
    model.add_module("pool", Pooled(layer, 8, 3, 0))
    wrapped = _Transposed(model).double().eval()
    x = torch.randn(n, n, 8, dtype=torch.float64)  # provider layout (N, T, d)
    u = torch.randn(n, 3, dtype=torch.float64)
    rows = TorchProvider(wrapped, x, per_sample="ghost", certify="never").per_sample_rows(u)
    truth = reference_rows(wrapped, (x,), (0,), u)
    assert rows.fallbacks == () and set(rows.routes.values()) <= {"ghost", "materialised"}
    assert float((rows.materialise() - truth).norm() / truth.norm()) <= 1e-10
    adapter = Adapter(wrapped, (x,), (0,))
    certify_rows(adapter, rows, u)


class _Transposed(nn.Module):
    """(N, T, d) -> the wrapped sequence-first model on (T, N, d)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(0, 1))


# ---- the precision of the passes -----------------------------------------------------------------
class _Island(nn.Module):
    """A float64 model with one float32 step inside (as T5's layer norm variance)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)).float().double())


def test_unit_roundoff_follows_the_least_precise_arithmetic() -> None:
    torch.manual_seed(0)
    model = _Island().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    u = torch.randn(5, 3, dtype=torch.float64)
    adapter = Adapter(model, (x,), (0,))
    rows = loop_vjp(adapter, u)
    assert certify_rows(adapter, rows, u).unit_roundoff == 2.0**-24
    mlp = Adapter(nn.Linear(4, 3), (x.float(),), (0,))
    uf = u.float()
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # float32 matmuls may run in bfloat16
        assert certify_rows(mlp, loop_vjp(mlp, uf), uf).unit_roundoff == 2.0**-8
    finally:
        torch.set_float32_matmul_precision(previous)
    assert certify_rows(mlp, loop_vjp(mlp, uf), uf).unit_roundoff == 2.0**-24


# ---- bad input -----------------------------------------------------------------------------------
BAD = [  # (what, call, exception, message)
    ("rows short", lambda a, r, u: certify_rows(a, r[1:], u), ValueError,
     r"rows has shape \(4, 51\), expected \(N, P\) = \(5, 51\)"),
    ("rows wide", lambda a, r, u: certify_rows(a, torch.cat([r, r[:, :1]], 1), u), ValueError,
     r"expected \(N, P\)"),
    ("rows dtype", lambda a, r, u: certify_rows(a, r.float(), u), TypeError, "rows has dtype"),
    ("rows numpy", lambda a, r, u: certify_rows(a, r.numpy(), u), TypeError, "rows must be torch"),
    ("rows object", lambda a, r, u: certify_rows(a, object(), u), TypeError, "rows must be an"),
    ("cotangents rows", lambda a, r, u: certify_rows(a, r, u[1:]), ValueError,
     r"cotangents must be a torch.Tensor of shape \(N = 5, C\)"),
    ("cotangents dtype", lambda a, r, u: certify_rows(a, r, u.float()), TypeError,
     "cotangents has dtype"),
    ("cotangents width", lambda a, r, u: certify_rows(a, r, u[:, 1:]), ValueError,
     r"cotangents has shape \(5, 2\) but the model's logits have \(5, 3\)"),
    ("seed", lambda a, r, u: certify_rows(a, r, u, seed=-1), ValueError, "seed must be an int"),
    ("seed bool", lambda a, r, u: certify_rows(a, r, u, seed=True), ValueError, "seed must be"),
    ("route", lambda a, r, u: certify_rows(a, r, u, route="reverse"), ValueError,
     "route must be one of"),
    ("samples", lambda a, r, u: certify_rows(a, r, u, samples=0), ValueError,
     "samples must be None or an int >= 1"),
    ("row_sq_norms", lambda a, r, u: certify_rows(a, r, u, row_sq_norms=torch.ones(4)),
     ValueError, r"row_sq_norms must be a floating torch.Tensor of shape \(N = 5,\)"),
]


def test_non_finite_rows_are_named() -> None:
    adapter, u, rows = _model_case(CASES[0], torch.float64)
    rows[2, 3] = torch.inf
    with pytest.raises(ngdref.NonFiniteError, match="per_sample_grads contain NaN or inf"):
        certify_rows(adapter, rows, u)


@pytest.mark.parametrize(("what", "call", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name(what: str, call: Any, error: type, message: str) -> None:
    adapter, u, rows = _model_case(CASES[0], torch.float64)
    calls = []
    original = adapter.sub_batch_logits
    adapter.sub_batch_logits = lambda *a: calls.append(1) or original(*a)  # type: ignore
    with pytest.raises(error, match=message):
        call(adapter, rows, u)
    if what != "cotangents width":  # C is known only from the reference pass
        assert not calls


# ---- the policy: certify="first" | "always" | "never", on_mismatch -------------------------------
def _policy_setup() -> tuple[Adapter, torch.Tensor, torch.Tensor, nn.Module, Any, list]:
    adapter, u, rows = _model_case(CASES[0], torch.float64)
    built: list[str] = []
    return adapter, u, rows, adapter.model, structure_key(adapter.model, adapter.inputs), built


def _routes(rows: torch.Tensor, built: list[str], bad: bool = True) -> dict[str, Callable]:
    wrong = _swapped(rows, 0, 2)
    routes = {"ghost": lambda: built.append("ghost") or (wrong if bad else rows),
              "loop": lambda: built.append("loop") or rows}
    return routes


def test_first_certifies_once_per_structure_and_remembers_the_route() -> None:
    adapter, u, rows, model, key, built = _policy_setup()
    ledger = Ledger()
    first = certified_rows(adapter, u, _routes(rows, built, bad=False), owner=model, key=key,
                           ledger=ledger)
    assert first.certificate is not None and first.route == "ghost" and not first.fallbacks
    second = certified_rows(adapter, u, _routes(rows, built, bad=False), owner=model, key=key,
                            ledger=ledger)
    assert second.certificate is None and second.route == "ghost"
    other = structure_key(model, (adapter.inputs[0][:3],))  # other input shapes: certify again
    third = certified_rows(adapter, u, _routes(rows, built, bad=False), owner=model, key=other,
                           ledger=ledger)
    assert third.certificate is not None
    assert built == ["ghost"] * 3


def test_always_and_never() -> None:
    adapter, u, rows, model, key, built = _policy_setup()
    ledger = Ledger()
    for _ in range(2):
        result = certified_rows(adapter, u, _routes(rows, built, bad=False), owner=model,
                                key=key, ledger=ledger, certify="always")
        assert result.certificate is not None
    calls = []
    original = adapter.sub_batch_logits
    adapter.sub_batch_logits = lambda *a: calls.append(1) or original(*a)  # type: ignore
    result = certified_rows(adapter, u, _routes(rows, built), owner=model, key=key,
                            ledger=Ledger(), certify="never")
    assert result.certificate is None and result.route == "ghost" and not calls


def test_mismatch_raises_and_records_nothing() -> None:
    adapter, u, rows, model, key, built = _policy_setup()
    ledger = Ledger()
    with pytest.raises(RowsCertificateError):
        certified_rows(adapter, u, _routes(rows, built), owner=model, key=key, ledger=ledger)
    assert ledger.route(model, key) is None
    assert built == ["ghost"]


def test_fallback_takes_the_next_route_and_reports_it() -> None:
    adapter, u, rows, model, key, built = _policy_setup()
    ledger = Ledger()
    result = certified_rows(adapter, u, _routes(rows, built), owner=model, key=key,
                            ledger=ledger, on_mismatch="fallback")
    assert result.route == "loop" and result.rows is rows and result.certificate is not None
    assert len(result.fallbacks) == 1 and "per_sample='ghost'" in result.fallbacks[0]
    assert ledger.route(model, key) == "loop"
    again = certified_rows(adapter, u, _routes(rows, built), owner=model, key=key,
                           ledger=ledger, on_mismatch="fallback")
    assert again.route == "loop" and again.certificate is None
    assert "earlier step" in again.fallbacks[0]
    assert built == ["ghost", "loop", "loop"]  # the failed route is not built again


def test_every_route_failing_raises() -> None:
    adapter, u, rows, model, key, _ = _policy_setup()
    wrong = _swapped(rows, 0, 2)
    with pytest.raises(RowsCertificateError, match="every route"):
        certified_rows(adapter, u, {"ghost": lambda: wrong, "vmap": lambda: wrong},
                       owner=model, key=key, ledger=Ledger(), on_mismatch="fallback")


def test_structure_key_tracks_structure_and_shapes_not_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    key = structure_key(model, x, "eval")
    assert structure_key(model, torch.randn(5, 4), "eval") == key  # new values, same shapes
    assert structure_key(model, torch.randn(6, 4), "eval") != key
    assert structure_key(model, x.double(), "eval") != key
    assert structure_key(model, {"x": x}, "eval") != key
    assert structure_key(model, x, "train") != key
    fns = [lambda out: out for _ in range(2)]  # one lambda built anew (each step's closure)
    assert fns[0] is not fns[1]
    assert structure_key(model, x, fns[0]) == structure_key(model, x, fns[1])
    assert structure_key(model, x, fns[0]) != structure_key(model, x, lambda out: out.logits)
    model[0].weight.requires_grad_(False)
    assert structure_key(model, x, "eval") != key
    model[0].weight.requires_grad_(True)
    model[1] = nn.ReLU()
    assert structure_key(model, x, "eval") != key


def test_ledger_forgets_a_deleted_model() -> None:
    ledger = Ledger()
    model = nn.Linear(2, 2)
    ledger.record(model, "key", "ghost")
    assert ledger.route(model, "key") == "ghost"
    del model
    gc.collect()
    assert len(ledger) == 0  # weak keys: the ledger keeps no model alive


BAD_POLICY = [
    ({"certify": "sometimes"}, "certify must be one of"),
    ({"on_mismatch": "ignore"}, "on_mismatch must be one of"),
    ({"seed": -2}, "seed must be an int"),
    ({"reference": "finite-differences"}, "reference must be one of"),
    ({"samples": 0}, "samples must be None or an int >= 1"),
]


@pytest.mark.parametrize(("options", "message"), BAD_POLICY)
def test_bad_policy_options_are_refused_by_name(options: dict, message: str) -> None:
    adapter, u, rows, model, key, built = _policy_setup()
    with pytest.raises(ValueError, match=message):
        certified_rows(adapter, u, _routes(rows, built), owner=model, key=key, ledger=Ledger(),
                       **options)
    assert not built
