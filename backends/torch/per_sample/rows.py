r"""Per-sample gradients G (N, P) kept per parameter as factors or rows: Gram matrices without G.

For a linear map with per-sample inputs a_n (T, d_in) and output gradients b_n (T, d_out)
(T positions; T = 1 for an MLP), the per-sample weight gradient is g_n = b_n^T a_n, so (sum
convention; see the conventions page, :ref:`conv-per-layer`)

.. math::
    \langle g_n, g_m \rangle = \sum_{t, t'} (a_{nt} \cdot a_{mt'})(b_{nt} \cdot b_{mt'})
    = \langle A_n A_m^\top, B_n B_m^\top \rangle_F, \qquad
    \sum_n w_n g_n = \Big(\sum_n w_n b_n^\top a_n\Big)

An embedding (V, d) looked up at indices i_n (T,) is the same with a_nt = onehot(i_nt):
a_nt . a_mt' = [i_nt == i_mt']; a convolution is a linear map of its unfolded input patches.
:class:`GhostRows` holds, per trainable parameter, either such factors
(:class:`~backends.torch.layers.blocks.FactorBlock`, one per row block of a parameter; a
:class:`~backends.torch.layers.blocks.TiedBlock` of one per form for a table both looked up
and used as an output layer) or the
materialised per-sample gradients of that parameter alone
(:class:`~backends.torch.layers.blocks.DenseBlock`, (N, size)), and implements the
``PerSampleRows`` contract of :mod:`ngdref` (``gram``, ``cross_gram``, ``matvec``,
``rmatvec``) from them. P vectors are flattened over the model's trainable parameters in
``named_parameters()`` order. Which form a parameter takes is the layer registry's cost model's
choice (:mod:`backends.torch.layers.cost`); the blocks themselves are
:mod:`backends.torch.layers.blocks`'.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import array_api_compat
import torch

from ngdref.rows import DenseRows, as_rows

from ..layers.blocks import DenseBlock, FactorBlock, TiedBlock

__all__ = ["DenseBlock", "FactorBlock", "GhostRows", "RoutedRows", "TiedBlock", "stack_rows"]

#: float64 entries of one column chunk of a materialised block's Gram (2 MiB)
_GRAM_CHUNK = 2**18


def _chunks64(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The tensors' columns in float64, a chunk at a time (float64 tensors whole).

    A fresh float64 copy of a large (N, size) block costs more (page faults, cache misses)
    than its product; the chunks reuse one small buffer per tensor (products summed chunk
    by chunk are regrouped sums: float64 rounding; the conversion is exact).
    """
    if all(t.dtype == torch.float64 for t in tensors):
        yield tensors
        return
    width = tensors[0].shape[1]
    step = max(1, _GRAM_CHUNK // max(t.shape[0] for t in tensors))
    bufs = [torch.empty(t.shape[0], min(step, width), dtype=torch.float64, device=t.device)
            for t in tensors]
    for start in range(0, width, step):
        yield tuple(buf[:, :min(step, width - start)].copy_(t[:, start:start + step])
                    for buf, t in zip(bufs, tensors, strict=True))


def _add_gram64(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a b^T in float64 (float32 columns converted a chunk at a time)."""
    for x, y in _chunks64(a, b):
        total.addmm_(x, y.T)


def _add_self_gram64(total: torch.Tensor, a: torch.Tensor) -> None:
    """total += a a^T in float64, with 3/4 of the multiply-adds of a general product.

    With a = [a_1; a_2] (rows split in half) only a_1 a_1^T and a_2 a^T are formed; the
    upper right block a_1 a_2^T is the transpose of the lower left one (torch has no
    symmetric rank-k product), so the result is exactly symmetric.
    """
    h = a.shape[0] // 2
    gram = torch.zeros_like(total)
    for (x,) in _chunks64(a):
        gram[:h, :h].addmm_(x[:h], x[:h].T)
        gram[h:].addmm_(x[h:], x.T)
    gram[:h, h:] = gram[h:, :h].T
    total += gram


class GhostRows:
    r"""The per-sample gradients G (N, P) of one batch, per parameter as factors or rows.

    Implements ngdref's ``PerSampleRows`` contract without forming G:

    ==================  =========================  ========================================
    method              shapes                     cost (per weight, ghost route)
    ==================  =========================  ========================================
    ``gram()``          -> (N, N) float64          N^2 T^2 (d_in + d_out); cached
    ``cross_gram(H)``   -> (N, M) float64          N M T T' (d_in + d_out)
    ``matvec(v)``       (P,) -> (N,)               N T d_in d_out
    ``rmatvec(w)``      (N,) -> (P,)               N T d_in d_out
    ==================  =========================  ========================================

    Rows are in whatever convention the cotangents had (R grad l_n for a reduction factor R).

    Attributes
    ----------
    shape : (N, P)
    dtype : torch.dtype
    grad : torch.Tensor (P,)
        G^T 1, computed from the factors on first access.
    fallbacks : tuple of str
        Parameters whose per-sample gradients came from a fallback route, and why.
    routes : dict of str to str
        The route of every trainable parameter, by name: "ghost" (factors), "materialised"
        (per-layer rows), "module vmap", "vmap", "loop" or "unused" (zero rows: the forward
        pass never read it); empty when the caller did not say.
    """

    def __init__(
        self,
        num_samples: int,
        num_params: int,
        *,
        factors: Sequence[FactorBlock],
        dense: Sequence[DenseBlock],
        dtype: torch.dtype,
        device: torch.device,
        grad: torch.Tensor | None = None,
        fallbacks: Sequence[str] = (),
        routes: Mapping[str, str] | None = None,
    ) -> None:
        covered = sum(f.size for f in factors) + sum(d.size for d in dense)
        if covered != num_params:
            raise ValueError(f"blocks cover {covered} parameters, expected P = {num_params}")
        self.shape = (int(num_samples), int(num_params))
        self.dtype = dtype
        self.device = device
        self.factors = tuple(factors)
        self.dense = tuple(dense)
        self._grad = grad
        self.fallbacks = tuple(fallbacks)
        self.routes = dict(routes or {})
        self._gram: torch.Tensor | None = None

    @property
    def grad(self) -> torch.Tensor:
        """g = G^T 1 (P,), from the stored factors on first use."""
        if self._grad is None:
            self._grad = self.rmatvec(torch.ones(self.shape[0], dtype=self.dtype,
                                                 device=self.device))
        return self._grad

    def array_namespace(self) -> Any:
        """array_api_compat's torch namespace."""
        return array_api_compat.array_namespace(torch.empty(0))

    def gram(self) -> torch.Tensor:
        """G G^T, (N, N) float64: the sum over parameters of their per-parameter Grams."""
        if self._gram is None:
            n = self.shape[0]
            total = torch.zeros(n, n, dtype=torch.float64, device=self.device)
            for f in self.factors:
                total += f.cross(f)
            for d in self.dense:
                _add_self_gram64(total, d.rows)
            self._gram = total
        return self._gram

    def cross_gram(self, other: Any) -> torch.Tensor:
        """G H^T, (N, M) float64. ``other``: GhostRows of the same model, or any PerSampleRows."""
        if isinstance(other, GhostRows) and self._same_layout(other):
            total = torch.zeros(
                self.shape[0], other.shape[0], dtype=torch.float64, device=self.device
            )
            for f, g in zip(self.factors, other.factors, strict=True):
                total += f.cross(g)
            for d, e in zip(self.dense, other.dense, strict=True):
                _add_gram64(total, d.rows, e.rows)
            return total
        if tuple(getattr(other, "shape", ()))[1:] != self.shape[1:]:
            raise ValueError(
                f"other must be rows with P = {self.shape[1]} columns, "
                f"got shape {getattr(other, 'shape', None)}"
            )
        # generic: column m is G h_m, one P-vector at a time (never an M x P matrix)
        columns = []
        for m in range(other.shape[0]):
            unit = torch.zeros(other.shape[0], dtype=other.dtype, device=self.device)
            unit[m] = 1
            columns.append(self.matvec(other.rmatvec(unit).to(self.dtype)).to(torch.float64))
        return torch.stack(columns, dim=1)

    def _same_layout(self, other: GhostRows) -> bool:
        return _layout(self) == _layout(other)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """G v, (P,) -> (N,) in ``dtype``."""
        self._check(vector, self.shape[1], "vector", "P")
        vector = vector.to(self.dtype)
        out = torch.zeros(self.shape[0], dtype=self.dtype, device=self.device)
        for f in self.factors:
            out += f.matvec(vector)
        for d in self.dense:
            out += torch.matmul(d.rows, vector[d.offset:d.offset + d.size])
        return out

    def rmatvec(self, weights: torch.Tensor) -> torch.Tensor:
        """G^T w, (N,) -> (P,) in ``dtype``, from the stored factors (no N x P matrix)."""
        self._check(weights, self.shape[0], "weights", "N")
        weights = weights.to(self.dtype)
        out = torch.empty(self.shape[1], dtype=self.dtype, device=self.device)
        for block in (*self.factors, *self.dense):  # each written in place into its slice
            block.rmatvec(weights, out[block.offset:block.offset + block.size])
        return out

    def materialise(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """G as a dense (N, P) tensor, written into ``out`` (N, P) when given (small models,
        tests, and TorchProvider's hooks route)."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for f in self.factors:
            f.materialise(out[:, f.offset:f.offset + f.size])
        for d in self.dense:
            out[:, d.offset:d.offset + d.size] = d.rows
        return out

    def _check(self, array: Any, size: int, name: str, what: str) -> None:
        if not isinstance(array, torch.Tensor) or tuple(array.shape) != (size,):
            raise ValueError(
                f"{name} must be a torch.Tensor of shape ({size},) ({what}), got "
                f"{tuple(array.shape) if isinstance(array, torch.Tensor) else type(array)}"
            )
        if array.device != self.device:
            raise TypeError(f"{name} is on {array.device}, the rows on {self.device}")


def _layout(rows: GhostRows) -> list[tuple]:
    """Per block its offset and form (a lookup, a factor pair or several tied forms)."""
    return [(f.offset, type(f).__name__, f.embedding if isinstance(f, FactorBlock) else tuple(
        u.embedding for u in f.uses)) for f in rows.factors] + [d.offset for d in rows.dense]


def _stack_factors(blocks: Sequence[Any]) -> Any:
    """Factor blocks of one parameter from several batches, one block of all their rows."""
    first = blocks[0]
    if isinstance(first, TiedBlock):
        return TiedBlock(first.offset, first.shape, tuple(
            _stack_factors(forms) for forms in zip(*(b.uses for b in blocks), strict=True)))
    return FactorBlock(first.offset, first.shape, torch.cat([f.x for f in blocks]),
                       torch.cat([f.b for f in blocks]))


class RoutedRows(DenseRows):
    """Dense per-sample rows (N, P) (``ngdref.rows.DenseRows``) with the route of every
    parameter and the fallback notes (the "vmap" and "loop" routes' rows; see
    :attr:`GhostRows.routes`)."""

    def __init__(self, array: torch.Tensor, *, routes: Mapping[str, str] | None = None,
                 fallbacks: Sequence[str] = ()) -> None:
        super().__init__(array)
        self.routes = dict(routes or {})
        self.fallbacks = tuple(fallbacks)


def stack_rows(parts: Sequence[Any]) -> Any:
    """The rows of several ``PerSampleRows`` of one model stacked: (sum of N_i, P).

    GhostRows of one layout stack block by block; anything else (dense arrays, or GhostRows
    whose parameters took different forms, e.g. a fallback in one chunk only) is materialised
    row-wise through ``as_rows``. Fallback notes and routes are merged (a parameter that took
    different routes in different parts is reported with each, joined by "+").
    """
    parts = [as_rows(p) for p in parts]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    notes = list(dict.fromkeys(f for p in parts for f in getattr(p, "fallbacks", ())))
    routes: dict[str, str] = {}
    for p in parts:
        for name, route in getattr(p, "routes", {}).items():
            known = routes.get(name, route).split("+")
            routes[name] = "+".join(known if route in known else [*known, route])
    if all(isinstance(p, GhostRows) and first._same_layout(p) for p in parts):
        factors = [_stack_factors(fs) for fs in zip(*(p.factors for p in parts), strict=True)]
        dense = [
            DenseBlock(ds[0].offset, torch.cat([d.rows for d in ds]))
            for ds in zip(*(p.dense for p in parts), strict=True)
        ]
        return GhostRows(
            sum(p.shape[0] for p in parts), first.shape[1], factors=factors, dense=dense,
            dtype=first.dtype, device=first.device, fallbacks=notes, routes=routes,
        )
    if all(isinstance(p, DenseRows) for p in parts):
        whole = torch.cat([p.array for p in parts])
        return RoutedRows(whole, routes=routes, fallbacks=notes) if notes or routes else (
            DenseRows(whole))
    arrays = [p.materialise() if isinstance(p, GhostRows) else p.array for p in parts
              if isinstance(p, (GhostRows, DenseRows))]
    if len(arrays) != len(parts):
        raise TypeError("stack_rows: the parts must be GhostRows or dense rows")
    whole = torch.cat(arrays)
    return GhostRows(whole.shape[0], whole.shape[1], factors=[], dense=[DenseBlock(0, whole)],
                     dtype=whole.dtype, device=whole.device, fallbacks=notes, routes=routes)
