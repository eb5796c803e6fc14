"""The SciPy LinearOperators of backends.scipy.operators against dense ngdref.curvature.

The expected matrices come from another route: the dense (N, C, P) Jacobian of the MLP
(one backward pass per logit) fed to :mod:`ngdref.curvature`, while the operators use
forward-mode jvp, summed vjp and the rows' matvec/rmatvec and never form P x P.

Tolerances (float64, unit roundoff u = 2^-53). Both routes are sums of products of
length at most K = P + N C; each entry of a float64 product of length K has error at
most K u |A||B| (Higham, Thm 3.5), so norm-wise
    ||op v - M v|| <= TOL_FACTOR K u S ||v||,   S = ||L||_F^2 max_n ||W_n||_2,
with M = L^T W L the curvature's factorisation (L = J and W = H for F, W = I for GN,
L = G and W = diag(1/s) or I for iEF/EF/SF); TOL_FACTOR = 8 covers both routes and the
H / 1/s products. Eigenvalues: Weyl's theorem moves each eigenvalue by at most the
operator's error ||E||_2 <= the bound above, ARPACK (tol=0) and LAPACK eigvalsh add
O(P u ||M||_2) <= O(K u S), so |lambda_eigsh - lambda_eigvalsh| <= 2 TOL_FACTOR K u S.
"""

from __future__ import annotations

from dataclasses import dataclass

import array_api_strict
import numpy as np
import pytest
from scipy.sparse.linalg import eigsh, minres

import ngdref
from backends import MLPProvider, mlp_init
from backends.scipy.operators import (
    OPERATOR_METHODS,
    curvature_operator,
    ef_operator,
    ief_operator,
    kfac_operator,
    sf_operator,
)

U = 2.0**-53
TOL_FACTOR = 8.0
SF_KEY = 7


@dataclass(frozen=True)
class OpCase:
    name: str
    sizes: tuple[int, ...]
    n: int
    loss: str  # "ce" | "mse"
    seed: int


CASES = [
    OpCase("ce-wide", (5, 6, 4), 7, "ce", 0),  # N C < P: F, EF, iEF all singular
    OpCase("ce-tall", (3, 3, 3), 12, "ce", 1),  # N C >= P
    OpCase("mse", (4, 5, 3), 6, "mse", 2),
]


def _problem(case: OpCase):
    rng = np.random.default_rng(case.seed)
    params = mlp_init(case.sizes, case.seed, xp=np)
    inputs = rng.standard_normal((case.n, case.sizes[0]))
    provider = MLPProvider(params, inputs, case.sizes)
    if case.loss == "ce":
        loss = ngdref.SoftmaxCrossEntropy()
        targets = rng.integers(0, case.sizes[-1], case.n)
    else:
        loss = ngdref.SquaredError()
        targets = rng.standard_normal((case.n, case.sizes[-1]))
    return provider, loss, targets


def _dense(method: str, provider, loss, targets, factor: float = 1.0):
    """(M, S): the dense matrix in the R = factor convention and its error scale S."""
    jac, z = provider.jacobian(), provider.logits()
    e = factor * loss.grad(z, targets)
    if method in ("fisher", "gn"):
        h = factor * (loss.hessian(z, targets) if method == "fisher" else
                      np.broadcast_to(np.eye(z.shape[1]), (z.shape[0],) + (z.shape[1],) * 2))
        m = ngdref.fisher_matrix(jac, np.ascontiguousarray(h))
        return m, np.sum(jac**2) * max(np.linalg.norm(hn, 2) for hn in h)
    if method == "sf":
        rows = ngdref.sampled_grads(provider, loss, targets, SF_KEY, reduction=factor)
        return ngdref.sf_matrix(rows), np.sum(rows**2)
    g = np.einsum("nc,ncp->np", e, jac)  # rows from the Jacobian, not from vjp
    if method == "ef":
        return ngdref.ef_matrix(g), np.sum(g**2)
    s = np.sum(e * e, axis=1)
    return ngdref.ief_matrix(g, s), np.sum(g**2 / s[:, None])


def _bound(provider, scale: float) -> float:
    k = provider.num_params + provider.logits().size
    return TOL_FACTOR * k * U * scale


