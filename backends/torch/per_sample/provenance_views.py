r"""Batch-axis provenance rules of views, reshapes and axis permutations.

The states and the shared rule helpers are :mod:`backends.torch.per_sample.provenance_rules`;
:data:`VIEW_RULES` joins the other rule tables in :mod:`backends.torch.per_sample.provenance`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..axes import BatchAxis
from .provenance_rules import (
    SAMPLE_FREE,
    Context,
    Provenance,
    Rule,
    along,
    arg,
    coupled,
    dim_of,
    moved,
    shifted,
)

__all__ = ["RESHAPES", "VIEW_RULES", "reshape_axis"]

#: operations that keep the entries' row-major order
RESHAPES = ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze",
            "unsqueeze", "ravel", "atleast_1d", "atleast_2d", "atleast_3d")


def reshape_axis(
    shape_in: Sequence[int], where: BatchAxis, num_samples: int, shape_out: Sequence[int],
) -> BatchAxis | None:
    r"""The batch axis after a row-major reshape of ``shape_in`` to ``shape_out``, or None.

    Entry f of the flattened tensor belongs to sample :math:`(f / I) \bmod N` with
    :math:`I = \mathrm{inner} \cdot \prod_{j > k} s_j`. Output axis j holds the samples iff
    :math:`B_j = \prod_{l > j} t_l` divides I and :math:`N I` divides :math:`t_j B_j`; then
    inner is :math:`I / B_j` and outer :math:`t_j B_j / (N I)`. For N > 1 at most one axis
    qualifies; for N == 1 every layout is one sample's, and the first qualifying axis is taken.
    """
    if tuple(shape_in) == tuple(shape_out):
        return where
    if 0 in shape_out or math.prod(shape_in) != math.prod(shape_out):
        return None
    run = where.inner * math.prod(shape_in[where.axis + 1:])
    period = num_samples * run
    found, behind = None, 1
    for j in reversed(range(len(shape_out))):
        size = shape_out[j]
        if run % behind == 0 and (size * behind) % period == 0:
            found = BatchAxis(j, size * behind // period, run // behind)
        behind *= size
    return found


def reshape(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """Any operation that keeps the row-major order of the entries (view, flatten, squeeze)."""
    x, s = args[0], ctx.state(args[0])
    if type(s) is not BatchAxis:
        return s
    if isinstance(arg(args, kwargs, 1, "dtype"), torch.dtype):  # view(dtype): last axis rescaled
        return along(ctx, x, [-1], "reinterprets the bits of")
    found = reshape_axis(x.shape, s, ctx.num_samples, result.shape)
    if found is None:
        return coupled(ctx, f"{tuple(x.shape)} -> {tuple(result.shape)} splits the samples "
                            f"of axis {s.axis} across axes")
    return found


def _permuted(ctx: Context, x: torch.Tensor, order: Sequence[int]) -> Provenance:
    """x's layout after its axes are put in ``order`` (order[j]: the input axis of output j)."""
    s = ctx.state(x)
    if type(s) is not BatchAxis:
        return s
    return moved(s, [dim_of(d, x.ndim) for d in order].index(s.axis))


