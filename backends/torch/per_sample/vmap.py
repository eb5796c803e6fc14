r"""Per-sample rows by ``torch.func.vmap`` over the samples, and the whole-model routes.

Row n of G (N, P) is :math:`u_n^\top J_n`, the vector-Jacobian product of sample n's logits
alone (a batch of one under ``vmap``), in the sum convention. :func:`vmap_vjp` gives all of
G, :func:`vmap_vjp_ranges` the columns of some slices of theta (the rest held fixed, so only
N x sum(sizes) is formed), :func:`vmap_jacobian` the per-sample Jacobians (N, C, P); each
processes the samples a chunk at a time (the provider's ``chunk_size``).

:func:`dense_ranges` is the chain of whole-model routes a parameter falls through when the
layer pass cannot split it: ``vmap``, and where torch cannot run it (recurrent layers, packed
sequences, operators without a batching rule, in-place updates of a batch-of-one state) the
loop of single-sample passes of :mod:`backends.torch.per_sample.loop`, which needs nothing
but the model's call on a sub-batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch.func import jacrev, vmap
from torch.func import vjp as func_vjp

from .loop import BatchModel, loop_vjp_ranges

__all__ = ["VmapModel", "dense_ranges", "error_line", "is_ours", "vmap_jacobian", "vmap_vjp",
           "vmap_vjp_ranges"]


class VmapModel(BatchModel, Protocol):
    """What the vmap routes need of a provider (e.g. :class:`backends.TorchProvider`), on top
    of the :class:`~backends.torch.per_sample.loop.BatchModel` of the loop."""

    @property
    def theta(self) -> torch.Tensor:
        """theta (P,)."""
        ...

    def chunks(self) -> Iterator[slice]:
        """The samples of each pass, consecutive slices covering the batch."""
        ...

    def batch(self, rows: slice) -> dict[str, torch.Tensor]:
        """The per-sample model inputs of the samples ``rows`` (samples first)."""
        ...

    def sample_logits(self, theta: torch.Tensor, sample: Mapping[str, torch.Tensor]) -> Any:
        """Logits (C,) of one sample (its inputs without the batch axis) at theta."""
        ...

    def vmap_context(self) -> AbstractContextManager[Any]:
        """The context every vmap pass runs in: the mode policy, and whatever the model's
        inputs need under vmap (Hugging Face attention masks)."""
        ...


def is_ours(err: BaseException) -> bool:
    """Whether an error is one of this project's named errors (never taken for a route that
    cannot run, always raised)."""
    return type(err).__module__.startswith(("ngdref", "backends"))


def error_line(err: BaseException) -> str:
    """``"RuntimeError: <first line of its message>"``, for a fallback's report."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _in_dims(model: VmapModel, rows: slice) -> dict[str, int]:
    return dict.fromkeys(model.batch(rows), 0)


def vmap_vjp(model: VmapModel, cotangents: torch.Tensor) -> torch.Tensor:
    """G (N, P): row n is u_n^T J_n, by vmap over the samples, a chunk at a time."""

    def one(theta: torch.Tensor, sample: dict, u: torch.Tensor) -> torch.Tensor:
        _, pullback = func_vjp(lambda th: model.sample_logits(th, sample), theta)
        return pullback(u)[0]

    out = []
    with model.vmap_context():
        for rows in model.chunks():
            per_sample = vmap(one, in_dims=(None, _in_dims(model, rows), 0))
            out.append(per_sample(model.theta, model.batch(rows), cotangents[rows]).detach())
    return out[0] if len(out) == 1 else torch.cat(out)


def vmap_vjp_ranges(
    model: VmapModel, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
) -> list[torch.Tensor]:
    """Per-sample u_n^T J_n restricted to the (offset, size) slices of theta: one (N, size)
    per range, in the order of ``ranges``; the rest of theta held fixed."""
    theta = model.theta
    cuts = sorted(ranges)
    fixed, start = [], 0
    for offset, size in cuts:
        fixed.append(theta[start:offset])
        start = offset + size
    tail = theta[start:]

    def assemble(pieces: tuple[torch.Tensor, ...]) -> torch.Tensor:
        parts = []
        for constant, piece in zip(fixed, pieces, strict=True):
            parts += [constant, piece]
        return torch.cat([*parts, tail])

    def one(pieces: tuple, sample: dict, u: torch.Tensor) -> tuple:
        _, pullback = func_vjp(lambda *q: model.sample_logits(assemble(q), sample), *pieces)
        return pullback(u)

    primals = tuple(theta[o:o + s] for o, s in cuts)
    out: list[list[torch.Tensor]] = [[] for _ in cuts]
    with model.vmap_context():
        for rows in model.chunks():
            per_sample = vmap(one, in_dims=(None, _in_dims(model, rows), 0))
            for i, g in enumerate(per_sample(primals, model.batch(rows), cotangents[rows])):
                out[i].append(g.detach())
    by_range = {cut: torch.cat(parts) for cut, parts in zip(cuts, out, strict=True)}
    return [by_range[r] for r in ranges]


def vmap_jacobian(model: VmapModel) -> torch.Tensor:
    """J (N, C, P): ``vmap`` over the samples of ``jacrev``, a chunk at a time."""
    out = []
    with model.vmap_context():
        for rows in model.chunks():
            per_sample = vmap(jacrev(model.sample_logits), in_dims=(None, _in_dims(model, rows)))
            out.append(per_sample(model.theta, model.batch(rows)).detach())
    return out[0] if len(out) == 1 else torch.cat(out)


def dense_ranges(
    model: VmapModel, cotangents: torch.Tensor, ranges: list[tuple[int, int]], *,
    route: str = "vmap",
) -> tuple[list[torch.Tensor], str, str | None]:
    """The whole-model routes for some slices of theta: (rows per range, the route that made
    them, why vmap could not, or None).

    ``route="vmap"``: :func:`vmap_vjp_ranges`, and where torch cannot run it (any error that
    is not one of the project's own), the loop of single-sample passes
    (:func:`~backends.torch.per_sample.loop.loop_vjp_ranges`); ``route="loop"``: the loop.
    """
    if route == "vmap":
        try:
            if list(ranges) == [(0, model.theta.numel())]:  # all of theta: no slices to join
                return [vmap_vjp(model, cotangents)], "vmap", None
            return vmap_vjp_ranges(model, cotangents, ranges), "vmap", None
        except Exception as err:  # torch-internal: the loop needs nothing vmap does
            if is_ours(err):
                raise
            why = error_line(err)
    else:
        why = None
    return loop_vjp_ranges(model, cotangents, ranges), "loop", why