@pytest.mark.parametrize("method", OPERATOR_METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_products_match_dense_matrix(case, method):
    provider, loss, targets = _problem(case)
    op = curvature_operator(method, provider, loss, targets, key=SF_KEY)
    m, scale = _dense(method, provider, loss, targets)
    p = provider.num_params
    rng = np.random.default_rng(case.seed + 100)
    v, u, x = rng.standard_normal(p), rng.standard_normal(p), rng.standard_normal((p, 3))
    tol = _bound(provider, scale)
    assert op.shape == (p, p) and op.dtype == np.float64
    assert np.linalg.norm(op.matvec(v) - m @ v) <= tol * np.linalg.norm(v)
    assert np.linalg.norm(op.rmatvec(v) - m.T @ v) <= tol * np.linalg.norm(v)
    assert np.linalg.norm(op.H @ v - m @ v) <= tol * np.linalg.norm(v)
    assert np.linalg.norm(op.matmat(x) - m @ x) <= tol * np.linalg.norm(x)
    # symmetry: |u^T A v - v^T A u| <= 2 tol ||u|| ||v||
    gap = abs(u @ op.matvec(v) - v @ op.matvec(u))
    assert gap <= 2 * tol * np.linalg.norm(u) * np.linalg.norm(v)


@pytest.mark.parametrize("method", OPERATOR_METHODS)
def test_float32_operator_against_float64_dense(method):
    """A float32 model: the operator stays float32 and is within the float32 bound.

    The float64 reference is the same model exactly (float32 parameters and inputs are
    representable in float64), so only float32 rounding separates them: the bound of the
    module docstring with u = 2^-24 (forward-pass errors in J are O(depth * width * u),
    below K u)."""
    case = CASES[0]
    provider64, loss, targets = _problem(case)
    params = provider64.params.astype(np.float32)
    inputs = provider64.inputs.astype(np.float32)
    provider32 = MLPProvider(params, inputs, case.sizes)
    provider64 = MLPProvider(params.astype(np.float64), inputs.astype(np.float64), case.sizes)
    op = curvature_operator(method, provider32, loss, targets, key=SF_KEY)
    m, scale = _dense(method, provider64, loss, targets)
    v = np.random.default_rng(1).standard_normal(provider32.num_params).astype(np.float32)
    got = op.matvec(v)
    assert op.dtype == np.float32 and got.dtype == np.float32
    tol = _bound(provider64, scale) * 2.0**29  # u32 / u64 = 2^29
    assert np.linalg.norm(got - m @ v.astype(np.float64)) <= tol * np.linalg.norm(v)


#: method -> power of R in its matrix under a reduction factor R (directions' convention)
REDUCTION_POWER = {"fisher": 1, "gn": 1, "ef": 2, "ief": 0, "sf": 2}


@pytest.mark.parametrize("method", OPERATOR_METHODS)
def test_reduction_factor_scales_as_ngdref(method):
    case = CASES[0]
    provider, loss, targets = _problem(case)
    r = 1.0 / case.n
    op = curvature_operator(method, provider, loss, targets, key=SF_KEY, reduction="mean")
    m_sum, scale = _dense(method, provider, loss, targets)
    v = np.random.default_rng(5).standard_normal(provider.num_params)
    expected = r ** REDUCTION_POWER[method] * (m_sum @ v)
    tol = _bound(provider, r ** REDUCTION_POWER[method] * scale)
    assert np.linalg.norm(op.matvec(v) - expected) <= tol * np.linalg.norm(v)


@pytest.mark.parametrize("method", OPERATOR_METHODS)
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.name)
def test_eigsh_matches_dense_eigvalsh(case, method):
    provider, loss, targets = _problem(case)
    op = curvature_operator(method, provider, loss, targets, key=SF_KEY)
    m, scale = _dense(method, provider, loss, targets)
    k = 4
    top = np.sort(eigsh(op, k=k, which="LA", tol=0, return_eigenvectors=False))
    expected = np.linalg.eigvalsh(m)[-k:]
    assert np.max(np.abs(top - expected)) <= 2 * _bound(provider, scale)


def test_minres_solves_the_damped_system():
    """The SciPy guide's solve: (F_iEF + lambda I) x = g by minres(shift=-lambda), no P x P
    formed."""
    provider, loss, targets = _problem(CASES[1])
    op = curvature_operator("ief", provider, loss, targets)
    q = ngdref.batch_quantities(provider, loss, targets)
    m, _ = _dense("ief", provider, loss, targets)
    damping = 1e-1 * np.linalg.norm(m, 2)
    x, info = minres(op, q.grad, shift=-damping, rtol=1e-13, maxiter=1000)
    expected = np.linalg.solve(m + damping * np.eye(provider.num_params), q.grad)
    # a residual <= 1e-13 ||g|| (+ the operator's error, <= 1e-12 ||M|| here) gives a forward
    # error <= cond(M + lambda I) (1e-13 + 1e-12) with cond <= 11: 1e-10 leaves 8x headroom
    assert info == 0
    assert np.linalg.norm(x - expected) <= 1e-10 * np.linalg.norm(expected)


