r"""Provenance rules of indexing, joining, splitting and padding.

Along the batch axis only whole periods of samples may be taken: a window of the axis, with
step 1, that starts and ends at multiples of :math:`N \cdot \mathrm{inner}`, keeps the map
:math:`n(i) = \lfloor i / \mathrm{inner} \rfloor \bmod N` (with fewer outer parts). Anything
else that picks, moves or mixes entries along the batch axis is refused. An index tensor that
carries samples may index a sample-free tensor (an embedding table looked up at the tokens): the
result carries the samples where the index's axes land.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..axes import BatchAxis
from .provenance_rules import (
    SAMPLE_FREE,
    Context,
    NotPerSample,
    Provenance,
    along,
    arg,
    coupled,
    dim_of,
    join,
    shifted,
)

__all__ = ["INDEXING_RULES", "index_layout", "window"]


def window(
    ctx: Context, s: BatchAxis, axis: int, length: int, start: int, stop: int, step: int = 1,
) -> Provenance:
    """The batch axis ``s`` (of ``length``) cut to ``range(start, stop, step)``, at ``axis``."""
    period = ctx.num_samples * s.inner
    if (start, stop, step) == (0, length, 1):
        return BatchAxis(axis, s.outer, s.inner)
    if step == 1 and stop > start and start % period == 0 and (stop - start) % period == 0:
        return BatchAxis(axis, (stop - start) // period, s.inner)
    return coupled(ctx, f"takes entries {start}:{stop}:{step} of the batch axis {s.axis}, not "
                        "whole periods of the samples")


def _entries(index: Any, ndim: int) -> list[tuple] | None:
    """The index as ("dim", axis, slice), ("drop", axis), ("new",) or ("adv", tensor, axes,
    whether it was a list: a constant)."""
    items = list(index) if isinstance(index, tuple) else [index]
    width = 0
    for e in items:
        if isinstance(e, list):
            if not all(isinstance(v, int) for v in e):
                return None  # torch reads a list of slices or tensors as a tuple
            e = torch.as_tensor(e)
        if isinstance(e, torch.Tensor):
            width += e.ndim if e.dtype == torch.bool else 1
        elif not (e is None or e is Ellipsis or isinstance(e, bool)):
            width += 1
    if sum(e is Ellipsis for e in items) > 1 or width > ndim:
        return None
    out: list[tuple] = []
    d = 0
    for e in items:
        if e is Ellipsis:
            out += [("dim", d + j, slice(None)) for j in range(ndim - width)]
            d += ndim - width
        elif e is None or e is True:
            out.append(("new",))
        elif isinstance(e, slice):
            out.append(("dim", d, e))
            d += 1
        elif isinstance(e, (list, torch.Tensor)):
            t = torch.as_tensor(e) if isinstance(e, list) else e
            if t.dtype == torch.bool and t.ndim == 0:
                return None
            w = t.ndim if t.dtype == torch.bool else 1
            out.append(("adv", t, tuple(range(d, d + w)), isinstance(e, list)))
            d += w
        elif e is not False and hasattr(e, "__index__"):
            out.append(("drop", d))
            d += 1
        else:
            return None
    return out + [("dim", j, slice(None)) for j in range(d, ndim)]


def index_layout(shape: torch.Size, entries: list[tuple]) -> tuple[list[tuple], list[int | None]]:
    """Where each axis of ``x[index]`` comes from, and its length (None: a mask's count).

    Axes: ("dim", axis of x, slice), ("new",), ("adv", axis of the broadcast index shape).
    As in torch, integers select first; the advanced (tensor) indices' axes replace them in
    place when they are adjacent, else go in front.
    """
    post = [e for e in entries if e[0] != "drop"]
    where = [i for i, e in enumerate(post) if e[0] == "adv"]
    sizes_adv: list[int | None] = []
    if not where:
        axes = post
    else:
        shapes = [(None,) if e[1].dtype == torch.bool else tuple(e[1].shape)
                  for e in post if e[0] == "adv"]
        width = max(len(s) for s in shapes)
        block = [("adv", j) for j in range(width)]
        if where == list(range(where[0], where[-1] + 1)):
            axes = post[:where[0]] + block + post[where[-1] + 1:]
        else:
            axes = block + [e for e in post if e[0] != "adv"]
        padded = [(1,) * (width - len(s)) + s for s in shapes]
        sizes_adv = [max((s[j] for s in padded if s[j] is not None), default=None)
                     if all(s[j] is not None for s in padded) else None for j in range(width)]
    sizes: list[int | None] = []
    for e in axes:
        if e[0] == "dim":
            sizes.append(len(range(*e[2].indices(shape[e[1]]))))
        else:
            sizes.append(1 if e[0] == "new" else sizes_adv[e[1]])
    return axes, sizes


def _layout_of(ctx: Context, x: torch.Tensor, index: Any, shape: torch.Size | None):
    """(entries, axes) of x[index], or a refusal when the rules do not follow the index."""
    bounds = [b for e in (index if isinstance(index, tuple) else (index,)) if isinstance(e, slice)
              for b in (e.start, e.stop, e.step) if isinstance(b, torch.Tensor)]
    if any(ctx.state(b) is not SAMPLE_FREE for b in bounds):
        return coupled(ctx, "a slice whose bounds were computed from the batch")
    entries = _entries(index, x.ndim)
    if entries is not None:
        axes, sizes = index_layout(x.shape, entries)
        if shape is None or (len(axes) == len(shape) and all(
                a is None or a == b for a, b in zip(sizes, shape, strict=True))):
            return entries, axes
    return coupled(ctx, f"an index the rules do not follow ({type(index).__name__})")


def _index_state(ctx: Context, entry: tuple) -> Provenance:
    return SAMPLE_FREE if entry[3] else ctx.state(entry[1])


def _identity_axis(t: torch.Tensor, length: int) -> int | None:
    """The axis along which ``t`` holds 0, 1, .., length - 1 (its other axes of length 1)."""
    if t.dtype == torch.bool or t.numel() != length or t.ndim == 0:
        return None
    axes = [a for a, size in enumerate(t.shape) if size == length]
    if len(axes) != 1 or not bool((t.reshape(-1) == torch.arange(length, device=t.device)).all()):
        return None
    return axes[0]


def _x_claim(ctx: Context, x: torch.Tensor, s: BatchAxis, entries: list, axes: list) -> Provenance:
    """Where x's batch axis lands in x[index]. A sample-free index tensor holding 0 .. L - 1
    along one axis (``mask[torch.arange(N)[:, None], positions]``) takes the batch axis to
    that axis of the advanced block."""
    for e in entries:
        if e[0] == "drop" and e[1] == s.axis:
            return coupled(ctx, f"selects one index of the batch axis {s.axis}")
        if e[0] == "adv" and s.axis in e[2]:
            a = _identity_axis(e[1], x.shape[s.axis])
            if a is None or _index_state(ctx, e) is not SAMPLE_FREE:
                return coupled(ctx, f"indexes across the batch axis {s.axis}")
            width = sum(f[0] == "adv" for f in axes)
            start = next(i for i, f in enumerate(axes) if f[0] == "adv")
            return BatchAxis(start + width - e[1].ndim + a, s.outer, s.inner)
    p = next(i for i, e in enumerate(axes) if e[0] == "dim" and e[1] == s.axis)
    return window(ctx, s, p, x.shape[s.axis], *axes[p][2].indices(x.shape[s.axis]))


def getitem(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``x[index]``: basic and advanced indexing (module docs)."""
    x, index = args[0], args[1]
    found = _layout_of(ctx, x, index, result.shape)
    if type(found) is NotPerSample:
        return found
    entries, axes = found
    s = ctx.state(x)
    claims = [_x_claim(ctx, x, s, entries, axes) if type(s) is BatchAxis else s]
    start = next((i for i, e in enumerate(axes) if e[0] == "adv"), 0)
    width = sum(e[0] == "adv" for e in axes)
    for e in entries:
        if e[0] != "adv" or (st := _index_state(ctx, e)) is SAMPLE_FREE:
            continue
        if type(st) is BatchAxis and e[1].dtype == torch.bool:
            st = coupled(ctx, "a mask that depends on the batch selects a data-dependent count")
        claims.append(shifted(st, start + width - e[1].ndim))
    return join(ctx, claims)


def setitem(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``x[index] = value``: the new state of x (the value's samples must fill whole axes of x)."""
    x, index, value = args[0], args[1], args[2]
    found = _layout_of(ctx, x, index, None)
    if type(found) is NotPerSample:
        return found
    entries, axes = found
    claims = [ctx.state(x)]
    sv = ctx.state(value)
    if type(sv) is BatchAxis:
        e = axes[sv.axis + len(axes) - value.ndim]
        if e[0] != "dim" or e[2].indices(x.shape[e[1]]) != (0, x.shape[e[1]], 1):
            return coupled(ctx, "writes a value's samples into part of an axis")
        sv = BatchAxis(e[1], sv.outer, sv.inner)
    claims.append(sv)
    for e in entries:
        if e[0] != "adv" or (st := _index_state(ctx, e)) is SAMPLE_FREE:
            continue
        if type(st) is BatchAxis and e[1].dtype == torch.bool:  # masked_fill by another name
            st = BatchAxis(e[2][st.axis], st.outer, st.inner)
        elif type(st) is BatchAxis:
            st = coupled(ctx, "writes at positions that depend on the batch")
        claims.append(st)
    return join(ctx, claims)


def select(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``select(dim, index)``: one index of an axis, which goes away."""
    x = args[0]
    d = dim_of(arg(args, kwargs, 1, "dim"), x.ndim)
    s = along(ctx, x, [d], "selects one index of")
    return shifted(s, -1) if type(s) is BatchAxis and s.axis > d else s


def narrow(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``narrow(dim, start, length)``: a window of one axis."""
    x, s = args[0], ctx.state(args[0])
    d = dim_of(arg(args, kwargs, 1, "dim"), x.ndim)
    if type(s) is not BatchAxis or s.axis != d:
        return s
    start = operator.index(arg(args, kwargs, 2, "start")) % max(x.shape[d], 1)
    return window(ctx, s, d, x.shape[d], start, start + result.shape[d])


def index_select(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``index_select(dim, index)``: entries of one axis picked by a 1-d index."""
    x, index = args[0], arg(args, kwargs, 2, "index")
    d = dim_of(arg(args, kwargs, 1, "dim"), x.ndim)
    return join(ctx, [along(ctx, x, [d], "picks entries along"), shifted(ctx.state(index), d)])


def gather(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``gather(dim, index)``: out[.., j, ..] = x[.., index[.., j, ..], ..] along ``dim``."""
    x, index = args[0], arg(args, kwargs, 2, "index")
    d = dim_of(arg(args, kwargs, 1, "dim"), x.ndim)
    s = along(ctx, x, [d], "picks entries along")
    if type(s) is BatchAxis and index.shape[s.axis] != x.shape[s.axis]:
        s = coupled(ctx, f"keeps part of the batch axis {s.axis}")
    return join(ctx, [s, ctx.state(index)])


def cat(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``cat(tensors, dim)``; along the batch axis, parts of whole sample periods add up."""
    nd = result.ndim
    d = dim_of(arg(args, kwargs, 1, "dim", 0), nd)
    parts = [t for t in arg(args, kwargs, 0, "tensors") if t.ndim == nd]  # legacy: empty 1-d
    states = [ctx.state(t) for t in parts]
    on = [s for s in states if type(s) is BatchAxis and s.axis == d]
    if not on:
        return join(ctx, states)
    inner, outer = on[0].inner, 0
    for t, s in zip(parts, states, strict=True):
        if type(s) is NotPerSample:
            return s
        if type(s) is BatchAxis and s.axis == d and s.inner == inner:
            outer += s.outer
        elif s is SAMPLE_FREE and t.shape[d] % (ctx.num_samples * inner) == 0:
            outer += t.shape[d] // (ctx.num_samples * inner)
        else:
            return coupled(ctx, f"joins parts along the batch axis {d} that are not whole "
                                "periods of the samples")
    return BatchAxis(d, outer, inner)


def stack(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``stack(tensors, dim)``: a new axis at ``dim``."""
    d = dim_of(arg(args, kwargs, 1, "dim", 0), result.ndim)
    return join(ctx, (shifted(s, 1) if type(s) is BatchAxis and s.axis >= d else s
                      for s in map(ctx.state, arg(args, kwargs, 0, "tensors"))))


def split(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Any:
    """``split``/``chunk``/``tensor_split``/``split_with_sizes``/``unbind``: one state per piece."""
    x, s = args[0], ctx.state(args[0])
    d = dim_of(arg(args, kwargs, 1 if ctx.name == "unbind" else 2, "dim", 0), x.ndim)
    if type(s) is not BatchAxis or s.axis != d:
        return shifted(s, -1) if ctx.name == "unbind" and type(s) is BatchAxis and s.axis > d \
            else s
    if ctx.name == "unbind":
        return coupled(ctx, f"separates the entries of the batch axis {d}")
    states, start = [], 0
    for piece in result:
        states.append(window(ctx, s, d, x.shape[d], start, start + piece.shape[d]))
        start += piece.shape[d]
    return tuple(states)


def pad(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``F.pad``/``constant_pad_nd``: pairs of widths from the last axis backwards."""
    x, widths = args[0], arg(args, kwargs, 1, "pad")
    dims = [x.ndim - 1 - j for j in range(len(widths) // 2) if widths[2 * j] or widths[2 * j + 1]]
    return along(ctx, x, dims, "pads")


#: name -> rule, as a TorchFunctionMode names the operations
INDEXING_RULES = {
    "__getitem__": getitem,
    "__setitem__": setitem,
    "select": select,
    "narrow": narrow,
    "index_select": index_select,
    "gather": gather,
    **dict.fromkeys(("cat", "concat", "concatenate"), cat),
    "stack": stack,
    **dict.fromkeys(("split", "chunk", "tensor_split", "split_with_sizes", "unbind"), split),
    **dict.fromkeys(("pad", "constant_pad_nd"), pad),
}
