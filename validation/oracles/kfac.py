r"""K-FAC oracles: ngdref's KFAC / eKFAC / ieKFAC against curvlinops and exact iEF.

Run by ``python -m validation`` (section "K-FAC oracles") and by
``tests/backends/torch/kfac/test_kfac.py``. Everything in float64, sum convention,
``normalisation="mean"`` (curvlinops' convention for a sum-reduced loss:
A averaged over the N T (expand) or N (reduce) terms, B summed).

Checks, per network x position convention x bias mode:

- ``factors[<method>]``: the dense block-diagonal K-FAC matrix against
  curvlinops' ``KFACLinearOperator`` applied to the identity:
  eKFAC vs ``fisher_type="empirical"``; KFAC with type-2 rows vs
  ``"type-2"``; KFAC with one sampled label vs ``"empirical"`` given the
  same sampled labels (curvlinops' "mc" draws its own labels); ieKFAC, which no
  library has, vs ``"empirical"`` on a sum-reduced ``MSELoss`` whose targets
  are z_n - u_n / 2 with u_n = e_n / ||e_n||, so that its per-sample logit
  gradients are u_n and its B is sum_n b_n b_n^T / s_n (Eq. 43).
- ``inverse[exact]``: (K + lambda I)^-1 g against ``KFACInverseLinearOperator``
  with ``use_exact_damping=True``; ``inverse[pi]`` against
  ``use_heuristic_damping=True, min_damping=0`` (joint bias only: for a
  separate bias curvlinops shifts B by its layer's pi-damping, ngdref by lambda).
- ``corrected``: with ``eigenvalue_correction=True`` (EK-FAC, George et al. 2018;
  the same rows and weights, so an eigenvalue-corrected ieKFAC too) the block and
  its exact damped inverse against ``EKFACLinearOperator``.
- ``iekfac = iEF``: one ``nn.Linear`` without bias, N = 1, T = 1, where
  F_iEF = g g^T / s = (b b^T / s) (x) (a a^T) is itself a Kronecker product:
  ieKFAC with either normalisation (N T = 1) equals F_iEF, and its exact
  damped inverse equals ``ngdref.ief_update(..., damping_space="parameter")``.

Tolerances (relative Frobenius / 2-norm differences, bound in
:func:`tolerances`): a factor entry sums m = N T rounded products of
back-propagated values, each with relative error <= a few d eps (d the widest
layer), so factors agree to tol_f = 16 (m + d) eps; an applied inverse
(K + lambda I)^-1 g amplifies that by the condition number kappa of the damped
matrix (perturbation bound for linear systems), plus the eigensolver's backward
error d eps kappa: tol_inv = kappa (tol_f + 16 d eps). The eigenvalue-corrected
blocks depend on the factors' eigenvectors, accurate to eps ||factor|| / gap, so
their two tolerances are multiplied by max ||factor|| / (smallest eigen-gap).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ngdref
from backends.torch.kfac.curvature import KFACCurvature, kfac_curvature
from ngdref import kfac as K
from validation.oracles.conversions import trainable
from validation.oracles.peers import unavailable
from validation.oracles.setup import OracleCheck

__all__ = [
    "KFAC_PROBLEMS",
    "KFACProblem",
    "SequenceNet",
    "all_checks",
    "iekfac_ief_check",
    "kfac_checks",
    "kfac_entry",
    "tolerances",
]

EPS = 2.0**-52
DAMPING = 1e-2


@dataclass(frozen=True)
class KFACProblem:
    """A small float64 classification network on one batch."""

    name: str
    build: Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]
    positions: int  # T of the weight-sharing layers (1: none)


def _mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    return model, torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))


class SequenceNet(nn.Module):
    """Linear on (N, T, d) tokens, tanh, mean over T, linear head: weight sharing over T."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


def _sequence() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return (
        SequenceNet().double(), torch.randn(6, 4, 3, dtype=torch.float64),
        torch.randint(0, 3, (6,)),
    )


def _cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)
    ).double()
    # N = 10 >= d_in = 8 and no padding: under "reduce" A has full rank (_corrected_checks)
    return model, torch.randn(10, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (10,))


def _cnn_same() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A string-padded, dilated convolution (K-FAC factors through the layer registry; before
    it, such a layer only had the diagonal fallback)."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding="same", dilation=2), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 4),
    ).double()
    return model, torch.randn(24, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (24,))


