"""backends.torch.kfac.curvature and the K-FAC optimisers on torch models.

Independent routes: curvlinops (validation.oracles.kfac, tolerances derived there),
exact iEF on a one-layer, one-sample network, and Python loops of single-sample
backward passes for the diagonal fallback (agreement to 8 N eps relative: a sum of
N squares of back-propagated values computed by the same kernels one sample at a time).
"""

from __future__ import annotations

import re

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.kfac.curvature import kfac_curvature, kfac_directions, merge_curvatures  # noqa: E402
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC  # noqa: E402
from validation.oracles.kfac import KFAC_PROBLEMS, iekfac_ief_check, kfac_checks  # noqa: E402
from validation.oracles.peers import unavailable  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EPS = 2.0**-52
CE = ngdref.SoftmaxCrossEntropy()


@pytest.mark.parametrize("problem", KFAC_PROBLEMS, ids=lambda p: p.name)
def test_curvlinops_oracles(problem) -> None:
    if unavailable("curvlinops") or (problem.name == "lora" and unavailable("peft")):
        pytest.skip("curvlinops or peft is not importable")
    failed = [(c.oracle, c.quantity, c.difference, c.tolerance) for c in kfac_checks(problem)
              if not c.ok]
    assert not failed


def test_iekfac_equals_exact_ief_for_one_sample() -> None:
    failed = [(c.quantity, c.difference, c.tolerance) for c in iekfac_ief_check() if not c.ok]
    assert not failed


def _mlp_with_norm() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))


@pytest.mark.parametrize("method", ["ekfac", "iekfac"])
def test_fallback_diagonal_from_single_sample_passes(method: str) -> None:
    model, x, y = _mlp_with_norm()
    curvature = kfac_curvature(model, CE, x, y, methods=(method,))
    assert set(curvature.fallback) == {"1.weight", "1.bias"}
    assert "LayerNorm((5,)" in curvature.fallback["1.weight"]
    assert "no Kronecker factors" in curvature.fallback["1.weight"]
    norm = model[1]
    expected = torch.zeros(10, dtype=torch.float64)
    for n in range(x.shape[0]):
        z = model(x[n:n + 1])
        e = CE.grad(z.detach(), y[n:n + 1])
        grads = torch.autograd.grad(z, [norm.weight, norm.bias], grad_outputs=e)
        weight = 1.0 / float(torch.sum(e * e)) if method == "iekfac" else 1.0
        expected += weight * torch.cat(grads) ** 2
    dense = curvature.dense(method)
    index = torch.cat([b.index for b in curvature.blocks if b.diagonal is not None])
    got = dense[index, index]
    assert float(torch.linalg.norm(got - expected) / torch.linalg.norm(expected)) <= 8 * 6 * EPS


def test_unregistered_layers_are_reported_or_refused() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.PReLU(), nn.Flatten(),
                          nn.Linear(2, 3)).double()
    x, y = torch.randn(3, 2, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 2])
    curvature = kfac_curvature(model, CE, x, y, methods=("ekfac",))
    assert set(curvature.fallback) == {"1.weight"}  # a grouped Conv2d has Kronecker blocks now
    assert "PReLU: no layer kind is registered" in curvature.fallback["1.weight"]
    assert [b.name for b in curvature.blocks if b.factors is not None][:2] == [
        "0[rows 0:1]", "0[rows 1:2]"]
    with pytest.raises(ValueError, match=re.escape("outside supported layers")):
        kfac_curvature(model, CE, x, y, methods=("ekfac",), strict=True)


class _FoldedTokens(nn.Module):
    """A Linear applied to (N T, d): the batch merged with the positions (provenance knows)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.reshape(-1, 3)).reshape(x.shape).mean(dim=1)


class _LearnedQuery(nn.Module):
    """A Linear on a sample-free tensor (a learned token), broadcast over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.query, self.out = nn.Linear(3, 3), nn.Linear(4, 3)
        self.token = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x)) * torch.tanh(self.query(self.token))


