r"""Provenance rules of contractions and layers: matmul, einsum, linear, convolutions, pooling,
norms, embeddings, attention, recurrent layers and losses.

A layer keeps the samples where it treats the entries of an axis independently (the leading
axes of a linear map, the batch axis of a convolution, the axes a norm does not normalise
over) and couples them where it contracts, normalises or attends over the batch axis. Its
weights must be sample free: a weight computed from the batch (a hypernetwork) meets every
sample, and is refused. Modules with running statistics in training mode normalise with the
batch's statistics: coupled, and their running buffers are marked as written from the batch.
"""

from __future__ import annotations

from typing import Any

import torch

from ..axes import BatchAxis
from .provenance_rules import (
    SAMPLE_FREE,
    Context,
    NotPerSample,
    Provenance,
    Rule,
    aligned,
    along,
    arg,
    coupled,
    first_keeps,
    join,
    moved,
    out_ndim,
    shifted,
    tensors,
)

__all__ = ["LAYER_RULES", "einsum_axes", "spatial"]


# ---- contractions -------------------------------------------------------------------------------
def _matmul(ctx: Context, a: torch.Tensor, b: torch.Tensor) -> Provenance:
    """a @ b with numpy's rules: 1-d operands get an axis that the result drops again."""
    na, nb = max(a.ndim, 2), max(b.ndim, 2)
    lead = max(na, nb) - 2  # the broadcast batch axes of the result
    claims = []
    sa, sb = ctx.state(a), ctx.state(b)
    if type(sa) is BatchAxis:
        k = sa.axis + (a.ndim == 1)  # a 1-d a is a row (1, K)
        if k == na - 1:
            return coupled(ctx, "contracts the batch axis of its first operand")
        claims.append(moved(sa, lead if k == na - 2 else k + lead - (na - 2)))
    else:
        claims.append(sa)
    if type(sb) is BatchAxis:
        if b.ndim == 1 or sb.axis == nb - 2:
            return coupled(ctx, "contracts the batch axis of its second operand")
        claims.append(moved(sb, lead + 1 if sb.axis == nb - 1 else sb.axis + lead - (nb - 2)))
    else:
        claims.append(sb)
    s = join(ctx, claims)
    if type(s) is BatchAxis and a.ndim == 1 and s.axis > lead:
        s = shifted(s, -1)  # the row axis of a 1-d a is dropped
    return s


