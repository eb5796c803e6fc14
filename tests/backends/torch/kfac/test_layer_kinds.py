"""kfac_curvature on every layer kind of the registry, against a loop of single-sample passes.

For each case of :mod:`.cases` (every kind; batch first, sequence first with T == N,
merged batches; tied, shared and functionally reused weights), each method and each
position convention: which parameters get diagonal blocks, and every block's A and B (or
diagonal), the whole block-diagonal matrix and its damped inverse applied to a vector
against :mod:`.reference` (single-sample float64 passes, factors formed from each call's
inputs and output gradients by autograd probes, placed by the reference's own reading of
the layer). Tolerance :func:`tests.backends.torch.layers.harness.rtol` (float64, 2^12 eps:
sums of at most 2^9 products from two exact routes); the inverse's, that times the
condition number of the damped matrix (a backward-stable solve on both sides).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch.kfac.curvature import kfac_curvature  # noqa: E402
from ngdref.kfac_diagonal import dense_factor  # noqa: E402
from tests.backends.torch.layers.harness import assert_close, rtol  # noqa: E402

from .cases import CASES, JOINT, KCase  # noqa: E402
from .reference import (  # noqa: E402
    CE,
    Reference,
    corrected_dense,
    dense,
    diagonal,
    factors,
    reference,
)

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")]
F64 = torch.float64
DAMPING = 0.1


def _owner(ref: Reference, position: int) -> str:
    return max((at, name) for name, at in ref.offsets.items() if at <= position)[1]


def _check_blocks(curvature, ref: Reference, model, method: str, convention: str,
                  joint: dict[str, str]) -> None:
    params = dict(model.named_parameters())
    for block in curvature.blocks:
        name = _owner(ref, int(block.index[0]))
        p = params[name]
        if block.diagonal is not None:
            assert_close(block.diagonal[method], diagonal(ref, name, p.numel()), F64,
                         f"{block.name}: D")
            continue
        row = (int(block.index[0]) - ref.offsets[name]) // (p.numel() // p.shape[0])
        role = "bias" if len(block.shape) == 1 else "weight"
        a, b = factors(ref.sides[(name, row, role)], ref.weights, convention,
                       ones=name in joint)
        f = block.factors[method]
        assert_close(f.grad_factor, b, F64, f"{block.name}: B")
        if a is not None:
            assert_close(dense_factor(torch, f.input_factor), a, F64, f"{block.name}: A")


def _check_matrix(curvature, ref: Reference, model, method: str, convention: str,
                  diagonal_names: set[str], joint: dict[str, str]) -> None:
    want = dense(ref, model, convention, diagonal_names, joint)
    assert_close(curvature.dense(method), want, F64, "the block-diagonal matrix")
    v = torch.randn(want.shape[0], dtype=F64, generator=torch.Generator().manual_seed(5))
    matrix = want + DAMPING * torch.eye(want.shape[0], dtype=F64)
    expected = torch.linalg.solve(matrix, v)
    got = curvature.inverse_apply(method, v, damping=DAMPING)
    kappa = float(torch.linalg.cond(matrix))
    error = float(torch.linalg.norm(got - expected))
    assert error <= kappa * rtol(F64) * float(torch.linalg.norm(expected)), (
        f"(K + lambda I)^-1 v off by {error:.3g} (kappa {kappa:.3g})")


def _run(case: KCase, method: str, convention: str, bias: str = "separate") -> None:
    model, x, y = case.batch()
    curvature = kfac_curvature(model, CE, x, y, methods=(method,), kfac_fisher="type-2",
                               convention=convention, bias=bias)
    diagonal_names = set(case.diagonal) | (set(case.lookups) if convention == "reduce"
                                           else set())
    assert set(curvature.fallback) == diagonal_names, curvature.fallback
    joint = _joint_pairs(model, curvature) if bias == "joint" else {}
    ref = reference(model, x, y, method)
    _check_blocks(curvature, ref, model, method, convention, joint)
    _check_matrix(curvature, ref, model, method, convention, diagonal_names, joint)


def _joint_pairs(model, curvature) -> dict[str, str]:
    """weight -> bias of the blocks whose shape has the extra column (read from the model:
    its "<module>.weight" and "<module>.bias", or in_proj_weight and in_proj_bias)."""
    names = {n for n, _ in model.named_parameters()}
    biased = {b.name.split("[")[0] for b in curvature.blocks if b.factors is not None}
    out = {}
    for n in names:
        for w, bias in ((".weight", ".bias"), ("in_proj_weight", "in_proj_bias")):
            if n.endswith(w) and n[:-len(w)] + bias in names and \
                    n[:-len(w)] + bias not in biased:
                out[n] = n[:-len(w)] + bias
    return out


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("method", ["ekfac", "iekfac", "kfac"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_blocks_match_single_sample_loop(case: KCase, method: str, convention: str) -> None:
    _run(case, method, convention)


@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
@pytest.mark.parametrize("case", JOINT, ids=str)
def test_joint_bias_blocks_match_single_sample_loop(case: KCase, method: str) -> None:
    _run(case, method, "expand", bias="joint")


@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_eigenvalue_corrected_blocks_match_single_sample_loop(case: KCase, method: str) -> None:
    """EK-FAC (expand): (U (x) V) diag(E) (U (x) V)^T per block against the loop's, V the
    identity for a lookup table's diagonal A. The eigenbasis is accurate to
    eps ||factor|| / (its smallest eigen-gap) (null spaces excepted: E is 0 there in every
    basis), so the bound is rtol times the largest such ratio."""
    model, x, y = case.batch()
    curvature = kfac_curvature(model, CE, x, y, methods=(method,), eigenvalue_correction=True)
    want, spread = corrected_dense(reference(model, x, y, method), model, set(case.diagonal))
    got = curvature.dense(method)
    error = float(torch.linalg.norm(got - want))
    assert error <= spread * rtol(F64) * float(torch.linalg.norm(want)), (
        f"corrected matrix off by {error:.3g} (||want|| {float(torch.linalg.norm(want)):.3g}, "
        f"spread {spread:.3g})")