def test_layers_called_without_the_batch_axis_fall_back() -> None:
    torch.manual_seed(7)
    model = _FoldedTokens().double()
    x, y = torch.randn(4, 2, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    assert kfac_curvature(model, CE, x, y, methods=("ekfac",)).fallback == {}
    model = _LearnedQuery().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    curvature = kfac_curvature(model, CE, x, y, methods=("ekfac",))
    assert set(curvature.fallback) == {"query.weight", "query.bias", "token"}
    assert "without the batch axis (SAMPLE_FREE)" in curvature.fallback["query.weight"]
    assert "_LearnedQuery: no layer kind is registered" in curvature.fallback["token"]


def test_zero_output_gradients_need_damping() -> None:
    """LoRA's default B = 0 gives lora_A zero output gradients: B factor 0, singular at 0."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 3)).double()
    with torch.no_grad():
        model[1].weight.zero_()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    updates = kfac_directions(model, CE, x, y, damping=1e-3, methods=("iekfac",))
    assert bool(torch.isfinite(updates["iekfac"]).all())
    with pytest.raises(ngdref.SingularMatrixError, match=re.escape("damping=0.0")):
        kfac_directions(model, CE, x, y, damping=0.0, methods=("iekfac",))


def test_non_finite_model_is_refused() -> None:
    model, x, y = _mlp_with_norm()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ngdref.NonFiniteError):
        kfac_curvature(model, CE, x, y)


def test_bad_options_name_the_argument() -> None:
    model, x, y = _mlp_with_norm()
    for kwargs, message in [
        ({"methods": ("kfac", "sf")}, "methods must be"),
        ({"kfac_fisher": "exact"}, "kfac_fisher must be"),
        ({"bias": "both"}, "bias must be"),
        ({"convention": "x"}, "convention must be"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            kfac_curvature(model, CE, x, y, **kwargs)


# ---- optimisers ---------------------------------------------------------------------------
OPTIMISERS = [KFAC, EKFAC, IEKFAC]


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))


@pytest.mark.parametrize("cls", OPTIMISERS, ids=lambda c: c.__name__)
def test_step_is_minus_lr_times_the_direction(cls) -> None:
    model, x, y = _mlp()
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    options = {"kfac_fisher": "type-2"} if cls is KFAC else {}
    direction = kfac_directions(model, CE, x, y, damping=0.1, methods=(cls.method,), **options)
    opt = cls(model, CE, lr=0.5, damping=0.1, **options)
    opt.step(lambda: (x, y))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = before - 0.5 * direction[cls.method]
    assert float(torch.linalg.norm(after - expected) / torch.linalg.norm(before)) <= 64 * EPS


@pytest.mark.parametrize("cls", OPTIMISERS, ids=lambda c: c.__name__)
def test_training_reduces_the_loss(cls) -> None:
    model, x, y = _mlp()
    opt = cls(model, CE, lr=0.5, damping=0.1, reduction="mean")
    losses = [opt.step(lambda: (x, y)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    assert opt.diagnostics["fallback"] == {}


def test_mean_reduction_is_sum_with_scaled_damping() -> None:
    """(lr, R lambda) under reduction="mean" takes the steps of (lr, lambda) under "sum"."""
    runs = []
    for reduction, damping in [("sum", 0.2), ("mean", 0.2 / 16)]:
        model, x, y = _mlp()
        opt = IEKFAC(model, CE, lr=0.3, damping=damping, reduction=reduction)
        for _ in range(2):
            opt.step(lambda x=x, y=y: (x, y))
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert float(torch.linalg.norm(runs[0] - runs[1]) / torch.linalg.norm(runs[0])) <= 1e-13


def test_update_interval_and_running_average() -> None:
    model, x, y = _mlp()
    opt = EKFAC(model, CE, lr=0.1, damping=0.1, update_interval=2, running_average=0.5)
    refreshed = []
    first = None
    for step in range(3):
        if step == 2:
            fresh = kfac_curvature(model, CE, x, y, methods=("ekfac",))
        opt.step(lambda: (x, y))
        refreshed.append(opt.diagnostics["refreshed"])
        first = first or opt._curvature
    assert refreshed == [True, False, True]
    block = opt._curvature.blocks[0].factors["ekfac"]
    expected = 0.5 * first.blocks[0].factors["ekfac"].grad_factor
    expected = expected + 0.5 * fresh.blocks[0].factors["ekfac"].grad_factor
    assert float(torch.linalg.norm(block.grad_factor - expected)) <= 64 * EPS * float(
        torch.linalg.norm(expected)
    )


def test_state_dict_round_trip_and_bad_hyperparameters() -> None:
    model, x, y = _mlp()
    opt = KFAC(model, CE, lr=0.1, damping=0.1, seed=3)
    opt.step(lambda: (x, y))
    state = opt.state_dict()
    other = KFAC(model, CE, lr=1.0, damping=1.0)
    other.load_state_dict(state)
    assert other.steps_taken == 1 and other.param_groups[0]["seed"] == 3
    for kwargs, message in [
        ({"damping": -1.0}, "damping must be"),
        ({"update_interval": 0}, "update_interval must be"),
        ({"running_average": 1.0}, "running_average must be"),
        ({"damped_inverse": "tikhonov"}, "damped_inverse must be"),
        ({"kfac_fisher": "exact"}, "kfac_fisher must be"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            KFAC(model, CE, **({"lr": 0.1, "damping": 0.1} | kwargs))


# ---- every validation setup: LoRA, prompt tuning (fallback), CNN, ViT ------------------------
def _setups() -> list:
    from validation.torch_cases import torch_problems

    return torch_problems()


@pytest.mark.parametrize("problem", _setups(), ids=lambda p: p.name)
@pytest.mark.parametrize("cls", OPTIMISERS, ids=lambda c: c.__name__)
def test_optimisers_descend_on_every_setup(problem, cls) -> None:
    """(K + lambda I)^-1 g is a descent direction, so a short enough step lowers the loss."""
    reason = problem.unavailable()
    if reason:
        pytest.skip(reason)
    batch = problem.builder()
    model, inputs, targets = batch.model, batch.inputs, batch.targets
    curvature = kfac_curvature(model, batch.loss, inputs, targets, methods=(cls.method,))
    direction = curvature.inverse_apply(cls.method, curvature.grad, damping=1e-3)
    assert float(direction @ curvature.grad) > 0
    # only prompt tuning's virtual-token embedding is outside nn.Linear / nn.Conv2d
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    expected_fallback = names if problem.name == "t5-prompt" else []
    assert sorted(curvature.fallback) == sorted(expected_fallback)
    opt = cls(model, batch.loss, lr=1e-3 / float(torch.linalg.norm(direction)), damping=1e-3)
    step_batch = inputs if isinstance(inputs, dict) and "labels" in inputs else (inputs, targets)
    before = opt.step(lambda: step_batch)
    after = kfac_curvature(model, batch.loss, inputs, targets, methods=("ekfac",)).loss
    assert after < before
    assert set(opt.diagnostics["fallback"]) == set(expected_fallback)


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("normalisation", ["mean", "sum"])
def test_merged_micro_batches_equal_the_full_batch(convention: str, normalisation: str) -> None:
    """Factors are sums (B, diagonal) and term-weighted means (A): merging is exact."""
    from validation.oracles.kfac import SequenceNet

    torch.manual_seed(6)
    model = nn.Sequential(SequenceNet(), nn.LayerNorm(3)).double()
    x, y = torch.randn(6, 4, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    options = {"methods": ("ekfac", "iekfac", "kfac"), "kfac_fisher": "type-2",
               "convention": convention, "normalisation": normalisation}
    full = kfac_curvature(model, CE, x, y, **options)
    parts = [kfac_curvature(model, CE, x[i:j], y[i:j], **options) for i, j in [(0, 2), (2, 6)]]
    merged = merge_curvatures(parts)
    for method in options["methods"]:
        expected = full.dense(method)
        # sums of 6 (N) or 24 (N T) rounded terms, in another order: 16 * 24 eps relative
        difference = torch.linalg.norm(merged.dense(method) - expected)
        assert float(difference / torch.linalg.norm(expected)) <= 16 * 24 * EPS
    assert float(torch.linalg.norm(merged.grad - full.grad)) <= 16 * 6 * EPS * float(
        torch.linalg.norm(full.grad)
    )
    assert merged.loss == pytest.approx(full.loss, rel=16 * 6 * EPS)


def test_corrected_curvatures_are_not_merged() -> None:
    model, x, y = _mlp()
    parts = [kfac_curvature(model, CE, x[i:i + 8], y[i:i + 8], methods=("ekfac",),
                            eigenvalue_correction=True) for i in (0, 8)]
    with pytest.raises(ValueError, match=re.escape("corrected eigenvalues cannot be merged")):
        merge_curvatures(parts)
