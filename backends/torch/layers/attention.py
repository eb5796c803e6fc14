r"""``nn.MultiheadAttention``: the packed or separate q, k, v projections, ``bias_k``/``bias_v``.

Its forward calls ``F.multi_head_attention_forward``, whose projections are functional
calls that no hook sees (not even ``out_proj``'s). So this kind has a decomposed forward
(:meth:`Attention.forward`, used by an engine instead of the module's own) that computes
the same output from linear maps whose outputs are tapped:

* the in-projection in the inputs' own layout, as torch packs it: one map of the whole
  ``in_proj_weight`` (3E, E) when query, key and value are one tensor (tap ``"qkv"``), its
  q rows and kv rows when key and value are one tensor (``"q"``, ``"kv"``), else three maps
  (``"q"``, ``"k"``, ``"v"``; also for the separate ``q/k/v_proj_weight`` that kdim, vdim !=
  embed_dim give);
* ``bias_k``, ``bias_v`` repeated over the batch and appended to the keys and values
  (``"bias_k"``, ``"bias_v"``);
* ``out_proj`` called as a module, on the attention output in the query's layout, so that
  its own kind (``nn.Linear``) sees it as an ordinary call with the query's batch axis.

The attention in between is torch's (masks as torch canonicalises and merges them;
``add_zero_attn``; the explicit softmax when ``need_weights``, else
``scaled_dot_product_attention`` with ``is_causal``). With x_n (T, d) the positions of
sample n of the projected tensor (query, key or value) and b_n (T, rows) its tap's gradient:

.. math:: \nabla_{W_{\text{rows}}} l_n = b_n^\top x_n, \qquad
          \nabla_{\beta_{\text{rows}}} l_n = \textstyle\sum_t b_{nt}, \qquad
          \nabla_{\text{bias\_k}} l_n = \textstyle\sum_{\text{copies } c \text{ of } n}
              \partial l_n / \partial k_{\text{appended}, c}

Parts: one ``Outer`` per tap on the rows it projects (the q, k, v row blocks of
``in_proj_weight`` and ``in_proj_bias``), ``bias_k``/``bias_v`` as rows. K-FAC: one
Kronecker block per row block. Samples must lie on the batch axis (0 if ``batch_first``
else 1, merged or not): every other axis is attended over or contracted. Refused:
unbatched inputs, dropout in train mode (masks a single-sample pass cannot reproduce).
Key and value carry their samples on the same axis as the query (torch requires it).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..axes import BatchAxis, batch_first
from .linear import positions
from .parts import Grad, Outer, Rows
from .registry import Captured, LayerKind, Tap, describe, register

__all__ = ["Attention"]

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _arguments(module: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    bound = _SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _pattern(module: nn.Module, query: Any, key: Any, value: Any) -> tuple[str, ...]:
    """The taps of the in-projection, in row order (torch's packing)."""
    if module.in_proj_weight is not None and query is key and key is value:
        return ("qkv",)
    if module.in_proj_weight is not None and key is value:
        return ("q", "kv")
    return ("q", "k", "v")


def _float_mask(mask: torch.Tensor | None, dtype: torch.dtype, name: str) -> Any:
    """A boolean mask as 0 / -inf (True: masked out), a float mask as it is."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool or floating tensor, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _pad(mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if mask is None else F.pad(mask, (0, 1))


def _project(module: nn.Module, query: Any, key: Any, value: Any, tap: Tap) -> tuple:
    e, w, b = module.embed_dim, module.in_proj_weight, module.in_proj_bias
    pattern = _pattern(module, query, key, value)
    rows = {"q": slice(0, e), "k": slice(e, 2 * e), "v": slice(2 * e, 3 * e),
            "kv": slice(e, 3 * e), "qkv": slice(0, 3 * e)}
    source = {"q": query, "k": key, "v": value, "kv": key, "qkv": query}
    separate = {"q": module.q_proj_weight, "k": module.k_proj_weight, "v": module.v_proj_weight}
    out = {}
    for name in pattern:
        weight = separate[name] if w is None else w[rows[name]]
        out[name] = tap(name, F.linear(source[name], weight, None if b is None else b[rows[name]]))
    if pattern == ("qkv",):
        return out["qkv"][..., :e], out["qkv"][..., e:2 * e], out["qkv"][..., 2 * e:]
    if pattern == ("q", "kv"):
        return out["q"], out["kv"][..., :e], out["kv"][..., e:]
    return out["q"], out["k"], out["v"]


def _masks(c: dict[str, Any], dtype: torch.dtype) -> tuple[Any, Any, bool]:
    """(attn_mask, key_padding_mask, is_causal) as torch canonicalises them."""
    kpm = _float_mask(c["key_padding_mask"], dtype, "key_padding_mask")
    mask, causal = c["attn_mask"], c["is_causal"]
    if causal and mask is None:
        raise RuntimeError("MultiheadAttention: is_causal needs attn_mask (as torch's forward)")
    if causal and kpm is None and not c["need_weights"]:
        return None, kpm, True
    mask = _float_mask(mask, dtype, "attn_mask")
    if mask is not None and mask.dim() == 2:
        mask = mask.unsqueeze(0)
    return mask, kpm, causal and kpm is None


def _attend(module: nn.Module, q: Any, k: Any, v: Any, c: dict[str, Any], tap: Tap) -> tuple:
    """torch's attention from projected q (L, B, E), k, v (S, B, E) -> ((L, B, E), weights)."""
    (length, batch, e), heads = q.shape, module.num_heads
    hd = e // heads
    mask, kpm, causal = _masks(c, q.dtype)
    if module.bias_k is not None:
        k = torch.cat([k, tap("bias_k", module.bias_k.repeat(1, batch, 1))])
        v = torch.cat([v, tap("bias_v", module.bias_v.repeat(1, batch, 1))])
        mask, kpm = _pad(mask), _pad(kpm)
    q = q.reshape(length, batch * heads, hd).transpose(0, 1)
    k = k.reshape(k.shape[0], batch * heads, hd).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * heads, hd).transpose(0, 1)
    if module.add_zero_attn:
        zeros = q.new_zeros(batch * heads, 1, hd)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        mask, kpm = _pad(mask), _pad(kpm)
    s = k.shape[1]
    if kpm is not None:
        kpm = kpm.view(batch, 1, 1, s).expand(-1, heads, -1, -1).reshape(batch * heads, 1, s)
        mask = kpm if mask is None else mask + kpm
    p = module.dropout if module.training else 0.0
    if not c["need_weights"]:
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.shape[0] == 1 else mask.view(batch, heads, -1, s)
        out = F.scaled_dot_product_attention(
            q.reshape(batch, heads, length, hd), k.reshape(batch, heads, s, hd),
            v.reshape(batch, heads, s, hd), mask, p, causal)
        return out.permute(2, 0, 1, 3).reshape(length, batch, e), None
    scores = q * math.sqrt(1.0 / hd)
    w = torch.bmm(scores, k.transpose(-2, -1)) if mask is None else torch.baddbmm(
        mask, scores, k.transpose(-2, -1))
    w = torch.softmax(w, dim=-1)
    if p > 0:
        w = F.dropout(w, p=p)
    out = torch.bmm(w, v).transpose(0, 1).reshape(length, batch, e)
    w = w.view(batch, heads, length, s)
    return out, w.mean(dim=1) if c["average_attn_weights"] else w


