"""An independent check of batch-axis claims: what moves when one sample's inputs move.

The tracker claims, for a tensor t of a forward pass, that the slices of its batch axis belong
to single samples (or that t is sample free). Two probes test such a claim without the rules:

* upstream: run the forward again with only sample m's inputs changed (floats + noise, token
  ids and masks replaced); only slices labelled m may change, and a sample-free tensor may not
  change at all. The comparison is exact: the other samples' arithmetic does not read sample
  m's values, so their results are bitwise the same.
* downstream: sample m's part of the logits, weighted at random, back-propagated to every
  claimed tensor (still unchanged since it was computed) must give exact zeros on the slices
  labelled with any other sample: no other sample's slice reaches sample m's loss.

A probe runs the forward under a tracker that also logs, for every operation, a copy of its
result and the state claimed for it then; runs are matched operation by operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from backends.torch.axes import BatchAxis, batch_first
from backends.torch.per_sample.provenance import (
    INPLACE,
    METADATA,
    SAMPLE_FREE,
    NotPerSample,
    Provenance,
    ProvenanceTracker,
)
from backends.torch.per_sample.provenance_rules import tensors


@dataclass(frozen=True)
class Input:
    """One tensor of the batch and its batch axis; ``high``: integer values lie in [0, high)."""

    value: torch.Tensor
    where: BatchAxis
    high: int | None = None


@dataclass
class Built:
    """A forward pass: inputs (by name) -> named tensors, one of them "logits"."""

    forward: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    inputs: dict[str, Input]
    free: list[torch.Tensor]
    num_samples: int


@dataclass(frozen=True)
class Entry:
    """One logged result: the operation, the tensor, a copy of its values, the claim."""

    name: str
    tensor: torch.Tensor
    value: torch.Tensor
    state: Provenance
    version: int


class Recorder(ProvenanceTracker):
    """A tracker that logs every result it classified (the probes' reference run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[Entry] = []

    def record(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:
        super().record(name, args, kwargs, result)
        if name in METADATA:
            return
        outs = list(tensors([result]))
        if not outs and args and isinstance(args[0], torch.Tensor) and (
                name in INPLACE or name.endswith("_")):
            outs = [args[0]]
        for t in outs:
            self.log.append(Entry(name, t, t.detach().clone(), self.axis_of(t), t._version))


@dataclass
class Run:
    named: dict[str, torch.Tensor]
    recorder: Recorder


def run(built: Built, values: dict[str, torch.Tensor], restore: list[torch.Tensor]) -> Run:
    """The forward on ``values`` under a :class:`Recorder`, the free tensors restored first
    (batch norm in training writes its running statistics)."""
    with torch.no_grad():
        for t, v in zip(built.free, restore, strict=True):
            t.copy_(v)
    rec = Recorder(built.num_samples, [(values[k], spec.where) for k, spec in built.inputs.items()],
                   free=built.free)
    with rec:
        named = built.forward(values)
    return Run(named, rec)


def perturbed(spec: Input, m: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """``spec.value`` with the entries of sample m changed (every one of them)."""
    x, where = spec.value, spec.where
    labels = (torch.arange(x.shape[where.axis]) // where.inner) % n
    shape = [1] * x.ndim
    shape[where.axis] = -1
    own = (labels == m).reshape(shape).expand_as(x)
    if x.dtype == torch.bool:
        new = ~x
    elif x.is_floating_point():
        new = x + 1 + torch.randn(x.shape, generator=generator, dtype=x.dtype)
    else:  # a shift by 1 .. high - 1 modulo high: every entry changes
        new = (x + 1 + torch.randint(0, spec.high - 1, x.shape, generator=generator)) % spec.high
    return torch.where(own, new, x)


def _labels(state: BatchAxis, length: int, n: int) -> torch.Tensor:
    return (torch.arange(length) // state.inner) % n


def _moved_slices(a: torch.Tensor, b: torch.Tensor, axis: int) -> torch.Tensor:
    """Which indices of ``axis`` hold an entry that differs (NaN equals NaN)."""
    same = (a == b) | (a.isnan() & b.isnan()) if a.is_floating_point() else a == b
    return (~same).movedim(axis, 0).reshape(a.shape[axis], -1).any(dim=1)


def upstream_violations(built: Built) -> list[str]:
    """Claims contradicted by perturbing one sample's inputs at a time (module docs)."""
    n = built.num_samples
    restore = [t.detach().clone() for t in built.free]
    values = {k: spec.value for k, spec in built.inputs.items()}
    base = run(built, values, restore).recorder.log
    generator = torch.Generator().manual_seed(0)
    found = []
    for m in range(n):
        changed = {k: perturbed(spec, m, n, generator) for k, spec in built.inputs.items()}
        log = run(built, changed, restore).recorder.log
        assert [(e.name, e.value.shape) for e in log] == [(e.name, e.value.shape) for e in base], (
            "the perturbed forward ran other operations: the probe cannot match them")
        for j, (e0, e1) in enumerate(zip(base, log, strict=True)):
            if e0.state is SAMPLE_FREE and not torch.equal(*_nan_safe(e0.value, e1.value)):
                found.append(f"#{j} {e0.name}: claimed sample free, moved with sample {m}")
            elif type(e0.state) is BatchAxis:
                moved = _moved_slices(e0.value, e1.value, e0.state.axis)
                labels = _labels(e0.state, e0.value.shape[e0.state.axis], n)
                if (labels[moved] != m).any():
                    found.append(f"#{j} {e0.name}: claimed {e0.state}, slices of other samples "
                                 f"moved with sample {m}")
    return found


def _nan_safe(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.is_floating_point():
        return torch.nan_to_num(a, nan=0.5), torch.nan_to_num(b, nan=0.5)
    return a, b


def downstream_violations(built: Built, logits_where: BatchAxis) -> tuple[list[str], int]:
    """Claims contradicted by back-propagating one sample's logits (module docs); and how
    many claimed tensors the logits reach."""
    n = built.num_samples
    restore = [t.detach().clone() for t in built.free]
    values = {k: spec.value.detach().clone().requires_grad_(spec.value.is_floating_point())
              for k, spec in built.inputs.items()}  # float inputs join the graph
    r = run(built, values, restore)
    logits = batch_first(r.named["logits"], logits_where, n)
    if not logits.requires_grad:  # integer results, or computed without the float inputs
        return [], 0
    seen: set[int] = set()
    watched = []
    for e in r.recorder.log:
        t = e.tensor
        if (type(e.state) is BatchAxis and t.requires_grad and t.is_floating_point()
                and t._version == e.version and id(t) not in seen):
            seen.add(id(t))
            watched.append(e)
    weights = torch.randn(logits.shape[1:], generator=torch.Generator().manual_seed(1),
                          dtype=logits.dtype)
    found, reached = [], set()
    for m in range(n):
        grads = torch.autograd.grad((logits[m] * weights).sum(), [e.tensor for e in watched],
                                    retain_graph=True, allow_unused=True)
        for e, g in zip(watched, grads, strict=True):
            if g is None:
                continue
            reached.add(id(e.tensor))
            touched = _moved_slices(g, torch.zeros_like(g), e.state.axis)
            labels = _labels(e.state, g.shape[e.state.axis], n)
            if (labels[touched] != m).any():
                found.append(f"{e.name} {tuple(e.tensor.shape)}: claimed {e.state}, sample {m}'s "
                             "loss reaches slices of other samples")
    return found, len(reached)


def matches(got: Provenance, expected: Provenance | str) -> bool:
    """``expected`` is a state, or a word that the reason of a NotPerSample must contain."""
    if isinstance(expected, str):
        return type(got) is NotPerSample and expected in got.reason
    return got == expected