def test_row_operators_accept_per_sample_rows_and_sampled_draws():
    rng = np.random.default_rng(3)
    g, s = rng.standard_normal((6, 9)), rng.uniform(0.1, 2.0, 6)
    v = rng.standard_normal(9)
    scale = np.sum(g**2) / 0.1
    tol = TOL_FACTOR * 15 * U * scale * np.linalg.norm(v)
    rows = ngdref.as_rows(g)
    assert np.linalg.norm(ief_operator(rows, s) @ v - ngdref.ief_matrix(g, s) @ v) <= tol
    assert np.linalg.norm(ef_operator(rows) @ v - ngdref.ef_matrix(g) @ v) <= tol
    got = sf_operator(g, num_samples=3) @ v
    assert np.linalg.norm(got - ngdref.sf_matrix(g, num_samples=3) @ v) <= tol


def _kfac_blocks(corrected: bool):
    """Two Kronecker blocks and a diagonal block over P = 3*4 + 5 + 2*3 = 23 entries."""
    rng = np.random.default_rng(11)
    n, s = 5, rng.uniform(0.5, 2.0, 5)
    blocks, dense = [], np.zeros((23, 23))
    layout = [(np.arange(0, 12), (4, 3)), (np.arange(17, 23)[::-1].copy(), (3, 2))]
    for idx, (d_in, d_out) in layout:
        a, b = rng.standard_normal((n, d_in)), rng.standard_normal((n, d_out))
        f = ngdref.kfac_factors(a, b, method="iekfac", logit_grad_sq_norms=s)
        if corrected:
            f = ngdref.kfac.eigenvalue_correction(f, a, b, weights=1.0 / s)
        blocks.append((idx, f))
        dense[np.ix_(idx, idx)] = ngdref.kfac_block_matrix(f)
    diag = rng.uniform(0.0, 3.0, 5)
    blocks.append((slice(12, 17), diag))
    dense[np.arange(12, 17), np.arange(12, 17)] = diag
    return blocks, dense


@pytest.mark.parametrize("corrected", [False, True], ids=["kron", "eigen-corrected"])
def test_kfac_operator_matches_block_diagonal(corrected):
    blocks, dense = _kfac_blocks(corrected)
    op = kfac_operator(blocks, 23)
    rng = np.random.default_rng(12)
    v, x = rng.standard_normal(23), rng.standard_normal((23, 2))
    # block products of length <= 4 on factors of norm ||B|| ||A||; the eigen route adds
    # two orthogonal rotations: 8 * 23 u ||K||_F covers both
    tol = TOL_FACTOR * 23 * U * np.linalg.norm(dense)
    assert np.linalg.norm(op @ v - dense @ v) <= tol * np.linalg.norm(v)
    assert np.linalg.norm(op @ x - dense @ x) <= tol * np.linalg.norm(x)
    top = np.sort(eigsh(op, k=3, which="LA", tol=0, return_eigenvectors=False))
    assert np.max(np.abs(top - np.linalg.eigvalsh(dense)[-3:])) <= 2 * tol


# ---- bad input: the exception names the argument ---------------------------------------
def _strict_provider():
    case = CASES[0]
    params = mlp_init(case.sizes, 0, xp=array_api_strict)
    inputs = array_api_strict.asarray(np.ones((case.n, case.sizes[0])))
    return MLPProvider(params, inputs, case.sizes)


def _ief_zero_s():
    provider, loss, targets = _problem(CASES[2])
    targets = targets.copy()
    targets[1] = provider.logits()[1]  # a perfectly fitted sample: e_1 = 0, s_1 = 0
    return curvature_operator("ief", provider, loss, targets)


def _op(method="ef"):
    provider, loss, targets = _problem(CASES[0])
    return curvature_operator(method, provider, loss, targets, key=SF_KEY)


