r"""The table of layer kinds, keyed by module type, and the contract every kind fulfils.

A *layer kind* knows everything the per-sample routes (ghost factors, materialised rows)
and K-FAC need from one type of module, so that they combine its factors and never branch
on a module's type. An engine uses a kind in four steps per call of a module:

1. ``refuse(module, mode)`` before the forward pass: why the module's per-sample
   gradients cannot be exact under ``mode`` ("eval" or "train"), or None;
2. the call itself: a forward hook that taps the output (``tap("output", output)``) where
   :attr:`LayerKind.hookable`, else ``kind.forward(module, args, kwargs, tap)`` in place
   of the module's own forward (a kind whose parameters are used by functional code that
   hooks cannot see, e.g. ``nn.MultiheadAttention``);
3. right after the call, ``refuse_call(module, args, kwargs, axis)`` (None, or why this
   call's layout cannot be exact: the samples on a contracted axis) and
   ``inputs(module, args, kwargs, axis, num_samples)``: the detached per-sample input
   features, taken before anything later in the forward pass can change the arguments;
4. after a backward pass gave the gradient of every tapped tensor,
   ``factors(module, inputs, grads, wanted)``: per parameter attribute, the per-sample
   gradient of that parameter as parts (:mod:`.parts`).

``axis`` is the :class:`~backends.torch.axes.BatchAxis` of the call's first argument:
where its samples lie, known from how it was computed (never from a dimension that
happens to have length N). One exception: an ``nn.EmbeddingBag`` called on a 1-D input
with offsets takes the axis of its bags (its output's axis 0), which nothing in the flat
indices shows. Conventions: sum over positions; the per-sample gradient of
sample n is that of l_n, whatever scale the cotangents of the backward pass carried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..axes import BatchAxis
from .cost import Cost, PartShape, factor_cost
from .parts import Grad

__all__ = ["MODES", "Captured", "LayerKind", "Tap", "describe", "kind_of", "register", "table",
           "unregistered"]

#: the module modes an engine runs the forward pass in
MODES = ("eval", "train")

#: ``tap(name, tensor) -> tensor``: record a tensor whose gradient the kind needs
Tap = Callable[[str, torch.Tensor], torch.Tensor]

_TABLE: dict[type[nn.Module], LayerKind] = {}


@dataclass(frozen=True)
class Captured:
    """What :meth:`LayerKind.inputs` keeps of one call: the batch axis of its first
    argument, N, and the kind's detached per-sample features (``x``, kind-specific)."""

    axis: BatchAxis
    num_samples: int
    x: Any = None


def describe(module: nn.Module) -> str:
    """``Linear(in_features=4, out_features=3, bias=True)``: the module named in messages."""
    return f"{type(module).__name__}({module.extra_repr()})"


