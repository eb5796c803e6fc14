r"""A reference engine for the registry: record the calls of registered kinds, then their parts.

:class:`Recorder` is the smallest engine that drives the :class:`~.registry.LayerKind`
contract: a forward hook per hookable module (or the kind's decomposed forward in place of
the module's own), ``refuse`` / ``refuse_call`` / ``inputs`` at call time, one
``torch.autograd.grad`` over every tapped tensor, then ``factors`` per call, gathered per
parameter (by identity, so tied and shared parameters collect every use). Where the samples
of each call's first argument lie is the ``axis`` function's to say (the provenance
tracker's job, as in the K-FAC capture; or the caller knows the layout). One exception,
which the flat indices cannot show: an ``nn.EmbeddingBag`` called on 1-D indices with
offsets gives its samples over its bags, so the axis function is asked about its output
(whose axis 0 are the bags) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..axes import BatchAxis
from .embedding_bag import EmbeddingBag
from .parts import Grad
from .registry import MODES, Captured, LayerKind, describe, kind_of, unregistered

__all__ = ["Call", "Recorder"]

#: (module, args, kwargs) -> the batch axis of the call's first argument, or None (or the
#: reason, a str) when it carries no samples
AxisOf = Callable[[nn.Module, tuple, Mapping[str, Any]], BatchAxis | str | None]


@dataclass
class Call:
    """One recorded call: its module, kind, captured inputs and tapped tensors."""

    module: nn.Module
    kind: LayerKind
    inputs: Captured
    taps: dict[str, torch.Tensor]


class Recorder:
    """Record the calls of every module of a registered kind that owns a trainable parameter.

    Parameters
    ----------
    model : nn.Module
    axis : callable (module, args, kwargs) -> BatchAxis, str or None
        The batch axis of a call's first argument (None, or why as a str: the call
        carries no samples).
    num_samples : int
    mode : {"eval", "train"}
        The mode the forward pass runs in (for :meth:`LayerKind.refuse`; setting it is
        the caller's).

    Attributes
    ----------
    calls : list of Call
    refused : dict of nn.Module to str
        Modules (or their calls) that cannot be exact, and why; their parameters must take
        another route.
    """

    def __init__(self, model: nn.Module, axis: AxisOf, num_samples: int, *,
                 mode: str = "eval") -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.axis, self.num_samples, self.mode = axis, num_samples, mode
        self.calls: list[Call] = []
        self.refused: dict[nn.Module, str] = {}
        self.kinds: dict[nn.Module, LayerKind] = {}
        for m in model.modules():
            if not any(p.requires_grad for p in m.parameters(recurse=False)):
                continue
            kind = kind_of(m)
            reason = unregistered(m) if kind is None else kind.refuse(m, mode)
            if reason is not None:
                self.refused[m] = reason
            else:
                self.kinds[m] = kind

    @contextmanager
    def recording(self) -> Iterator[Recorder]:
        """Hooks and decomposed forwards installed for the ``with`` block, removed after."""
        handles, patched = [], []
        try:
            for m, kind in self.kinds.items():
                if kind.hookable:
                    # first in line, so that the hook sees the module's own output
                    handles.append(m.register_forward_hook(self._hook, with_kwargs=True,
                                                           prepend=True))
                else:
                    if "forward" in vars(m):
                        raise RuntimeError(f"{describe(m)} has an instance-level forward")
                    m.forward = self._decomposed(m, kind)
                    patched.append(m)
            yield self
        finally:
            for h in handles:
                h.remove()
            for m in patched:
                del m.forward

    def _check(self, m: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               output: Any = None) -> BatchAxis | None:
        if output is not None and isinstance(self.kinds[m], EmbeddingBag) and \
                _first_tensor(args, kwargs).ndim == 1:
            axis = self.axis(m, (output,), {})
        else:
            axis = self.axis(m, args, kwargs)
        if isinstance(axis, BatchAxis):
            reason = self.kinds[m].refuse_call(m, args, kwargs, axis)
        else:
            why = f" ({axis})" if isinstance(axis, str) else ""
            reason = f"{describe(m)}: called on an input without the batch axis{why}"
        if reason is not None:
            self.refused[m] = reason
            return None
        return axis

    def _hook(self, m: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        axis = self._check(m, args, kwargs, output)
        if axis is not None:
            kind = self.kinds[m]
            captured = kind.inputs(m, args, kwargs, axis, self.num_samples)
            self.calls.append(Call(m, kind, captured, {"output": output}))

    def _decomposed(self, m: nn.Module, kind: LayerKind) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            axis = self._check(m, args, kwargs)
            if axis is None:
                return type(m).forward(m, *args, **kwargs)
            taps: dict[str, torch.Tensor] = {}

            def tap(name: str, t: torch.Tensor) -> torch.Tensor:
                if name in taps:
                    raise ValueError(f"{describe(m)}: tap {name!r} used twice in one call")
                taps[name] = t
                return t

            out = kind.forward(m, args, kwargs, tap)
            captured = kind.inputs(m, args, kwargs, axis, self.num_samples)
            self.calls.append(Call(m, kind, captured, taps))
            return out

        return forward

    def uses(self, outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor], *,
             retain_graph: bool = False) -> dict[nn.Parameter, list[Grad]]:
        """One backward pass from ``outputs`` with cotangents ``grad_outputs``: per trainable
        parameter of a recorded call, the parts of each of its uses (calls in order)."""
        return self.backward(outputs, grad_outputs, retain_graph=retain_graph)[0]

    def backward(
        self, outputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor], *,
        retain_graph: bool = False, inputs: Sequence[torch.Tensor] = (),
    ) -> tuple[dict[nn.Parameter, list[Grad]], tuple[torch.Tensor, ...]]:
        """:meth:`uses`, and the gradients of ``inputs`` (zeros where unused) from the same
        backward pass (e.g. the batch gradient of the parameters)."""
        taps = [(c, name, t) for c in self.calls for name, t in c.taps.items()
                if t.requires_grad]
        wrt = [t for _, _, t in taps] + list(inputs)
        found = torch.autograd.grad(
            list(outputs), wrt, list(grad_outputs), retain_graph=retain_graph,
            allow_unused=True, materialize_grads=True,
        ) if wrt else ()
        grads: dict[int, dict[str, torch.Tensor]] = {id(c): {} for c in self.calls}
        for (c, name, _), g in zip(taps, found, strict=False):
            grads[id(c)][name] = g
        out: dict[nn.Parameter, list[Grad]] = {}
        for c in self.calls:
            g = {name: grads[id(c)].get(name, torch.zeros_like(t)) for name, t in c.taps.items()}
            own, wanted = self._own(c)
            for a, parts in c.kind.factors(c.module, c.inputs, g, wanted).items():
                out.setdefault(own[a], []).append(parts)
        return out, tuple(found[len(taps):])

    def users(self) -> dict[nn.Parameter, list[Call]]:
        """Per trainable parameter of a recorded call, its calls in the order of :meth:`uses`."""
        out: dict[nn.Parameter, list[Call]] = {}
        for c in self.calls:
            own, wanted = self._own(c)
            for a in wanted:
                out.setdefault(own[a], []).append(c)
        return out

    @staticmethod
    def _own(c: Call) -> tuple[dict[str, nn.Parameter], frozenset[str]]:
        own = {a: getattr(c.module, a) for a in c.kind.params(c.module)}
        return own, frozenset(a for a, p in own.items() if p.requires_grad)


def _first_tensor(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The call's first argument (its first keyword argument when called by keywords)."""
    return args[0] if args else next(iter(kwargs.values()))