def transpose(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``transpose``/``swapaxes``/``swapdims``, ``t`` and the ``T``, ``mT``, ``H``, ``mH`` views."""
    x = args[0]
    order = list(range(x.ndim))
    if ctx.name in ("T", "H", "numpy_T"):
        order.reverse()
    else:
        if ctx.name in ("mT", "mH", "adjoint"):
            a, b = -2, -1
        elif ctx.name in ("t", "t_"):
            a, b = 0, (1 if x.ndim == 2 else 0)
        else:
            a, b = arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1")
        a, b = dim_of(a, x.ndim), dim_of(b, x.ndim)
        order[a], order[b] = order[b], order[a]
    return _permuted(ctx, x, order)


def permute(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``permute(*dims)`` and ``permute(dims)``."""
    dims = args[1:] if len(args) > 2 or isinstance(arg(args, kwargs, 1, "dims"), int) else (
        arg(args, kwargs, 1, "dims"))
    return _permuted(ctx, args[0], dims)


def movedim(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``movedim``/``moveaxis``: source axes to destination positions, the rest in order."""
    x = args[0]
    src, dst = arg(args, kwargs, 1, "source"), arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [dim_of(d, x.ndim) for d in src]
    order: list[int | None] = [None] * x.ndim
    for a, b in zip(src, dst, strict=True):
        order[dim_of(b, x.ndim)] = a
    rest = iter(d for d in range(x.ndim) if d not in src)
    return _permuted(ctx, x, [next(rest) if d is None else d for d in order])


def expand(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``expand``/``expand_as``/``broadcast_to``: new axes in front, size-1 axes broadcast."""
    return shifted(ctx.state(args[0]), result.ndim - args[0].ndim)


def repeat(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    r"""``repeat``/``tile``: copies of x side by side; along the batch axis they are more outer
    parts (index i of r copies belongs to sample :math:`\lfloor i / inner \rfloor \bmod N`)."""
    x, s = args[0], ctx.state(args[0])
    if type(s) is not BatchAxis:
        return s
    lead = result.ndim - x.ndim
    k = s.axis + lead
    copies = result.shape[k] // x.shape[s.axis]
    return BatchAxis(k, s.outer * copies, s.inner)


def repeat_interleave(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """Each entry repeated r times along ``dim``: along the batch axis, inner grows r-fold."""
    x, s = args[0], ctx.state(args[0])
    r, d = arg(args, kwargs, 1, "repeats"), arg(args, kwargs, 2, "dim")
    if isinstance(r, torch.Tensor) and ctx.state(r) is not SAMPLE_FREE:
        return coupled(ctx, "repeat counts that depend on the batch")
    if type(s) is not BatchAxis:
        return s
    if d is None:
        return coupled(ctx, "flattens the samples' axes")
    if dim_of(d, x.ndim) != s.axis:
        return s
    if isinstance(r, torch.Tensor) and r.numel() != 1:
        return coupled(ctx, "a different number of copies of each entry along the batch axis")
    return BatchAxis(s.axis, s.outer, s.inner * int(r))


def flip(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``flip``/``roll``/``rot90``/``fliplr``/``flipud``: entries move along the given axes."""
    x = args[0]
    if ctx.name == "fliplr":
        dims: Any = [1]
    elif ctx.name == "flipud":
        dims = [0]
    elif ctx.name == "rot90":
        dims = arg(args, kwargs, 2, "dims", [0, 1])
    else:
        dims = arg(args, kwargs, 2 if ctx.name == "roll" else 1, "dims")
    if dims is None:  # roll over the flattened tensor
        dims = range(x.ndim)
    dims = [dims] if isinstance(dims, int) else dims
    if ctx.name == "flip" and len(args) > 2:  # flip(*dims)
        dims = args[1:]
    return along(ctx, x, dims, "moves entries along")


def diagonal(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``diagonal(offset, dim1, dim2)``: the two axes become one, last."""
    x = args[0]
    d1 = dim_of(arg(args, kwargs, 2, "dim1", 0), x.ndim)
    d2 = dim_of(arg(args, kwargs, 3, "dim2", 1), x.ndim)
    s = along(ctx, x, [d1, d2], "takes the diagonal of")
    if type(s) is not BatchAxis:
        return s
    return moved(s, [d for d in range(x.ndim) if d not in (d1, d2)].index(s.axis))


#: name -> rule, as a TorchFunctionMode names the operations
VIEW_RULES: dict[str, Rule] = {
    **dict.fromkeys(RESHAPES, reshape),
    **dict.fromkeys(("transpose", "swapaxes", "swapdims", "t", "T", "mT", "H", "mH", "adjoint"),
                    transpose),
    "permute": permute,
    **dict.fromkeys(("movedim", "moveaxis"), movedim),
    **dict.fromkeys(("expand", "expand_as", "broadcast_to"), expand),
    **dict.fromkeys(("repeat", "tile"), repeat),
    "repeat_interleave": repeat_interleave,
    **dict.fromkeys(("flip", "fliplr", "flipud", "roll", "rot90"), flip),
    "diagonal": diagonal,
}
