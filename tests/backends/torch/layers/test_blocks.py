"""Blocks from parts, the cost model's choices and the contract's bad input.

Expected values of the block products come from per-sample gradients built by a Python loop
over samples and positions (sum_t outer(u_nt, v_nt) placed at the part's rows), not from the
block code. Bounds: float64, sums of at most 2^6 terms, :func:`.harness.rtol`.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from backends.torch.layers import (  # noqa: E402
    LayerKind,
    Outer,
    PartShape,
    Rows,
    SplitBlock,
    TiedBlock,
    assemble,
    diagonal,
    factor_cost,
    input_factors,
    joint,
    kind_of,
    register,
    tied_cost,
)
from backends.torch.per_sample.rows import DenseBlock, FactorBlock  # noqa: E402

from .harness import assert_close  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N = 3


def _loop_rows(parts: list[Outer], shape: tuple[int, ...]) -> torch.Tensor:
    """(N, size): sum_t outer(u_nt, v_nt) at each part's rows, sample by sample."""
    out = torch.zeros(N, *shape, dtype=torch.float64)
    for p in parts:
        for n in range(N):
            for t in range(p.u.shape[1]):
                rows = slice(p.start, p.start + p.u.shape[2])
                out[n, rows] += torch.outer(p.u[n, t], p.v[n, t])
    return out.reshape(N, -1)


def _split_uses() -> tuple[list, tuple[int, int]]:
    """Two uses of a (5, 2) weight in row blocks of 2 and 3 rows, T = 2 and 4 positions."""
    gen = torch.Generator().manual_seed(0)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    uses = [(Outer(r(N, 2, 2), r(N, 2, 2), 0), Outer(r(N, 4, 3), r(N, 4, 2), 2)),
            (Outer(r(N, 1, 2), r(N, 1, 2), 0), Outer(r(N, 3, 3), r(N, 3, 2), 2))]
    return uses, (5, 2)


def test_split_block_products_match_loop_rows() -> None:
    uses, shape = _split_uses()
    block = assemble(4, shape, uses, route="ghost")
    assert isinstance(block, SplitBlock)
    expected = sum(_loop_rows(list(use), shape) for use in uses)
    assert_close(block.materialise(), expected, torch.float64, "rows")
    assert_close(block.cross(block), expected @ expected.T, torch.float64, "Gram")
    v = torch.randn(4 + 10, dtype=torch.float64)
    w = torch.randn(N, dtype=torch.float64)
    assert_close(block.matvec(v), expected @ v[4:], torch.float64, "G v")
    assert_close(block.rmatvec(w), expected.T @ w, torch.float64, "G^T w")
    assert_close(block.rmatvec(None), expected.sum(0), torch.float64, "G^T 1")
    dense = assemble(4, shape, uses, route="materialise")
    assert isinstance(dense, DenseBlock)
    assert_close(dense.rows, expected, torch.float64, "materialised rows")


def _tied_uses(n: int, seed: int) -> tuple[list, torch.Tensor]:
    """Two lookups (T = 2, 3) and two output-layer uses (T = 1, 2) of one (4, 3) table, and
    their per-sample gradients (n, 12) summed sample by sample and position by position."""
    gen = torch.Generator().manual_seed(seed)

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    expected = torch.zeros(n, 4, 3, dtype=torch.float64)
    uses = []
    for t in (2, 3):
        index, b = torch.randint(0, 4, (n, t), generator=gen), r(n, t, 3)
        uses.append((Outer(index, b, 0, "v"),))
        for i in range(n):
            for s in range(t):
                expected[i, index[i, s]] += b[i, s]
    for t in (1, 2):
        u, x = r(n, t, 4), r(n, t, 3)
        uses.append((Outer(u, x),))
        for i in range(n):
            for s in range(t):
                expected[i] += torch.outer(u[i, s], x[i, s])
    return uses, expected.reshape(n, -1)


def test_tied_uses_keep_factors_and_match_loop_rows() -> None:
    """A table read as a lookup and as an output layer: every product of the TiedBlock
    (its cross kernels between forms are gathers) against rows summed in a loop."""
    uses, expected = _tied_uses(N, 0)
    block = assemble(5, (4, 3), uses, route="ghost")
    assert isinstance(block, TiedBlock) and len(block.uses) == 2
    other_uses, other = _tied_uses(N + 2, 1)
    others = assemble(5, (4, 3), other_uses, route="ghost")
    assert_close(block.materialise(), expected, torch.float64, "rows")
    assert_close(block.cross(block), expected @ expected.T, torch.float64, "Gram")
    assert_close(block.cross(others), expected @ other.T, torch.float64, "cross-Gram")
    v = torch.randn(5 + 12, dtype=torch.float64)
    w = torch.randn(N, dtype=torch.float64)
    assert_close(block.matvec(v), expected @ v[5:], torch.float64, "G v")
    assert_close(block.at(0).matvec(v[5:]), expected @ v[5:], torch.float64, "G v at 0")
    assert_close(block.rmatvec(w), expected.T @ w, torch.float64, "G^T w")
    assert_close(block.rmatvec(None), expected.sum(0), torch.float64, "G^T 1")
    dense = assemble(5, (4, 3), uses, route="materialise")
    assert isinstance(dense, DenseBlock)
    assert_close(dense.rows, expected, torch.float64, "materialised rows")


