r"""One forward and one backward pass with module hooks -> :class:`backends.ghost.GhostRows`.

:class:`LayerPass` runs the model once (eval mode, through the provider's functional call at
theta) with a forward hook on every module that holds a trainable parameter of its own, and
then one ordinary backward pass per set of cotangents (e.g. R dl_n/dz_n, or SF's sampled
labels) that reuses that forward. The hooks keep each call's input and, through a hook on its
output, the per-sample output gradient. Per parameter:

=====================================  ===================================================
module (exact type, not subclasses)    per-sample gradient
=====================================  ===================================================
``nn.Linear`` (peft LoRA's A and B)    weight: factors (ghost) or b^T a (materialised), by
``nn.Conv2d`` (groups=1, via unfold)   :func:`backends.ghost.ghost_is_cheaper`; bias:
                                       sum_t b_nt (materialised)
``nn.Embedding`` (prompt tuning too)   weight: factors (indices, b) or scattered rows
``nn.LayerNorm``, ``nn.RMSNorm``       sum_t b_nt * xhat_nt, sum_t b_nt (materialised)
any other module                       ``torch.func.vmap`` of that module alone on its
                                       captured inputs (materialised, reported)
=====================================  ===================================================

A weight used several times (tied) concatenates its uses along t (mixed kinds are
materialised and summed). The backward pass asks autograd only for the hooked modules'
output gradients b (``torch.autograd.grad`` with those outputs as inputs), so no weight
gradient is ever formed: the weight-gradient work of an ordinary backward pass is replaced by
the Gram matrix and by G^T c. A parameter that no hook can account for falls back to ``vmap``
over the whole model for that parameter only: one used outside its own module's forward
(watched during the forward pass by a ``TorchFunctionMode`` that sees every torch operation
on the parameter tensors), one whose module's output is changed in place afterwards, or one
of a call without the batch axis. The same watch marks the tensors the forward pass computes
from no input and no parameter (``torch.arange`` and what follows from it): a call on such a
tensor is not per sample even when its leading axis happens to have length N (T5's relative
position bias on a (6, 6) table for a batch of 6). Every fallback is listed in
:attr:`GhostRows.fallbacks`. Hooks that a user registered stay in place; ours run first (so
they see the module's own output) and are removed after the forward pass, also on error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.func import vjp as func_vjp
from torch.overrides import TorchFunctionMode

from backends.ghost import DenseBlock, FactorBlock, GhostRows, ghost_is_cheaper

if TYPE_CHECKING:  # the provider imports this module
    from backends.torch_provider import TorchProvider

__all__ = ["ROUTES", "LayerPass"]

#: per-layer choice: cost model, ghost wherever possible, materialised everywhere
ROUTES = ("auto", "ghost", "materialise")


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


#: tensor methods and properties that read metadata only (not a use of the values)
_METADATA = frozenset({
    "size", "dim", "numel", "is_floating_point", "element_size", "stride", "is_contiguous",
    "data_ptr", "__len__", "type", "is_complex", "get_device", "__repr__", "__format__",
    "__hash__", "requires_grad_", "shape", "dtype", "device", "requires_grad", "is_leaf",
    "ndim", "layout", "is_cuda", "grad_fn", "_version", "is_sparse", "is_quantized",
    "is_meta", "itemsize", "nbytes", "names", "grad", "_base", "is_nested", "output_nr",
})


def _operation(func: Any) -> str:
    """The name of a torch function, or of the property a ``__get__`` reads."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _UseWatch(TorchFunctionMode):
    """Watches every torch operation of the forward pass for two things.

    A parameter used outside the innermost running hooked module (-> ``outside``), and the
    output of a hooked call made for one sample and then repeated over the batch (peft's
    prompt tuning: ``prompt_encoder(tokens[:1]).repeat(N, 1, 1)``): the repeated tensor
    becomes that call's output, so its gradient is per sample. Any other use of the
    one-sample output makes the call fail (-> the vmap fallback).
    """

    def __init__(self, watched: dict[int, int], num_samples: int) -> None:
        super().__init__()
        self.watched = watched  # id(parameter tensor as the modules see it) -> slot
        self.stack: list[frozenset[int]] = []  # ids each running hooked module may use
        self.outside: set[int] = set()
        self.n = num_samples
        #: id(one-sample output) -> (its use, the call's positional args, the output itself,
        #: held so that its id stays its own during the forward pass)
        self.single: dict[int, tuple[_Use, tuple, torch.Tensor]] = {}
        self.done: set[int] = set()  # ids of the one-sample outputs already repeated
        self.repeated: list[tuple[_Use, tuple, torch.Tensor]] = []
        #: tensors computed in the forward pass from no input and no parameter (torch.arange
        #: and what follows from it, such as T5's relative positions): their leading axis is
        #: not the samples even when its length happens to be N
        self.constant: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        result = self._dispatch(func, args, kwargs)
        flat = [*args, *kwargs.values()]
        flat += [b for a in flat if type(a) in (list, tuple) for b in a]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        if not all(id(t) in self.constant for t in tensors):
            name = _operation(func)
            if tensors and ((name.endswith("_") and not name.startswith("__"))
                            or name in ("__setitem__", "__iadd__", "__imul__", "__isub__")):
                self.constant.pop(id(tensors[0]), None)  # written in place from the batch
            return result
        if not (
            # expanding a constant over the batch makes it per sample by intent
            _operation(func) in ("expand", "repeat", "expand_as", "broadcast_to")
            and tensors and tensors[0].ndim and tensors[0].shape[0] == 1
            and isinstance(result, torch.Tensor) and result.ndim and result.shape[0] == self.n
        ):
            for out in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(out, torch.Tensor):
                    self.constant[id(out)] = out
        return result

    def _dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        # runs for every torch operation of the forward pass: the common case (no parameter
        # among the arguments) is decided by C-level set operations
        ids = self.watched.keys()
        flat = (*args, *kwargs.values())
        if ids.isdisjoint(map(id, flat)) and not any(type(a) in (list, tuple) for a in flat):
            if not self.single or self.single.keys().isdisjoint(map(id, flat)):
                return func(*args, **kwargs)
            return self._single_use(func, args, kwargs)
        watched = self.watched
        hits = [a for a in flat if id(a) in watched]
        for a in flat:
            if type(a) in (list, tuple):
                hits += [b for b in a if id(b) in watched]
        if hits and _operation(func) not in _METADATA:
            allowed = self.stack[-1] if self.stack else frozenset()
            self.outside.update(watched[id(a)] for a in hits if id(a) not in allowed)
        return func(*args, **kwargs)

    def _single_use(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """An operation on a one-sample output: its repeat over the batch, or a failure."""
        result = func(*args, **kwargs)
        name = _operation(func)
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


class LayerPass:
    r"""The forward pass of a batch with hooks, ready for backward passes -> GhostRows.

    Parameters
    ----------
    provider : backends.TorchProvider
        Supplies the model, the batch, theta (P,) and eval mode.
    route : {"auto", "ghost", "materialise"}
        Per weight: the cheaper by :func:`backends.ghost.ghost_is_cheaper`, factors
        wherever the layer kind allows, or materialised per-layer rows everywhere.

    Attributes
    ----------
    logits : torch.Tensor, (N, C)
        Detached logits of the forward pass.
    """

    def __init__(self, provider: TorchProvider, route: str = "auto") -> None:
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        self.provider = provider
        self.route = route
        self._n = provider.num_samples
        sizes = [int(math.prod(s)) for s in provider._shapes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self._slots = list(zip(provider.param_names, offsets, sizes, provider._shapes, strict=True))
        by_id = {id(p): i for i, (_, p) in enumerate(
            (name, p) for name, p in provider.model.named_parameters() if p.requires_grad
        )}
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
        theta = p._theta.detach().requires_grad_(True)
        params = p.unflatten(theta)
        index = {name: i for i, (name, *_) in enumerate(self._slots)}
        self._watch = _UseWatch({id(t): index[name] for name, t in params.items()}, self._n)
        handles = []
        try:
            for m in self._owned:
                handles.append(m.register_forward_pre_hook(self._enter, prepend=True))
                handles.append(
                    m.register_forward_hook(self._hook, with_kwargs=True, prepend=True)
                )
            with p._eval_mode(), torch.enable_grad(), self._watch:
                z = p._batch_logits(theta, p._batch(slice(None)), params)
        finally:
            for h in handles:
                h.remove()
        self._watch.constant.clear()  # only the forward pass's hooks needed them
        for use, args, out in self._watch.repeated:  # one-sample calls repeated over the batch
            if use.failure.endswith("without the batch axis"):  # and not used otherwise
                expanded = args[0].detach().expand(self._n, *args[0].shape[1:])
                use.x = self._features(use.module, use.kind, (expanded,), {})
                use.output, use.version, use.failure = out, out._version, None
        self._watch.single.clear()
        return z, theta

    def _enter(self, module: nn.Module, args: tuple) -> None:
        own = frozenset(id(module._parameters[a]) for a in self._owned[module])
        self._watch.stack.append(own)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._watch.stack:
            self._watch.stack.pop()
        use = _Use(module, _kind(module))
        self._uses.append(use)
        if not isinstance(output, torch.Tensor) or not output.requires_grad:
            use.failure = f"{type(module).__name__} returned no differentiable tensor"
            return
        first = args[0] if args else None
        batched = isinstance(first, torch.Tensor) and first.ndim >= 1 and (
            first.shape[0] == self._n and id(first) not in self._watch.constant
        )
        if use.kind != "generic" and not batched:
            use.failure = f"{type(module).__name__} got an input without the batch axis"
            if use.kind in ("linear", "embedding") and first is not None and first.ndim >= 1 \
                    and first.shape[0] == 1 and output.ndim and output.shape[0] == 1:
                self._watch.single[id(output)] = (use, args, output)  # repeated later?
            return
        if output.ndim == 0 or output.shape[0] != self._n:
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
            per_sample = v.ndim and v.shape[0] == n and id(v) not in self._watch.constant
            return 0 if per_sample else None

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
        live = [
            (i, u) for i, u in enumerate(self._uses)
            if u.failure is None and u.output._version == u.version
        ]
        for u in self._uses:
            if u.failure is None and u.output._version != u.version:
                u.failure = f"{type(u.module).__name__}'s output was changed in place"
        # only the hooked outputs' gradients: autograd forms no weight gradient at all
        found = torch.autograd.grad(
            self._z, [u.output for _, u in live], grad_outputs=cotangents,
            retain_graph=keep_graph, allow_unused=True,
        ) if live else []
        if not keep_graph:
            self._z = None
        self._grads = {i: g for (i, _), g in zip(live, found, strict=True) if g is not None}
        factors, dense, failed, notes = self._blocks()
        failed |= self._watch.outside
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
            return "used outside its own module's forward"
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

    def _blocks(self) -> tuple[list[FactorBlock], dict[int, torch.Tensor], set[int], list[str]]:
        """Factor blocks, materialised rows per slot, failed slots, fallback notes."""
        parts: dict[int, list[tuple[str, _Use, Any]]] = {}
        failed: set[int] = set()
        notes: list[str] = []
        for index, use in enumerate(self._uses):
            slots = self._owned[use.module]
            if use.failure is not None:
                failed.update(slots.values())
                continue
            if use.kind == "generic":
                names = ", ".join(self._slots[i][0] for i in slots.values())
                notes.append(f"{type(use.module).__name__} ({names}): per-module vmap")
                grads = self._module_vmap(index, use)
                for attr, slot in slots.items():
                    parts.setdefault(slot, []).append(("rows", use, grads[attr]))
                continue
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

    def _slot_block(self, slot: int, parts: list[tuple[str, _Use, Any]]) -> Any:
        _, offset, _, shape = self._slots[slot]
        factorable = all(a == "weight" and u.kind in ("linear", "conv2d", "embedding")
                         for a, u, _ in parts)
        families = {u.kind == "embedding" for _, u, _ in parts}
        if factorable and len(families) == 1:
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

    def _materialise(self, attr: str, use: _Use, b: Any, offset: int, shape: tuple) -> Any:
        if attr == "rows":
            return b
        if attr == "bias":
            return b.sum(dim=1)
        if use.kind == "norm":
            return (b * use.x).sum(dim=1)
        return FactorBlock(offset, shape, use.x, b).materialise()

    def _module_vmap(self, index: int, use: _Use) -> dict[str, torch.Tensor]:
        """Per-sample gradients of one module's own parameters: vmap over its captured inputs."""
        g = self._grads.get(index)
        arg_pairs, kw_pairs = use.x
        args, arg_dims = tuple(v for v, _ in arg_pairs), tuple(d for _, d in arg_pairs)
        kwargs, kw_dims = {k: v for k, (v, _) in kw_pairs.items()}, {
            k: d for k, (_, d) in kw_pairs.items()}
        own = self._owned[use.module]
        values = self.provider.unflatten(self._theta.detach())
        params = {attr: values[self._slots[slot][0]] for attr, slot in own.items()}
        if g is None:
            return {a: torch.zeros(self._n, p.numel(), dtype=p.dtype, device=p.device)
                    for a, p in params.items()}

        def one(p: dict, a: tuple, kw: dict, b: torch.Tensor) -> dict:
            a = tuple(v.unsqueeze(0) if d == 0 else v for v, d in zip(a, arg_dims, strict=True))
            kw = {k: v.unsqueeze(0) if kw_dims[k] == 0 else v for k, v in kw.items()}
            _, pull = func_vjp(lambda q: functional_call(use.module, q, a, kw), p)
            return pull(b.unsqueeze(0))[0]

        with self.provider._eval_mode():
            out = vmap(one, in_dims=(None, arg_dims, kw_dims, 0))(params, args, kwargs, g)
        return {a: t.reshape(self._n, -1).detach() for a, t in out.items()}
