r"""The states of batch-axis provenance, and the rules of elementwise operations, reductions,
scans.

A tensor computed in a forward pass is in one of three states:

* :class:`~backends.torch.axes.BatchAxis` ``(k, outer, inner)``: index i of axis k belongs to
  sample :math:`n(i) = \lfloor i / \mathrm{inner} \rfloor \bmod N`, and the slice at i was
  computed from sample n(i)'s slices of the operands and from sample-free tensors only;
* :data:`SAMPLE_FREE`: computed without the batch's inputs, whatever its shape (a parameter,
  ``torch.arange(N)``, T5's relative position table);
* :class:`NotPerSample`: anything else, with the reason: samples coupled (a reduction or a
  contraction over the batch axis, indexing across it), or an operation the rules do not know.

A rule maps an operation's arguments and result to the result's state. Rules are conservative:
where a rule cannot prove a layout it answers :class:`NotPerSample`, never a guess. A
sample-free operand goes with any layout; two operands carrying samples on different axes of
the result are coupled. Indexing, joining and splitting are in
:mod:`backends.torch.per_sample.provenance_indexing`; views, reshapes and axis permutations in
:mod:`backends.torch.per_sample.provenance_views`; contractions and layers (linear,
convolutions, norms, attention, recurrent layers, losses) in
:mod:`backends.torch.per_sample.provenance_layers`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..axes import BatchAxis

__all__ = [
    "GENERIC_RULES",
    "SAMPLE_FREE",
    "Context",
    "NotPerSample",
    "Provenance",
    "Rule",
    "SampleFree",
    "coupled",
    "join",
    ]


class SampleFree:
    """The state of a tensor computed without the batch's inputs (one instance)."""

    _instance: SampleFree | None = None

    def __new__(cls) -> SampleFree:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "SAMPLE_FREE"


#: computed without the batch's inputs, whatever its shape
SAMPLE_FREE = SampleFree()


@dataclass(frozen=True)
class NotPerSample:
    """No axis holds the samples one-to-one; ``reason`` names the operation and why."""

    reason: str


Provenance = BatchAxis | SampleFree | NotPerSample


class Context(Protocol):
    """What a rule reads from the tracker: N, the operation's name, the operands' states."""

    num_samples: int
    name: str

    def state(self, t: Any) -> Provenance:
        """The state of ``t`` (SAMPLE_FREE for a value that is not a tensor)."""

    def written(self, t: torch.Tensor, state: Provenance) -> None:
        """``t`` was changed in place by the operation as a side effect: its new state."""


#: (context, args, kwargs, result) -> the result's state, or one per item of a tuple result
Rule = Callable[[Context, tuple, dict, Any], Any]


def coupled(ctx: Context, what: str) -> NotPerSample:
    """Not per sample because of the current operation: ``"<op>: <what>"``."""
    return NotPerSample(f"{ctx.name}: {what}")


def tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    """The tensors among ``values`` and inside the lists and tuples among them."""
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from tensors(v)


def join(ctx: Context, claims: Iterable[Provenance]) -> Provenance:
    """The state of a result from its operands' states, already placed on the result's axes."""
    found = None
    for c in claims:
        if c is SAMPLE_FREE:
            continue
        if type(c) is NotPerSample:
            return c
        if found is None:
            found = c
        elif c != found:
            return coupled(ctx, f"operands carry the samples on different axes ({found}, {c})")
    return SAMPLE_FREE if found is None else found


def moved(state: Provenance, axis: int) -> Provenance:
    """``state`` with its batch axis at ``axis`` (other states unchanged)."""
    if type(state) is BatchAxis:
        return BatchAxis(axis, state.outer, state.inner)
    return state


def shifted(state: Provenance, by: int) -> Provenance:
    """``state`` with its batch axis moved by ``by`` (right-aligned broadcasting)."""
    if by and type(state) is BatchAxis:
        return BatchAxis(state.axis + by, state.outer, state.inner)
    return state


def dim_of(d: int, ndim: int) -> int:
    """A dimension argument as a non-negative axis (a 0-d tensor has the one axis 0)."""
    return d % ndim if ndim else 0


def arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """An argument given by position or by keyword."""
    if len(args) > position:
        return args[position]
    return kwargs.get(name, default)


def out_ndim(result: Any) -> int:
    """The number of axes of the (first) tensor of a result."""
    if isinstance(result, torch.Tensor):
        return result.ndim
    return next(tensors(result)).ndim


# ---- elementwise and same-layout operations --------------------------------------------------
def aligned(ctx: Context, values: Iterable[Any], ndim: int) -> Provenance:
    """The join of the tensors among ``values``, each right-aligned to ``ndim`` axes."""
    return join(ctx, (shifted(ctx.state(t), ndim - t.ndim) for t in tensors(values)))


