r"""Which tensors of a forward pass carry the samples, and along which axis: by provenance.

:class:`ProvenanceTracker` follows every tensor a forward pass computes from the batch's
inputs (each given with its :class:`~backends.torch.axes.BatchAxis`) and answers, for any
tensor, one of

* a :class:`~backends.torch.axes.BatchAxis` ``(k, outer, inner)``: index i of axis k belongs
  to sample :math:`n(i) = \lfloor i / \mathrm{inner} \rfloor \bmod N`, and every slice was
  computed from its own sample's inputs and from sample-free tensors only, so that a per-sample
  loss :math:`l_n` of a result that keeps this map depends on the slices of sample n alone;
* :data:`SAMPLE_FREE`: computed without the inputs, whatever its shape (a parameter, a
  constant table of length N);
* :class:`NotPerSample` with the reason: samples coupled (a reduction or contraction over the
  batch axis, indexing across it, batch norm in training), an operation the rules do not know
  (named), or a tensor the tracker never saw computed.

A dimension of length N is never evidence. The rules are data: :data:`RULES` maps an
operation's name, as a ``TorchFunctionMode`` sees it (``add`` for both ``torch.add`` and
``Tensor.add``, ``__getitem__``, ``linear``, ``T`` for the property), to a function of the
operands' states. An in-place operation (``add_``, ``__iadd__``, ``__setitem__``, or a result
that is its own operand) gives the written tensor the join of its old state and the operands';
when that changes its state, every other tensor sharing its memory becomes not per sample.
Values read into Python from tensors that are not sample free (``item``, ``tolist``,
``__bool__``) are listed in :attr:`ProvenanceTracker.leaks`, not refused: the tracker cannot
follow them, so a tensor built from such a value is claimed sample free, and a branch taken on
one is taken for the whole batch. A caller that needs the strict guarantee refuses a pass with
leaks (HF T5 has two, both ``__bool__`` of the shortcut that skips an all-ones mask).

Run it as a mode around the forward pass, or call :meth:`ProvenanceTracker.record` from
another mode's ``__torch_function__`` after running each operation there.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..axes import BatchAxis
from .provenance_indexing import INDEXING_RULES
from .provenance_layers import LAYER_RULES
from .provenance_rules import (
    GENERIC_RULES,
    SAMPLE_FREE,
    NotPerSample,
    Provenance,
    Rule,
    SampleFree,
    broadcast,
    tensors,
)
from .provenance_views import VIEW_RULES

__all__ = [
    "INPLACE",
    "METADATA",
    "NAMES",
    "RULES",
    "SAMPLE_FREE",
    "NotPerSample",
    "Provenance",
    "ProvenanceTracker",
    "SampleFree",
    "held_tensors",
    "operation_name",
]

#: name -> rule: the state of an operation's result from its operands' states
RULES: dict[str, Rule] = {**GENERIC_RULES, **VIEW_RULES, **INDEXING_RULES, **LAYER_RULES}

#: operations that read metadata only: no result to follow, no value read
METADATA = frozenset({
    "size", "dim", "numel", "shape", "dtype", "device", "stride", "is_contiguous", "data_ptr",
    "element_size", "is_floating_point", "is_complex", "get_device", "ndim", "ndimension",
    "nelement", "layout", "is_cuda", "is_cpu", "is_mps", "requires_grad", "is_leaf", "grad_fn",
    "_version", "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes", "names",
    "is_nested", "output_nr", "__len__", "__repr__", "__format__", "__hash__", "__str__",
    "storage_offset", "_is_view", "is_inference", "has_names", "untyped_storage",
    "retain_grad", "register_hook",
})
#: operations that read tensor values into Python
VALUE_READS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy",
    "equal", "allclose", "is_nonzero", "__array__", "__contains__",
})
#: in-place operations whose name does not end in "_", by the operation they perform
INPLACE = {
    "__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div",
    "__idiv__": "div", "__ifloordiv__": "floor_divide", "__imod__": "remainder",
    "__ipow__": "pow", "__iand__": "__and__", "__ior__": "__or__", "__ixor__": "__xor__",
    "__ilshift__": "__lshift__", "__irshift__": "__rshift__", "__imatmul__": "matmul",
    "__setitem__": "__setitem__",
    "__set__": "copy",  # a property set: x.data = y
}
#: in-place operations that change their tensor's shape: the rules need the old one
RESHAPING_INPLACE = frozenset({
    "squeeze_", "unsqueeze_", "t_", "transpose_", "swapaxes_", "swapdims_", "resize_",
    "resize_as_", "as_strided_", "set_",
})

#: func -> operation_name(func), filled as the forward passes meet torch functions (a mode
#: in the hot path may read it directly before calling operation_name)
NAMES: dict[Any, str] = {}


def operation_name(func: Any) -> str:
    """The name a ``TorchFunctionMode`` sees: ``func.__name__``, or the property's name for a
    getter (``Tensor.T.__get__`` -> ``"T"``). Cached per torch function."""
    try:
        return NAMES[func]
    except KeyError:
        pass
    except TypeError:  # unhashable: named anew
        return _name_of(func)
    name = NAMES[func] = _name_of(func)
    return name


def _name_of(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def held_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors ``model`` holds before a forward pass: every submodule's parameters,
    buffers and tensor attributes (also inside dicts, lists and tuples: peft's prompt tokens).

    Computed before the batch is seen, they are sample free, unless a caller stored batch data
    on the model (then declare it an input instead).
    """
    found: dict[int, torch.Tensor] = {}
    for module in model.modules():
        stack = [*module._parameters.values(), *module._buffers.values(), *(
            v for k, v in vars(module).items() if k not in ("_parameters", "_buffers"))]
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                found.setdefault(id(v), v)
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    return list(found.values())