class LayerKind:
    """The per-sample and K-FAC contract of one kind of layer (see the module docstring).

    Attributes
    ----------
    types : tuple of type
        The module types registered for this kind (set by :func:`register`).
    hookable : bool
        True: the module's own forward, with its output tapped as ``"output"``, is what
        :meth:`forward` does (an engine may use a forward hook instead).
    inherited : tuple of str
        Methods a subclass must not override to be taken as this kind
        (``NonDynamicallyQuantizableLinear`` keeps ``nn.Linear.forward``).
    """

    types: ClassVar[tuple[type[nn.Module], ...]] = ()
    hookable: ClassVar[bool] = True
    inherited: ClassVar[tuple[str, ...]] = ("forward",)

    def params(self, module: nn.Module) -> tuple[str, ...]:
        """The attributes of the parameters this kind accounts for (those not None)."""
        return tuple(a for a, p in module.named_parameters(recurse=False) if p is not None)

    def refuse(self, module: nn.Module, mode: str) -> str | None:
        """Why the module's per-sample gradients cannot be exact in ``mode``, or None."""
        return None

    def refuse_call(
        self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any], axis: BatchAxis
    ) -> str | None:
        """Why this call, with its samples along ``axis`` of ``args[0]``, cannot be exact."""
        return None

    def first_input(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    output: Any = None) -> torch.Tensor | None:
        """The tensor whose batch axis is the call's ``axis``: its first positional argument
        (None if there is none; ``output``: the call's output, None before the call)."""
        return args[0] if args and isinstance(args[0], torch.Tensor) else None

    def tap_axis(self, module: nn.Module, name: str, axis: BatchAxis) -> BatchAxis:
        """Where the samples lie in the tapped tensor ``name`` of a call with batch axis
        ``axis`` (as :meth:`factors` splits its gradient): ``axis`` unless a kind says."""
        return axis

    def forward(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                tap: Tap) -> Any:
        """The module's output, with every tensor whose gradient :meth:`factors` reads
        passed through ``tap``. Default: the class's own forward, its output tapped."""
        return tap("output", type(module).forward(module, *args, **kwargs))

    def inputs(
        self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any], axis: BatchAxis,
        num_samples: int,
    ) -> Any:
        """The detached per-sample input features of one call (whatever :meth:`factors`
        of this kind reads, in :attr:`Captured.x`). Called right after the call, once
        :meth:`refuse_call` passed."""
        raise NotImplementedError

    def factors(
        self, module: nn.Module, inputs: Any, grads: Mapping[str, torch.Tensor],
        wanted: frozenset[str] | None = None,
    ) -> dict[str, Grad]:
        """Per parameter attribute in ``wanted`` (default: all of :meth:`params`), its
        per-sample gradient as parts, from the call's inputs and the gradients of its taps
        (zeros where the backward pass did not reach a tap)."""
        raise NotImplementedError

    def wanted(self, module: nn.Module, wanted: frozenset[str] | None) -> tuple[str, ...]:
        """The attributes of :meth:`params` that are in ``wanted`` (all when None)."""
        return tuple(a for a in self.params(module) if wanted is None or a in wanted)

    def cost(self, n: int, shapes: tuple[PartShape, ...], itemsize: int = 4) -> Cost:
        """Ghost against materialised work of one parameter's block (:func:`.cost.factor_cost`)."""
        return factor_cost(n, shapes, itemsize)

    def _matches(self, module: nn.Module, base: type[nn.Module]) -> bool:
        cls = type(module)
        return all(getattr(cls, m, None) is getattr(base, m, None) for m in self.inherited)


def register(*types: type[nn.Module]) -> Callable[[type[LayerKind]], type[LayerKind]]:
    """Class decorator: one instance of the kind serves every module of ``types``."""
    if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
        raise TypeError(f"register needs nn.Module subclasses, got {types!r}")

    def decorate(cls: type[LayerKind]) -> type[LayerKind]:
        taken = [t.__name__ for t in types if t in _TABLE]
        if taken:
            raise ValueError(f"layer kinds already registered for {taken}")
        cls.types = tuple(types)
        kind = cls()
        for t in types:
            _TABLE[t] = kind
        return cls

    return decorate


def _registered_base(module: nn.Module) -> type[nn.Module] | None:
    return next((b for b in type(module).__mro__ if b in _TABLE), None)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of ``module``: its exact type's, else the nearest registered base class's
    when the subclass overrides none of that kind's :attr:`~LayerKind.inherited` methods;
    None for anything else (the engine's fallback route, see :func:`unregistered`)."""
    base = _registered_base(module)
    if base is None:
        return None
    kind = _TABLE[base]
    return kind if base is type(module) or kind._matches(module, base) else None


def unregistered(module: nn.Module) -> str:
    """Why :func:`kind_of` has no kind for ``module`` (for a fallback's report)."""
    base = _registered_base(module)
    if base is None:
        return f"{type(module).__name__}: no layer kind is registered for it"
    kind = _TABLE[base]
    changed = [m for m in kind.inherited
               if getattr(type(module), m, None) is not getattr(base, m, None)]
    return (f"{type(module).__name__} overrides {', '.join(changed)} of "
            f"nn.{base.__name__}: its {base.__name__} kind does not apply")


def table() -> Mapping[type[nn.Module], LayerKind]:
    """The registered module types and their kinds (read only)."""
    return dict(_TABLE)
