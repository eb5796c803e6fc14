r"""The forms a per-sample parameter gradient takes: :class:`Outer` factors and :class:`Rows`.

A layer kind gives, per parameter and per call, a :data:`Grad`: a tuple of parts that
together cover the parameter, flattened row-major. Two forms:

:class:`Outer` (factors over T positions; rows [start, start + d_u) of the parameter seen
as a (rows, d_v) matrix)

.. math::
    g_n[\text{rows}] = \operatorname{vec}\Big(\sum_t u_{nt}\, v_{nt}^\top\Big)

    u_{nt} \in \mathbb{R}^{d_u} \text{ (or the one-hot row } e_{i_{nt}}
    \text{ of a lookup table)}, \qquad
    v_{nt} \in \mathbb{R}^{d_v} \text{ (or } v = 1 \text{: a bias, } g_n = \textstyle\sum_t u_{nt})

``nn.Linear``: u = output gradients, v = inputs. A convolution: u = output gradients,
v = unfolded input patches, one part per group. ``nn.Embedding``: u = the looked-up
indices, v = output gradients. The routes turn parts into blocks
(:mod:`backends.torch.layers.blocks`): the ghost Gram
<g_n, g_m> = sum_{t,t'} (u_nt . u_mt')(v_nt . v_mt') or materialised rows.

:class:`Rows`: the per-sample gradients (N, size) already materialised (norm layers'
scales, where a factor form saves nothing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Grad", "Outer", "Part", "Rows", "along_positions", "materialise", "part_size"]


@dataclass(frozen=True)
class Outer:
    """Per-sample gradients of rows [start, start + d_u) of a parameter as outer products.

    Attributes
    ----------
    u : torch.Tensor
        (N, T, d_u) floating, or (N, T) int64 indices into the rows of a lookup table
        (the part then covers the whole parameter (rows, d_v) and start is 0).
    v : torch.Tensor or None
        (N, T, d_v); None: a column of ones (a bias: the parameter part is (d_u,)).
    start : int
        The first row of the part in the parameter viewed as (rows, d_v).
    grad : {"u", "v"}
        The factor that carries the loss's gradient (K-FAC weights it and sums it over
        samples; the other one is the input side, averaged under ``normalisation="mean"``).
    kronecker : bool
        Whether the T positions are the layer's own input positions, so that the sums of
        u u^T and v v^T over them are its K-FAC factors (False: positions made up for the
        factor form, e.g. the elements of an embedding bag, or padding).
    """

    u: torch.Tensor
    v: torch.Tensor | None
    start: int = 0
    grad: str = "u"
    kronecker: bool = True

    #: whether u holds indices (one-hot rows of a table) rather than vectors
    lookup: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.grad not in ("u", "v") or (self.grad == "v" and self.v is None):
            raise ValueError(f"Outer.grad must name a present factor, got {self.grad!r}")
        object.__setattr__(self, "lookup", not torch.is_floating_point(self.u))
        if self.lookup and (self.v is None or self.start != 0):
            raise ValueError("an Outer part with indices covers a whole table (v given, start 0)")

    @property
    def positions(self) -> int:
        return int(self.u.shape[1])


@dataclass(frozen=True)
class Rows:
    """Materialised per-sample gradients of a whole parameter, ``rows`` (N, size)."""

    rows: torch.Tensor


Part = Outer | Rows
#: the per-sample gradient of one parameter from one call: parts covering it, by start
Grad = tuple[Part, ...]


def along_positions(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One factor of several uses concatenated along T (axis 1; no copy for a single use)."""
    return factors[0] if len(factors) == 1 else torch.cat(list(factors), dim=1)


def part_size(part: Part, shape: tuple[int, ...]) -> int:
    """Entries of the parameter (of ``shape``) that ``part`` covers."""
    if isinstance(part, Rows):
        return int(part.rows.shape[1])
    if part.lookup:
        return math.prod(shape)
    return int(part.u.shape[-1]) * (1 if part.v is None else int(part.v.shape[-1]))


def materialise(part: Part, shape: tuple[int, ...]) -> torch.Tensor:
    """The per-sample gradients a part stands for, (N, part_size) in row-major order."""
    if isinstance(part, Rows):
        return part.rows
    n = part.u.shape[0]
    if part.v is None:
        return part.u.sum(dim=1)
    if not part.lookup:
        return torch.bmm(part.u.transpose(1, 2), part.v).reshape(n, -1)
    rows, d = shape[0], part.v.shape[-1]
    where = (part.u + rows * torch.arange(n, device=part.u.device)[:, None]).reshape(-1)
    out = torch.zeros(n * rows, d, dtype=part.v.dtype, device=part.v.device)
    return out.index_add_(0, where, part.v.reshape(-1, d)).view(n, -1)
