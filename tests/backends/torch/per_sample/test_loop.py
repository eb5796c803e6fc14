"""per_sample="loop": rows from single-sample passes, against independent per-sample rows.

References (float64): a Python loop of ``torch.autograd.grad`` on a deep copy of the model fed
one sample at a time, its inputs cut by hand (:func:`models.reference_rows`), for every case;
and ``torch.func.vmap`` of ``torch.func.grad`` over the batch axis where vmap runs the model.

Tolerance: both sides evaluate the same derivative of an O(1) model (random weights, inputs of
unit variance) through at most ~20 operations whose sums have at most ~100 terms; the error
of each entry is at most (terms x operations) eps = 2000 eps ~ 4.4e-13 relative to the row's
largest entry (and vmap only reorders batched sums). :data:`RTOL` = 1e-12.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch.func import functional_call, grad, vmap  # noqa: E402

from backends.torch.per_sample.loop import (  # noqa: E402
    loop_vjp,
    loop_vjp_ranges,
    slice_packed,
)
from tests.backends.torch.per_sample.models import (  # noqa: E402
    CASES,
    Adapter,
    Case,
    build,
    one_sample,
    reference_rows,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

RTOL = 1e-12


def _setup(case: Case) -> tuple[Any, Adapter, torch.Tensor]:
    model, inputs, axes = build(case, torch.float64)
    adapter = Adapter(model, inputs, axes)
    with adapter.module_mode():
        z = adapter.sub_batch_logits(adapter.unflatten(adapter.params_vector()), slice(None))
    u = torch.randn(z.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return (model, inputs, axes), adapter, u


def _assert_rows(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    assert got.shape == expected.shape
    assert float(((got - expected).abs() / scale).max()) <= RTOL


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_loop_rows_match_single_sample_copies(case: Case) -> None:
    """Every model, vmap-able or not (RNN/GRU/LSTM both layouts and packed, a zero-state
    cell, Python control flow, tied/frozen/sparse parameters; T == N where it matters)."""
    (model, inputs, axes), adapter, u = _setup(case)
    before = [p.detach().clone() for p in model.parameters()]
    _assert_rows(loop_vjp(adapter, u), reference_rows(model, inputs, axes, u))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _vmap_rows(model: Any, inputs: tuple, axes: tuple, u: torch.Tensor) -> torch.Tensor:
    """G by vmap over the batch axes of grad of u_n . z_n for a batch of one."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def one(p: dict, *rest: Any) -> torch.Tensor:
        *xs, un = rest
        z = functional_call(model, p, tuple(x.unsqueeze(a) for x, a in zip(xs, axes, strict=True)))
        return (z.reshape(-1) * un).sum()

    model.eval()
    g = vmap(grad(one), in_dims=(None, *axes, 0))(params, *inputs, u)
    return torch.cat([g[k].reshape(u.shape[0], -1) for k in params], dim=1)


VMAP_CASES = [c for c in CASES if c.vmap]


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("case", VMAP_CASES, ids=[c.name for c in VMAP_CASES])
def test_loop_rows_match_vmap(case: Case) -> None:
    (model, inputs, axes), adapter, u = _setup(case)
    _assert_rows(loop_vjp(adapter, u), _vmap_rows(model, inputs, axes, u))


RANGES = [
    [(0, 3)],  # inside the first parameter
    [(20, 40), (2, 7)],  # unordered; one across a parameter boundary
    [(1, 1), (5, 200), (240, 3)],  # single entries, most of theta, the last entries
]


@pytest.mark.parametrize("ranges", RANGES)
@pytest.mark.parametrize("name", ["gru-seq-first-T=N", "tied-frozen-sparse-padded-embedding-d=N"])
def test_ranges_are_the_columns_of_the_reference_rows(name: str, ranges: list) -> None:
    case = next(c for c in CASES if c.name == name)
    (model, inputs, axes), adapter, u = _setup(case)
    p = adapter.params_vector().numel()
    ranges = [(o, min(s, p - o)) for o, s in ranges if o < p]
    expected = reference_rows(model, inputs, axes, u)
    out = [torch.full((u.shape[0], s), torch.nan, dtype=torch.float64) for _, s in ranges]
    got = loop_vjp_ranges(adapter, u, ranges, out=out)
    for (o, s), block, buffer in zip(ranges, got, out, strict=True):
        assert block is buffer  # written in place
        _assert_rows(block, expected[:, o:o + s])