#: name -> (the operation whose rule applies, None for an in-place reshaping; whether the
#: operation writes its first argument in place; whether its rule is the elementwise one),
#: filled as the passes meet operations
_KINDS: dict[str, tuple[str | None, bool, bool]] = {}


def _kind_of(name: str) -> tuple[str | None, bool, bool]:
    base = INPLACE.get(name)
    if base is not None or (name[-1:] == "_" and name[-2:] != "__"):
        kind = (None if name in RESHAPING_INPLACE else (base or name[:-1]), True, False)
    else:
        kind = (name, False, RULES.get(name) is broadcast)
    _KINDS[name] = kind
    return kind


#: id(tensor) -> (a weak reference to it, its state): the tracker keeps no tensor alive, so
#: a forward pass frees its intermediates as it would unwatched; an entry whose reference
#: no longer gives the same tensor (it died and its id was reused) is no entry
States = dict[int, tuple[weakref.ref, Provenance]]


def _freeness(values: Iterable[Any], states: States) -> bool | None:
    """True: every tensor among ``values`` (and in their lists, tuples and slices) is sample
    free; False: one is known not to be; None: some have no state yet, the others are free."""
    unseen = False
    for v in values:
        if isinstance(v, torch.Tensor):
            entry = states.get(id(v))
            if entry is None or entry[0]() is not v:
                unseen = True
            elif entry[1] is not SAMPLE_FREE:
                return False
        elif isinstance(v, (list, tuple, slice)):
            inner = _freeness((v.start, v.stop, v.step) if isinstance(v, slice) else v, states)
            if inner is False:
                return False
            unseen = unseen or inner is None
    return None if unseen else True


