r"""The K-FAC family on every zoo case with a layer K-FAC factors (Linear, convolutions,
embeddings, attention): each optimiser step runs or refuses by name, and the curvature's
blocks hold every per-sample gradient.

What runs is checked where no Kronecker factor is needed (the factors against dense ones
are :mod:`tests.backends.torch.kfac.test_kfac`'s job): with a damping lambda far above the
curvature, one step with lr = lambda moves theta by

.. math:: -\lambda (K + \lambda I)^{-1} g = -(g - K g / \lambda + \dots)

so it must equal -g, the sum of the reference's per-sample gradients, to within
||K|| / lambda. lambda = 1e12 (||G||_F^2 + 1) / min(1, min_n s_n); the bound assumes
||K||_2 <= 1e5 (||G||_F^2 + 1) / min(1, min_n s_n) (a K-FAC block is a product of an input
factor and an output-gradient factor whose traces are, for these tiny models with O(1)
weights and inputs, sums of a few hundred O(1) terms times ||G||^2-sized gradients, the
1 / s_n of IEKFAC included), so the relative error is at most 1e-7 plus the rounding of
theta (measured: below 1e-12 on every case that runs). A wrong gradient (train-mode
statistics, a dropped parameter) is far outside it.

The blocks are checked where the step cannot see them: with ``eigenvalue_correction=True``
every Kronecker block keeps its factors' orthonormal eigenbasis U (x) V and holds
E = sum_n (U^T G_n V)^2, whose entries sum to sum_n ||G_n||_F^2 whatever the basis; a diagonal
block's entries sum to the same. So per block, the sum of E (or D) must equal
sum_n ||g_n||^2 over the block's entries of the reference's per-sample gradients: a wrong
batch axis, a dropped or double-counted use, a misplaced index or a wrong layer factor
changes it. Bound: the reference rows are within gamma ||G||_F of the exact ones
(:func:`.reference.rows_gamma`), so a sum of squares over any entries is within
(2 gamma + gamma^2) ||G||_F^2, plus the rounding of the rotations (a few P eps ||G||_F^2).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from backends.torch.kfac.curvature import kfac_curvature
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC

from .defects import KFAC_METHODS, NO_ROUTE, params
from .models import CASES
from .outcomes import MARKS, Outcome, judge_refusal, judge_value, run, theta, trained
from .reference import EPS, reference, rows_gamma

pytestmark = MARKS

OPTIMISERS = {"kfac": KFAC, "ekfac": EKFAC, "iekfac": IEKFAC}
#: the layer kinds K-FAC is defined for (subclasses too: MultiheadAttention's out_proj)
KFAC_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag)
#: ||K||_2 / lambda at most (see the module docstring)
CURVATURE_RATIO = 1e-7


def _has_kfac_layer(name: str) -> bool:
    model, _, _ = CASES[name].build()
    return any(isinstance(m, KFAC_LAYERS) and any(p.requires_grad for p in m.parameters(False))
               for m in model.modules())


KFAC_CASES = [name for name in CASES if _has_kfac_layer(name)]


def _damping(name: str) -> float:
    if CASES[name].refuse is not None:
        return 1.0  # any: the step must be refused
    ref = reference(name)
    s_min = float(np.min(np.sum(ref.logit_grads**2, axis=1)))
    return 1e12 * (float(np.sum(ref.grads**2)) + 1.0) / min(1.0, s_min)


def kfac_outcome(name: str, method: str) -> Outcome:
    case = CASES[name]
    damping = _damping(name)

    def action(model: nn.Module, inputs: Any, targets: torch.Tensor) -> dict[str, Any]:
        opt = OPTIMISERS[method](model, case.loss(), lr=damping, damping=damping, mode=case.mode)
        before = theta(model)
        opt.step(lambda: (inputs, targets))
        return {method: before - theta(model)}

    return run(case, action, may_change=trained(case))


@pytest.mark.parametrize(("name", "route", "quantity"),
                         params(KFAC_CASES, KFAC_METHODS, routes=(NO_ROUTE,)))
def test_kfac_step(name: str, route: str, quantity: str) -> None:
    case = CASES[name]
    outcome = kfac_outcome(name, quantity)
    if outcome.error is not None:
        judge_refusal(case, outcome)
        return
    if case.refuse is not None:
        pytest.fail(f"silently ran a model without per-sample meaning ({case.refuse})")
    assert not outcome.changed, f"changed {sorted(outcome.changed)}"
    assert outcome.values is not None
    g = reference(name).grads.sum(axis=0)
    model, _, _ = case.build()
    bound = CURVATURE_RATIO * float(np.linalg.norm(g)) + 2 * EPS * (
        float(np.linalg.norm(theta(model))) + float(np.linalg.norm(g))
    )
    judge_value(f"{quantity} gradient (large damping)", outcome.values[quantity], g, bound)


@pytest.mark.parametrize(("name", "route", "quantity"),
                         params(KFAC_CASES, ("ekfac",), routes=(NO_ROUTE,)))
def test_kfac_blocks_hold_every_per_sample_gradient(name: str, route: str,
                                                     quantity: str) -> None:
    case = CASES[name]

    def action(model: nn.Module, inputs: Any, targets: torch.Tensor) -> dict[str, Any]:
        curvature = kfac_curvature(model, case.loss(), inputs, targets, methods=("ekfac",),
                                   eigenvalue_correction=True, mode=case.mode)
        return {b.name: (b.index.numpy(), float((b.diagonal["ekfac"] if b.factors is None else
                                                 b.factors["ekfac"].corrected_eigenvalues).sum()))
                for b in curvature.blocks}

    outcome = run(case, action)
    if outcome.error is not None:
        judge_refusal(case, outcome)
        return
    if case.refuse is not None:
        pytest.fail(f"silently ran a model without per-sample meaning ({case.refuse})")
    assert outcome.values is not None and not outcome.changed
    g = reference(name).grads
    gamma = rows_gamma(g.shape[1])
    bound = (2 * gamma + gamma**2 + 16 * g.shape[1] * EPS) * float(np.sum(g * g))
    covered = np.concatenate([index for index, _ in outcome.values.values()])
    assert np.array_equal(np.sort(covered), np.arange(g.shape[1])), "blocks must tile theta"
    for block, (index, total) in outcome.values.items():
        want = float(np.sum(g[:, index] ** 2))
        assert abs(total - want) <= bound, (
            f"block {block}: sum of E {total:.6g}, sum_n ||g_n||^2 {want:.6g} (bound {bound:.2g})")


def test_kfac_zoo_is_most_of_the_zoo() -> None:
    """Only cases without a K-FAC layer are left out (raw parameters, norms alone)."""
    left_out = sorted(set(CASES) - set(KFAC_CASES))
    assert left_out == ["functional_parameters"], left_out
