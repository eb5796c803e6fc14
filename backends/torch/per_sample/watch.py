r"""The watch over the forward pass of :class:`backends.torch.per_sample.layer_pass.LayerPass`.

:class:`UseWatch` is a ``TorchFunctionMode``: it sees every torch operation of the forward
pass and sorts each use of a trainable parameter tensor.

* A use inside the forward of the innermost running hooked module that owns the parameter,
  on per-sample inputs: the module's hook accounts for it.
* A *sample-free* result: an operation whose tensor arguments are all parameters, constants
  (computed in the forward pass from no input and no parameter: ``torch.arange`` and what
  follows from it) or earlier sample-free results. T5's relative position bias (an
  ``nn.Embedding`` looked up at a constant (T, T) bucket table, permuted to (1, H, T, T)) and
  a parameter itself are sample free. Such a tensor is not per sample, whatever its shape.
* A *broadcast capture*: a sample-free s (s.ndim < x.ndim or s.shape[0] == 1) meeting a
  per-sample x (N, ...) in

  ======================================  =============================================
  r = x + s, s + x, s.expand(N, ...),     ds_n = reduce_s(dr_n)
  s.broadcast_to(...), s.repeat(N, 1..)
  r = x * s, s * x                        ds_n = reduce_s(dr_n * x_n)
  ======================================  =============================================

  where reduce_s sums over the axes along which s was broadcast (r.shape == x.shape). The
  per-sample gradient of the parameters behind s is then one backward pass from s batched
  over n (``is_grads_batched``): exact, at the cost of N copies of s and of the parameters it
  reads (ViT's class and position embeddings, T5's relative position bias table, T5LayerNorm's
  weight in ``weight * hidden``).
* Anything else (an escape): the parameters behind it take the vmap fallback of their own
  generic module when the escape happens inside it (``module_vmap``), else the whole-model
  vmap (``outside``).

Expanding or repeating a one-sample tensor over the batch is taken to make it per sample (as
for constants): copy n is taken to be sample n's. The watch also keeps the output of a hooked
call made for one sample and then repeated over the batch (peft's prompt tuning:
``prompt_encoder(tokens[:1]).repeat(N, 1, 1)``): the repeated tensor becomes that call's
output; any other use of the one-sample output makes the call fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["Capture", "Frame", "UseWatch", "capture_rows"]

#: tensor methods and properties that read metadata only (not a use of the values)
_METADATA = frozenset({
    "size", "dim", "numel", "is_floating_point", "element_size", "stride", "is_contiguous",
    "data_ptr", "__len__", "type", "is_complex", "get_device", "__repr__", "__format__",
    "__hash__", "requires_grad_", "shape", "dtype", "device", "requires_grad", "is_leaf",
    "ndim", "layout", "is_cuda", "grad_fn", "_version", "is_sparse", "is_quantized",
    "is_meta", "itemsize", "nbytes", "names", "grad", "_base", "is_nested", "output_nr",
})
#: the metadata reads that return no tensor: the watch lets them through untouched
_PASS = _METADATA - {"grad", "_base", "type", "requires_grad_"}
_ADD = frozenset({"add", "__add__", "__radd__"})
_MUL = frozenset({"mul", "__mul__", "__rmul__"})
_EXPAND = frozenset({"expand", "expand_as", "broadcast_to"})


def _operation(func: Any) -> str:
    """The name of a torch function, or of the property a ``__get__`` reads."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


#: func -> _operation(func), filled as the forward passes meet torch functions
_NAMES: dict[Any, str] = {}


def _name(func: Any) -> str:
    """``_operation(func)``, cached per torch function (unhashable ones are named anew)."""
    try:
        return _NAMES[func]
    except KeyError:
        name = _NAMES[func] = _operation(func)
        return name
    except TypeError:
        return _operation(func)


def _in_place(name: str) -> bool:
    return (name.endswith("_") and not name.startswith("__")) or name in (
        "__setitem__", "__iadd__", "__imul__", "__isub__")


@dataclass(frozen=True)
class Frame:
    """One running hooked module call: its own parameter ids and slots, kind, call number."""

    own: frozenset[int]
    slots: frozenset[int]
    generic: bool
    call: int


@dataclass
class Capture:
    """A sample-free s broadcast over the batch into r (x: the per-sample factor of a product)."""

    s: torch.Tensor
    slots: frozenset[int]
    r: torch.Tensor
    x: torch.Tensor | None
    versions: tuple[int, ...]

    def intact(self) -> bool:
        """Whether s, r and x are as the forward pass left them (no later in-place change)."""
        now = (self.s._version, self.r._version, -1 if self.x is None else self.x._version)
        return now == self.versions

    def sample_gradient(self, dr: torch.Tensor | None) -> torch.Tensor:
        """ds_n (N, *s.shape) from dr (N, *r.shape) (None: the backward pass missed r)."""
        n = self.r.shape[0]
        if dr is None:
            return torch.zeros(n, *self.s.shape, dtype=self.s.dtype, device=self.s.device)
        if self.x is not None:
            dr = dr * self.x
        lead = self.r.ndim - self.s.ndim
        axes = [*range(1, lead), *(
            lead + i for i, k in enumerate(self.s.shape) if k == 1 and self.r.shape[lead + i] != 1
        )]
        if lead == 0:
            axes = [a for a in axes if a != 0]
        if axes:
            dr = dr.sum(dim=axes, keepdim=True)
        return dr.reshape(n, *self.s.shape)