class ProvenanceTracker(TorchFunctionMode):
    """Follows the batch axis of every tensor of a forward pass (module docs).

    Parameters
    ----------
    num_samples : int >= 1
        N, the number of samples in the batch.
    inputs : iterable of (torch.Tensor, BatchAxis)
        The batch's tensors (features, token ids, masks, labels), each with the axis of its
        samples: ``BatchAxis(0)`` batch first, ``BatchAxis(1)`` sequence first (T, N, ...).
    free : iterable of torch.Tensor
        Tensors computed without the batch: the parameters and buffers as the forward pass
        reads them, e.g. :func:`held_tensors` of the model. Any other tensor the tracker did
        not see computed is not per sample.
    held : callable () -> iterable of torch.Tensor, optional
        More sample-free tensors, asked for once, the first time a tensor the tracker has not
        seen is classified (e.g. ``lambda: held_tensors(model)``, a walk over every module's
        attributes that a forward pass reading only declared tensors never pays for).

    Attributes
    ----------
    leaks : list of str
        The operations that read values of tensors carrying samples into Python, in order.

    Raises
    ------
    ValueError
        If ``num_samples`` is not a positive int, or an input's axis does not have
        outer * N * inner entries.

    Notes
    -----
    The tracker keeps weak references only: an intermediate the forward pass drops is freed
    as without the tracker (holding them would keep every activation of the pass alive), and
    a tensor whose id once belonged to a dead one is not taken for it.
    """

    def __init__(
        self, num_samples: int, inputs: Iterable[tuple[torch.Tensor, BatchAxis]], *,
        free: Iterable[torch.Tensor] = (),
        held: Callable[[], Iterable[torch.Tensor]] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.num_samples = num_samples
        self.name = ""  # the operation whose rule runs (the rules' Context)
        self.leaks: list[str] = []
        self._states: States = {}
        self._held = held
        self._unseen = NotPerSample("computed where the tracker did not see it: neither an "
                                    "input, nor declared sample free, nor computed in the pass")
        inputs = list(inputs)
        for j, pair in enumerate(inputs):
            self._check_input(j, pair)
        for t in free:
            self.mark_free(t)
        for t, where in inputs:
            self._states[id(t)] = (weakref.ref(t), where)

    def _check_input(self, j: int, pair: Any) -> None:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], torch.Tensor)
                and isinstance(pair[1], BatchAxis)):
            raise ValueError(f"inputs[{j}] must be a (torch.Tensor, BatchAxis) pair, got "
                             f"{type(pair).__name__}")
        t, where = pair
        if where.axis >= t.ndim or t.shape[where.axis] != where.outer * self.num_samples * (
                where.inner):
            raise ValueError(
                f"inputs[{j}]: axis {where.axis} of a tensor of shape {tuple(t.shape)} does not "
                f"hold outer * N * inner = {where.outer} * {self.num_samples} * {where.inner} "
                "entries")

    def mark_free(self, t: torch.Tensor) -> None:
        """Declares ``t`` computed without the batch (a parameter, a buffer)."""
        self._states[id(t)] = (weakref.ref(t), SAMPLE_FREE)

    def axis_of(self, t: torch.Tensor) -> Provenance:
        """The state of ``t``: its BatchAxis, SAMPLE_FREE, or NotPerSample with the reason."""
        return self.state(t)

    def mark(self, t: torch.Tensor, where: BatchAxis) -> None:
        """Declares that ``t`` carries the samples along ``where`` from now on: a tensor the
        caller treats as per sample by its own rule (copy n of a sample-free tensor repeated
        over the batch taken to be sample n's). Every later result follows from it, so a use
        that contradicts the claim (a sum over those copies) comes out not per sample."""
        self._states[id(t)] = (weakref.ref(t), self._fit(where, t))

    def state(self, t: Any) -> Provenance:
        """:meth:`axis_of` for a tensor; SAMPLE_FREE for any other value (the rules' Context)."""
        if not isinstance(t, torch.Tensor):
            return SAMPLE_FREE
        entry = self._states.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        if self._load_held():
            return self.state(t)
        return self._unseen

    def _load_held(self) -> bool:
        """Declares the ``held`` tensors sample free (once); whether there were any to load."""
        if self._held is None:
            return False
        held, self._held = self._held, None
        for t in held():
            entry = self._states.get(id(t))
            if entry is None or entry[0]() is not t:
                self._states[id(t)] = (weakref.ref(t), SAMPLE_FREE)
        return True

    def clear(self) -> None:
        """Forgets every tensor."""
        self._states.clear()
        self.leaks.clear()
        self._held = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = operation_name(func)
        if name == "__iter__":  # iterating a tensor unbinds its first axis, out of our sight
            items = tuple(result)
            self.record("unbind", (args[0], 0), {}, items)
            return iter(items)
        self.record(name, args, kwargs, result)
        return result

    def record(self, name: str, args: tuple, kwargs: dict, result: Any) -> None:
        """Classifies ``result`` (and any tensor the operation wrote) after the operation ran.

        Parameters
        ----------
        name : str
            :func:`operation_name` of the torch function.
        args, kwargs
            The operation's arguments, as the mode received them (kwargs may be None).
        result
            What the operation returned.
        """
        if name in METADATA:
            return
        kind = _KINDS.get(name) or _kind_of(name)
        if kind[2] and not kwargs and type(result) is torch.Tensor:
            state = self._elementwise(args, result)
            if state is not None:  # the common case, without the general path's calls
                entry = self._states.get(id(result))
                if entry is None or entry[0]() is not result or entry[1] is state:
                    self._states[id(result)] = (weakref.ref(result), state)
                    return
                self._assign(result, state)  # an operand returned as the result, changed
                return
        if kwargs is None:
            kwargs = {}
        base = kind[0]
        written: Any = None
        if kind[1]:  # the written tensor, or the list a _foreach_ operation writes
            written = args[0] if args and isinstance(args[0], (torch.Tensor, list, tuple)) else None
        if kwargs and isinstance(kwargs.get("out"), torch.Tensor):
            written = kwargs["out"]
        values = (*args, *kwargs.values()) if kwargs else args
        free = _freeness(values, self._states)
        if free is None and self._load_held():
            free = _freeness(values, self._states)
        if free:
            state: Any = SAMPLE_FREE
        elif written is None and not isinstance(result, torch.Tensor) and not any(
                True for _ in tensors([result])):
            if name in VALUE_READS:
                self.leaks.append(name)
            return
        else:
            state = self._rule(name, base, args, kwargs, result)
        if isinstance(written, torch.Tensor):
            self._write(written, state if not isinstance(state, tuple) else state[0])
            if result is None or result is written:
                return
        elif written is not None:
            for t in tensors(written):
                self._write(t, state if not isinstance(state, tuple) else state[0])
            return
        self._assign(result, state)

    def _elementwise(self, args: tuple, result: torch.Tensor) -> Provenance | None:
        """:func:`~.provenance_rules.broadcast`'s state for plain tensor arguments whose states
        are known, checked against the result's shape; None: take the general path."""
        found, nd = None, result.ndim
        for v in args:
            if isinstance(v, torch.Tensor):
                entry = self._states.get(id(v))
                if entry is None or entry[0]() is not v:
                    return None
                s = entry[1]
                if s is SAMPLE_FREE:
                    continue
                if type(s) is not BatchAxis:
                    return s
                if v.ndim != nd:
                    s = BatchAxis(s.axis + nd - v.ndim, s.outer, s.inner)
                if found is None:
                    found = s
                elif s != found:
                    return None
            elif isinstance(v, (list, tuple)):
                return None
        if found is None:
            return SAMPLE_FREE
        fits = found.axis < nd and result.shape[found.axis] == (
            found.outer * self.num_samples * found.inner)
        return found if fits else None

    def _rule(self, name: str, base: str | None, args: tuple, kwargs: dict, result: Any) -> Any:
        """The state(s) the rule of ``base`` gives, or why there is none."""
        self.name = name
        rule = RULES.get(base) if base is not None else None
        if rule is None:
            states = [self.state(t) for t in tensors((*args, *kwargs.values()))]
            if any(type(s) is BatchAxis for s in states):
                return NotPerSample(f"{name}: an operation the rules do not know, on a tensor "
                                    "that carries samples")
            return next(s for s in states if type(s) is NotPerSample)
        if "axis" in kwargs:  # torch's numpy alias of dim, which the rules read
            kwargs = {("dim" if k == "axis" else k): v for k, v in kwargs.items()}
        try:
            return rule(self, args, kwargs, result)
        except Exception as e:  # a rule that cannot read these arguments proves nothing
            return NotPerSample(f"{name}: its rule could not read the arguments "
                                f"({type(e).__name__}: {e})")

    def _fit(self, state: Any, t: torch.Tensor) -> Provenance:
        """``state`` checked against t's shape (a claim that does not fit is refused)."""
        if type(state) is not BatchAxis:
            return state
        n = self.num_samples
        if state.axis < t.ndim and t.shape[state.axis] == state.outer * n * state.inner:
            return state
        if n == 1 and state.axis < t.ndim and t.shape[state.axis]:  # one sample: any layout
            return BatchAxis(state.axis, 1, t.shape[state.axis])
        return NotPerSample(f"{self.name}: {state} does not fit the result's shape "
                            f"{tuple(t.shape)} (a gap in the rules)")

    def _assign(self, result: Any, state: Any) -> None:
        if isinstance(result, torch.Tensor):
            entry = self._states.get(id(result))
            new = self._fit(state, result) if type(state) is BatchAxis else state
            if entry is not None and entry[0]() is result and entry[1] is not new and (
                    entry[1] != new):
                # an operand returned as the result (in place, or a no-op view), now changed
                self._write(result, new)
            else:
                self._states[id(result)] = (weakref.ref(result), new)
        elif isinstance(result, (list, tuple)):
            each = state if isinstance(state, tuple) else [state] * len(result)
            for r, s in zip(result, each, strict=True):
                self._assign(r, s)

    def written(self, t: torch.Tensor, state: Provenance) -> None:
        """``t`` was changed in place by the current operation: its new state (rules' Context)."""
        self._write(t, state)

    def _write(self, t: torch.Tensor, state: Provenance) -> None:
        """t's values were written in place; a changed state reaches every alias of t."""
        entry = self._states.get(id(t))
        new = self._fit(state, t)
        self._states[id(t)] = (weakref.ref(t), new)
        if entry is None or entry[0]() is not t or entry[1] is new or entry[1] == new:
            return
        why = NotPerSample(f"{self.name}: shares memory with a tensor written in place")
        key = _storage(t)
        for k, (ref, s) in list(self._states.items()):
            u = ref()
            if u is not None and u is not t and type(s) is not NotPerSample and u.numel() and (
                    key is None or _storage(u) in (key, None)):
                self._states[k] = (ref, why)


def _storage(t: torch.Tensor) -> int | None:
    """The address of t's memory (None: unknown, so any tensor may share it)."""
    try:
        return t.untyped_storage().data_ptr() if t.numel() else -1
    except (RuntimeError, NotImplementedError):
        return None