BAD_INPUTS = [
    ("strict rows", lambda: ef_operator(array_api_strict.ones((3, 4))), TypeError,
     "per_sample_grads"),
    ("strict provider", lambda: curvature_operator(
        "fisher", _strict_provider(), ngdref.SoftmaxCrossEntropy(),
        array_api_strict.zeros(7, dtype=array_api_strict.int64)), TypeError, "provider"),
    ("list rows", lambda: ief_operator([[1.0]], np.ones(1)), TypeError, "per_sample_grads"),
    ("1-D rows", lambda: ef_operator(np.ones(4)), ValueError, "per_sample_grads"),
    ("s shape", lambda: ief_operator(np.ones((3, 4)), np.ones(2)), ValueError,
     "logit_grad_sq_norms"),
    ("s list", lambda: ief_operator(np.ones((3, 4)), [1.0, 1.0, 1.0]), TypeError,
     "logit_grad_sq_norms"),
    ("s zero", lambda: ief_operator(np.ones((3, 4)), np.array([1.0, 0.0, 1.0])), ValueError,
     "logit_grad_sq_norms"),
    ("s_n = 0 from the loss", _ief_zero_s, ValueError, "logit_grad_sq_norms"),
    ("sf K", lambda: sf_operator(np.ones((3, 4)), num_samples=2), ValueError, "num_samples"),
    ("method", lambda: curvature_operator("adam", None, None, None), ValueError, "method"),
    ("sf key", lambda: curvature_operator("sf", *_problem(CASES[0])), ValueError, "key"),
    ("x shape", lambda: _op().matvec(np.ones(3)), ValueError, "x"),
    ("x matrix shape", lambda: _op().matmat(np.ones((3, 2))), ValueError, "x"),
    ("x dtype", lambda: _op().matvec(np.ones(_op().shape[0], dtype=np.float32)), TypeError,
     "x"),
    ("x nan", lambda: _op().matvec(np.full(_op().shape[0], np.nan)), ngdref.NonFiniteError,
     "x"),
    ("x strict", lambda: _op().matvec(array_api_strict.ones(3)), TypeError, "x"),
    ("kfac overlap", lambda: kfac_operator([(slice(0, 2), np.ones(2)),
                                            (slice(1, 3), np.ones(2))], 3), ValueError,
     "blocks"),
    ("kfac size", lambda: kfac_operator([(slice(0, 2), np.ones(3))], 3), ValueError, "blocks"),
    ("kfac P", lambda: kfac_operator([], 0), ValueError, "num_params"),
]


@pytest.mark.parametrize("build, error, name", [b[1:] for b in BAD_INPUTS],
                         ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(build, error, name):
    with pytest.raises(error, match=name):
        build()


def test_readme_example_runs():
    """The SciPy guide's two-line block (docs/guide/scipy.md), on a real provider: eigsh's
    values and minres' solution."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[3] / "docs" / "guide" / "scipy.md"
    text = page.read_text()
    section = text[text.index("## Two lines") :]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    provider, loss, targets = _problem(CASES[1])
    grad = ngdref.batch_quantities(provider, loss, targets).grad
    env = {"provider": provider, "loss": loss, "targets": targets, "grad": grad}
    exec(compile(block, str(page), "exec"), env)
    m, scale = _dense("ief", provider, loss, targets)
    expected = np.linalg.eigvalsh(m)[-10:]
    assert np.max(np.abs(np.sort(env["top"]) - expected)) <= 2 * _bound(provider, scale)
    # minres (default rtol 1e-5) stops when its residual estimate is <= rtol (||A|| ||x|| +
    # ||b||) (scipy's Acond/Anorm test); 10x covers its estimate of ||A|| from the Lanczos steps
    a = m + 1e-3 * np.eye(provider.num_params)
    residual = np.linalg.norm(a @ env["x"] - grad)
    bound = 10 * 1e-5 * (np.linalg.norm(a, 2) * np.linalg.norm(env["x"]) + np.linalg.norm(grad))
    assert env["info"] == 0 and residual <= bound


@pytest.mark.parametrize("corrected", [False, True], ids=["kron", "eigen-corrected"])
@pytest.mark.parametrize("method", ["kfac", "ekfac", "iekfac"])
@pytest.mark.parametrize("model", ["mlp", "embedding"])
def test_kfac_curvature_operator_matches_torch_dense(method, corrected, model):
    """From backends.torch.kfac.curvature's torch curvature: Kronecker blocks, LayerNorm's
    diagonal blocks, and an embedding's Kronecker block whose input factor is a (V,)
    diagonal (never formed V x V)."""
    torch = pytest.importorskip("torch")
    from backends.scipy.operators import kfac_curvature_operator
    from backends.torch.kfac.curvature import kfac_curvature

    torch.manual_seed(0)
    if model == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.LayerNorm(5), torch.nn.Tanh(),
                                  torch.nn.Linear(5, 3)).double()
        x = torch.randn(6, 4, dtype=torch.float64)
    else:  # tokens (N, T) -> embeddings summed over T -> logits
        net = torch.nn.Sequential(torch.nn.Embedding(7, 4), torch.nn.Flatten(),
                                  torch.nn.Linear(12, 3)).double()
        x = torch.randint(0, 7, (6, 3))
    y = torch.randint(0, 3, (6,))
    curvature = kfac_curvature(net, ngdref.SoftmaxCrossEntropy(), x, y, methods=(method,),
                               eigenvalue_correction=corrected)
    dense = curvature.dense(method).numpy()
    op = kfac_curvature_operator(curvature, method)
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    # as test_kfac_operator_matches_block_diagonal: 8 P u ||K||_F
    tol = TOL_FACTOR * op.shape[0] * U * np.linalg.norm(dense)
    assert np.linalg.norm(op @ v - dense @ v) <= tol * np.linalg.norm(v)
    other = "ekfac" if method != "ekfac" else "kfac"
    with pytest.raises(ValueError, match="method"):
        kfac_curvature_operator(curvature, other)
