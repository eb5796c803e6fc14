"""One optimiser step against the ngdref update of independently computed inputs.

Every reference takes another route than the optimiser (:mod:`tests.backends.torch.optim.cases`):
per-sample gradients from a Python loop of single-sample ``cross_entropy(reduction="sum")`` backward
passes, s from a softmax written here, the sampled labels re-drawn with ``loss.sample`` and the
optimiser's key, the Fisher as a dense matrix from ``torch.autograd.functional.jacobian``. These
are fed to the :mod:`ngdref` update functions, and the parameter change of one ``opt.step`` must
equal ``-lr_t * update``. Also the sum / mean conventions, the diagnostics and a short training
run. Everything runs in float64.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from tests.backends.torch.optim.cases import (  # noqa: E402
    CASES,
    IGNORE,
    PROBLEMS,
    TOL,
    N,
    decayed,
    dense_fisher,
    factor,
    hand_s,
    logits_and_mask,
    loop_grads,
    mlp_problem,
    t5_problem,
    take_step,
)

# CG stops at a relative residual of cg_tol = 1e-12; the error of its solution is at most
# cond(F + lambda I) times that (< 400 for these problems and dampings), far below 1e-7.
CG_TOL = {"rtol": 1e-7, "atol": 1e-10}
# Hugging Face's T5LayerNorm computes its variance in float32 even in a float64 model, so the
# forward-mode derivatives of NGD's Fisher-vector products and the reverse-mode Jacobian of the
# reference agree only to float32 precision (4e-8 relative for one product, measured).
FORWARD_MODE_TOL = {"rtol": 1e-6, "atol": 1e-8}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- one step equals the ngdref update of independently computed inputs ---------------------
IEF_OPTIONS = [
    {"damping": 1e-3},
    {"damping": 1e-3, "damping_space": "parameter", "dedup_threshold": 0.99},
    {"damping": 1e-4, "damping_mode": "relative"},
    {"damping": 1e-2, "damping_mode": "levenberg_marquardt"},
    {"damping": 0.0, "damping_mode": "diagonal_only"},
]


@pytest.mark.parametrize("options", IEF_OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_ief_step_is_minus_lr_times_ief_update(name: str, reduction: str, options: dict) -> None:
    problem = PROBLEMS[name]()
    r = factor(reduction)
    expected = -0.5 * ngdref.ief_update(
        r * loop_grads(problem, problem.targets), r**2 * hand_s(problem), **options
    )
    opt = IEF(problem.model, problem.loss, lr=0.5, reduction=reduction, **options)
    torch.testing.assert_close(take_step(problem, opt), expected, **TOL)
    # constant learning rate
    assert opt.diagnostics["lr"] == 0.5
    opt.step(lambda: problem.batch)
    assert opt.diagnostics["lr"] == 0.5


@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_ef_steps_are_normalised_with_linear_decay(name: str, reduction: str) -> None:
    problem = PROBLEMS[name]()
    r = factor(reduction)
    opt = EF(problem.model, problem.loss, lr=0.1, damping=1e-3, total_steps=3, reduction=reduction)
    for t in range(2):
        u = ngdref.ef_update(r * loop_grads(problem, problem.targets), damping=1e-3)
        expected = -decayed(0.1, t, 3) * u / torch.linalg.vector_norm(u)
        torch.testing.assert_close(take_step(problem, opt), expected, **TOL)
        assert opt.diagnostics["lr"] == pytest.approx(decayed(0.1, t, 3), rel=1e-15)


@pytest.mark.parametrize("num_samples", [1, 2])
@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_sf_steps_use_labels_redrawn_with_the_key(
    name: str, reduction: str, num_samples: int
) -> None:
    problem = PROBLEMS[name]()
    r = factor(reduction)
    opt = SF(
        problem.model,
        problem.loss,
        lr=0.1,
        damping=1e-2,
        total_steps=3,
        num_samples=num_samples,
        seed=7,
        reduction=reduction,
    )
    keys: list[int] = []
    draws: list[Any] = []
    for t in range(2):
        z, _ = logits_and_mask(problem, problem.targets)
        # the documented key, computed here: a key that did not change with t would fail
        drawn = problem.loss.sample(
            z.reshape(N, -1), documented_key(7, t), num_samples=num_samples,
            targets=problem.targets,
        )
        keys.append(documented_key(7, t))
        draws.append(drawn)
        # sampled rows of the reduced loss: R times the sum-convention rows (conventions page,
        # SF's sampled rows)
        rows = torch.cat([r * loop_grads(problem, drawn[k]) for k in range(num_samples)])
        grad = r * loop_grads(problem, problem.targets).sum(0)
        u = ngdref.sf_update(rows, grad, damping=1e-2, num_samples=num_samples)
        expected = -decayed(0.1, t, 3) * u / torch.linalg.vector_norm(u)
        torch.testing.assert_close(take_step(problem, opt), expected, **TOL)
    # the test has power: the two steps' labels differ (a key reused across steps would fail)
    assert not torch.equal(draws[0], draws[1])
    assert [opt.sampling_key(t) for t in range(2)] == keys


def documented_key(seed: int, step: int) -> int:
    """SF's documented key: blake2b of "seed:step", 8 bytes, little-endian."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def test_sf_keys_differ_between_steps_and_seeds() -> None:
    problem = mlp_problem()
    keys = {
        (seed, t): SF(problem.model, problem.loss, lr=0.1, damping=1e-2, total_steps=3, seed=seed)
        .sampling_key(t)
        for seed in (0, 1, 7)
        for t in range(3)
    }
    assert len(set(keys.values())) == len(keys)
    assert all(key == documented_key(*st) for st, key in keys.items())