def test_out_is_written_in_place() -> None:
    (model, inputs, axes), adapter, u = _setup(CASES[0])
    out = torch.full((u.shape[0], adapter.params_vector().numel()), torch.nan,
                     dtype=torch.float64)
    assert loop_vjp(adapter, u, out=out) is out
    _assert_rows(out, reference_rows(model, inputs, axes, u))


def test_mode_policy_is_applied_and_flags_restored() -> None:
    """A model in train mode with dropout: the rows are the eval-mode rows, and every
    module's flag is as the user left it (one submodule deliberately in eval)."""
    (model, inputs, axes), adapter, u = _setup(CASES[0])  # Linear, Tanh, Dropout, Linear
    model.train()
    model[1].eval()
    expected = reference_rows(model, inputs, axes, u)
    _assert_rows(loop_vjp(adapter, u), expected)
    assert [m.training for m in model.modules()] == [True, True, False, True, True]


def test_slice_packed_keeps_each_sample() -> None:
    (_, (packed,), axes), _, _ = _setup(next(c for c in CASES if c.name == "gru-packed"))
    for rows in (slice(1, 4), slice(3, 4), slice(0, 5)):
        got = slice_packed(packed, rows)
        for i, n in enumerate(range(*rows.indices(5))):
            (alone,) = one_sample((packed,), axes, n)
            (mine,) = one_sample((got,), axes, i)
            assert torch.equal(mine.data, alone.data)
            assert torch.equal(mine.batch_sizes, alone.batch_sizes)


class _BatchDependent(Adapter):
    """Logits padded to the batch's longest input: a sample alone has fewer entries."""

    def sub_batch_logits(self, params: Any, rows: slice) -> torch.Tensor:
        z = super().sub_batch_logits(params, rows)
        return torch.cat([z, z[:, :1].expand(-1, z.shape[0] - 1)], dim=1)


def test_batch_dependent_output_is_refused_by_name() -> None:
    (model, inputs, axes), _, _ = _setup(CASES[0])
    adapter = _BatchDependent(model, inputs, axes)
    with adapter.module_mode():
        z = adapter.sub_batch_logits(adapter.unflatten(adapter.params_vector()), slice(None))
    with pytest.raises(ValueError, match="sample 0 alone gives logits of shape"):
        loop_vjp(adapter, torch.ones_like(z))


BAD = [  # (what, call, exception, message)
    ("cotangents rows", lambda a, u: loop_vjp(a, u[1:]), ValueError, "cotangents has 4 rows"),
    ("cotangents 1-d", lambda a, u: loop_vjp(a, u[0]), ValueError,
     r"cotangents must be .*\(N, C\)"),
    ("cotangents dtype", lambda a, u: loop_vjp(a, u.float()), TypeError, "cotangents has dtype"),
    ("cotangents width", lambda a, u: loop_vjp(a, u[:, 1:]), ValueError, "C = 2 per sample"),
    ("ranges empty", lambda a, u: loop_vjp_ranges(a, u, []), ValueError, "ranges must be"),
    ("ranges overlap", lambda a, u: loop_vjp_ranges(a, u, [(0, 5), (4, 2)]), ValueError,
     "ranges must be disjoint"),
    ("ranges past P", lambda a, u: loop_vjp_ranges(a, u, [(50, 2)]), ValueError,
     "offset \\+ size <= P = 51"),
    ("ranges size 0", lambda a, u: loop_vjp_ranges(a, u, [(0, 0)]), ValueError, "size >= 1"),
    ("ranges bool", lambda a, u: loop_vjp_ranges(a, u, [(True, 2)]), ValueError, "ranges"),
    ("out shape", lambda a, u: loop_vjp(a, u, out=torch.empty(5, 50, dtype=torch.float64)),
     ValueError, r"out must be a torch.Tensor of shape \(5, 51\)"),
    ("out dtype", lambda a, u: loop_vjp(a, u, out=torch.empty(5, 51)), TypeError, "out has dtype"),
    ("out count", lambda a, u: loop_vjp_ranges(a, u, [(0, 2), (3, 1)],
                                               out=[torch.empty(5, 2, dtype=torch.float64)]),
     ValueError, r"out must hold one tensor per range \(2\), got 1"),
]


@pytest.mark.parametrize(("what", "call", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_by_name_before_any_pass(what: str, call: Any, error: type,
                                                      message: str) -> None:
    (model, _, _), adapter, u = _setup(CASES[0])
    calls = []
    original = adapter.sub_batch_logits
    adapter.sub_batch_logits = lambda *a: calls.append(1) or original(*a)  # type: ignore
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=message):
        call(adapter, u)
    if what != "cotangents width":  # C is known only from the first sample's logits
        assert not calls
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