def matmul(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``matmul``/``mm``/``bmm``/``mv``/``@``; ``__rmatmul__(a, b)`` is b @ a."""
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
    if b is None:
        b = arg(args, kwargs, 1, "mat2", kwargs.get("vec"))
    return _matmul(ctx, b, a) if ctx.name == "__rmatmul__" else _matmul(ctx, a, b)


def add_product(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``addmm``/``addmv``/``baddbmm``/``addr``: input + a @ b (or the outer product a b^T)."""
    x, a, b = args[0], args[1], args[2]
    product = outer(ctx, (a, b), {}, result) if ctx.name == "addr" else _matmul(ctx, a, b)
    return join(ctx, [shifted(ctx.state(x), result.ndim - x.ndim), product])


def outer(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``outer``/``ger``: out[i, j] = a[i] b[j]."""
    return join(ctx, [ctx.state(args[0]), shifted(ctx.state(args[1]), 1)])


def inner(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``inner``/``dot``/``vdot``: the last axes contracted, the others side by side."""
    a, b = args[0], args[1]
    return join(ctx, [along(ctx, a, [-1], "contracts"),
                      shifted(along(ctx, b, [-1], "contracts"), max(a.ndim - 1, 0))])


def einsum_axes(equation: str, ndims: list[int]) -> tuple[list[str], str]:
    """The subscripts of each operand and of the result, ``...`` spelled out as letters."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    used = set(equation)
    spare = [c for c in map(chr, range(0x3B1, 0x3B1 + 64)) if c not in used]
    width = max((n - len(t.replace("...", "")) for t, n in zip(terms, ndims, strict=True)
                 if "..." in t), default=0)
    dots = "".join(spare[:width])

    def spelled(t: str, n: int) -> str:
        return t.replace("...", dots[width - (n - len(t.replace("...", ""))):]) if "..." in t \
            else t

    terms = [spelled(t, n) for t, n in zip(terms, ndims, strict=True)]
    if not arrow:
        once = sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1
                      and c not in dots)
        rhs = dots + "".join(once)
    else:
        rhs = rhs.replace("...", dots)
    return terms, rhs


def einsum(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``einsum(equation, *operands)``: the batch letter must reach the result, undoubled."""
    equation, operands = args[0], args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    if not isinstance(equation, str):
        return coupled(ctx, "the sublist form of einsum")
    terms, rhs = einsum_axes(equation, [t.ndim for t in operands])
    claims = []
    for term, t in zip(terms, operands, strict=True):
        s = ctx.state(t)
        if type(s) is BatchAxis:
            letter = term[s.axis]
            if term.count(letter) > 1 or letter not in rhs:
                return coupled(ctx, f"{equation!r} sums over or takes a diagonal of the batch "
                                    f"axis {s.axis}")
            s = moved(s, rhs.index(letter))
        claims.append(s)
    return join(ctx, claims)


# ---- layers -------------------------------------------------------------------------------------
def linear(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``F.linear(input, weight, bias)``: input (..., in) -> (..., out)."""
    s = first_keeps(ctx, args, kwargs, result)
    return along(ctx, args[0], [-1], "contracts") if type(s) is BatchAxis else s


def bilinear(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``F.bilinear(input1 (..., in1), input2 (..., in2), weight, bias)`` -> (..., out): both
    inputs' last axes contracted with the weight, their leading axes side by side."""
    x1, x2 = arg(args, kwargs, 0, "input1"), arg(args, kwargs, 1, "input2")
    weights = [v for v in tensors((*args[2:], *kwargs.values())) if v is not x1 and v is not x2]
    if any(ctx.state(w) is not SAMPLE_FREE for w in weights):
        return coupled(ctx, "a weight carries samples")
    nd = out_ndim(result)
    return join(ctx, [shifted(along(ctx, x, [-1], "contracts"), nd - x.ndim) for x in (x1, x2)])


def spatial(dims: int | None, *, channels_mixed: bool = False) -> Rule:
    """An operation over the last ``dims`` axes (None: all but two), with the channel axis
    in front of them when ``channels_mixed`` (convolutions, unfold): the axes in front keep
    their places; the weights are sample free."""

    def rule(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
        x = args[0]
        mixed = (x.ndim - 2 if dims is None else dims) + channels_mixed
        s = first_keeps(ctx, args, kwargs, result)
        if type(s) is BatchAxis and s.axis >= x.ndim - mixed:
            return coupled(ctx, f"mixes the entries of the batch axis {s.axis}")
        return s

    return rule


def unfold(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``Tensor.unfold(dim, size, step)`` (windows, a new last axis) or ``F.unfold`` (patches)."""
    x = args[0]
    if result.ndim == x.ndim + 1:
        return along(ctx, x, [arg(args, kwargs, 1, "dimension")], "takes windows along")
    return spatial(2, channels_mixed=True)(ctx, args, kwargs, result)


def normalised(position: int, name: str, default: Any = None) -> Rule:
    """A norm over the last ``len(normalized_shape)`` axes (``layer_norm``, ``rms_norm``) or
    along one ``dim`` (``F.normalize``); the affine parameters sample free."""

    def rule(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
        x = args[0]
        given = arg(args, kwargs, position, name, default)
        if name == "normalized_shape":
            shape = [given] if isinstance(given, int) else given
            dims = range(x.ndim - len(shape), x.ndim)
        else:
            dims = [given]
        s = first_keeps(ctx, args, kwargs, result)
        return along(ctx, x, dims, "normalises over") if type(s) is BatchAxis else s

    return rule


def group_norm(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``group_norm(input (N, C, ...), groups, ...)``: statistics over all axes but the first."""
    s = first_keeps(ctx, args, kwargs, result)
    return along(ctx, args[0], range(1, args[0].ndim), "normalises over") \
        if type(s) is BatchAxis else s


def running_norm(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``batch_norm`` and ``instance_norm``, in ``F``'s argument order or in torch's (9 args).

    With batch statistics (``training``), batch norm couples the samples and both write the
    batch's statistics into their running buffers; instance norm's own statistics are over the
    spatial axes of one sample and channel. With running statistics: elementwise per channel.
    """
    x = args[0]
    native = len(args) == 9
    stats = [arg(args, kwargs, i, n) for i, n in
             (((3, "running_mean"), (4, "running_var")) if native
              else ((1, "running_mean"), (2, "running_var")))]
    own = arg(args, kwargs, 5, "use_input_stats" if "instance" in ctx.name else "training")
    if ctx.name == "instance_norm" and own is None:
        own = True
    if not own:
        return first_keeps(ctx, args, kwargs, result)
    sx = ctx.state(x)
    if ctx.name == "batch_norm":
        s = sx if type(sx) is not BatchAxis else coupled(
            ctx, "normalises with the batch's statistics")
    else:
        s = first_keeps(ctx, args, kwargs, result)
        s = along(ctx, x, range(2, x.ndim), "normalises over") if type(s) is BatchAxis else s
    if sx is not SAMPLE_FREE:  # after the result's state: the update follows the normalisation
        for t in stats:
            if t is not None:
                ctx.written(t, coupled(ctx, "running statistics updated from the batch"))
    return s


def embedding(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``F.embedding(input, weight, ...)`` or ``torch.embedding(weight, input, ...)``: rows of a
    sample-free table at the indices, whose axes stay in front. ``max_norm`` renormalises the
    looked-up rows of the table in place: the table is then written from the batch."""
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    index, table = (b, a) if a.is_floating_point() else (a, b)
    if ctx.state(table) is not SAMPLE_FREE:
        return join(ctx, [ctx.state(table), coupled(ctx, "a table that carries samples")])
    if not a.is_floating_point() and arg(args, kwargs, 3, "max_norm") is not None:
        ctx.written(table, coupled(ctx, "rows renormalised in place at the batch's indices"))
    return ctx.state(index)


def embedding_bag(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Any:
    """``F.embedding_bag(input, weight, offsets, ...)`` or ``torch.embedding_bag(weight, input,
    offsets, ...)`` (a 4-tuple): bags of rows of a sample-free table, output (B, d).

    A 2-D input (B, L) holds one bag per row: its axis 0 (with ``per_sample_weights`` (B, L)
    on the same layout or sample free) is the output's; samples along the positions L would
    meet in a bag. A 1-D input with ``offsets``: the bags own the samples only where every
    bag's positions belong to one sample, in a layout :func:`_bag_owners` proves from the
    offsets' values, which must then be sample free."""
    a, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    native = a.is_floating_point()
    index, table = (b, a) if native else (a, b)
    offsets = arg(args, kwargs, 2, "offsets")
    weights = arg(args, kwargs, 6 if native else 8, "per_sample_weights")
    last = bool(arg(args, kwargs, 7 if native else 9, "include_last_offset", False))
    if ctx.state(table) is not SAMPLE_FREE:
        s = join(ctx, [ctx.state(table), coupled(ctx, "a table that carries samples")])
    else:
        if not native and arg(args, kwargs, 3, "max_norm") is not None:
            ctx.written(table, coupled(ctx, "rows renormalised in place at the batch's indices"))
        s = join(ctx, [ctx.state(index), ctx.state(weights)])
        if type(s) is BatchAxis and index.ndim == 2:
            s = s if s.axis == 0 else coupled(ctx, f"a bag reduces the batch axis {s.axis}")
        elif type(s) is BatchAxis or ctx.state(offsets) is not SAMPLE_FREE:
            s = _bag_owners(ctx, s, offsets, last, index.numel())
    return (s, s, s, s) if native else s


def _bag_owners(ctx: Context, s: Provenance, offsets: Any, last: bool, positions: int
                ) -> Provenance:
    """The bags' layout BatchAxis(0, outer, inner') of flat indices laid out as ``s``: every
    non-empty bag's positions belong to one sample, bag j's being (j // inner') mod N."""
    if not isinstance(offsets, torch.Tensor) or ctx.state(offsets) is not SAMPLE_FREE:
        return coupled(ctx, "offsets that carry samples: which bags belong to which sample "
                            "cannot be proven from them")
    if type(s) is not BatchAxis:
        return s
    n = ctx.num_samples
    bounds = offsets.tolist() + ([] if last else [positions])
    bags = len(bounds) - 1
    inner = bags // (s.outer * n) if bags % (s.outer * n) == 0 else 0
    for j in range(bags if inner else 0):
        owners = {(i // s.inner) % n for i in range(bounds[j], bounds[j + 1])}
        if owners - {(j // inner) % n}:
            inner = 0
            break
    if not inner:
        return coupled(ctx, "the offsets do not split the flat indices into bags of one sample "
                            "each in a layout of the batch axis")
    return BatchAxis(0, s.outer, inner)


def multi_head_attention(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Any:
    """``F.multi_head_attention_forward``: query, key, value (L, B, E), each of the B columns
    attended on its own; masks (B, S) and (B H, L, S), static keys (B H, S, d); the
    projections sample free. Result: (output (L, B, E), weights (B, [H,] L, S) or None)."""
    query = arg(args, kwargs, 0, "query")
    heads = arg(args, kwargs, 4, "num_heads")
    claims = []
    for position, name, axis, merged in (
        (0, "query", 1, 1), (1, "key", 1, 1), (2, "value", 1, 1),
        (14, "key_padding_mask", 0, 1), (16, "attn_mask", 0, heads),
        (21, "static_k", 0, heads), (22, "static_v", 0, heads),
    ):
        t = arg(args, kwargs, position, name)
        s = ctx.state(t)
        if type(s) is BatchAxis:
            if query.ndim != 3 or s.axis != axis or (t.ndim == 2 and name == "attn_mask") or (
                    s.inner % merged):
                return coupled(ctx, f"{name} carries samples along axis {s.axis}, not along its "
                                    "batch axis")
            s = BatchAxis(1, s.outer, s.inner // merged)
        claims.append(s)
    rest = [t for i, t in enumerate(args) if i not in (0, 1, 2, 14, 16, 21, 22)]
    rest += [v for k, v in kwargs.items() if k not in (
        "query", "key", "value", "key_padding_mask", "attn_mask", "static_k", "static_v")]
    claims += [s if type(s) is NotPerSample or s is SAMPLE_FREE
               else coupled(ctx, "a projection that carries samples")
               for s in map(ctx.state, tensors(rest))]
    s = join(ctx, claims)
    return s, moved(s, 0)


def attention(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``scaled_dot_product_attention(q (..., L, E), k (..., S, E), v (..., S, Ev), mask)``:
    the leading axes (broadcast) are independent; L, S and the features are mixed."""
    nd = result.ndim
    gqa = arg(args, kwargs, 7, "enable_gqa", False)
    claims = []
    for position, name in ((0, "query"), (1, "key"), (2, "value"), (3, "attn_mask")):
        t = arg(args, kwargs, position, name)
        if not isinstance(t, torch.Tensor):
            continue
        s = shifted(along(ctx, t, [-2, -1], "attends over"), nd - t.ndim)
        if gqa and type(s) is BatchAxis and s.axis == nd - 3:
            s = coupled(ctx, "groups the heads of the batch axis")
        claims.append(s)
    return join(ctx, claims)


def recurrent(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Any:
    """``gru``/``lstm``/``rnn_tanh``/``rnn_relu`` on (T, B, H) or batch-first (B, T, H) inputs
    and their states (layers, B, H): each of the B columns runs on its own. Packed sequences
    (their rows interleave the samples by time step) are refused."""
    if not isinstance(args[2], (list, tuple)):
        return coupled(ctx, "a packed sequence interleaves the samples by time step")
    x, state, params = args[0], args[1], args[2]
    axis = 0 if args[8] else 1
    s = ctx.state(x)
    if type(s) is BatchAxis and (x.ndim != 3 or s.axis != axis):
        return coupled(ctx, f"samples along axis {s.axis}, not along the batch axis {axis}")
    claims = [moved(s, 1)]
    for t in tensors([state]):
        h = ctx.state(t)
        if type(h) is BatchAxis and h.axis != 1:
            return coupled(ctx, f"a state that carries samples along axis {h.axis}")
        claims.append(h)
    claims += [coupled(ctx, "a weight that carries samples")
               if ctx.state(p) is not SAMPLE_FREE else SAMPLE_FREE for p in tensors(params)]
    h = join(ctx, claims)
    return (moved(h, axis), *[h] * (len(result) - 1))


def cell(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``gru_cell``/``lstm_cell``/``rnn_tanh_cell``/``rnn_relu_cell``: input (B, in) and
    state (B, H), rows on their own; unbatched (1-d) inputs carry no batch axis."""
    claims = [along(ctx, t, [-1], "contracts") for t in tensors(args[:2])]
    claims += [coupled(ctx, "a weight that carries samples")
               if ctx.state(p) is not SAMPLE_FREE else SAMPLE_FREE for p in tensors(args[2:])]
    return join(ctx, claims)


def class_loss(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``cross_entropy``/``nll_loss(input (N, C, ...) or (C,), target, weight, reduction)``:
    with ``reduction="none"`` one loss per entry, the class axis 1 gone; else summed."""
    x, target = args[0], arg(args, kwargs, 1, "target")
    c = 1 if x.ndim >= 2 else 0

    def without_classes(t: torch.Tensor) -> Provenance:  # (N, C, ...) -> (N, ...) axes
        s = along(ctx, t, [c], "sums over the classes along")
        return shifted(s, -1) if type(s) is BatchAxis and s.axis > c else s

    weight = ctx.state(arg(args, kwargs, 2, "weight"))
    if type(weight) is BatchAxis:
        weight = coupled(ctx, "class weights that carry samples")
    indices = target.ndim < x.ndim
    return _reduced(ctx, args, kwargs, join(ctx, [
        without_classes(x), ctx.state(target) if indices else without_classes(target), weight]))


def pointwise_loss(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """Elementwise losses (``mse_loss``, ``binary_cross_entropy_with_logits``, ...)."""
    values = (*args, *kwargs.values())
    return _reduced(ctx, args, kwargs, aligned(ctx, values, max(t.ndim for t in tensors(values))))


def _reduced(ctx: Context, args: tuple, kwargs: dict, s: Provenance) -> Provenance:
    """A loss's state: ``s`` for ``reduction="none"``, else summed over the batch."""
    reduction = kwargs.get("reduction", next((a for a in args if isinstance(a, str)), "mean"))
    if reduction == "none" or type(s) is not BatchAxis:
        return s
    return coupled(ctx, f"reduction={reduction!r} sums over the batch")


#: name -> rule, as a TorchFunctionMode names the operations
LAYER_RULES: dict[str, Rule] = {
    **dict.fromkeys(("matmul", "mm", "bmm", "mv", "__matmul__", "__rmatmul__"), matmul),
    **dict.fromkeys(("addmm", "addmv", "baddbmm", "addr"), add_product),
    **dict.fromkeys(("outer", "ger"), outer),
    **dict.fromkeys(("inner", "dot", "vdot"), inner),
    "einsum": einsum,
    "linear": linear,
    "bilinear": bilinear,
    **{f"conv{d}d": spatial(d, channels_mixed=True) for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": spatial(d, channels_mixed=True) for d in (1, 2, 3)},
    **{f"{kind}{d}d{tail}": spatial(d) for d in (1, 2, 3) for tail in ("", "_with_indices")
       for kind in ("max_pool", "adaptive_max_pool")},
    **{f"{kind}{d}d": spatial(d) for d in (1, 2, 3)
       for kind in ("avg_pool", "adaptive_avg_pool", "lp_pool")},
    **dict.fromkeys(("interpolate", "upsample", "upsample_nearest", "upsample_bilinear"),
                    spatial(None)),
    **dict.fromkeys(("pixel_shuffle", "pixel_unshuffle"), spatial(2, channels_mixed=True)),
    "fold": spatial(1, channels_mixed=True),
    "unfold": unfold,
    **dict.fromkeys(("layer_norm", "rms_norm"), normalised(1, "normalized_shape")),
    "normalize": normalised(2, "dim", 1),
    "group_norm": group_norm,
    **dict.fromkeys(("batch_norm", "instance_norm"), running_norm),
    "embedding": embedding,
    "embedding_bag": embedding_bag,
    "scaled_dot_product_attention": attention,
    "multi_head_attention_forward": multi_head_attention,
    **dict.fromkeys(("gru", "lstm", "rnn_tanh", "rnn_relu"), recurrent),
    **dict.fromkeys(("gru_cell", "lstm_cell", "rnn_tanh_cell", "rnn_relu_cell"), cell),
    **dict.fromkeys(("cross_entropy", "nll_loss"), class_loss),
    **dict.fromkeys(("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "soft_margin_loss",
                     "binary_cross_entropy", "binary_cross_entropy_with_logits"),
                    pointwise_loss),
}