def test_tied_cost_counts_the_cross_kernels() -> None:
    """T5-small's shared table (32128 x 512; N = 16, 50 lookups, 2 output positions):
    factors, though a flop count of the forms alone would miss the cross terms."""
    shapes = (PartShape(50, 32128, 512, lookup=True), PartShape(2, 32128, 512))
    alone, tied = factor_cost(16, shapes), tied_cost(16, shapes)
    pair = 16 * 16 * 50 * 2 * (512 + 1)
    assert tied.ghost.flops == alone.ghost.flops + 2 * pair
    assert tied.ghost_cheaper()
    assert not tied_cost(64, (PartShape(512, 8, 8, lookup=True), PartShape(512, 8, 8))
                         ).ghost_cheaper()


def test_bias_and_rows_parts_are_dense() -> None:
    u = torch.randn(N, 4, 3, dtype=torch.float64)
    bias = assemble(0, (3,), [(Outer(u, None),)], route="ghost")
    assert isinstance(bias, DenseBlock)
    assert_close(bias.rows, u.sum(1), torch.float64, "bias rows")
    rows = torch.randn(N, 6, dtype=torch.float64)
    assert torch.equal(assemble(0, (2, 3), [(Rows(rows),)], route="ghost").rows, rows)


def test_auto_route_follows_the_cost_model() -> None:
    """Wide and short: factors; narrow and long: rows (the cost model's two extremes)."""
    wide = [(Outer(torch.randn(N, 1, 64), torch.randn(N, 1, 64)),)]
    long = [(Outer(torch.randn(N, 64, 2), torch.randn(N, 64, 2)),)]
    assert isinstance(assemble(0, (64, 64), wide), FactorBlock)
    assert isinstance(assemble(0, (2, 2), long), DenseBlock)


def test_bytes_moved_can_favour_factors_over_a_flop_count() -> None:
    """N = 8, T = 16, d = 256 float32: fewer multiply-adds materialised, but its N d^2
    float32 writes and float64 Gram reads outweigh the ghost kernels' (N T)^2."""
    cost = factor_cost(8, (PartShape(16, 256, 256),), itemsize=4)
    assert cost.ghost.flops > cost.materialised.flops
    assert not cost.ghost_cheaper(balance=0.0)
    assert cost.ghost_cheaper()


def test_cost_of_dense_only_parts_has_no_ghost() -> None:
    assert factor_cost(4, (PartShape(3, 5, 0),)).ghost is None
    assert factor_cost(4, (PartShape(3, 5, 2), PartShape(3, 5, 0))).ghost is None
    big_vocab = factor_cost(4, (PartShape(8, 32000, 64, lookup=True),))
    assert big_vocab.ghost_cheaper()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"route": "cheapest"}, "route must be one of"),
    ({"uses": []}, "at least one use"),
])
def test_assemble_bad_input(kwargs, match) -> None:
    arguments = {"offset": 0, "shape": (2, 2),
                 "uses": [(Outer(torch.randn(N, 1, 2), torch.randn(N, 1, 2)),)], **kwargs}
    with pytest.raises(ValueError, match=match):
        assemble(**arguments)


def test_part_overrunning_its_parameter_is_refused() -> None:
    part = Outer(torch.randn(N, 1, 3), None, start=2)
    with pytest.raises(ValueError, match="overruns a parameter of shape"):
        assemble(0, (4,), [(part,)])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"grad": "w"}, "must name a present factor"),
    ({"v": None, "grad": "v"}, "must name a present factor"),
    ({"u": torch.zeros(N, 2, dtype=torch.long), "v": None}, "covers a whole table"),
])
def test_outer_bad_input(kwargs, match) -> None:
    arguments = {"u": torch.randn(N, 1, 2), "v": torch.randn(N, 1, 2), **kwargs}
    with pytest.raises(ValueError, match=match):
        Outer(**arguments)


def test_kronecker_factors_refuse_mixed_uses_and_diagonal_serves_them() -> None:
    rows = torch.randn(N, 4, dtype=torch.float64)
    uses = [(Rows(rows),)]
    with pytest.raises(ValueError, match="no common Kronecker form"):
        input_factors(uses, (2, 2))
    w = torch.rand(N, dtype=torch.float64)
    assert_close(diagonal(uses, (2, 2), weights=w), (w[:, None] * rows**2).sum(0),
                 torch.float64, "diagonal")


def test_joint_needs_the_bias_of_the_same_call() -> None:
    b, x = torch.randn(N, 2, 3), torch.randn(N, 2, 4)
    (use,) = joint([(Outer(b, x),)], [(Outer(b, None),)])
    assert torch.equal(use[0].v[..., -1], torch.ones(N, 2)) and use[0].u is b
    with pytest.raises(ValueError, match="the bias part of the same call"):
        joint([(Outer(b, x),)], [(Outer(b.clone(), None),)])
    index = torch.zeros(N, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="one linear part of the weight"):
        joint([(Outer(index, x, 0, "v"),)], [(Outer(b, None),)])


def test_default_forward_is_the_modules_own_with_its_output_tapped() -> None:
    """What an engine that substitutes every forward gets from a hookable kind."""
    module, x = nn.Linear(3, 2), torch.randn(4, 3)
    taps = {}
    out = kind_of(module).forward(module, (x,), {}, lambda name, t: taps.setdefault(name, t))
    assert torch.equal(out, module(x)) and taps["output"] is out


def test_register_refuses_taken_types_and_non_modules() -> None:
    with pytest.raises(ValueError, match="already registered for"):
        register(nn.Linear)(type("Again", (LayerKind,), {}))
    with pytest.raises(TypeError, match=r"nn\.Module subclasses"):
        register(int)
