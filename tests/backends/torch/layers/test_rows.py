"""Per-sample rows of every layer kind against a loop of single-sample backward passes.

For each case of :mod:`.cases` and each per-parameter route ("ghost": factors wherever the
parts allow, "materialise": rows everywhere, "auto": the cost model's choice), the rows
that :func:`backends.torch.layers.assemble` builds from the recorded parts are compared, as
materialised rows, Gram matrix G G^T, G v and G^T w, with the float64 loop (bounds in
:mod:`.harness`). The float32 run computes the batch in float32 against the same loop.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch.layers import ROUTES  # noqa: E402

from .cases import CASES  # noqa: E402
from .harness import (  # noqa: E402
    assert_close,
    assert_rows_match,
    inputs,
    models,
    record,
    reference_rows,
    rows_of,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_rows_match_single_sample_loop(case, dtype) -> None:
    model, reference = models(case, dtype)
    args, kwargs = inputs(case, dtype)
    expected = reference_rows(case, reference, args, kwargs)
    batch = record(case, model, args, kwargs)
    assert not batch.recorder.refused, batch.recorder.refused
    for route in ROUTES:
        assert_rows_match(rows_of(batch, case.n, route), expected, dtype)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_recorded_forward_returns_the_modules_output(case) -> None:
    """The recorded forward (hooks, or a kind's decomposed forward) changes no output."""
    model, _ = models(case, torch.float64)
    args, kwargs = inputs(case, torch.float64)
    batch = record(case, model, args, kwargs)
    with torch.no_grad():
        own = case.outputs(model(*args, **kwargs))
    for got, expected in zip(case.outputs(batch.output), own, strict=True):
        assert_close(got.detach(), expected, torch.float64, "output")