@pytest.mark.parametrize(("name", "reduction"), CASES)
def test_ngd_step_is_a_dense_fisher_solve(name: str, reduction: str) -> None:
    problem = PROBLEMS[name]()
    r = factor(reduction)
    fisher = r * dense_fisher(problem)
    grad = r * loop_grads(problem, problem.targets).sum(0)
    eye = torch.eye(grad.shape[0], dtype=grad.dtype)
    expected = -0.3 * torch.linalg.solve(fisher + eye, grad)
    # T5's float32 layer-norm variance bounds the Fisher-vector products' accuracy near 1e-8,
    # so a 1e-12 CG tolerance is unreachable there (and would now be reported as such)
    cg_tol = 1e-7 if name == "t5" else 1e-12
    opt = NGD(problem.model, problem.loss, lr=0.3, damping=1.0, cg_tol=cg_tol, reduction=reduction)
    tol = FORWARD_MODE_TOL if name == "t5" else CG_TOL
    torch.testing.assert_close(take_step(problem, opt), expected, **tol)


# ---- conventions ----------------------------------------------------------------------------
# (optimiser, options, lr factor, damping factor): a mean-convention run with lr * N**a and
# damping * N**b takes the sum-convention run's steps (module docstring of
# backends.torch.optim.methods).
SCALINGS = [
    (IEF, {}, 1, -2),
    (IEF, {"damping_space": "parameter"}, 1, 0),
    (EF, {"total_steps": 2}, 0, -2),
    (SF, {"total_steps": 2}, 0, -2),
    (NGD, {"cg_tol": 1e-12}, 0, -1),
]


@pytest.mark.parametrize(
    ("cls", "options", "lr_power", "damping_power"),
    SCALINGS,
    ids=["ief-sample", "ief-parameter", "ef", "sf", "ngd"],
)
def test_mean_convention_rescales_lr_and_damping(
    cls: type, options: dict, lr_power: int, damping_power: int
) -> None:
    summed, mean = mlp_problem(), mlp_problem()
    opt_sum = cls(summed.model, summed.loss, lr=0.2, damping=1e-2, **options)
    opt_mean = cls(
        mean.model,
        mean.loss,
        lr=0.2 * N**lr_power,
        damping=1e-2 * N**damping_power,
        reduction="mean",
        **options,
    )
    tol = CG_TOL if cls is NGD else TOL
    torch.testing.assert_close(take_step(mean, opt_mean), take_step(summed, opt_sum), **tol)


def test_returned_loss_follows_the_reduction() -> None:
    problem = mlp_problem()
    x, y = problem.batch
    with torch.no_grad():
        summed = F.cross_entropy(problem.model(x), y, reduction="sum").item()
        mean = F.cross_entropy(problem.model(x), y).item()
    opt = IEF(problem.model, problem.loss, lr=0.0, damping=1e-3)
    assert opt.step(lambda: problem.batch) == pytest.approx(summed, rel=1e-13)
    opt = IEF(problem.model, problem.loss, lr=0.0, damping=1e-3, reduction="mean")
    assert opt.step(lambda: problem.batch) == pytest.approx(mean, rel=1e-13)


