r"""The watch over the forward pass of :class:`backends.torch.per_sample.layer_pass.LayerPass`.

:class:`UseWatch` is a ``TorchFunctionMode``: it sees every torch operation of the forward
pass, drives the batch-axis :class:`~backends.torch.per_sample.provenance.ProvenanceTracker`
with it (every operation is recorded, so every tensor has a provenance: a
:class:`~backends.torch.axes.BatchAxis`, sample free, or not per sample with the reason), and
sorts each use of a trainable parameter tensor.

* A use inside the call of the innermost running module of a registered layer kind that
  owns the parameter (or a sample-free tensor that call computed from its own parameters,
  e.g. the q rows of ``in_proj_weight``): the layer kind accounts for it.
* A *sample-free* result: an operation whose tensor arguments are all sample free by
  provenance (parameters, constants such as ``torch.arange`` and what follows from them) and
  that reads a parameter. Its slots are kept: T5's relative position bias (an
  ``nn.Embedding`` looked up at a constant bucket table) is sample free, whatever its shape.
* A *broadcast capture*: a sample-free s meeting the batch as

  ========================================  ===============================================
  r = s.expand(...), s.broadcast_to(...),   ds_n = dr_n summed over the copies of s
  s.repeat(...) with one new axis of        (r is declared per sample to the tracker:
  length N                                  copy n is sample n's)
  r = x + s, s + x, x += s                  ds_n = reduce_s(dr restricted to sample n)
  r = x * s, s * x                          ds_n = reduce_s((dr * x) restricted to sample n)
  ========================================  ===============================================

  with x carrying the samples on a :class:`BatchAxis` of r (any axis, merged or not, by
  provenance) and reduce_s summing over the axes along which s was broadcast. The per-sample
  gradient of the parameters behind s is then one backward pass from s batched over n
  (``is_grads_batched``): exact, at the cost of N copies of s and of the parameters it reads
  (ViT's class and position embeddings, T5's relative position bias table, T5LayerNorm's
  weight in ``weight * hidden``, a recurrent cell's first step on a zero state).
* Anything else (an escape): the parameters behind it take the per-module vmap of their own
  generic module when the escape happens inside it (``module_vmap``), else the whole-model
  routes (``outside``).

The repeated copies of a capture are declared to the tracker as per sample, so any use of
them that mixes samples makes the logits not per sample, and the engine then trusts none of
the pass's per-sample claims (:class:`~backends.torch.per_sample.layer_pass.LayerPass`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from ..axes import BatchAxis, batch_first
from .provenance import NAMES, SAMPLE_FREE, ProvenanceTracker, operation_name

__all__ = ["Capture", "Frame", "UseWatch", "capture_rows"]

#: tensor methods and properties that read metadata only and return no tensor: the watch
#: lets them through untouched (the tracker records nothing for them either)
_PASS = frozenset({
    "size", "dim", "numel", "is_floating_point", "element_size", "stride", "is_contiguous",
    "data_ptr", "__len__", "is_complex", "get_device", "__repr__", "__format__", "__hash__",
    "shape", "dtype", "device", "requires_grad", "is_leaf", "ndim", "layout", "is_cuda",
    "grad_fn", "_version", "is_sparse", "is_quantized", "is_meta", "itemsize", "nbytes",
    "names", "is_nested", "output_nr",
})
_ADD = frozenset({"add", "__add__", "__radd__"})
_IADD = frozenset({"add_", "__iadd__"})
_MUL = frozenset({"mul", "__mul__", "__rmul__"})
_EXPAND = frozenset({"expand", "expand_as", "broadcast_to", "repeat"})
_NESTED = frozenset({list, tuple})


def _in_place(name: str) -> bool:
    return (name.endswith("_") and not name.startswith("__")) or name in (
        "__setitem__", "__iadd__", "__imul__", "__isub__")


def _tensors(values: Any) -> list[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif type(v) in (list, tuple):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return out


@dataclass(frozen=True)
class Frame:
    """One running hooked module call: its own parameter ids and slots, whether it is a
    generic module (no layer kind: its parameters' escapes take its per-module vmap), and
    its call number."""

    own: frozenset[int]
    slots: frozenset[int]
    generic: bool
    call: int


@dataclass
class Capture:
    """A sample-free s broadcast over the batch into r, whose samples lie along ``axis``
    (x: the per-sample factor of a product)."""

    s: torch.Tensor
    slots: frozenset[int]
    r: torch.Tensor
    x: torch.Tensor | None
    axis: BatchAxis
    versions: tuple[int, ...]

    def intact(self) -> bool:
        """Whether s, r and x are as the forward pass left them (no later in-place change)."""
        now = (self.s._version, self.r._version, -1 if self.x is None else self.x._version)
        return now == self.versions

    def sample_gradient(self, dr: torch.Tensor | None, n: int) -> torch.Tensor:
        """ds_n ``(N, *s.shape)`` from dr ``(*r.shape)`` (None: the backward pass missed r)."""
        s, r = self.s, self.r
        if dr is None:
            return torch.zeros(n, *s.shape, dtype=s.dtype, device=s.device)
        d = dr if self.x is None else dr * self.x
        k, lead = self.axis.axis, r.ndim - s.ndim
        e = batch_first(d, self.axis, n)  # (N, *r.shape[:k], outer, inner, *r.shape[k + 1:])
        whole = k >= lead and s.shape[k - lead] != 1
        if whole:  # s is not broadcast along the batch axis: sample n owns its own slices
            eye = torch.eye(n, dtype=d.dtype, device=d.device)
            e = e.unsqueeze(k + 2) * eye.view(n, *[1] * (k + 1), n, *[1] * (e.ndim - k - 2))
            e = e.reshape(n, *r.shape)
        else:  # summed over the copies along the batch axis
            e = e.sum(dim=(k + 1, k + 2))
        dims = [j for j in range(r.ndim) if whole or j != k]  # r's axes e still has, in order
        axes = [1 + i for i, j in enumerate(dims)
                if j < lead or (s.shape[j - lead] == 1 and r.shape[j] != 1)]
        if axes:
            e = e.sum(dim=axes, keepdim=True)
        return e.reshape(n, *s.shape)


class UseWatch(TorchFunctionMode):
    """Records every operation with the tracker and sorts every use of a watched parameter
    tensor during the forward pass (module docs).

    Parameters
    ----------
    watched : dict of int to int
        id(parameter tensor as the modules see it) -> slot.
    tracker : ProvenanceTracker
        The batch-axis provenance of the pass (this mode records every operation with it).
    num_samples : int
    """

    def __init__(self, watched: dict[int, int], tracker: ProvenanceTracker,
                 num_samples: int) -> None:
        super().__init__()
        self.watched = watched
        #: ids of the watched and free tensors: an operation on none of them is only recorded
        self.hot: set[int] = set(watched)
        self.tracker = tracker
        self.n = num_samples
        self.stack: list[Frame] = []
        self.outside: set[int] = set()  # slots for the whole-model routes
        self.module_vmap: set[int] = set()  # slots for their own generic module's vmap
        self.touched: set[int] = set()  # slots that any operation read
        #: id(sample-free tensor read from parameters) -> (it, the slots it reads, its call)
        self.free: dict[int, tuple[torch.Tensor, frozenset[int], int]] = {}
        self.captures: list[Capture] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        # every operation of the forward pass (the hooks' own run with torch functions off):
        # the tracker records it; only operations on parameters and on sample-free tensors
        # read from them are sorted further (decided by set operations on argument ids)
        try:
            name = NAMES[func]
        except (KeyError, TypeError):
            name = operation_name(func)
        if name in _PASS:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        flat = (*args, *kwargs.values()) if kwargs else args
        if self.hot.isdisjoint(map(id, flat)) and not _NESTED.intersection(map(type, flat)):
            result = func(*args, **kwargs)
            if name == "__iter__":
                return self._iterate(args, result)
            self.tracker.record(name, args, kwargs, result)
            return result
        return self._dispatch(func, name, args, kwargs)

    def _iterate(self, args: tuple, result: Any) -> Any:
        items = tuple(result)  # iterating a tensor unbinds its first axis, out of our sight
        self.tracker.record("unbind", (args[0], 0), {}, items)
        return iter(items)

    def _dispatch(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        result = func(*args, **kwargs)
        if name == "__iter__":
            return self._iterate(args, result)
        self.tracker.record(name, args, kwargs, result)
        tensors = _tensors((*args, *kwargs.values()))
        slots = self._slots_of(tensors)
        if not slots:
            return result
        self.touched |= slots
        frame = self.stack[-1] if self.stack else None
        state = self.tracker.state
        sources = all(state(t) is SAMPLE_FREE for t in tensors)
        if frame is not None and not frame.generic:
            others = [t for t in tensors if (id(t) in self.watched or id(t) in self.free)
                      and not self._own(t, frame)]
            if not others:
                if sources:  # e.g. a row block of the module's own weight
                    self._mark_free(result, slots, frame)
                return result  # the module's own weights on its inputs: its layer kind's work
            if not sources:  # the kind accounts for its own; the others escape
                self._escape(name, others, frame)
                return result
        if self._capture(name, args, kwargs, result):
            return result
        if sources:
            self._mark_free(result, slots, frame)
            return result
        self._escape(name, tensors, frame)
        return result

    def _own(self, t: torch.Tensor, frame: Frame) -> bool:
        if id(t) in self.watched:
            return id(t) in frame.own
        _, slots, call = self.free[id(t)]
        return call == frame.call and slots <= frame.slots

    def _mark_free(self, result: Any, slots: frozenset[int], frame: Frame | None) -> None:
        for out in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(out, torch.Tensor):
                self.free[id(out)] = (out, slots, frame.call if frame else -1)
                self.hot.add(id(out))

    def _slots_of(self, tensors: list[torch.Tensor]) -> frozenset[int]:
        slots = {self.watched[id(t)] for t in tensors if id(t) in self.watched}
        for t in tensors:
            if id(t) in self.free:
                slots |= self.free[id(t)][1]
        return frozenset(slots)

    def _sample_free(self, t: Any) -> bool:
        """A parameter or a sample-free tensor read from parameters."""
        return isinstance(t, torch.Tensor) and (id(t) in self.watched or id(t) in self.free)

    def _capture(self, name: str, args: tuple, kwargs: dict, result: Any) -> bool:
        """Records s broadcast over the batch into ``result`` (module docs), if it is that."""
        if not isinstance(result, torch.Tensor) or len(args) < 2 or kwargs:
            return False
        x = None
        if name in _EXPAND:
            s = args[0]
            where = self._copies(name, args, result) if self._sample_free(s) else None
            if where is None:
                return False
            self.tracker.mark(result, where)
        elif name in _ADD or name in _MUL or name in _IADD:
            a, b = args[:2]
            if self._sample_free(b) and self._per_sample(a):
                s, x = b, a
            elif name not in _IADD and self._sample_free(a) and self._per_sample(b):
                s, x = a, b
            else:
                return False
            where = self.tracker.state(result)
            if (type(where) is not BatchAxis or x.shape != result.shape
                    or not _broadcasts(s.shape, result.shape)):
                return False
            x = x.detach() if name in _MUL else None
        else:
            return False
        self.captures.append(Capture(
            s, self._slots_of([s]), result, x, where,
            (s._version, result._version, -1 if x is None else x._version),
        ))
        return True

    def _per_sample(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and type(self.tracker.state(t)) is BatchAxis

    def _copies(self, name: str, args: tuple, result: torch.Tensor) -> BatchAxis | None:
        """The one axis of ``result`` along which ``args[0]`` was copied N times, or None."""
        s, n = args[0], self.n
        if result.ndim == 0:
            return None
        if n == 1:  # one sample owns every copy
            return BatchAxis(0, 1, result.shape[0])
        if name == "repeat":
            reps = tuple(args[1]) if len(args) == 2 and not isinstance(args[1], int) else args[1:]
            shape = (1,) * (len(reps) - s.ndim) + tuple(s.shape)
            found = [BatchAxis(j, 1, shape[j]) for j, k in enumerate(reps) if k == n]
        else:
            lead = result.ndim - s.ndim
            found = [BatchAxis(j) for j in range(result.ndim)
                     if result.shape[j] == n and (j < lead or s.shape[j - lead] == 1)]
        return found[0] if len(found) == 1 else None

    def _escape(self, name: str, tensors: list[torch.Tensor], frame: Frame | None) -> None:
        """A use the layer kinds and the captures cannot split per sample: mark its slots."""
        for t in tensors:
            if id(t) in self.watched:
                inside = frame is not None and frame.generic and id(t) in frame.own
                (self.module_vmap if inside else self.outside).add(self.watched[id(t)])
            elif id(t) in self.free:
                _, slots, call = self.free[id(t)]
                inside = frame is not None and frame.generic and call == frame.call and (
                    slots <= frame.slots)
                (self.module_vmap if inside else self.outside).update(slots)
        if tensors and _in_place(name) and self.free.pop(id(tensors[0]), None) is not None:
            self.hot.discard(id(tensors[0]))  # written in place from the batch

    def clear(self) -> None:
        """Drops what only the forward pass needed (the tracker's states, the free tensors)."""
        self.tracker.clear()
        self.free.clear()
        self.hot.clear()
        self.stack.clear()


def _broadcasts(small: torch.Size, big: torch.Size) -> bool:
    """Whether a tensor of shape ``small`` broadcasts to ``big`` (right-aligned)."""
    lead = len(big) - len(small)
    return lead >= 0 and all(k in (1, big[lead + i]) for i, k in enumerate(small))


def capture_rows(
    captures: list[Capture], grads: list[torch.Tensor | None], views: list[torch.Tensor],
    watched: dict[int, int], num_samples: int, *, keep_graph: bool,
) -> dict[int, torch.Tensor]:
    """Per-sample gradients (N, size) of the captured slots, from dr of each capture.

    ``views``: the parameter tensors the forward pass read, by slot; ``watched`` maps their
    ids to slots. Sample-free tensors that are not parameters take one backward pass batched
    over the samples (``keep_graph`` keeps the forward graph for another one).
    """
    by_s: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for c, dr in zip(captures, grads, strict=True):
        ds = c.sample_gradient(dr, num_samples)
        old = by_s.get(id(c.s))
        by_s[id(c.s)] = (c.s, ds if old is None else old[1] + ds)
    out: dict[int, torch.Tensor] = {}
    derived = [(s, ds) for key, (s, ds) in by_s.items() if key not in watched]
    for key, (_, ds) in by_s.items():
        if key in watched:
            out[watched[key]] = ds.reshape(ds.shape[0], -1)
    if derived:
        slots = sorted({i for c in captures if id(c.s) not in watched for i in c.slots})
        found = torch.autograd.grad(
            [s for s, _ in derived], [views[i] for i in slots], [ds for _, ds in derived],
            retain_graph=keep_graph, allow_unused=True, is_grads_batched=True,
        )
        n = num_samples
        for i, g in zip(slots, found, strict=True):
            g = (torch.zeros(n, math.prod(views[i].shape), dtype=views[i].dtype,
                             device=views[i].device) if g is None else g.reshape(n, -1))
            out[i] = out[i] + g if i in out else g
    return out