class UseWatch(TorchFunctionMode):
    """Sorts every use of a watched parameter tensor during the forward pass (module docs)."""

    def __init__(self, watched: dict[int, int], num_samples: int) -> None:
        super().__init__()
        self.watched = watched  # id(parameter tensor as the modules see it) -> slot
        self.stack: list[Frame] = []
        self.n = num_samples
        self.outside: set[int] = set()  # slots for the whole-model vmap
        self.module_vmap: set[int] = set()  # slots for their own generic module's vmap
        self.touched: set[int] = set()  # slots that any operation read
        #: id(sample-free tensor) -> (it, the slots it reads, the call it was made in)
        self.free: dict[int, tuple[torch.Tensor, frozenset[int], int]] = {}
        self.captures: list[Capture] = []
        #: id(one-sample output) -> (its use, the call's positional args, the output itself,
        #: held so that its id stays its own during the forward pass)
        self.single: dict[int, tuple[Any, tuple, torch.Tensor]] = {}
        self.done: set[int] = set()  # ids of the one-sample outputs already repeated
        self.repeated: list[tuple[Any, tuple, torch.Tensor]] = []
        #: tensors computed in the forward pass from no input and no parameter: their leading
        #: axis is not the samples even when its length happens to be N
        self.constant: dict[int, torch.Tensor] = {}

    def per_sample(self, t: Any) -> bool:
        """Whether t is a tensor with the samples first (not constant, not sample free)."""
        return isinstance(t, torch.Tensor) and t.ndim >= 1 and t.shape[0] == self.n and (
            id(t) not in self.constant and id(t) not in self.free and id(t) not in self.watched)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        # runs for every torch operation of the forward pass (the hooks' own included): the
        # common cases return at once. A metadata read is no use of the values and marks
        # nothing; an operation whose arguments are tensors and values none of which is a
        # parameter, a sample-free, constant or one-sample tensor, or a list, marks nothing
        # either (decided by C-level set operations on the argument ids)
        name = _name(func)
        if name in _PASS:
            return func(*args, **kwargs) if kwargs else func(*args)
        kwargs = kwargs or {}
        flat = (*args, *kwargs.values()) if kwargs else args
        ids = list(map(id, flat))
        if (
            flat and isinstance(flat[0], torch.Tensor)
            and self.watched.keys().isdisjoint(ids) and self.free.keys().isdisjoint(ids)
            and self.constant.keys().isdisjoint(ids)
            and (not self.single or self.single.keys().isdisjoint(ids))
        ):
            kinds = set(map(type, flat))
            if list not in kinds and tuple not in kinds:
                return func(*args, **kwargs)
        return self._marking(func, name, args, kwargs)

    def _marking(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        """Runs an operation that may mark a tensor: sample free, constant, captured, escaped."""
        result = self._dispatch(func, name, args, kwargs)
        flat = [*args, *kwargs.values()]
        flat += [b for a in flat if type(a) in (list, tuple) for b in a]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if not all(id(t) in self.constant for t in tensors):
            if tensors and _in_place(name):
                self.constant.pop(id(tensors[0]), None)  # written in place from the batch
            return result
        if not (
            # expanding a constant over the batch makes it per sample by intent
            name in ("expand", "repeat", "expand_as", "broadcast_to")
            and tensors and tensors[0].ndim and tensors[0].shape[0] == 1
            and isinstance(result, torch.Tensor) and result.ndim and result.shape[0] == self.n
        ):
            for out in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(out, torch.Tensor):
                    self.constant[id(out)] = out
        return result

    def _dispatch(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        flat = (*args, *kwargs.values())
        ids = list(map(id, flat))
        nested = any(type(a) in (list, tuple) for a in flat)
        if not nested and self.watched.keys().isdisjoint(ids) and self.free.keys().isdisjoint(ids):
            if not self.single or self.single.keys().isdisjoint(ids):
                return func(*args, **kwargs)
            return self._single_use(func, name, args, kwargs)
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        tensors += [b for a in flat if type(a) in (list, tuple) for b in a
                    if isinstance(b, torch.Tensor)]
        slots = self._slots_of(tensors)
        if not slots or name in _METADATA:
            return func(*args, **kwargs)
        self.touched |= slots
        result = func(*args, **kwargs)
        frame = self.stack[-1] if self.stack else None
        sources = all(id(t) in self.watched or id(t) in self.free or id(t) in self.constant
                      for t in tensors)
        if not sources and frame is not None and not frame.generic and all(
            id(t) in frame.own for t in tensors if id(t) in self.watched or id(t) in self.free
        ):
            return result  # the module's own weights on per-sample inputs: its hook's work
        if self._capture(name, args, kwargs, result):
            return result
        if sources:
            for out in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(out, torch.Tensor):
                    self.free[id(out)] = (out, slots, frame.call if frame else -1)
            return result
        self._escape(name, tensors, frame)
        return result

    def _slots_of(self, tensors: list[torch.Tensor]) -> frozenset[int]:
        slots = {self.watched[id(t)] for t in tensors if id(t) in self.watched}
        for t in tensors:
            if id(t) in self.free:
                slots |= self.free[id(t)][1]
        return frozenset(slots)

    def _sample_free(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and (id(t) in self.watched or id(t) in self.free)

    def _capture(self, name: str, args: tuple, kwargs: dict, result: Any) -> bool:
        """Records s broadcast over the batch into ``result`` (module docs), if it is that."""
        if kwargs or not self.per_sample(result) or len(args) < 2:
            return False
        s, x = args[0], None
        if name in _EXPAND or name == "repeat":
            if not self._sample_free(s) or not (s.ndim < result.ndim or s.shape[0] == 1):
                return False
            reps = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
            if name == "repeat" and tuple(reps) != (self.n, *[1] * (s.ndim - 1)):
                return False
        elif (name in _ADD or name in _MUL) and len(args) == 2:
            a, b = args
            if self._sample_free(b) and self.per_sample(a):
                s, x = b, a
            elif not (self._sample_free(a) and self.per_sample(b)):
                return False
            else:
                x = b
            if x.shape != result.shape or (s.ndim == x.ndim and s.shape[0] != 1):
                return False
            x = x.detach() if name in _MUL else None
        else:
            return False
        self.captures.append(Capture(
            s, self._slots_of([s]), result, x,
            (s._version, result._version, -1 if x is None else x._version),
        ))
        return True

    def _escape(self, name: str, tensors: list[torch.Tensor], frame: Frame | None) -> None:
        """A use the hooks and the captures cannot split per sample: mark its parameters."""
        for t in tensors:
            if id(t) in self.watched:
                inside = frame is not None and frame.generic and id(t) in frame.own
                (self.module_vmap if inside else self.outside).add(self.watched[id(t)])
            elif id(t) in self.free:
                _, slots, call = self.free[id(t)]
                inside = frame is not None and frame.generic and call == frame.call and (
                    slots <= frame.slots)
                (self.module_vmap if inside else self.outside).update(slots)
        if tensors and _in_place(name):
            self.free.pop(id(tensors[0]), None)  # written in place from the batch

    def _single_use(self, func: Any, name: str, args: tuple, kwargs: dict) -> Any:
        """An operation on a one-sample output: its repeat over the batch, or a failure."""
        result = func(*args, **kwargs)
        if name in _METADATA:
            return result
        first = args[0] if args else None
        reps = args[1] if len(args) == 2 and not isinstance(args[1], int) else args[1:]
        if (
            name == "repeat" and id(first) in self.single and id(first) not in self.done
            and not kwargs and tuple(reps) == (self.n, *([1] * (first.ndim - 1)))
        ):
            self.done.add(id(first))
            use, call_args, _ = self.single[id(first)]
            self.repeated.append((use, call_args, result))
            return result
        for a in (*args, *kwargs.values()):
            if id(a) in self.single:
                use = self.single[id(a)][0]
                use.failure = (f"{type(use.module).__name__}'s one-sample output is used "
                               "other than by one repeat over the batch")
        return result


def capture_rows(
    captures: list[Capture], grads: list[torch.Tensor | None], views: list[torch.Tensor],
    watched: dict[int, int], *, keep_graph: bool,
) -> dict[int, torch.Tensor]:
    """Per-sample gradients (N, size) of the captured slots, from dr of each capture.

    ``views``: the parameter tensors the forward pass read, by slot; ``watched`` maps their
    ids to slots. Sample-free tensors that are not parameters take one backward pass batched
    over the samples (``keep_graph`` keeps the forward graph for another one).
    """
    by_s: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for c, dr in zip(captures, grads, strict=True):
        ds = c.sample_gradient(dr)
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
        n = derived[0][1].shape[0]
        for i, g in zip(slots, found, strict=True):
            g = (torch.zeros(n, math.prod(views[i].shape), dtype=views[i].dtype,
                             device=views[i].device) if g is None else g.reshape(n, -1))
            out[i] = out[i] + g if i in out else g
    return out
