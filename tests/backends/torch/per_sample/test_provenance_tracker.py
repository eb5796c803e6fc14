"""The tracker itself: the reshape arithmetic against enumerated index maps, bad input, tensors
it never saw, values read into Python, in-place writes through aliases, and the same answers
when another mode drives it through ``record``."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

from torch.overrides import TorchFunctionMode  # noqa: E402

from backends.torch.axes import BatchAxis  # noqa: E402
from backends.torch.per_sample.provenance import (  # noqa: E402
    SAMPLE_FREE,
    NotPerSample,
    ProvenanceTracker,
    operation_name,
)
from backends.torch.per_sample.provenance_views import reshape_axis  # noqa: E402

from .provenance_cases import CASES  # noqa: E402
from .provenance_probe import run  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _layouts_by_enumeration(shape_out: tuple[int, ...], labels: torch.Tensor, n: int) -> set:
    """Every (axis, outer, inner) whose index map n(i) = (i // inner) % n gives ``labels``."""
    found = set()
    for j, size in enumerate(shape_out):
        for inner in range(1, size + 1):
            if size % (n * inner):
                continue
            want = (torch.arange(size) // inner) % n
            shape = [1] * len(shape_out)
            shape[j] = size
            if torch.equal(labels, want.reshape(shape).expand(shape_out)):
                found.add(BatchAxis(j, size // (n * inner), inner))
    return found


def _factorisations(total: int, length: int) -> list[tuple[int, ...]]:
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    return [s for s in itertools.product(divisors, repeat=length) if math.prod(s) == total]


RESHAPES = [
    (shape_in, where, shape_out)
    for n in (2, 3)
    for shape_in, where in [
        ((n, 4), BatchAxis(0)), ((2, n, 2), BatchAxis(1)), ((3, 2 * n), BatchAxis(1, outer=2)),
        ((2 * n, 2), BatchAxis(0, inner=2)), ((n, n), BatchAxis(1))]
    for length in (1, 2, 3)
    for shape_out in _factorisations(math.prod(shape_in), length)
]


@pytest.mark.parametrize(("shape_in", "where", "shape_out"), RESHAPES)
def test_reshape_axis_agrees_with_the_enumerated_index_map(shape_in, where, shape_out) -> None:
    n = shape_in[where.axis] // (where.outer * where.inner)
    lengths = torch.arange(shape_in[where.axis])
    shape = [1] * len(shape_in)
    shape[where.axis] = -1
    labels = ((lengths // where.inner) % n).reshape(shape).expand(shape_in).reshape(shape_out)
    possible = _layouts_by_enumeration(shape_out, labels, n)
    got = reshape_axis(shape_in, where, n, shape_out)
    assert (got in possible) if got is not None else not possible


def test_bad_input_is_refused_by_name() -> None:
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="num_samples"):
        ProvenanceTracker(0, [(x, BatchAxis(0))])
    with pytest.raises(ValueError, match="num_samples"):
        ProvenanceTracker(True, [(x, BatchAxis(0))])
    with pytest.raises(ValueError, match=r"inputs\[1\] must be a \(torch.Tensor, BatchAxis\)"):
        ProvenanceTracker(4, [(x, BatchAxis(0)), (x, 0)])
    with pytest.raises(ValueError, match=r"inputs\[0\]: axis 1 .* shape \(4, 3\)"):
        ProvenanceTracker(4, [(x, BatchAxis(1))])


def test_a_tensor_never_seen_is_not_per_sample() -> None:
    outside = torch.randn(4, 3)  # neither an input nor declared free
    x = torch.randn(4, 3)
    with ProvenanceTracker(4, [(x, BatchAxis(0))]) as tracker:
        y = x + outside
        z = x + outside.detach()  # computed in the pass from an unseen tensor
    for t in (outside, y, z):
        assert type(tracker.axis_of(t)) is NotPerSample
        assert "did not see" in tracker.axis_of(t).reason


def test_values_read_into_python_are_listed() -> None:
    x = torch.randn(4, 3)
    with ProvenanceTracker(4, [(x, BatchAxis(0))]) as tracker:
        table = torch.arange(3.0)
        if table.sum() > 0:  # sample free: no leak
            pass
        if x.sum() > 0:
            pass
        x[0, 0].item()
    assert tracker.leaks == ["__bool__", "item"]


def test_numpy_axis_alias_is_read_as_dim() -> None:
    x = torch.randn(4, 4)
    with ProvenanceTracker(4, [(x, BatchAxis(0))]) as tracker:
        over_batch = x.softmax(axis=0)
        over_features = x.softmax(axis=1)
    assert type(tracker.axis_of(over_batch)) is NotPerSample
    assert tracker.axis_of(over_features) == BatchAxis(0)


def test_writing_samples_through_an_alias_refuses_the_other_views() -> None:
    x = torch.randn(4, 3)
    with ProvenanceTracker(4, [(x, BatchAxis(0))]) as tracker:
        buf = torch.zeros(4, 3)
        row = buf[0]
        flat = buf.detach().view(-1)  # shares memory without being a view of buf
        buf.add_(x)
        same = buf.mul_(2.0)  # the state does not change: nothing else to refuse
    assert tracker.axis_of(buf) == tracker.axis_of(same) == BatchAxis(0)
    for t in (row, flat):
        assert "shares memory" in tracker.axis_of(t).reason


def test_replacing_data_through_the_property_is_a_write() -> None:
    x = torch.randn(4, 3)
    with ProvenanceTracker(4, [(x, BatchAxis(0))]) as tracker:
        buf = torch.zeros(4, 3)
        buf.data = x.sum(0, keepdim=True).expand(4, 3)
    assert "reduces over the batch" in tracker.axis_of(buf).reason


def test_a_foreach_write_reaches_every_tensor_of_its_list() -> None:
    x = torch.randn(4, 3)
    with ProvenanceTracker(4, [(x, BatchAxis(0))]) as tracker:
        a, b = torch.zeros(3), torch.zeros(3)
        torch._foreach_add_([a, b], [x.sum(0), x.sum(0)])
    assert all("reduces over the batch" in tracker.axis_of(t).reason for t in (a, b))


def test_one_sample_takes_any_layout_that_fits() -> None:
    x = torch.randn(1, 3)
    with ProvenanceTracker(1, [(x, BatchAxis(0))]) as tracker:
        y = x.squeeze(0)
    assert tracker.axis_of(y) == BatchAxis(0, 1, 3)


def test_iterating_a_tensor_unbinds_its_first_axis() -> None:
    x = torch.randn(2, 4, 3)  # (T, N, d)
    with ProvenanceTracker(4, [(x, BatchAxis(1))]) as tracker:
        steps = list(x)
        rows = [r.sum() for r in x.transpose(0, 1)]
    assert [tracker.axis_of(s) for s in steps] == [BatchAxis(0)] * 2
    assert all("separates" in tracker.axis_of(r).reason for r in rows)


class _Driver(TorchFunctionMode):
    """Another mode that runs each operation itself and tells the tracker (as UseWatch will)."""

    def __init__(self, tracker: ProvenanceTracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.tracker.record(operation_name(func), args, kwargs, result)
        return result


@pytest.mark.parametrize("name", ["encoder_layer_sequence_first", "t5", "in_place"])
def test_record_from_another_mode_gives_the_same_answers(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    built = case.build()
    values = {k: spec.value for k, spec in built.inputs.items()}
    alone = run(built, values, [t.detach().clone() for t in built.free])
    tracker = ProvenanceTracker(built.num_samples,
                                [(values[k], s.where) for k, s in built.inputs.items()],
                                free=built.free)
    with _Driver(tracker):
        named = built.forward(values)
    for key in case.expected:
        assert tracker.axis_of(named[key]) == alone.recorder.axis_of(alone.named[key])


def test_clear_forgets_everything() -> None:
    x = torch.randn(4, 3)
    with ProvenanceTracker(4, [(x, BatchAxis(0))], free=[]) as tracker:
        y = x * 2
    tracker.clear()
    assert type(tracker.axis_of(y)) is NotPerSample and type(tracker.axis_of(x)) is NotPerSample
    assert tracker.state(3.0) is SAMPLE_FREE
