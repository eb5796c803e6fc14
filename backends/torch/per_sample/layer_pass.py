r"""One forward and one backward pass with module hooks -> :class:`.rows.GhostRows`.

:class:`LayerPass` runs the model once (eval mode, through the provider's functional call at
theta) with a forward hook on every module that holds a trainable parameter of its own, and
then one ordinary backward pass per set of cotangents (e.g. R dl_n/dz_n, or SF's sampled
labels) that reuses that forward. The hooks keep each call's input and, through a hook on its
output, the per-sample output gradient. Per parameter:

=====================================  ===================================================
module (exact type, not subclasses)    per-sample gradient
=====================================  ===================================================
``nn.Linear`` (peft LoRA's A and B)    weight: factors (ghost) or b^T a (materialised), by
``nn.Conv2d`` (groups=1, via unfold)   :func:`.rows.ghost_is_cheaper`; bias:
                                       sum_t b_nt (materialised)
``nn.Embedding`` (prompt tuning too)   weight: factors (indices, b) or scattered rows
``nn.LayerNorm``, ``nn.RMSNorm``       sum_t b_nt * xhat_nt, sum_t b_nt (materialised)
parameters broadcast over the batch    captured by :mod:`backends.torch.per_sample.watch` (x + s,
(ViT's class and position embeddings,  x * s, s expanded or repeated over N): ds_n from
T5's relative position bias and        dr_n, then one backward pass from s batched over n
T5LayerNorm's ``weight * hidden``)     (materialised)
any other module                       ``torch.func.vmap`` of that module alone on its
                                       captured inputs, for the parameters the watch saw
                                       used otherwise (materialised, reported)
=====================================  ===================================================

A weight used several times (tied) concatenates its uses along t (mixed kinds are
materialised and summed). The backward pass asks autograd only for the hooked modules'
output gradients b (``torch.autograd.grad`` with those outputs as inputs), so no weight
gradient is ever formed: the weight-gradient work of an ordinary backward pass is replaced by
the Gram matrix and by G^T c. A parameter that neither a hook nor a capture can account for
falls back to ``vmap`` over the whole model for that parameter only: one used outside its own
module's forward in another way than a broadcast (the ``TorchFunctionMode`` of
:mod:`backends.torch.per_sample.watch` sees every torch operation of the forward pass), one whose
module's output or broadcast sum is changed in place afterwards, or one of a call without the batch
axis whose output is not sample free. The watch also marks the tensors the forward pass
computes from no input and no parameter (``torch.arange`` and what follows from it) and
those computed from parameters and such constants only: a call on them is not per sample
even when their leading axis happens to have length N (T5's relative position bias on a
(6, 6) table for a batch of 6). Every fallback is listed in :attr:`GhostRows.fallbacks`.
Hooks that a user registered stay in place; ours run first (so they see the module's own
output) and are removed after the forward pass, also on error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.func import vjp as func_vjp

from ngdref.checks import check_choice

from .rows import DenseBlock, FactorBlock, GhostRows, ghost_is_cheaper
from .watch import Frame, UseWatch, capture_rows

__all__ = ["ROUTES", "LayerPass", "ModelBatch"]

#: per-layer choice: cost model, ghost wherever possible, materialised everywhere
ROUTES = ("auto", "ghost", "materialise")


class ModelBatch(Protocol):
    """What :class:`LayerPass` needs of a provider (e.g. :class:`backends.TorchProvider`): a
    model on one batch of N samples at theta (P,), the trainable parameters' layout, and the
    provider's own forward call, so that the hooks see exactly the provider's forward.
    """

    model: nn.Module
    dtype: torch.dtype
    device: torch.device
    num_params: int
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
        """The per-sample model inputs of the samples ``rows``."""
        ...

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """(P,) -> {parameter name: view of the parameter's shape}, differentiable."""
        ...

    def eval_mode(self) -> AbstractContextManager[Any]:
        """Every submodule in eval mode inside, each one's own flag restored after."""
        ...

    def batch_logits(
        self, theta: torch.Tensor, batched: Mapping[str, torch.Tensor], params: Any = None
    ) -> torch.Tensor:
        """Logits (n, C) of ``batched`` at ``theta`` (``params``: ``unflatten(theta)``)."""
        ...

    def vjp_ranges(
        self, cotangents: torch.Tensor, ranges: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Per-sample J_n^T u_n restricted to the (offset, size) slices of theta, by vmap."""
        ...


def _kind(module: nn.Module) -> str:
    """The hook kind of a module holding trainable parameters ("generic": module vmap)."""
    kind = type(module)
    if kind is nn.Linear:
        return "linear"
    if kind is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" and (
        not isinstance(module.padding, str) or module.padding == "valid"
    ):
        return "conv2d"
    if kind is nn.Embedding and module.max_norm is None and not module.sparse:
        return "embedding"
    if kind in (nn.LayerNorm, nn.RMSNorm):
        return "norm"
    return "generic"


@dataclass
class _Use:
    """One forward call of a hooked module: its input features x and its output."""

    module: nn.Module
    kind: str
    x: Any = None  # (N, T, d_in) features, (N, T) indices, or (args, kwargs) for "generic"
    output: Any = None
    version: int = 0  # of the output when the module returned it (in-place changes after)
    failure: str | None = None
    free: bool = False  # a sample-free call (its output is watched, not hooked)


class LayerPass:
    r"""The forward pass of a batch with hooks, ready for backward passes -> GhostRows.

    Parameters
    ----------
    provider : ModelBatch
        Supplies the model, the batch, theta (P,), eval mode and the forward call (e.g.
        :class:`backends.TorchProvider`).
    route : {"auto", "ghost", "materialise"}
        Per weight: the cheaper by :func:`backends.torch.per_sample.rows.ghost_is_cheaper`, factors
        wherever the layer kind allows, or materialised per-layer rows everywhere.

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
        sizes = [int(math.prod(s)) for s in provider.param_shapes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._slots = list(
            zip(provider.param_names, offsets, sizes, provider.param_shapes, strict=True)
        )
        by_id = {id(p): i for i, p in enumerate(provider.param_tensors)}
        #: module -> {attr: slot index} for its own trainable parameters (tied ones included)
        self._owned: dict[nn.Module, dict[str, int]] = {}
        for module in provider.model.modules():
            own = {a: by_id[id(p)] for a, p in module._parameters.items()
                   if p is not None and id(p) in by_id}
            if own:
                self._owned[module] = own
        self._uses: list[_Use] = []
        self._grads: dict[int, torch.Tensor] = {}
        self._z, self._theta = self._forward()
        self.logits = self._z.detach()

    @property
    def spent(self) -> bool:
        """Whether a backward pass without ``keep_graph`` released the forward graph."""
        return self._z is None

    # ---- forward -------------------------------------------------------------------------
    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.provider
        theta = p.theta.detach().requires_grad_(True)
        params = p.unflatten(theta)
        index = {name: i for i, (name, *_) in enumerate(self._slots)}
        self._watch = UseWatch({id(t): index[name] for name, t in params.items()}, self._n)
        self._views = [params[name] for name, *_ in self._slots]
        self._calls = 0
        handles = []
        try:
            for m in self._owned:
                handles.append(m.register_forward_pre_hook(self._enter, prepend=True))
                handles.append(
                    m.register_forward_hook(self._hook, with_kwargs=True, prepend=True)
                )
            with p.eval_mode(), torch.enable_grad(), self._watch:
                z = p.batch_logits(theta, p.batch(slice(None)), params)
        finally:
            for h in handles:
                h.remove()
        if id(z) in self._watch.free:  # logits computed from no input: nothing is per sample
            self._watch.outside |= self._watch.free[id(z)][1]
        self._watch.constant.clear()  # only the forward pass's hooks needed them
        self._watch.free.clear()
        for use, args, out in self._watch.repeated:  # one-sample calls repeated over the batch
            if use.failure.endswith("without the batch axis"):  # and not used otherwise
                expanded = args[0].detach().expand(self._n, *args[0].shape[1:])
                use.x = self._features(use.module, use.kind, (expanded,), {})
                use.output, use.version, use.failure = out, out._version, None
        self._watch.single.clear()
        return z, theta

    def _enter(self, module: nn.Module, args: tuple) -> None:
        own = frozenset(id(module._parameters[a]) for a in self._owned[module])
        self._calls += 1
        self._watch.stack.append(Frame(own, frozenset(self._owned[module].values()),
                                       _kind(module) == "generic", self._calls))

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # the hook's own reads and copies are no use of the model's tensors: the watch (a
        # torch function mode) would only pay for dispatching them
        with torch._C.DisableTorchFunction():
            self._record(module, args, kwargs, output)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """A hooked call's input features and output (or why it cannot be hooked)."""
        if self._watch.stack:
            self._watch.stack.pop()
        use = _Use(module, _kind(module))
        self._uses.append(use)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            use.failure = f"{type(module).__name__} returned no differentiable tensor"
            return
        first = args[0] if args else None
        if use.kind != "generic" and not self._watch.per_sample(first):
            use.failure = f"{type(module).__name__} got an input without the batch axis"
            if use.kind in ("linear", "embedding") and first is not None and first.ndim >= 1 \
                    and first.shape[0] == 1 and output.ndim and output.shape[0] == 1:
                self._watch.single[id(output)] = (use, args, output)  # repeated later?
                self._watch.free.pop(id(output), None)
            elif id(output) in self._watch.free:  # its uses are the watch's to split
                use.failure, use.free = None, True
            return
        if not self._watch.per_sample(output):  # sample free, or N by coincidence
            use.failure = f"{type(module).__name__} returned no batch axis"
            return
        use.x = self._features(module, use.kind, args, kwargs)
        use.output, use.version = output, output._version

    def _features(self, module: Any, kind: str, args: tuple, kwargs: dict) -> Any:
        a = args[0].detach() if kind != "generic" else None
        n = self._n
        if kind == "linear":
            return a.reshape(n, -1, a.shape[-1])
        if kind == "conv2d":
            patches = F.unfold(a, module.kernel_size, module.dilation,
                               0 if module.padding == "valid" else module.padding, module.stride)
            return patches.transpose(1, 2)
        if kind == "embedding":
            return a.reshape(n, -1)
        if kind == "norm":
            shape = module.normalized_shape
            with torch.no_grad():
                if isinstance(module, nn.LayerNorm):
                    xhat = F.layer_norm(a, shape, None, None, module.eps)
                else:
                    xhat = F.rms_norm(a, shape, None, module.eps)
            return xhat.reshape(n, -1, math.prod(shape))
        def dim(v: Any) -> int | None:  # vmapped over: tensors with the samples first
            return 0 if self._watch.per_sample(v) else None

        def keep(v: Any) -> tuple[Any, int | None]:
            return (v.detach(), dim(v)) if isinstance(v, torch.Tensor) else (v, None)

        return tuple(keep(v) for v in args), {k: keep(v) for k, v in kwargs.items()}

    # ---- backward ------------------------------------------------------------------------
    def rows(self, cotangents: torch.Tensor, *, keep_graph: bool = False) -> GhostRows:
        r"""Per-sample rows u_n^T J_n from one backward pass with ``cotangents`` (N, C).

        ``keep_graph`` keeps the forward for another call (SF's sampled labels).
        """
        if self._z is None:
            raise RuntimeError("LayerPass.rows: the forward graph was released by an earlier call")
        watch = self._watch
        for u in self._uses:
            if u.failure is None and not u.free and u.output._version != u.version:
                u.failure = f"{type(u.module).__name__}'s output was changed in place"
        live = [(i, u) for i, u in enumerate(self._uses) if u.failure is None and not u.free]
        captures = [c for c in watch.captures if c.intact()]
        for c in watch.captures:
            if not c.intact():
                watch.outside |= c.slots
        derived = any(id(c.s) not in watch.watched for c in captures)
        # only the hooked outputs' gradients: autograd forms no weight gradient at all
        outputs = [u.output for _, u in live] + [c.r for c in captures]
        found = torch.autograd.grad(
            self._z, outputs, grad_outputs=cotangents, retain_graph=keep_graph or derived,
            allow_unused=True,
        ) if outputs else []
        self._grads = {i: g for (i, _), g in zip(live, found[:len(live)], strict=True)
                       if g is not None}
        captured = capture_rows(captures, list(found[len(live):]), self._views, watch.watched,
                                keep_graph=keep_graph)
        if not keep_graph:
            self._z = None
            watch.captures = []
        factors, dense, failed, notes = self._blocks(captured)
        failed |= watch.outside | (watch.module_vmap & captured.keys())
        for i in sorted(failed):
            notes.append(f"{self._slots[i][0]}: whole-model vmap ({self._why(i)})")
        blocks = [DenseBlock(self._slots[i][1], r) for i, r in dense.items() if i not in failed]
        factors = [f for f in factors if self._slot_at(f.offset) not in failed]
        if failed:
            pieces = self.provider.vjp_ranges(
                cotangents, [(self._slots[i][1], self._slots[i][2]) for i in sorted(failed)]
            )
            blocks += [DenseBlock(self._slots[i][1], piece)
                       for i, piece in zip(sorted(failed), pieces, strict=True)]
        return GhostRows(
            self._n, self.provider.num_params, factors=factors, dense=blocks,
            dtype=self.provider.dtype, device=self.provider.device, fallbacks=notes,
        )

    def _slot_at(self, offset: int) -> int:
        return next(i for i, (_, o, _, _) in enumerate(self._slots) if o == offset)

    def _why(self, slot: int) -> str:
        if slot in self._watch.outside:
            return "used where neither its module's hook nor a broadcast capture splits it"
        if slot in self._watch.module_vmap:
            return "used both in a broadcast over the batch and otherwise"
        reasons = {u.failure for u in self._uses_of(slot) if u.failure}
        return "; ".join(sorted(reasons)) or "no hooked module used it"

    def _uses_of(self, slot: int) -> list[_Use]:
        return [u for u in self._uses if slot in self._owned[u.module].values()]

    def _output_grad(self, index: int, use: _Use) -> torch.Tensor:
        """b of one use, (N, T, d_out), zero where the backward pass did not reach it."""
        g = self._grads.get(index)
        n = self._n
        if use.kind == "conv2d":
            shape = (n, use.module.out_channels, use.x.shape[1])
            if g is None:
                return torch.zeros(shape, dtype=self.provider.dtype,
                                   device=self.provider.device).transpose(1, 2)
            return g.reshape(shape).transpose(1, 2)
        width = {"linear": lambda m: m.out_features, "embedding": lambda m: m.embedding_dim,
                 "norm": lambda m: math.prod(m.normalized_shape)}[use.kind](use.module)
        if g is None:
            return torch.zeros(n, use.x.shape[1], width, dtype=self.provider.dtype,
                               device=self.provider.device)
        b = g.reshape(n, -1, width)
        padding = getattr(use.module, "padding_idx", None)
        if use.kind == "embedding" and padding is not None:
            b = b * (use.x != padding)[..., None]
        return b

    def _blocks(
        self, captured: dict[int, torch.Tensor],
    ) -> tuple[list[FactorBlock], dict[int, torch.Tensor], set[int], list[str]]:
        """Factor blocks, materialised rows per slot, failed slots, fallback notes.

        ``captured``: the per-sample gradients (N, size) the watch's broadcast captures give.
        """
        parts: dict[int, list[tuple[str, _Use | None, Any]]] = {
            slot: [("rows", None, rows)] for slot, rows in captured.items()}
        failed: set[int] = set()
        notes: list[str] = []
        for index, use in enumerate(self._uses):
            slots = self._owned[use.module]
            if use.free:
                continue
            if use.kind == "generic":
                notes += self._generic_parts(index, use, captured, parts, failed)
            elif use.failure is not None:
                failed.update(slots.values())
            else:
                b = self._output_grad(index, use)
                for attr, slot in slots.items():
                    parts.setdefault(slot, []).append((attr, use, b))
        factors: list[FactorBlock] = []
        dense: dict[int, torch.Tensor] = {}
        for slot in range(len(self._slots)):
            if slot in failed:
                continue
            if slot not in parts:  # used by no hooked call: only the vmap fallback can tell
                failed.add(slot)
                continue
            block = self._slot_block(slot, parts[slot])
            if isinstance(block, FactorBlock):
                factors.append(block)
            else:
                dense[slot] = block
        return factors, dense, failed, list(dict.fromkeys(notes))

    def _generic_parts(
        self, index: int, use: _Use, captured: dict[int, torch.Tensor],
        parts: dict[int, list[tuple[str, _Use | None, Any]]], failed: set[int],
    ) -> list[str]:
        """A generic module's own parameters: captured, unread (zero), or its vmap."""
        watch, slots = self._watch, self._owned[use.module]
        if use.failure is not None:  # its vmap cannot run: only captures can stand
            failed.update(i for i in slots.values() if i in watch.module_vmap or i not in captured)
            return []
        for i in slots.values():
            if i not in watch.touched:  # no operation read it: its gradient is zero
                parts.setdefault(i, []).append(("rows", use, torch.zeros(
                    self._n, self._slots[i][2], dtype=self.provider.dtype,
                    device=self.provider.device)))
        # a parameter also captured takes the whole-model vmap (the module's would count the
        # captured uses inside it twice)
        vmapped = {a: i for a, i in slots.items() if i in watch.module_vmap and i not in captured}
        if not vmapped:
            return []
        grads = self._module_vmap(index, use, vmapped)
        for attr, slot in vmapped.items():
            parts.setdefault(slot, []).append(("rows", use, grads[attr]))
        names = ", ".join(self._slots[i][0] for i in vmapped.values())
        return [f"{type(use.module).__name__} ({names}): per-module vmap"]

    def _slot_block(self, slot: int, parts: list[tuple[str, _Use | None, Any]]) -> Any:
        _, offset, _, shape = self._slots[slot]
        factorable = all(a == "weight" and u.kind in ("linear", "conv2d", "embedding")
                         for a, u, _ in parts)
        if factorable and len({u.kind == "embedding" for _, u, _ in parts}) == 1:
            block = FactorBlock(offset, tuple(shape), torch.cat([u.x for _, u, _ in parts], 1),
                                torch.cat([b for _, _, b in parts], 1))
            n, t, d_out = block.b.shape
            vocab = shape[0] if block.embedding else None
            d_in = 1 if block.embedding else block.x.shape[2]
            if self.route == "ghost" or (
                self.route == "auto" and ghost_is_cheaper(n, t, d_in, d_out, vocab)
            ):
                return block
        total = None
        for attr, use, b in parts:
            piece = self._materialise(attr, use, b, offset, tuple(shape))
            total = piece if total is None else total + piece
        return total

    def _materialise(self, attr: str, use: _Use | None, b: Any, offset: int, shape: tuple) -> Any:
        if attr == "rows":
            return b
        if attr == "bias":
            return b.sum(dim=1)
        if use.kind == "norm":
            return (b * use.x).sum(dim=1)
        return FactorBlock(offset, shape, use.x, b).materialise()

    def _module_vmap(
        self, index: int, use: _Use, wanted: dict[str, int],
    ) -> dict[str, torch.Tensor]:
        """Per-sample gradients of some of a module's own parameters (``wanted``: attr -> slot).

        vmap over the call's captured inputs; its other parameters enter as constants.
        """
        g = self._grads.get(index)
        arg_pairs, kw_pairs = use.x
        args, arg_dims = tuple(v for v, _ in arg_pairs), tuple(d for _, d in arg_pairs)
        kwargs, kw_dims = {k: v for k, (v, _) in kw_pairs.items()}, {
            k: d for k, (_, d) in kw_pairs.items()}
        own = self._owned[use.module]
        values = self.provider.unflatten(self._theta.detach())
        params = {attr: values[self._slots[slot][0]] for attr, slot in wanted.items()}
        fixed = {attr: values[self._slots[slot][0]] for attr, slot in own.items()
                 if attr not in wanted}
        if g is None:
            return {a: torch.zeros(self._n, p.numel(), dtype=p.dtype, device=p.device)
                    for a, p in params.items()}

        def one(p: dict, a: tuple, kw: dict, b: torch.Tensor) -> dict:
            a = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(a, arg_dims, strict=True))
            kw = {k: v.unsqueeze(0) if kw_dims[k] == 0 else v for k, v in kw.items()}
            _, pull = func_vjp(lambda q: functional_call(use.module, {**fixed, **q}, a, kw), p)
            return pull(b.unsqueeze(0))[0]

        with self.provider.eval_mode():
            out = vmap(one, in_dims=(None, arg_dims, kw_dims, 0))(params, args, kwargs, g)
        return {a: t.reshape(self._n, -1).detach() for a, t in out.items()}
