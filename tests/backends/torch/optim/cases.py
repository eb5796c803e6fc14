"""The problems and independent references of the optimiser tests (tests/backends/torch/optim/).

Every reference takes another route than the optimiser: per-sample gradients from a Python loop
of single-sample ``cross_entropy(reduction="sum")`` backward passes (:func:`loop_grads`), s from
a softmax written here (:func:`hand_s`), the Fisher as a dense matrix from
``torch.autograd.functional.jacobian`` (:func:`dense_fisher`). Everything runs in float64.
Import it after ``pytest.importorskip("torch")``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ngdref
from backends.torch.optim.methods import EF, IEF, SF
from tests.array_backends import tolerance
from validation.tiny_models import T5_LORA_TARGETS, lora, tiny_t5_config

N = 4
IGNORE = -100
TOL = tolerance("float64")


# ---- problems -------------------------------------------------------------------------------
@dataclass
class Problem:
    """A model, one batch and an independent way to evaluate per-sample logits."""

    model: nn.Module
    batch: Any  # what the closure returns
    targets: Any  # (N,) class labels or (N, T) token ids with IGNORE padding
    loss: ngdref.LogitLoss
    vocab: int  # classes per label position
    #: forward(call, rows) -> logits (n, T, V) of the samples ``rows``; call is the model
    forward: Callable[[Callable[..., Any], slice], Any]

    @property
    def trainable(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def theta(self) -> Any:
        return torch.cat([p.detach().reshape(-1) for _, p in self.trainable])


def mlp_problem(duplicate: bool = False) -> Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(N, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (N,))
    if duplicate:
        x[3], y[3] = x[2], y[2]
    return Problem(
        model=model,
        batch=(x, y),
        targets=y,
        loss=ngdref.SoftmaxCrossEntropy(),
        vocab=3,
        forward=lambda call, rows: call(x[rows])[:, None, :],
    )


def t5_problem() -> Problem:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    torch.manual_seed(0)
    config = tiny_t5_config(
        vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, dropout_rate=0.0
    )
    base = transformers.T5ForConditionalGeneration(config).double()
    model = lora(base, r=2, targets=T5_LORA_TARGETS).double()
    input_ids = torch.randint(1, 40, (N, 6))
    attention_mask = torch.ones(N, 6, dtype=torch.long)
    input_ids[0, 4:], attention_mask[0, 4:] = 0, 0
    labels = torch.randint(1, 40, (N, 3))
    labels[1, 2], labels[2, 1:] = IGNORE, IGNORE
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def forward(call: Callable[..., Any], rows: slice) -> Any:
        return call(**{k: v[rows] for k, v in batch.items()}).logits

    return Problem(
        model=model,
        batch=batch,
        targets=labels,
        loss=ngdref.SequenceSoftmaxCrossEntropy(40),
        vocab=40,
        forward=forward,
    )


PROBLEMS = {"mlp": mlp_problem, "t5": t5_problem}
CASES = [("mlp", "sum"), ("mlp", "mean"), ("t5", "mean")]


# ---- the independent references -------------------------------------------------------------
def loop_grads(problem: Problem, targets: Any) -> Any:
    """Per-sample gradients (N, P) of the sum-convention l_n, one backward pass per sample."""
    params = [p for _, p in problem.trainable]
    rows = []
    for i in range(N):
        z = problem.forward(problem.model, slice(i, i + 1))
        loss = F.cross_entropy(
            z.reshape(-1, problem.vocab),
            targets[i].reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def logits_and_mask(problem: Problem, targets: Any) -> tuple[Any, Any]:
    """Logits (N, T, V) and the label mask (N, T, 1)."""
    with torch.no_grad():
        z = problem.forward(problem.model, slice(None))
    mask = (targets.reshape(N, -1) != IGNORE).to(z.dtype)[..., None]
    return z, mask


def hand_s(problem: Problem) -> Any:
    """s_n = sum over label positions of ||softmax(z) - onehot(y)||^2 (sum convention)."""
    z, mask = logits_and_mask(problem, problem.targets)
    labels = problem.targets.reshape(N, -1).clamp(min=0)
    e = mask * (torch.softmax(z, dim=-1) - F.one_hot(labels, problem.vocab).to(z.dtype))
    return (e**2).sum(dim=(1, 2))


def dense_fisher(problem: Problem) -> Any:
    """F = sum_n J_n^T H_n J_n (P, P), J from autograd.functional.jacobian, H by hand."""
    names = [n for n, _ in problem.trainable]
    params = [p for _, p in problem.trainable]

    def logits_of(theta: Any) -> Any:
        chunks = theta.split([p.numel() for p in params])
        pieces = {n: t.view_as(p) for n, t, p in zip(names, chunks, params, strict=True)}

        def call(*args: Any, **kwargs: Any) -> Any:
            return torch.func.functional_call(problem.model, pieces, args, kwargs)

        return problem.forward(call, slice(None))

    jac = torch.autograd.functional.jacobian(logits_of, problem.theta(), vectorize=True)
    z, mask = logits_and_mask(problem, problem.targets)
    p = torch.softmax(z, dim=-1)
    hessians = mask[..., None] * (torch.diag_embed(p) - p[..., :, None] * p[..., None, :])
    return torch.einsum("ntvp,ntvw,ntwq->pq", jac, hessians, jac)


def decayed(lr: float, step: int, total: int) -> float:
    return lr * (total - step) / total


def take_step(problem: Problem, opt: Any) -> Any:
    """The parameter change of one ``opt.step``."""
    before = problem.theta()
    opt.step(lambda: problem.batch)
    return problem.theta() - before


def factor(reduction: str) -> float:
    return 1.0 / N if reduction == "mean" else 1.0


def assert_refused(problem: Problem, opt: Any, closure: Any, error: type, match: str) -> None:
    """The step raises and leaves the parameters, the counter and the diagnostics alone.

    ``closure`` is the step's closure, or a dict of ``step``'s keyword arguments.
    """
    before = [p.detach().clone() for p in problem.model.parameters()]
    steps, diagnostics = opt.steps_taken, dict(opt.diagnostics)
    arguments = closure if isinstance(closure, dict) else {"closure": closure}
    with pytest.raises(error, match=match):
        opt.step(**arguments)
    assert all(torch.equal(a, b) for a, b in zip(before, problem.model.parameters(), strict=True))
    assert opt.steps_taken == steps and opt.diagnostics == diagnostics


#: the optimisers that take a per-sample route, with options for one step on a tiny problem
ROUTE_OPTIMISERS = {
    "ief": (IEF, {"lr": 0.5, "damping": 1e-3}),
    "ef": (EF, {"lr": 0.5, "damping": 1e-3, "total_steps": 2}),
    "sf": (SF, {"lr": 0.5, "damping": 1e-3, "total_steps": 2, "num_samples": 2}),
}