@register(nn.MultiheadAttention)
class Attention(LayerKind):
    """Per-sample factors of attention's in-projection (inputs and tapped projections) and
    of ``bias_k``/``bias_v``; ``out_proj`` is its own ``nn.Linear`` call."""

    hookable = False

    def refuse(self, module: nn.Module, mode: str) -> str | None:
        if mode == "train" and module.dropout > 0:
            return (f"{describe(module)}: attention dropout in train mode draws masks that a "
                    "single-sample pass cannot reproduce (run it in eval mode)")
        return None

    def refuse_call(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    axis: BatchAxis) -> str | None:
        query = _arguments(module, args, kwargs)["query"]
        if query.ndim != 3:
            return (f"{describe(module)}: an unbatched query of shape {tuple(query.shape)}; "
                    "its samples would lie on the sequence it attends over or the features")
        batch = 0 if module.batch_first else 1
        if axis.axis != batch:
            return (f"{describe(module)}: the samples lie on axis {axis.axis} of a query of "
                    f"shape {tuple(query.shape)}, not on its batch axis {batch} (batch_first="
                    f"{module.batch_first}): the others are attended over or contracted")
        return None

    def first_input(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                    output: Any = None) -> torch.Tensor | None:
        """The query (positional or keyword)."""
        query = _arguments(module, args, kwargs)["query"]
        return query if isinstance(query, torch.Tensor) else None

    def tap_axis(self, module: nn.Module, name: str, axis: BatchAxis) -> BatchAxis:
        """``bias_k``/``bias_v`` are repeated over the batch on axis 1 (after the layout's
        transpose), the projections keep the query's axis."""
        return BatchAxis(1, axis.outer, axis.inner) if name.startswith("bias_") else axis

    def forward(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                tap: Tap) -> Any:
        """The module's (output, weights), from tapped projections and ``module.out_proj``."""
        c = _arguments(module, args, kwargs)
        q, k, v = _project(module, c["query"], c["key"], c["value"], tap)
        if module.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        out, weights = _attend(module, q, k, v, c, tap)
        if module.batch_first:
            out = out.transpose(0, 1)
        return module.out_proj(out), weights

    def inputs(self, module: nn.Module, args: tuple, kwargs: Mapping[str, Any],
               axis: BatchAxis, num_samples: int) -> Captured:
        c = _arguments(module, args, kwargs)
        sources = {"q": c["query"], "k": c["key"], "v": c["value"], "kv": c["key"],
                   "qkv": c["query"]}
        pattern = _pattern(module, c["query"], c["key"], c["value"])
        x = {name: positions(sources[name].detach(), axis, num_samples) for name in pattern}
        return Captured(axis, num_samples, x)

    def factors(self, module: nn.Module, inputs: Captured, grads: Mapping[str, torch.Tensor],
                wanted: frozenset[str] | None = None) -> dict[str, Grad]:
        e, n, axis = module.embed_dim, inputs.num_samples, inputs.axis
        start = {"q": 0, "k": e, "v": 2 * e, "kv": e, "qkv": 0}
        b = {name: positions(grads[name], axis, n) for name in inputs.x}
        out: dict[str, Grad] = {}
        for a in self.wanted(module, wanted):
            if a == "in_proj_weight":
                out[a] = tuple(Outer(b[t], inputs.x[t], start[t]) for t in inputs.x)
            elif a == "in_proj_bias":
                out[a] = tuple(Outer(b[t], None, start[t]) for t in inputs.x)
            elif a in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                out[a] = (Outer(b[a[0]], inputs.x[a[0]]),)
            else:  # bias_k, bias_v: (1, B, E) copies, the batch on axis 1 as the query's
                where = self.tap_axis(module, a, axis)
                out[a] = (Rows(batch_first(grads[a], where, n).reshape(n, -1, e).sum(dim=1)),)
        return out
