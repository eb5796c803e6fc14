r"""One forward and one backward pass with module hooks -> :class:`.rows.GhostRows`.

:class:`LayerPass` runs the model once (the provider's mode policy, its functional call at
theta) under :class:`~.watch.UseWatch`, which records every operation with the batch-axis
provenance tracker (:mod:`~backends.torch.per_sample.provenance`), and then one ordinary
backward pass per set of cotangents (e.g. R dl_n/dz_n, or SF's sampled labels) that reuses
that forward. Every module that owns a trainable parameter is one of

=======================================  ==================================================
module                                   per-sample gradient of its own parameters
=======================================  ==================================================
a registered layer kind                  the kind's parts (:mod:`backends.torch.layers`:
(:func:`backends.torch.layers.kind_of`)  factors or rows), from its inputs and the
                                         gradients of its tapped outputs; each call's batch
                                         axis by provenance (any axis, merged or not:
                                         sequence-first layouts get factors too)
anything else (a generic module)         ``torch.func.vmap`` of that module alone over its
                                         call's arguments, along their batch axes (by
                                         provenance), for the parameters the watch saw used
                                         inside it (reported)
=======================================  ==================================================

plus the watch's broadcast captures (parameters broadcast over the batch: ViT's class and
position embeddings, T5's relative position bias, T5LayerNorm's ``weight * hidden``). Per
parameter, the parts of all its uses (tied and shared parameters: every call, every capture)
become one block (:func:`backends.torch.layers.assemble`): factors where the route or the
registry's cost model says so, else materialised rows. The backward pass asks autograd only
for the tapped tensors' gradients, so no weight gradient is ever formed.

A parameter none of these can account for takes the whole-model routes (the provider's
``dense_ranges``: ``torch.func.vmap`` over the samples, else a loop of single-sample passes),
with the reason in :attr:`GhostRows.fallbacks`: a call whose input or output has no batch
axis by provenance (or not the layer's), a call its kind refuses, a use outside its module
that no capture splits, an output changed in place afterwards, a per-module vmap that torch
cannot run. If the logits themselves are not per sample by provenance (an operation the
tracker's rules do not know, a capture's copies mixed), no per-sample claim of the pass is
trusted and every parameter takes the whole-model routes. Hooks that a user registered stay
in place; ours run first (so they see the module's own output) and are removed after the
forward pass, also on error.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from ngdref.checks import check_choice

from ..axes import BATCH_FIRST, BatchAxis
from ..layers import ROUTES, LayerKind, Rows, assemble, describe, kind_of
from .layer_rows import (
    Slot,
    Use,
    in_dim,
    module_vmap,
    route_of,
    split_blocks,
    tensor_outputs,
    why_not,
    zero_block,
)
from .provenance import SAMPLE_FREE, NotPerSample, ProvenanceTracker, held_tensors
from .rows import DenseBlock, GhostRows
from .vmap import error_line, is_ours
from .watch import Frame, UseWatch, capture_rows

__all__ = ["ROUTES", "LayerPass", "ModelBatch"]


class ModelBatch(Protocol):
    """What :class:`LayerPass` needs of a provider (e.g. :class:`backends.TorchProvider`): a
    model on one batch of N samples at theta (P,), the trainable parameters' layout, the
    provider's own forward call (so that the hooks see exactly the provider's forward) and
    mode policy, and its whole-model routes for the parameters the pass cannot split.
    """

    model: nn.Module
    dtype: torch.dtype
    device: torch.device
    num_params: int
    #: the mode policy of every pass, "eval" or "train"
    mode: str
    #: the trainable parameters: names, shapes and the tensors themselves, in theta's order
    param_names: tuple[str, ...]
    param_shapes: tuple[tuple[int, ...], ...]
    param_tensors: tuple[torch.Tensor, ...]

    @property
    def num_samples(self) -> int:
        """N."""
        ...

    @property
    def theta(self) -> torch.Tensor:
        """theta (P,), the point the model is evaluated at (not to be changed in place)."""
        ...

    def batch(self, rows: slice) -> dict[str, torch.Tensor]:
        """The per-sample model inputs of the samples ``rows`` (samples first)."""
        ...

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """(P,) -> {parameter name: view of the parameter's shape}, differentiable."""
        ...

    def module_mode(self) -> AbstractContextManager[Any]:
        """The mode policy applied to every submodule inside, each one's flag restored."""
        ...

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """``model.named_modules()`` (the provider may walk the model once per step)."""
        ...

    def eval_mode(self) -> AbstractContextManager[Any]:
        """The same context under its earlier name (the K-FAC capture uses it)."""
        ...

    def batch_logits(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> torch.Tensor:
        """Logits (n, C) of ``batched`` at ``theta`` (``params``: ``unflatten(theta)``)."""
        ...

    def dense_ranges(
        self, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
    ) -> tuple[list[torch.Tensor], str, str | None]:
        """Per-sample J_n^T u_n restricted to the (offset, size) slices of theta by the
        whole-model routes: (rows per range, "vmap" or "loop", why vmap could not, or None)."""
        ...


class LayerPass:
    r"""The forward pass of a batch with hooks, ready for backward passes -> GhostRows.

    Parameters
    ----------
    provider : ModelBatch
        Supplies the model, the batch, theta (P,), the mode policy, the forward call and the
        whole-model routes (e.g. :class:`backends.TorchProvider`).
    route : {"auto", "ghost", "materialise"}
        Per parameter: factors or materialised rows by the registry's cost model
        (:mod:`backends.torch.layers.cost`), factors wherever the layer kind allows, or
        materialised per-layer rows everywhere.

    Attributes
    ----------
    logits : torch.Tensor, (N, C)
        Detached logits of the forward pass.
    """

    def __init__(self, provider: ModelBatch, route: str = "auto") -> None:
        check_choice(route, "route", ROUTES)
        self.provider = provider
        self.route = route
        self._n = provider.num_samples
        names, shapes = provider.param_names, provider.param_shapes
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        offsets = [0, *itertools.accumulate(sizes)][:-1]
        self._slots = [Slot(*f) for f in zip(names, offsets, sizes, map(tuple, shapes),
                                             strict=True)]
        self._owned, self._kinds, self._held = self._walk(provider)
        self._uses: list[Use] = []
        self._calls = itertools.count()
        self._global: str | None = None  # why no per-sample claim of the pass holds
        self._z, self._theta = self._forward()
        self.logits = self._z.detach()

    @property
    def spent(self) -> bool:
        """Whether a backward pass without ``keep_graph`` released the forward graph."""
        return self._z is None

    def decisions(self) -> list[tuple[str, str, Any]]:
        """Per recorded call, in order: (module path, decision, axis / in_dims / reason)
        (:meth:`.layer_rows.Use.decision`): the pass's routing as data."""
        path = {m: name for name, m in self.provider.named_modules()}
        return [(path.get(u.module, "?"), *u.decision()) for u in self._uses]

    # ---- setup ---------------------------------------------------------------------------
    def _walk(self, provider: ModelBatch) -> tuple[dict, dict, list]:
        """Modules owning trainable parameters (attr -> slot), the kind of every module that
        gets hooks or a decomposed forward (None: generic), and the model's own tensors."""
        by_id = {id(p): i for i, p in enumerate(provider.param_tensors)}
        owned: dict[nn.Module, dict[str, int]] = {}
        kinds: dict[nn.Module, LayerKind | None] = {}
        held: list[torch.Tensor] = []
        for _, module in provider.named_modules():
            own = {}
            for attr, p in module._parameters.items():
                if p is not None:
                    held.append(p)
                    if id(p) in by_id:
                        own[attr] = by_id[id(p)]
            held += [b for b in module._buffers.values() if b is not None]
            kind = kind_of(module)
            if kind is not None and (kind.refuse(module, provider.mode) is not None or (
                    not kind.hookable and "forward" in vars(module))):
                kind = None  # a generic module (its forward cannot be replaced)
            if own:
                owned[module] = own
                kinds[module] = kind
            elif kind is not None and not kind.hookable and any(
                    id(p) in by_id for p in module.parameters()):
                kinds[module] = kind  # its children's parameters need its decomposed forward
        return owned, kinds, held

    # ---- forward -------------------------------------------------------------------------
    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.provider
        theta = p.theta.detach().requires_grad_(True)
        params = p.unflatten(theta)
        batch = p.batch(slice(None))
        tracker = ProvenanceTracker(
            self._n, [(t, BATCH_FIRST) for t in batch.values()],
            free=[*params.values(), *self._held], held=lambda: held_tensors(p.model))
        index = {s.name: i for i, s in enumerate(self._slots)}
        self._watch = UseWatch({id(t): index[name] for name, t in params.items()}, tracker,
                               self._n)
        self._views = [params[s.name] for s in self._slots]
        handles, patched = [], []
        try:
            for m, kind in self._kinds.items():
                if kind is None or kind.hookable:
                    handles.append(m.register_forward_pre_hook(self._enter, prepend=True))
                    handles.append(
                        m.register_forward_hook(self._hook, with_kwargs=True, prepend=True))
                else:
                    m.forward = self._decomposed(m, kind)
                    patched.append(m)
            with p.module_mode(), torch.enable_grad(), self._watch:
                z = p.batch_logits(theta, batch, params)
            final = tracker.state(z)
        finally:
            for h in handles:
                h.remove()
            for m in patched:
                del m.forward
        if final != BATCH_FIRST:
            self._global = why_not(final, "the logits")
        self._watch.clear()
        return z, theta

    def _frame(self, module: nn.Module, generic: bool) -> Frame:
        own = self._owned.get(module, {})
        return Frame(frozenset(id(module._parameters[a]) for a in own),
                     frozenset(own.values()), generic, next(self._calls))

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self._watch.stack.append(self._frame(module, self._kinds[module] is None))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # the hook's own reads and copies are no use of the model's tensors
        with torch._C.DisableTorchFunction():
            frame = self._watch.stack.pop()
            kind = self._kinds[module]
            use = Use(module, kind, frame.call)
            self._uses.append(use)
            if kind is None:
                self._generic(use, args, kwargs, output)
                return
            first = kind.first_input(module, args, kwargs, output)
            if not isinstance(output, torch.Tensor):
                use.failure = f"{describe(module)} returned no tensor"
                return
            self._layer(use, self._axis(first), {"output": output}, args, kwargs)

    def _axis(self, first: torch.Tensor | None) -> Any:
        if first is None:
            return NotPerSample("the call has no tensor input")
        return self._watch.tracker.state(first)

    def _layer(self, use: Use, axis: Any, taps: dict[str, torch.Tensor], args: tuple,
               kwargs: Mapping[str, Any]) -> None:
        """A call of a registered kind: its batch axis checked, its inputs captured."""
        m, kind, tracker = use.module, use.kind, self._watch.tracker
        if type(axis) is not BatchAxis:
            if axis is SAMPLE_FREE and all(id(t) in self._watch.free for t in taps.values()):
                use.free = True  # its output's uses are the watch's to split
            else:
                use.failure = f"{describe(m)}: {why_not(axis, 'its input')}"
            return
        for name, t in taps.items():
            want = kind.tap_axis(m, name, axis)
            state = tracker.state(t)
            if state is SAMPLE_FREE:  # copies over the batch: copy n is sample n's
                tracker.mark(t, want)
            elif state != want:
                use.failure = (f"{describe(m)}: its {name} carries its samples as {state}, "
                               f"not as {want} like its input")
                return
            if not t.requires_grad:
                use.failure = f"{describe(m)} returned no differentiable tensor"
                return
        use.failure = kind.refuse_call(m, args, kwargs, axis)
        if use.failure is None:
            use.axis = axis
            use.captured = kind.inputs(m, args, kwargs, axis, self._n)
            use.keep(args, kwargs)
            for name, t in taps.items():
                use.tap(name, t)

    def _decomposed(self, m: nn.Module, kind: LayerKind) -> Callable[..., Any]:
        """``m.forward`` during the pass: the kind's decomposed forward with tapped tensors."""
        def forward(*args: Any, **kwargs: Any) -> Any:
            frame = self._frame(m, False)
            use = Use(m, kind, frame.call)
            with torch._C.DisableTorchFunction():
                axis = self._axis(kind.first_input(m, args, kwargs))
                reason = kind.refuse_call(m, args, kwargs, axis) if type(
                    axis) is BatchAxis else None
            taps: dict[str, torch.Tensor] = {}

            def tap(name: str, t: torch.Tensor) -> torch.Tensor:
                taps[name] = t
                if self._watch.tracker.state(t) is SAMPLE_FREE:
                    self._watch.tracker.mark(t, kind.tap_axis(m, name, axis))
                return t

            self._watch.stack.append(frame)
            try:
                if type(axis) is BatchAxis and reason is None:
                    out = kind.forward(m, args, kwargs, tap)
                else:
                    out = type(m).forward(m, *args, **kwargs)
            finally:
                self._watch.stack.pop()
            if m in self._owned:
                self._uses.append(use)
                with torch._C.DisableTorchFunction():
                    outs = taps or dict(zip(["output"], tensor_outputs(out)[:1], strict=False))
                    self._layer(use, axis, outs, args, kwargs)
            return out

        return forward

    def _generic(self, use: Use, args: tuple, kwargs: dict, output: Any) -> None:
        """A call of a module without a layer kind: its arguments' and outputs' batch axes
        (for its per-module vmap), or why it cannot be split."""
        state = self._watch.tracker.state
        name = describe(use.module)
        every = tensor_outputs(output)
        positions = [j for j, o in enumerate(every) if o.requires_grad]
        outs = [every[j] for j in positions]
        if outs and all(id(o) in self._watch.free for o in outs):
            use.free = True
            return
        if not outs:
            use.failure = f"{name} returned no differentiable tensor"
            return
        out_dims = [in_dim(state(o)) for o in outs]
        arg_dims = tuple(in_dim(state(v)) if isinstance(v, torch.Tensor) else None
                         for v in args)
        kw_dims = {k: in_dim(state(v)) if isinstance(v, torch.Tensor) else None
                   for k, v in kwargs.items()}
        bad = [d.replace("an argument", "its output", 1) for d in out_dims if isinstance(d, str)]
        bad += ["an output of it is sample free" for d in out_dims if d is None]
        bad += [d for d in (*arg_dims, *kw_dims.values()) if isinstance(d, str)]
        if bad:
            use.failure = f"{name}: {bad[0]}"
            return
        detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
        use.captured = (tuple(map(detach, args)), {k: detach(v) for k, v in kwargs.items()},
                        (arg_dims, kw_dims), tuple(positions))
        use.out_dims = tuple(out_dims)
        use.keep(args, kwargs)
        for i, o in enumerate(outs):
            use.tap(str(i), o)

    # ---- backward ------------------------------------------------------------------------
    def rows(self, cotangents: torch.Tensor, *, keep_graph: bool = False) -> GhostRows:
        r"""Per-sample rows u_n^T J_n from one backward pass with ``cotangents`` (N, C).

        ``keep_graph`` keeps the forward for another call (SF's sampled labels).
        """
        if self._z is None:
            raise RuntimeError("LayerPass.rows: the forward graph was released by an earlier call")
        watch = self._watch
        for u in self._uses:
            if u.failure is None and not u.free:
                u.failure = u.changed()
        live = [u for u in self._uses if u.failure is None and not u.free]
        captures = [c for c in watch.captures if c.intact()]
        for c in watch.captures:
            if not c.intact():
                watch.outside |= c.slots
        derived = any(id(c.s) not in watch.watched for c in captures)
        taps = [(u, name, t) for u in live for name, t in u.taps.items()]
        outputs = [t for *_, t in taps] + [c.r for c in captures]
        found = torch.autograd.grad(
            self._z, outputs, grad_outputs=cotangents, retain_graph=keep_graph or derived,
            allow_unused=True,
        ) if outputs else ()
        grads: dict[int, dict[str, torch.Tensor]] = {id(u): {} for u in live}
        for (u, name, t), g in zip(taps, found, strict=False):
            grads[id(u)][name] = torch.zeros_like(t) if g is None else g
        captured = capture_rows(captures, list(found[len(taps):]), self._views, watch.watched,
                                self._n, keep_graph=keep_graph)
        if not keep_graph:
            self._z = None
            watch.captures = []
        return self._assemble(cotangents, grads, captured)

    def _assemble(self, cotangents: torch.Tensor, grads: dict[int, dict[str, torch.Tensor]],
                  captured: dict[int, torch.Tensor]) -> GhostRows:
        parts: dict[int, list] = {slot: [(Rows(r),)] for slot, r in captured.items()}
        failed, vmapped, notes = self._parts(grads, captured, parts)
        p, n = self.provider, self._n
        factors, dense, routes = [], [], {}
        for i, slot in enumerate(self._slots):
            if i in failed:
                continue
            if i not in parts:
                dense.append(zero_block(slot, n, p.dtype, p.device))
                routes[slot.name] = "unused"
                continue
            block = assemble(slot.offset, slot.shape, parts[i], route=self.route)
            routes[slot.name] = route_of(block, i in vmapped and i not in captured)
            for b in split_blocks(block):
                (dense if isinstance(b, DenseBlock) else factors).append(b)
        if failed:
            order = sorted(failed)
            pieces, route, why = p.dense_ranges(
                cotangents, [(self._slots[i].offset, self._slots[i].size) for i in order])
            for i, piece in zip(order, pieces, strict=True):
                dense.append(DenseBlock(self._slots[i].offset, piece))
                routes[self._slots[i].name] = route
                extra = "" if why is None else f"; torch.func.vmap could not run it: {why}"
                notes.append(f"{self._slots[i].name}: whole-model {route} ({failed[i]}{extra})")
        return GhostRows(n, p.num_params, factors=factors, dense=dense, dtype=p.dtype,
                         device=p.device, fallbacks=list(dict.fromkeys(notes)), routes=routes)

    def _parts(self, grads: dict[int, dict[str, torch.Tensor]],
               captured: dict[int, torch.Tensor], parts: dict[int, list]
               ) -> tuple[dict[int, str], set[int], list[str]]:
        """The parts of every live call, by slot; the failed slots (why), the slots that took
        a per-module vmap and its notes."""
        watch = self._watch
        failed: dict[int, str] = {}
        if self._global is not None:
            failed = dict.fromkeys(range(len(self._slots)), self._global)
        for i in watch.outside:
            failed.setdefault(i, "used where neither its layer kind nor a broadcast capture "
                                 "splits it")
        for i in watch.module_vmap & captured.keys():
            failed.setdefault(i, "used both in a broadcast over the batch and otherwise")
        vmapped: set[int] = set()
        notes: list[str] = []
        for use in self._uses:
            own = self._owned.get(use.module, {})
            if use.free:
                continue
            if use.failure is not None:
                for i in own.values():
                    if use.kind is not None or i in watch.module_vmap:
                        failed.setdefault(i, use.failure)
            elif use.kind is not None:
                wanted = frozenset(a for a, i in own.items() if i not in failed)
                for attr, grad in use.kind.factors(use.module, use.captured, grads[id(use)],
                                                   wanted).items():
                    parts.setdefault(own[attr], []).append(grad)
            else:
                notes += self._module_parts(use, grads[id(use)], failed, parts, vmapped)
        for i in range(len(self._slots)):
            if i not in parts and i in watch.touched:
                failed.setdefault(i, "no call of its module used it per sample")
        return failed, vmapped, notes

    def _module_parts(self, use: Use, grads: dict[str, torch.Tensor], failed: dict[int, str],
                      parts: dict[int, list], vmapped: set[int]) -> list[str]:
        """A generic module's own parameters used inside it: its per-module vmap."""
        own, watch = self._owned[use.module], self._watch
        wanted = {a: i for a, i in own.items() if i in watch.module_vmap and i not in failed}
        if not wanted:
            return []
        values = self.provider.unflatten(self._theta.detach())
        try:
            found = module_vmap(
                use, {a: values[self._slots[i].name] for a, i in wanted.items()},
                {a: values[self._slots[i].name] for a, i in own.items() if a not in wanted},
                grads, self._n, self.provider.module_mode)
        except Exception as err:  # torch cannot vmap it: those parameters take the next route
            if is_ours(err):
                raise
            for i in wanted.values():
                failed.setdefault(i, f"per-module vmap of {type(use.module).__name__} failed: "
                                     f"{error_line(err)}")
            return []
        for attr, i in wanted.items():
            parts.setdefault(i, []).append((Rows(found[attr]),))
            vmapped.add(i)
        names = ", ".join(self._slots[i].name for i in wanted.values())
        return [f"{type(use.module).__name__} ({names}): per-module vmap"]
