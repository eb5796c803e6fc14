"""The zoo itself: it covers every trainable ``torch.nn`` class, its annotations are true, its
reference is right, and its refused cases really have no per-sample meaning."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp, vmap

from .case import NO_FORWARD_AD, NO_VMAP, Case
from .coverage import EXCLUDED, classes_in, trainable_classes
from .models import CASES
from .outcomes import MARKS, Snapshot
from .reference import call, logit_grads, reference, rows_gamma, sample_of, trainable

pytestmark = MARKS

PER_SAMPLE = [name for name, case in CASES.items() if case.refuse is None]
REFUSED = [name for name, case in CASES.items() if case.refuse is not None]


def _zoo_classes() -> set[str]:
    return classes_in(CASES[name].build()[0] for name in CASES)


def test_every_trainable_torch_nn_class_is_in_the_zoo_or_excluded() -> None:
    zoo = _zoo_classes()
    missing = [c.__name__ for c in trainable_classes()
               if c.__name__ not in zoo and c.__name__ not in EXCLUDED]
    assert not missing, f"trainable torch.nn classes in no zoo case and not excluded: {missing}"


def test_exclusions_are_trainable_classes_outside_the_zoo() -> None:
    trainable_names = {c.__name__ for c in trainable_classes()}
    assert set(EXCLUDED) <= trainable_names, sorted(set(EXCLUDED) - trainable_names)
    assert not set(EXCLUDED) & _zoo_classes(), sorted(set(EXCLUDED) & _zoo_classes())


def _eval_case(case: Case) -> tuple[nn.Module, Any, dict[str, torch.Tensor]]:
    model, inputs, _ = case.build()
    model.eval()
    return model, inputs, {n: p.detach() for n, p in trainable(model)}


def _logits(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        out = functional_call(model, params, (), inputs)
    else:
        out = functional_call(model, params, (inputs,))
    return out.reshape(out.shape[0], -1)


def _vmap_runs(case: Case) -> bool:
    """Whether vmap over samples of a single-sample vjp (what the vmap routes need) runs."""
    model, inputs, params = _eval_case(case)
    u = torch.ones(*_logits(model, params, inputs).shape, dtype=torch.float64)

    def one(sample: Any, cotangent: torch.Tensor) -> Any:
        batch = (sample.unsqueeze(0) if isinstance(sample, torch.Tensor)
                 else {k: v.unsqueeze(0) for k, v in sample.items()})
        _, pullback = vjp(lambda p: _logits(model, p, batch)[0], params)
        return pullback(cotangent)

    try:
        vmap(one)(inputs, u)
    except (RuntimeError, NotImplementedError, ValueError):
        return False
    return True


def _forward_ad_runs(case: Case) -> bool:
    model, inputs, params = _eval_case(case)
    tangents = {n: torch.ones_like(p) for n, p in params.items()}
    try:
        jvp(lambda p: _logits(model, p, inputs), (params,), (tangents,))
    except (RuntimeError, NotImplementedError):
        return False
    return True


@pytest.mark.parametrize("name", CASES)
def test_limits_are_torch_funcs(name: str) -> None:
    """``Case.limits`` says exactly what torch.func cannot do on the model."""
    case = CASES[name]
    found = {NO_VMAP} if not _vmap_runs(case) else set()
    found |= {NO_FORWARD_AD} if not _forward_ad_runs(case) else set()
    assert found == set(case.limits)


def _batch_gradient(case: Case) -> tuple[np.ndarray, Snapshot, nn.Module, np.ndarray]:
    """grad of sum_n l_n by one backward pass over the whole batch in the model's own mode,
    the logits, and the model before the pass (to see what the pass changed)."""
    model, inputs, targets = case.build()
    before = Snapshot.of(model)
    z = call(model, inputs)
    e = torch.from_numpy(logit_grads(case, z.detach().numpy(), targets.numpy()))
    params = [p for _, p in trainable(model)]
    grads = torch.autograd.grad(z, params, grad_outputs=e, allow_unused=True)
    flat = [(torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
            for g, p in zip(grads, params, strict=True)]
    return torch.cat(flat).numpy(), before, model, z.detach().numpy()


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_reference_rows_sum_to_the_batch_gradient(name: str) -> None:
    """The loop's G^T 1 is the gradient of one ordinary backward pass over the batch, and
    every case has nonzero rows (its damping is ||G||^2 / N)."""
    ref = reference(name)
    case = CASES[name]
    g, _, _, _ = _batch_gradient(dataclasses.replace(case, training=False))  # eval, as ref
    assert np.linalg.norm(ref.grads, axis=1).min() > 0
    bound = 2 * rows_gamma(ref.num_params) * np.linalg.norm(ref.grads) * np.sqrt(len(ref.grads))
    assert np.linalg.norm(ref.grads.sum(axis=0) - g) <= bound


@pytest.mark.parametrize("name", REFUSED)
def test_refused_cases_couple_the_samples(name: str) -> None:
    """Each refused case really has no per-sample meaning in its own mode: a sample's logits
    in the batch differ from its logits alone, or the batch gradient is not the sum of the
    single-sample gradients, or the forward pass changes the parameters (differences far
    beyond rounding: 1e-6 relative)."""
    case = CASES[name]
    g, before, model, z = _batch_gradient(case)
    if before.changed(model):
        return
    model, inputs, targets = case.build()
    alone = [call(model, sample_of(inputs, n)) for n in range(z.shape[0])]
    logits = np.concatenate([zn.detach().numpy() for zn in alone])
    e = torch.from_numpy(logit_grads(case, logits, targets.numpy()))
    params = [p for _, p in trainable(model)]
    summed = sum(
        torch.cat([gr.to_dense().reshape(-1)
                   for gr in torch.autograd.grad(zn, params, grad_outputs=e[n:n + 1])]).numpy()
        for n, zn in enumerate(alone)
    )
    assert not (np.allclose(logits, z, rtol=1e-6, atol=0)
                and np.allclose(summed, g, rtol=1e-6, atol=0))
