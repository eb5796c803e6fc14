"""The authors' remaining conventions as named options of ngdref, and two named refusals.

The expected values follow the authors' released code, written out here on its own terms (the
pairwise loops of ``iEFOptimizer_GP.py``'s duplicate filter with NaN cosines for a zero row,
``torch.median`` for the median), never through the functions under test:

* the duplicate filter's all-zero rows: ``dedup_zero_rows="keep"`` keeps them as the authors'
  filter does (their cosine 0/0 is NaN and never exceeds the threshold), "drop" removes them;
* SF's relative damping: lambda times the median of the diagonal of the kept true rows' Gram
  matrix (``median_damping``);
* ``grad_norm_imbalance`` with a zero row: a named error unless +inf is asked for;
* ``directions(key=...)``: a float key is refused as what it is, an integer of any type works.
"""

from __future__ import annotations

import numpy as np
import pytest

import ngdref
from ngdref.updates import median_damping

torch = pytest.importorskip("torch")

EPS = float(np.finfo(np.float64).eps)


def _authors_kept(rows: np.ndarray, threshold: float) -> list[int]:
    """iEFOptimizer_GP.py's filter: every pair above the threshold removes its smaller-norm row
    (the later one on equal norms); cosines of a zero row are NaN and never compare above."""
    gram = rows @ rows.T
    diagonal = np.sqrt(np.diag(gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = gram / np.outer(diagonal, diagonal)
    norms = np.linalg.norm(rows, axis=1)
    removed = []
    for i in range(rows.shape[0]):
        for j in range(i + 1, rows.shape[0]):
            if abs(cosine[i, j]) > threshold:
                removed.append(i if norms[j] > norms[i] else j)
    return [i for i in range(rows.shape[0]) if i not in removed]


def _rows(case: str) -> np.ndarray:
    """Rows with duplicates (a scaled copy, a negated copy) and, per case, zero rows."""
    rng = np.random.default_rng(len(case))
    base = rng.standard_normal((5, 7)) * np.array([1.0, 3.0, 0.5, 2.0, 1.5])[:, None]
    extra = {"one_zero": 1, "two_zeros": 2, "no_zero": 0}[case]
    return np.vstack([base, 2.0 * base[0], -0.7 * base[3], np.zeros((extra, 7))])


CASES = ["no_zero", "one_zero", "two_zeros"]


@pytest.mark.parametrize("case", CASES)
def test_keeping_zero_rows_is_the_authors_filter(case: str) -> None:
    rows = _rows(case)
    gram = rows @ rows.T
    expected = _authors_kept(rows, 0.99)
    kept = ngdref.near_duplicate_mask(gram, threshold=0.99, zero_rows="keep")
    assert list(np.flatnonzero(kept)) == expected
    dropped = ngdref.near_duplicate_mask(gram, threshold=0.99)  # the default drops them
    nonzero = [i for i in expected if np.any(rows[i] != 0)]
    assert list(np.flatnonzero(dropped)) == nonzero
    greedy = ngdref.near_duplicate_mask(gram, threshold=0.99, rule="greedy", zero_rows="keep")
    assert set(np.flatnonzero(greedy)) >= {i for i in expected if i not in nonzero}


@pytest.mark.parametrize("case", CASES)
def test_kept_zero_rows_leave_damped_updates_unchanged(case: str) -> None:
    rows = _rows(case)
    s = np.linspace(0.5, 2.0, rows.shape[0])
    keep, info = ngdref.ief_update(rows, s, damping=1e-3, dedup_threshold=0.99,
                                   dedup_zero_rows="keep", return_info=True)
    drop = ngdref.ief_update(rows, s, damping=1e-3, dedup_threshold=0.99)
    assert int(info.kept.sum()) == len(_authors_kept(rows, 0.99))
    # a zero row's own equation decouples: the same solve on the other rows (rounding only)
    assert np.linalg.norm(keep - drop) <= 1e3 * EPS * np.linalg.norm(drop)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("damping", [1e-3, 0.25])
def test_median_damping_is_the_authors_median_of_the_kept_gram_diagonal(
    case: str, damping: float
) -> None:
    rows = _rows(case)
    kept = _authors_kept(rows, 0.99)
    diagonal = torch.diag(torch.from_numpy(rows @ rows.T))[kept]
    expected = float(torch.median(diagonal)) * damping  # their `C.diag().median() * -damping`
    got = median_damping(rows, damping)
    assert got == pytest.approx(expected, rel=8 * rows.shape[1] * EPS)
    if case == "two_zeros":  # the kept zero rows pull the median down: the rule matters
        without = median_damping(rows, damping, dedup_zero_rows="drop")
        assert without > got


def test_median_damping_refuses_a_zero_median() -> None:
    rows = np.vstack([np.ones((1, 3)), np.zeros((2, 3))])
    with pytest.raises(ngdref.SingularMatrixError, match="median squared norm"):
        median_damping(rows, 0.1)


def test_a_zero_row_makes_the_imbalance_a_named_error_or_an_asked_for_inf() -> None:
    rows = _rows("one_zero")
    zero = rows.shape[0] - 1
    with pytest.raises(ValueError, match=rf"rows \[{zero}\] are all zero"):
        ngdref.grad_norm_imbalance(rows)
    with pytest.raises(ValueError, match=rf"rows \[{zero}\] are all zero"):  # caller's numbers
        ngdref.grad_norm_imbalance(rows, kept=np.arange(rows.shape[0]) != 1)
    assert ngdref.grad_norm_imbalance(rows, zero_rows="inf") == np.inf
    nonzero = np.any(rows != 0, axis=1)
    norms = np.linalg.norm(rows[nonzero], axis=1)
    got = ngdref.grad_norm_imbalance(rows, kept=nonzero)
    assert got == pytest.approx(norms.max() / norms.min(), rel=16 * EPS)
    with pytest.raises(ValueError, match="zero_rows must be"):
        ngdref.grad_norm_imbalance(rows, zero_rows="skip")


def test_directions_key_float_is_refused_by_name_and_any_integer_works() -> None:
    from torch import nn

    from backends.torch.provider import TorchProvider

    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0])
    provider = TorchProvider(model, x)
    loss = ngdref.SoftmaxCrossEntropy()
    with pytest.raises(TypeError, match=r"key must be an int seed or an array of uniforms.*0\.5"):
        ngdref.directions(provider, loss, y, damping=1e-3, methods=("sf",), key=0.5)
    plain = ngdref.directions(provider, loss, y, damping=1e-3, methods=("sf",), key=3)
    numpy_int = ngdref.directions(provider, loss, y, damping=1e-3, methods=("sf",),
                                  key=np.int64(3))
    assert torch.equal(plain["sf"], numpy_int["sf"])