def _lora() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """peft LoRA (r = 2) on both layers of an MLP; B initialised randomly, not to 0."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(base, config)
    return model, torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))


KFAC_PROBLEMS = (
    KFACProblem("mlp", _mlp, 1),
    KFACProblem("sequence", _sequence, 4),
    KFACProblem("cnn", _cnn, 9),
    KFACProblem("cnn-same", _cnn_same, 25),
    KFACProblem("lora", _lora, 1),
)

#: ngdref method (and how its rows are made) -> curvlinops fisher_type
_VARIANTS = (
    ("ekfac", "mc", "empirical"),
    ("kfac", "type-2", "type-2"),
    ("kfac", "mc", "empirical"),  # with ngdref's sampled labels as the targets
    ("iekfac", "mc", "empirical"),  # on the shifted MSELoss, see the module docstring
)


def tolerances(dense: torch.Tensor, num_terms: int, damping: float) -> tuple[float, float]:
    """(tol_f, tol_inv) of the module docstring for the block-diagonal matrix ``dense``."""
    d = dense.shape[0]
    tol_f = 16 * (num_terms + d) * EPS
    eig = torch.linalg.eigvalsh(dense)
    kappa = float((eig.max() + damping) / (eig.min().clamp(min=0) + damping))
    return tol_f, kappa * (tol_f + 16 * d * EPS)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _oracle_data(
    method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, key: int
) -> tuple[nn.Module, torch.Tensor]:
    """curvlinops' loss and targets that make its "empirical" B equal ngdref's ``method``."""
    loss = ngdref.SoftmaxCrossEntropy()
    if method == "ekfac":
        return nn.CrossEntropyLoss(reduction="sum"), y
    with torch.no_grad():
        z = model(x)
    if method == "kfac":
        return nn.CrossEntropyLoss(reduction="sum"), loss.sample(z, key, targets=y)[0]
    e = loss.grad(z, y)
    u = e / torch.linalg.norm(e, dim=1, keepdim=True)
    return nn.MSELoss(reduction="sum"), z - u / 2


def kfac_checks(problem: KFACProblem) -> list[OracleCheck]:
    """Every factor and inverse check of one problem (see the module docstring)."""
    reason = unavailable("curvlinops") or (problem.name == "lora" and unavailable("peft"))
    if reason:
        return [OracleCheck(f"curvlinops {problem.name}", "all", math.nan, math.nan, reason)]
    model, x, y = problem.build()
    checks = []
    for convention in ("expand", "reduce"):
        for bias in ("separate", "joint"):
            for variant in _VARIANTS:
                checks += _variant_checks(problem, model, x, y, convention, bias, *variant)
    return checks


def _variant_checks(
    problem: KFACProblem,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    convention: str,
    bias: str,
    method: str,
    rows: str,
    fisher_type: str,
) -> list[OracleCheck]:
    """Factors and damped inverses of one method against one curvlinops operator."""
    from curvlinops import KFACLinearOperator

    label = f"curvlinops {problem.name} {convention} {bias} {fisher_type}"
    curvature_of = functools.partial(
        kfac_curvature, model, ngdref.SoftmaxCrossEntropy(), x, y, methods=(method,),
        kfac_fisher=rows, convention=convention, bias=bias, key=3,
    )
    curvature = curvature_of()
    loss, targets = (
        _oracle_data(method, model, x, y, 3) if fisher_type == "empirical"
        else (nn.CrossEntropyLoss(reduction="sum"), y)
    )
    oracle_options = (model, x, loss, targets, fisher_type, convention, bias)
    operator, oracle = _curvlinops_dense(KFACLinearOperator, oracle_options)
    dense = curvature.dense(method)
    num_terms = x.shape[0] * (problem.positions if convention == "expand" else 1)
    tol_f, tol_inv = tolerances(dense, num_terms, DAMPING)
    name = f"{method}[{rows}]"
    checks = [OracleCheck(label, f"factors {name}", _relative(oracle, dense), tol_f)]
    checks += _inverse_checks(label, name, operator, curvature, method, bias, tol_inv)
    if fisher_type == "empirical" or rows == "type-2":
        corrected = curvature_of(eigenvalue_correction=True)
        checks += _corrected_checks(label, name, corrected, method, oracle_options, num_terms)
    return checks


def _curvlinops_dense(
    operator_class: Any, oracle_options: tuple[Any, ...]
) -> tuple[Any, torch.Tensor]:
    """A curvlinops K-FAC operator on one batch, and its dense matrix (operator @ I).

    ``oracle_options`` is (model, x, loss, targets, fisher_type, convention, bias).
    """
    model, x, loss, targets, fisher_type, convention, bias = oracle_options
    params = trainable(model)
    operator = operator_class(
        model, loss, params, [(x, targets)],
        fisher_type=fisher_type, kfac_approx=convention,
        separate_weight_and_bias=bias == "separate", check_deterministic=False,
    )
    size = sum(p.numel() for p in params)
    return operator, operator @ torch.eye(size, dtype=torch.float64)


def _inverse_checks(
    label: str,
    name: str,
    operator: Any,
    curvature: KFACCurvature,
    method: str,
    bias: str,
    tol_inv: float,
) -> list[OracleCheck]:
    """(K + lambda I)^-1 g against KFACInverseLinearOperator: exact damping, and pi (joint)."""
    from curvlinops import KFACInverseLinearOperator

    forms = [("exact", {"use_exact_damping": True})]
    if bias == "joint":
        forms.append(("pi", {"use_heuristic_damping": True, "min_damping": 0.0}))
    checks = []
    for form, kwargs in forms:
        inverse = KFACInverseLinearOperator(operator, damping=DAMPING, **kwargs)
        mine = curvature.inverse_apply(
            method, curvature.grad, damping=DAMPING, damped_inverse=form
        )
        difference = _relative(mine, inverse @ curvature.grad)
        checks.append(OracleCheck(label, f"inverse[{form}] {name}", difference, tol_inv))
    return checks


def _inverse_relative_gap(factors: K.KroneckerFactors) -> float:
    """max over the two factors of ||factor|| / (smallest gap between its eigenvalues).

    Eigenvalues equal to rounding (a null space: no row of the factor reaches into it,
    so E is 0 there in every basis) count as one cluster.
    """
    worst = 1.0
    for m in (factors.input_factor, factors.grad_factor):
        if m is not None and m.shape[0] > 1:
            eig = torch.linalg.eigvalsh(m)
            scale = float(eig.abs().max())
            gaps = torch.diff(eig)
            gaps = gaps[gaps > 64 * m.shape[0] * EPS * scale]
            if gaps.numel():
                worst = max(worst, scale / float(gaps.min()))
    return worst


def _corrected_checks(
    label: str,
    name: str,
    curvature: KFACCurvature,
    method: str,
    oracle_options: tuple[Any, ...],
    num_terms: int,
) -> list[OracleCheck]:
    """The eigenvalue-corrected block and its exact inverse against EKFACLinearOperator.

    EK-FAC is unique only where the factors' eigenvalues are: under "reduce" with weight
    sharing the per-position inputs a_nt need not lie in the range of A (built from the
    position means), so E in a degenerate null space of A depends on the basis eigh
    picks. The problems here keep A and B of full rank wherever that matters.
    """
    from curvlinops import EKFACLinearOperator, KFACInverseLinearOperator

    operator, oracle = _curvlinops_dense(EKFACLinearOperator, oracle_options)
    dense = curvature.dense(method)
    # the eigenbasis is only as accurate as eps ||factor|| / (its smallest eigen-gap)
    spread = max(_inverse_relative_gap(f) for b in curvature.blocks for f in b.factors.values())
    tol_f, tol_inv = (tol * spread for tol in tolerances(dense, num_terms, DAMPING))
    inverse = KFACInverseLinearOperator(operator, damping=DAMPING, use_exact_damping=True)
    mine = curvature.inverse_apply(method, curvature.grad, damping=DAMPING)
    label = label.replace("curvlinops", "curvlinops EKFAC")
    return [
        OracleCheck(label, f"corrected {name}", _relative(oracle, dense), tol_f),
        OracleCheck(label, f"corrected inverse {name}",
                    _relative(mine, inverse @ curvature.grad), tol_inv),
    ]


def iekfac_ief_check(damping: float = DAMPING) -> list[OracleCheck]:
    """ieKFAC = exact iEF with parameter-space damping: one bias-free layer, N = 1, T = 1."""
    from backends.torch.provider import TorchProvider

    torch.manual_seed(4)
    model = nn.Linear(4, 3, bias=False).double()
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([1])
    loss = ngdref.SoftmaxCrossEntropy()
    provider = TorchProvider(model, x)
    z = provider.logits()
    e = loss.grad(z, y)
    per_sample_grads = provider.vjp(e)
    s = torch.sum(e * e, dim=1)
    f_ief = per_sample_grads.T @ (per_sample_grads / s[:, None])
    expected = ngdref.ief_update(per_sample_grads, s, damping=damping, damping_space="parameter")
    checks = []
    for normalisation in ("mean", "sum"):
        curvature = kfac_curvature(
            model, loss, x, y, methods=("iekfac",), normalisation=normalisation
        )
        dense = curvature.dense("iekfac")
        tol_f, tol_inv = tolerances(dense, 1, damping)
        mine = curvature.inverse_apply("iekfac", curvature.grad, damping=damping)
        label = f"exact iEF (N=T=1, {normalisation})"
        checks += [
            OracleCheck(label, "F_iEF = ieKFAC", _relative(dense, f_ief), tol_f),
            OracleCheck(label, "(F_iEF + lambda I)^-1 g", _relative(mine, expected), tol_inv),
        ]
    return checks


def all_checks() -> list[OracleCheck]:
    """Every K-FAC oracle check of ``python -m validation``."""
    checks = []
    for problem in KFAC_PROBLEMS:
        checks += kfac_checks(problem)
    return checks + iekfac_ief_check()


def kfac_entry(format_checks: Callable[[list[OracleCheck]], str]) -> dict[str, Any]:
    """Run :func:`all_checks`, print them with ``format_checks``; the report entry."""
    print("\n[K-FAC] KFAC / eKFAC / ieKFAC vs curvlinops and exact iEF", flush=True)
    start = time.perf_counter()
    checks = all_checks()
    print(format_checks(checks), flush=True)
    seconds = time.perf_counter() - start
    print(f"  ({seconds:.1f} s)", flush=True)
    return {
        "problem": "kfac",
        "family": "kfac",
        "rows": [],
        "independent": [],
        "oracles": [c.as_dict() for c in checks],
        "seconds": seconds,
    }