def test_token_factor_reproduces_the_hugging_face_loss() -> None:
    problem = t5_problem()
    with torch.no_grad():
        hf_loss = problem.model(**problem.batch).loss.item()
    tokens = int((problem.targets != IGNORE).sum())
    opt = IEF(problem.model, problem.loss, lr=1.0, damping=1e-3, reduction=1.0 / tokens)
    assert opt.step(lambda: problem.batch) == pytest.approx(hf_loss, rel=1e-12)
    assert opt.diagnostics["loss"] == pytest.approx(hf_loss, rel=1e-12)


# ---- diagnostics ----------------------------------------------------------------------------
def test_diagnostics_match_the_loop_quantities() -> None:
    problem = mlp_problem()
    grads, s = loop_grads(problem, problem.targets), hand_s(problem)
    norms = torch.linalg.vector_norm(grads, dim=1)
    opt = IEF(problem.model, problem.loss, lr=0.5, damping=1e-12, damping_mode="relative")
    loss = opt.step(lambda: problem.batch)
    d = opt.diagnostics
    assert d["step"] == 0 and d["lr"] == 0.5 and d["kept"] == N and d["loss"] == loss
    assert d["damping"] == pytest.approx(1e-12 * float(norms.max() ** 2), rel=1e-12)
    assert d["grad_norm_imbalance"] == pytest.approx(float(norms.max() / norms.min()), rel=1e-12)
    u = ngdref.ief_update(grads, s, damping=1e-12, damping_mode="relative")
    assert d["update_norm"] == pytest.approx(float(torch.linalg.vector_norm(u)), rel=1e-9)
    # G u = s in the undamped limit (Eq. 7): the residual is at the level of the damping
    assert d["residual"] < 1e-8

    problem = mlp_problem()
    opt = EF(problem.model, problem.loss, lr=0.5, damping=1e-12, total_steps=1)
    opt.step(lambda: problem.batch)
    assert opt.diagnostics["residual"] < 1e-8  # G u = 1 (Eq. 6)
    assert opt.steps_taken == 1


def test_ngd_reports_cg_iterations() -> None:
    problem = mlp_problem()
    opt = NGD(problem.model, problem.loss, lr=0.1, damping=1e-2)
    opt.step(lambda: problem.batch)
    p = problem.theta().numel()
    assert 1 <= opt.diagnostics["cg_iterations"] <= 10 * p
    assert opt.diagnostics["damping"] == 1e-2


def test_dedup_filter_drops_a_duplicated_sample() -> None:
    problem = mlp_problem(duplicate=True)
    before = [p.detach().clone() for p in problem.model.parameters()]
    opt = IEF(problem.model, problem.loss, lr=0.5, damping=0.0, dedup_threshold=None)
    with pytest.raises(ngdref.SingularMatrixError):
        opt.step(lambda: problem.batch)
    assert all(torch.equal(a, b) for a, b in zip(before, problem.model.parameters(), strict=True))
    assert opt.steps_taken == 0 and opt.diagnostics == {}

    opt = IEF(problem.model, problem.loss, lr=0.5, damping=0.0, dedup_threshold=0.99)
    expected = -0.5 * ngdref.ief_update(
        loop_grads(problem, problem.targets), hand_s(problem), damping=0.0, dedup_threshold=0.99
    )
    torch.testing.assert_close(take_step(problem, opt), expected, **TOL)
    assert opt.diagnostics["kept"] == N - 1


# ---- training -------------------------------------------------------------------------------
def test_ief_decreases_the_loss_on_a_separable_toy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    y = torch.tensor([0, 1] * 4)
    x = torch.randn(8, 2, dtype=torch.float64) + 2.0 * (2 * y[:, None] - 1)
    opt = IEF(model, ngdref.SoftmaxCrossEntropy(), lr=1.0, damping=1e-8)
    losses = [opt.step(lambda: (x, y)) for _ in range(5)]
    assert all(b < a for a, b in itertools.pairwise(losses))
    assert losses[-1] < 0.5 * losses[0]