def broadcast(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """Elementwise with broadcasting: every operand right-aligned to the result's axes."""
    nd = result.ndim if isinstance(result, torch.Tensor) else (
        out_ndim(result) if result is not None else args[0].ndim)
    found = None
    # the most frequent rule, so a plain loop rather than aligned() over generators
    for v in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(v, torch.Tensor):
            s = ctx.state(v)
            if s is SAMPLE_FREE:
                continue
            if type(s) is NotPerSample:
                return s
            if v.ndim != nd:
                s = BatchAxis(s.axis + nd - v.ndim, s.outer, s.inner)
            if found is None:
                found = s
            elif s != found:
                return coupled(ctx, f"operands carry the samples on different axes ({found}, {s})")
        elif isinstance(v, (list, tuple)):
            return aligned(ctx, (*args, *kwargs.values()), nd)
    return SAMPLE_FREE if found is None else found


def first_only(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """The first operand's layout; the other tensor arguments give a shape, dtype or device."""
    return ctx.state(args[0])


def first_keeps(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """The first operand's layout, its axes kept in front; the other operands sample free."""
    for v in (*args[1:], *kwargs.values()) if kwargs else args[1:]:
        if isinstance(v, torch.Tensor):
            s = ctx.state(v)
            if s is SAMPLE_FREE:
                continue
            return s if type(s) is NotPerSample else coupled(
                ctx, "an operand other than the input carries samples")
        if isinstance(v, (list, tuple)) and any(ctx.state(t) is not SAMPLE_FREE
                                                for t in tensors(v)):
            return first_keeps(ctx, (args[0], *tensors(v)), {}, result)
    return ctx.state(args[0])


def data_copy(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """``torch.tensor(data)``, ``as_tensor``, ``x.new_tensor(data)``: the layout of a tensor
    ``data``; data holding tensors in lists are refused unless sample free."""
    data = arg(args, kwargs, 1 if ctx.name == "new_tensor" else 0, "data")
    if isinstance(data, torch.Tensor):
        return ctx.state(data)
    return join(ctx, [coupled(ctx, "builds a tensor from tensors that carry samples")
                      if type(s) is BatchAxis else s for s in map(ctx.state, tensors([data]))])


def sample_free(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
    """A new tensor whose values do not read its tensor arguments (``zeros_like``, ``new_ones``)."""
    return SAMPLE_FREE


def along(ctx: Context, x: torch.Tensor, dims: Iterable[int], what: str) -> Provenance:
    """x's layout if its batch axis is none of ``dims`` (that the operation mixes), else coupled."""
    s = ctx.state(x)
    if type(s) is BatchAxis and s.axis in {dim_of(d, x.ndim) for d in dims}:
        return coupled(ctx, f"{what} the batch axis {s.axis}")
    return s


def scan(position: int, default: int | None) -> Rule:
    """An operation along one axis that keeps the number of axes (softmax, cumsum, sort, topk,
    ``diff`` with its sample-free ``prepend``/``append``)."""

    def rule(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
        x = args[0]
        d = arg(args, kwargs, position, "dim", default)
        if d is None:  # the legacy implicit softmax axis
            d = 0 if x.ndim in (0, 1, 3) else 1
        s = first_keeps(ctx, args, kwargs, result)
        return along(ctx, x, [d], "mixes the entries along") if type(s) is BatchAxis else s

    return rule


# ---- reductions ---------------------------------------------------------------------------------
def _reduced_dims(x: torch.Tensor, d: Any) -> list[int] | None:
    if d is None or (isinstance(d, (list, tuple)) and not d):
        return None  # every axis
    return sorted({dim_of(int(e), x.ndim) for e in (d if isinstance(d, (list, tuple)) else [d])})


def reduction(position: int = 1, default: int | None = None) -> Rule:
    """A reduction over ``dim`` (all axes when None), with or without ``keepdim`` (read from
    the result: the old ``std(dim, unbiased, keepdim)`` puts it elsewhere). ``quantile``'s 1-d
    ``q`` puts a new axis in front.

    ``torch.max(a, b)`` and ``torch.min(a, b)`` with a tensor ``b`` are elementwise.
    """

    def rule(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Provenance:
        x = args[0]
        d = arg(args, kwargs, position, "dim", default)
        if isinstance(d, torch.Tensor):
            return broadcast(ctx, args, kwargs, result)
        if isinstance(d, bool):  # std(x, unbiased) of old
            d = None
        s = first_keeps(ctx, args, kwargs, result)
        if type(s) is not BatchAxis:
            return s
        dims = _reduced_dims(x, d)
        if dims is None or s.axis in dims:
            return coupled(ctx, f"reduces over the batch axis {s.axis}")
        q = arg(args, kwargs, 1, "q") if "quantile" in ctx.name else None
        lead = int(isinstance(q, torch.Tensor) and q.ndim == 1)
        if out_ndim(result) - lead == x.ndim:  # keepdim
            return shifted(s, lead)
        return shifted(s, lead - sum(e < s.axis for e in dims))

    return rule


def where(ctx: Context, args: tuple, kwargs: dict, result: Any) -> Any:
    """``where(cond, a, b)`` elementwise; ``where(cond)`` the positions of the true entries."""
    if len(args) + len(kwargs) == 1:
        return coupled(ctx, "positions that depend on the values")
    return broadcast(ctx, args, kwargs, result)


#: elementwise operations with broadcasting (their in-place forms end in "_")
ELEMENTWISE = (
    "abs", "absolute", "acos", "arccos", "acosh", "arccosh", "add", "addcdiv", "addcmul",
    "angle", "asin", "arcsin", "asinh", "arcsinh", "atan", "arctan", "atan2", "arctan2", "atanh",
    "arctanh", "bitwise_and", "bitwise_not", "bitwise_or", "bitwise_xor", "bitwise_left_shift",
    "bitwise_right_shift", "ceil", "clamp", "clamp_min", "clamp_max", "clip", "conj",
    "conj_physical", "copysign", "cos", "cosh", "deg2rad", "digamma", "div", "divide", "eq",
    "erf", "erfc", "erfinv", "exp", "exp2", "expm1", "float_power", "floor", "floor_divide",
    "fmax", "fmin", "fmod", "frac", "ge", "greater", "greater_equal", "gt", "heaviside", "hypot",
    "i0", "isclose", "isfinite", "isinf", "isnan", "isneginf", "isposinf", "isreal", "ldexp",
    "le", "lerp", "less", "less_equal", "lgamma", "log", "log10", "log1p", "log2", "logaddexp",
    "logaddexp2", "logical_and", "logical_not", "logical_or", "logical_xor", "logit", "lt",
    "masked_fill", "maximum", "minimum", "mul", "multiply", "mvlgamma", "nan_to_num", "ne",
    "neg", "negative", "nextafter", "not_equal", "positive", "pow", "rad2deg", "real", "imag",
    "reciprocal", "remainder", "round", "rsqrt", "rsub", "sgn", "sigmoid", "sign", "signbit",
    "sin", "sinc", "sinh", "sqrt", "square", "sub", "subtract", "tan", "tanh", "true_divide",
    "trunc", "fix", "xlogy", "tril", "triu", "bernoulli",
    # activations and dropout (torch and torch.nn.functional names)
    "relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "hardtanh", "hardswish",
    "hardsigmoid", "hardshrink", "softshrink", "tanhshrink", "threshold", "leaky_relu",
    "logsigmoid", "softplus", "softsign", "rrelu", "dropout", "alpha_dropout",
    "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout",
    # casts and copies
    "float", "double", "half", "bfloat16", "int", "long", "short", "char", "byte", "bool",
    "cfloat", "cdouble", "clone", "detach", "contiguous", "cpu", "cuda",
    # the in-place writes of values (copy_, fill_, zero_, random fills), joined with x
    "copy", "fill", "zero", "normal", "uniform", "random", "exponential", "geometric", "cauchy",
    "log_normal",
    # operators
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__",
    "__rtruediv__", "__div__", "__rdiv__", "__floordiv__", "__rfloordiv__", "__mod__",
    "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__", "__abs__", "__invert__", "__and__",
    "__rand__", "__or__", "__ror__", "__xor__", "__rxor__", "__lshift__", "__rlshift__",
    "__rshift__", "__rrshift__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
)
#: reductions: the position of their ``dim`` argument
REDUCTIONS = {
    **dict.fromkeys(("sum", "nansum", "mean", "nanmean", "prod", "amax", "amin", "max", "min",
                     "std", "var", "std_mean", "var_mean", "logsumexp", "all", "any", "argmax",
                     "argmin", "count_nonzero", "median", "nanmedian", "aminmax"), 1),
    **dict.fromkeys(("norm", "vector_norm", "quantile", "nanquantile"), 2),
}

#: name -> rule, as a TorchFunctionMode names the operations
GENERIC_RULES: dict[str, Rule] = {
    **dict.fromkeys(ELEMENTWISE, broadcast),
    "where": where,
    **dict.fromkeys(("to", "type", "type_as", "data", "requires_grad_"), first_only),
    **dict.fromkeys(("one_hot", "prelu", "view_as_real"), first_keeps),
    **dict.fromkeys(("tensor", "as_tensor", "asarray", "new_tensor"), data_copy),
    **dict.fromkeys(("new_zeros", "new_ones", "new_full", "new_empty",
                     "zeros_like", "ones_like", "empty_like", "full_like", "rand_like",
                     "randn_like", "randint_like"), sample_free),
    **{name: reduction(position) for name, position in REDUCTIONS.items()},
    "kthvalue": reduction(2, -1),
    "mode": reduction(1, -1),
    **dict.fromkeys(("softmax", "log_softmax", "softmin"), scan(1, None)),
    **dict.fromkeys(("cumsum", "cumprod", "logcumsumexp", "cummax", "cummin"), scan(1, None)),
    **dict.fromkeys(("sort", "argsort", "glu"), scan(1, -1)),
    "msort": scan(1, 0),
    **dict.fromkeys(("topk", "diff"), scan(2, -1)),
    "gumbel_softmax": scan(4, -1),
}
