"""The Fisher products and the parts of an iEF step, timed by ``python -m validation.bench.steps``.

On a workload: building the :class:`backends.TorchProvider` (a forward pass for the logits),
G by the layer hooks and by vmap, the Gram solve, one Fisher-vector product
(:func:`ngdref.fisher_vp`: jvp + vjp_sum) and one :func:`ngdref.gamma` (with
:func:`ngdref.fisher_quadratic_form`, one jvp, and through ``fisher_vp``); beside them
curvlinops' ``GGNLinearOperator`` and ``EFLinearOperator`` matvecs on the same model, batch and
vector, with the relative gaps that show both compute the same products.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import ngdref
from backends.torch.optim.options import provider_keywords
from backends.torch.provider import TorchProvider
from validation.bench.report import FVP
from validation.bench.workloads import Workload


@dataclass
class Products:
    """The matvecs and the iEF parts, built once, with their cross-checks.

    ``gaps[label]`` is ``|ngdref - curvlinops| / |curvlinops|`` for "GGN" (the FVP) and "EF"
    (G^T G v); ``notes`` say what could not be compared, and why.
    """

    things: dict[str, Callable[[], object]]
    gaps: dict[str, float]
    notes: list[str]


def _provider(w: Workload, route: str) -> TorchProvider:
    """A provider on the optimisers' ``per_sample`` route (their one mapping of the options)."""
    options = {"output_fn": None, "per_sample": route, "chunk_size": None, "mode": "eval",
               "certify": "never", "on_mismatch": "raise", "certify_samples": None}
    return TorchProvider(w.model, w.provider_inputs, **provider_keywords(options, 0))


def products(w: Workload, damping: float) -> Products:
    """The timed products on ``w`` (Gram damping ``damping``, relative), and their checks."""
    provider = _provider(w, "hooks")
    dense = _provider(w, "vmap")  # G as one (N, P) tensor, on every installed provider
    q = ngdref.batch_quantities(dense, w.loss, w.targets)
    e = q.logit_grads
    fvp = ngdref.fisher_vp(provider, w.loss, w.targets)
    form = ngdref.fisher_quadratic_form(provider, w.loss, w.targets)
    update, _ = ngdref.gram_update(
        q.per_sample_grads, q.logit_grad_sq_norms, damping=damping, damping_mode="relative"
    )
    vector = torch.randn(w.num_params, generator=torch.Generator().manual_seed(6)).to(
        w.trainable[0].device
    )
    things: dict[str, Callable[[], object]] = {
        "  TorchProvider() (logits fwd)": lambda: _provider(w, "hooks"),
        "  G by hooks (provider.vjp)": lambda: provider.vjp(e),
        "  G by vmap (provider.vjp)": lambda: dense.vjp(e),
        "  Gram solve (gram_update)": lambda: ngdref.gram_update(
            q.per_sample_grads, q.logit_grad_sq_norms, damping=damping, damping_mode="relative"
        ),
        FVP: lambda: fvp(vector),
        "gamma (fisher_quadratic_form)": lambda: ngdref.gamma(update, q.grad, quadratic_form=form),
        "gamma (through fisher_vp)": lambda: ngdref.gamma(update, q.grad, fisher_vp=fvp),
    }
    out = Products(things, {}, [])
    if w.curvlinops_args is None:
        out.notes.append("curvlinops: not available for this model")
        return out
    try:
        from curvlinops import EFLinearOperator, GGNLinearOperator
    except ImportError as err:  # pragma: no cover - curvlinops is an optional oracle
        out.notes.append(f"curvlinops: skipped, cannot import it ({err})")
        return out
    model_func, loss_func, x, y, batch_size_fn = w.curvlinops_args
    options = {"check_deterministic": False, "batch_size_fn": batch_size_fn}
    reference = {
        "GGN": fvp(vector),
        "EF": q.per_sample_grads.T @ (q.per_sample_grads @ vector),
    }
    for label, cls in (("GGN", GGNLinearOperator), ("EF", EFLinearOperator)):
        name = f"curvlinops {label} matvec"
        try:
            operator = cls(model_func, loss_func, w.trainable, [(x, y)], **options)
            result = operator @ vector
        except Exception as err:  # a cell curvlinops cannot handle is reported, not fatal
            out.notes.append(f"{name}: skipped, {type(err).__name__}: {err}")
            continue
        things[name] = lambda operator=operator: operator @ vector
        out.gaps[label] = float((result - reference[label]).norm() / reference[label].norm())
    if w.curvlinops_note:
        out.notes.append(w.curvlinops_note)
    return out
