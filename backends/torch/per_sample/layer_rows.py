r"""The calls a :class:`~backends.torch.per_sample.layer_pass.LayerPass` records, and what
they give after the backward pass: per-parameter parts, per-module vmap rows, blocks.

One :class:`Use` per call of a module that owns a trainable parameter:

* a *registered* call (a layer kind of :mod:`backends.torch.layers`, batch axis proven by
  provenance): its kind's captured inputs and its tapped tensors; after the backward pass
  ``kind.factors`` gives the parts of each of its parameters;
* a *generic* call (no layer kind): its arguments with the batch axis of each (``in_dims``)
  and its outputs with theirs (``out_dims``), for a ``torch.func.vmap`` of that module alone
  over the samples (:func:`module_vmap`), for the parameters the watch saw used inside it;
* a *sample-free* call (its input carries no samples: a lookup at a constant table, a
  recurrent cell on its zero state): the watch splits its output's uses (``free``);
* a *failed* call, with the reason: its parameters take the whole-model routes.

The decisions are plain data (:meth:`Use.decision`), so a later pass could replay them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten

from ..axes import BatchAxis
from ..layers import DenseBlock, FactorBlock, LayerKind, SplitBlock, TiedBlock
from .provenance import SAMPLE_FREE, NotPerSample, Provenance

__all__ = ["Slot", "Use", "in_dim", "module_vmap", "route_of", "split_blocks", "tensor_outputs",
           "why_not", "zero_block"]


@dataclass(frozen=True)
class Slot:
    """One trainable parameter: its name, offset and size in theta, and shape."""

    name: str
    offset: int
    size: int
    shape: tuple[int, ...]


@dataclass
class Use:
    """One call of a module that owns trainable parameters (module docstring).

    Attributes
    ----------
    module : nn.Module
    kind : LayerKind or None
        None: a generic call.
    call : int
        The call's number in the forward pass.
    axis : BatchAxis or None
        The batch axis of a registered call.
    captured : Any
        The kind's :class:`~backends.torch.layers.Captured` inputs; for a generic call
        ``(args, kwargs, (arg_dims, kw_dims), positions)``: the detached arguments, their
        batch axes (None: sample free), and which of its output tensors are tapped.
    taps : dict of str to torch.Tensor
        The tensors whose gradients the call needs (a generic call's outputs by index).
    versions : dict of str to int
        The taps' versions when the call returned (an in-place change after it fails it).
    out_dims : tuple of int
        A generic call's outputs' batch axes, in the order of its taps.
    failure : str or None
    free : bool
        A sample-free call (its output's uses are the watch's).
    """

    module: nn.Module
    kind: LayerKind | None
    call: int
    axis: BatchAxis | None = None
    captured: Any = None
    taps: dict[str, torch.Tensor] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    out_dims: tuple[int, ...] = ()
    failure: str | None = None
    free: bool = False
    #: the call's tensor arguments and their versions (its captured inputs may be views)
    arguments: tuple[tuple[torch.Tensor, int], ...] = ()

    def tap(self, name: str, t: torch.Tensor) -> None:
        self.taps[name] = t
        self.versions[name] = t._version

    def keep(self, args: tuple, kwargs: Mapping[str, Any]) -> None:
        """Remember the versions of the call's tensor arguments."""
        self.arguments = tuple((t, t._version) for t in (*args, *kwargs.values())
                               if isinstance(t, torch.Tensor))

    def changed(self) -> str | None:
        """Why a tapped tensor or an argument is no longer what the call saw, or None."""
        for name, t in self.taps.items():
            if t._version != self.versions[name]:
                return f"{type(self.module).__name__}'s output was changed in place"
        if any(t._version != v for t, v in self.arguments):
            return f"{type(self.module).__name__}'s input was changed in place after the call"
        return None

    def decision(self) -> tuple[str, Any]:
        """What was decided for this call: ("layer", axis), ("generic", in_dims),
        ("free", None) or ("failed", reason)."""
        if self.failure is not None:
            return "failed", self.failure
        if self.free:
            return "free", None
        if self.kind is None:
            return "generic", self.captured[2] if self.captured else None
        return "layer", self.axis


def why_not(state: Provenance, what: str) -> str:
    """A failure message for a tensor without a (plain) batch axis."""
    if state is SAMPLE_FREE:
        return f"{what}: no samples (sample free)"
    if type(state) is NotPerSample:
        return f"{what}: not per sample by provenance ({state.reason})"
    return f"{what}: samples merged with other axes ({state})"


def in_dim(state: Provenance) -> int | str | None:
    """vmap's in_dim of a tensor: its plain batch axis, None when sample free, else why not."""
    if state is SAMPLE_FREE:
        return None
    if type(state) is BatchAxis and state.plain:
        return state.axis
    return why_not(state, "an argument")


def tensor_outputs(output: Any) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or tensors in tuples, lists, dicts)."""
    leaves, _ = tree_flatten(output)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def module_vmap(
    use: Use, wanted: Mapping[str, torch.Tensor], fixed: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor], num_samples: int,
    mode: Callable[[], AbstractContextManager[Any]],
) -> dict[str, torch.Tensor]:
    """Per-sample gradients (N, size) of some of a generic module's own parameters.

    ``wanted``: attr -> value (the parameters differentiated), ``fixed``: its other own
    parameters (constants); ``grads``: the gradient of each tapped output. ``vmap`` over the
    call's arguments along their batch axes (``in_dims``), each sample given its batch axis
    back with length one, and the outputs' cotangents along theirs (``out_dims``).
    """
    args, kwargs, (arg_dims, kw_dims), positions = use.captured
    cotangents = tuple(grads[name] for name in use.taps)

    def one(p: dict, a: tuple, kw: dict, bs: tuple) -> dict:
        a = tuple(v.unsqueeze(d) if d is not None else v for v, d in zip(a, arg_dims,
                                                                          strict=True))
        kw = {k: v.unsqueeze(kw_dims[k]) if kw_dims[k] is not None else v for k, v in kw.items()}

        def f(q: dict) -> tuple:
            outs = tensor_outputs(functional_call(use.module, {**fixed, **q}, a, kw))
            return tuple(outs[j] for j in positions)

        _, pull = vjp(f, p)
        return pull(tuple(b.unsqueeze(d) for b, d in zip(bs, use.out_dims, strict=True)))[0]

    with mode():
        out = vmap(one, in_dims=(None, arg_dims, kw_dims, use.out_dims))(
            dict(wanted), args, kwargs, cotangents)
    return {a: t.reshape(num_samples, -1).detach() for a, t in out.items()}


def split_blocks(block: Any) -> list[Any]:
    """A :class:`SplitBlock` as its row blocks (each a FactorBlock of its own), any other
    block as itself: GhostRows, stacking and distributed rows see FactorBlocks only."""
    return list(block.parts) if isinstance(block, SplitBlock) else [block]


def zero_block(slot: Slot, n: int, dtype: torch.dtype, device: torch.device) -> DenseBlock:
    """Zero rows of a parameter the forward pass never read."""
    return DenseBlock(slot.offset, torch.zeros(n, slot.size, dtype=dtype, device=device))


def route_of(block: Any, vmapped: bool) -> str:
    """The route name a parameter's block reports."""
    if isinstance(block, (FactorBlock, SplitBlock, TiedBlock)):
        return "ghost"
    return "module vmap" if vmapped else "materialised"

