"""BatchAxis and batch_first against index arithmetic written out by hand."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch.axes import BATCH_FIRST, BatchAxis, batch_first  # noqa: E402

N = 3

#: (shape, where, a function of the sample n and the position of the other axes -> the index
#: into t) for layouts that occur: batch first, sequence first, merged in front or behind
CASES = [
    ((N, 4, 2), BATCH_FIRST),
    ((4, N, 2), BatchAxis(1)),
    ((4 * N, 2), BatchAxis(0, outer=4)),  # (T, N, d) -> (T N, d)
    ((N * 4, 2), BatchAxis(0, inner=4)),  # (N, T, d) -> (N T, d)
    ((2, 5 * N * 3), BatchAxis(1, outer=5, inner=3)),
    ((N, N, N), BatchAxis(1)),  # every axis has length N: only the declared one is samples
]


@pytest.mark.parametrize(("shape", "where"), CASES, ids=[str(c[1]) for c in CASES])
def test_batch_first_puts_each_samples_entries_in_its_row(shape, where) -> None:
    t = torch.arange(int(torch.Size(shape).numel())).reshape(shape)
    got = batch_first(t, where, N)
    k, outer, inner = where.axis, where.outer, where.inner
    for n in range(N):
        # the entries of sample n: along axis k the indices i with (i // inner) % N == n
        own = [i for i in range(shape[k]) if (i // inner) % N == n]
        want = t.index_select(k, torch.tensor(own))
        assert sorted(got[n].reshape(-1).tolist()) == sorted(want.reshape(-1).tolist())
        assert got[n].numel() == want.numel() == t.numel() // N
    assert got.shape[0] == N and got.shape[1 + k:3 + k] == (outer, inner)


def test_a_length_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="axis 1 of a tensor of shape"):
        batch_first(torch.zeros(2, 5), BatchAxis(1), N)
    with pytest.raises(ValueError, match="axis >= 0"):
        BatchAxis(0, inner=0)
