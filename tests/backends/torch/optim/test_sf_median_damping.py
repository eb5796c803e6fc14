"""SF's ``damping_mode="median"``: one step against the authors' SF step written out.

The authors' SF branch (``iEFOptimizer_GP.py``) with a negative damping -lambda reads

    damping = median(diag(C)) * lambda        C = J J^T over the rows their filter keeps
    u = (g - J_hat^T (J_hat J_hat^T + K damping I)^-1 J_hat g) / damping

with J the true-label per-sample gradients of the mean loss, J_hat the sampled ones, g the
batch gradient and ``torch.median`` the lower middle value. Here every quantity comes from a
Python loop of single-sample backward passes in float64; the sampled labels are the
optimiser's own draws (``loss.sample`` with its public ``sampling_key``), which the step does
not otherwise test. The batch holds an exact duplicate (the filter drops one) and a zero
input (a zero row, which the authors' filter keeps and which lowers the median).

Tolerance: the rows agree to about P eps, and the Woodbury solve amplifies that by at most the
condition number kappa of J_hat J_hat^T + damping I, so u agrees to 16 kappa N P eps.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.methods import SF  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
EPS = 2.0**-52
CE = ngdref.SoftmaxCrossEntropy()


def _problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))
    x = torch.randn(7, 4, dtype=torch.float64)
    x[1] = x[0]  # an exact duplicate of sample 0 (same label below)
    x[2] = 0.0  # a zero row: no bias, so every gradient of this sample is zero
    return model.double(), x, torch.tensor([0, 0, 1, 2, 1, 0, 2])


def _rows(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, r: float) -> torch.Tensor:
    """(N, P): gradient of r * l_n(labels_n), one sample at a time."""
    out = []
    for n in range(x.shape[0]):
        value = r * nn.functional.cross_entropy(model(x[n:n + 1]), labels[n:n + 1], reduction="sum")
        grads = torch.autograd.grad(value, list(model.parameters()))
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(out)


def _authors_kept(j: torch.Tensor) -> list[int]:
    c = j @ j.T
    diagonal = c.diag() ** 0.5
    similarity = c / (diagonal[:, None] * diagonal[None, :])  # NaN for the zero row
    norms = j.norm(dim=1)
    removed = []
    for i in range(j.shape[0]):
        for k in range(i + 1, j.shape[0]):
            if torch.abs(similarity[i, k]) > 0.99:
                removed.append(i if norms[k] > norms[i] else k)
    return [i for i in range(j.shape[0]) if i not in removed]


@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_median_damping_step_is_the_authors_sf_step(lam: float) -> None:
    model, x, y = _problem()
    n, lr, total = x.shape[0], 0.1, 4
    r = 1.0 / n
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    opt = SF(model, CE, lr=lr, damping=lam, damping_mode="median", reduction="mean",
             total_steps=total, per_sample="hooks")
    with torch.no_grad():
        drawn = CE.sample(model(x), opt.sampling_key(0), num_samples=1, targets=y)[0]
    j, j_hat = _rows(model, x, y, r), _rows(model, x, drawn, r)
    kept = _authors_kept(j)
    assert len(kept) == n - 1 and 2 in kept  # the duplicate dropped, the zero row kept
    damping = float(torch.median((j @ j.T).diag()[kept])) * lam
    g = j.sum(dim=0)
    system = j_hat @ j_hat.T + damping * torch.eye(n, dtype=torch.float64)
    u = (g - j_hat.T @ torch.linalg.solve(system, j_hat @ g)) / damping
    expected = theta - lr * u / torch.linalg.norm(u)  # step 0 of T: (T - 0) / T = 1
    opt.step(lambda: (x, y))
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    kappa = float(np.linalg.cond(system.numpy()))
    bound = 16 * kappa * n * theta.numel() * EPS
    assert float(torch.linalg.norm(after - expected)) <= bound * lr
    assert opt.diagnostics["damping"] == pytest.approx(damping, rel=bound)


def test_damping_mode_is_checked_and_old_states_load_as_absolute() -> None:
    model = _problem()[0]
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        SF(model, CE, lr=0.1, damping=1e-3, total_steps=2, damping_mode="relative")
    opt = SF(model, CE, lr=0.1, damping=1e-3, total_steps=2)
    state = opt.state_dict()
    del state["param_groups"][0]["damping_mode"]  # a state_dict written before the option
    fresh = SF(model, CE, lr=0.1, damping=1e-3, total_steps=2, damping_mode="median")
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["damping_mode"] == "absolute"
