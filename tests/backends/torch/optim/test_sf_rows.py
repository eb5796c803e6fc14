"""SF's paired products over the true and the sampled rows (backends.torch.optim.sf_rows), and SF's
single-sample steps across the per-sample routes (the route that takes them)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import ngdref  # noqa: E402
from backends.torch.optim.methods import SF  # noqa: E402
from backends.torch.optim.sf_rows import PairedRows, cross_gram_is_cheaper  # noqa: E402
from backends.torch.per_sample.rows import (  # noqa: E402
    DenseBlock,
    FactorBlock,
    GhostRows,
    TiedBlock,
)
from backends.torch.provider import TorchProvider  # noqa: E402
from tests.backends.torch.optim.cases import CASES, PROBLEMS, mlp_problem, take_step  # noqa: E402
from tests.backends.torch.per_sample.test_layer_pass import ALL_CASES  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# float64 products of at most a few hundred terms against sums of the same terms in another
# order: both within (terms) eps ||.|| of the exact value; 1e-12 relative to sum |w_n| ||g_n||
# is far above 2 * 300 * 1.1e-16 = 7e-14 (tests/backends/torch/per_sample/test_layer_pass.py uses
# the same bound)
BOUND = 1e-12


def _forms(rows: GhostRows) -> list[FactorBlock]:
    """The factor blocks of rows, a tied block's forms one by one."""
    return [u for f in rows.factors for u in (f.uses if isinstance(f, TiedBlock) else (f,))]


@pytest.mark.parametrize("route", ["ghost", "materialise", "auto"])
@pytest.mark.parametrize(
    "name", ["cnn", "tied_embedding_head", "t5_all_parameters", "vit_all_parameters"]
)
def test_rmatvec_pair_is_the_two_products_summed(name: str, route: str) -> None:
    """G^T w + A^T v from the paired rows against the materialised rows; A's labels differ
    from G's but share the forward pass, so every factor block takes the one-product path."""
    model, inputs, targets, loss = ALL_CASES[name].build()
    model.eval()
    provider = TorchProvider(model, inputs, per_sample_method="ghost", layer_route=route)
    logits = provider.logits()
    u = loss.grad(logits, targets)
    u2 = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(9))
    rows = provider.per_sample_rows(u, keep_graph=True)
    other = provider.per_sample_rows(u2, keep_graph=False)
    assert all(torch.equal(f.x, g.x) for f, g in zip(_forms(rows), _forms(other), strict=True))
    if route == "ghost":
        assert rows.factors  # the one-product path is exercised
    g, h = rows.materialise(), other.materialise()
    n = g.shape[0]
    w = torch.linspace(-1.0, 2.0, n, dtype=torch.float64)
    v = torch.linspace(3.0, -0.5, n, dtype=torch.float64)
    expected = w @ g + v @ h
    scale = float((w.abs() * g.norm(dim=1)).sum() + (v.abs() * h.norm(dim=1)).sum())
    got = PairedRows.of(rows).rmatvec_pair(other, w, v)
    assert float(torch.linalg.vector_norm(got - expected)) <= BOUND * scale
    # rows of another layout (dense): the two rmatvecs summed
    dense = PairedRows.of(rows).rmatvec_pair(ngdref.as_rows(h), w, v)
    assert float(torch.linalg.vector_norm(dense - expected)) <= BOUND * scale
    # A G^T 1 block by block (cross-Gram or A_b g_b), then u with SF's constant w reusing g_b
    paired = PairedRows.of(rows)
    sums = paired.cross_row_sums(other)
    ones = torch.ones(n, dtype=torch.float64)
    assert float(torch.linalg.vector_norm(sums - h @ (g.T @ ones))) <= BOUND * float(
        h.norm(dim=1).sum() * g.norm(dim=1).sum())
    constant = torch.full((n,), 0.5, dtype=torch.float64)
    got = paired.rmatvec_pair(other, constant, v)
    expected = constant @ g + v @ h
    scale = float(0.5 * g.norm(dim=1).sum() + (v.abs() * h.norm(dim=1)).sum())
    assert float(torch.linalg.vector_norm(got - expected)) <= BOUND * scale


# float64: the routes agree to ~1e-15 relative in every product; the damped solves (condition
# < 1e4 at damping 1e-3) amplify that to < 1e-11: 1e-10 norm-wise
# (tests/backends/torch/optim/test_routes.py)
@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_single_sample_sf_steps_equal_across_routes(name: str, reduction: str) -> None:
    steps = {}
    for route in ("vmap", "auto", "ghost", "hooks"):
        problem = PROBLEMS[name]()
        opt = SF(problem.model, problem.loss, lr=0.5, damping=1e-3, total_steps=2,
                 reduction=reduction, per_sample=route)
        steps[route] = take_step(problem, opt)
    reference = steps["vmap"]
    for route, step in steps.items():
        error = float(torch.linalg.vector_norm(step - reference))
        assert error <= 1e-10 * float(torch.linalg.vector_norm(reference)), route


def test_float32_sf_steps_equal_across_routes() -> None:
    """float32: eps32 = 1.2e-7 amplified by about 10 (well damped MLP): 1e-5, as for iEF."""
    steps = {}
    for route in ("vmap", "auto", "ghost"):
        problem = mlp_problem()
        problem.model.float()
        x, y = problem.batch
        problem.batch = (x.float(), y)
        opt = SF(problem.model, problem.loss, lr=0.5, damping=1e-1, total_steps=2,
                 per_sample=route)
        steps[route] = take_step(problem, opt)
    reference = steps["vmap"]
    assert reference.dtype == torch.float32
    for route, step in steps.items():
        error = float(torch.linalg.vector_norm(step - reference))
        assert error <= 1e-5 * float(torch.linalg.vector_norm(reference)), route


def _rows(t: int, d: int, n: int = 4) -> GhostRows:
    x, b = torch.zeros(n, t, d), torch.zeros(n, t, d)
    return GhostRows(n, d * d, factors=[FactorBlock(0, (d, d), x, b)], dense=[],
                     dtype=torch.float32, device=torch.device("cpu"))


def test_the_cross_gram_route_is_taken_only_where_it_costs_less() -> None:
    # factors: cross 4 * 4 * T^2 * 2d against 4 T d^2 + d^2
    assert cross_gram_is_cheaper(_rows(1, 64), 4)  # 8192 < 17408
    assert not cross_gram_is_cheaper(_rows(32, 8), 4)  # 262144 > 8256
    dense = GhostRows(4, 10, factors=[], dense=[DenseBlock(0, torch.zeros(4, 10))],
                      dtype=torch.float32, device=torch.device("cpu"))
    assert not cross_gram_is_cheaper(dense, 4)  # 160 > 50
    assert cross_gram_is_cheaper(dense, 1) is False  # 40 > 20
    assert not cross_gram_is_cheaper(ngdref.as_rows(torch.zeros(4, 10)), 4)  # vmap: dense
