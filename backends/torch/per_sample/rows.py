r"""Per-sample gradients G (N, P) kept as per-layer factors: Gram matrices without G.

For a linear map with per-sample inputs a_n (T, d_in) and output gradients b_n (T, d_out)
(T positions; T = 1 for an MLP), the per-sample weight gradient is g_n = b_n^T a_n, so
(SPEC section 9, sum convention)

.. math::
    \langle g_n, g_m \rangle = \sum_{t, t'} (a_{nt} \cdot a_{mt'})(b_{nt} \cdot b_{mt'})
    = \langle A_n A_m^\top, B_n B_m^\top \rangle_F, \qquad
    \sum_n w_n g_n = \Big(\sum_n w_n b_n^\top a_n\Big)

An embedding (V, d) looked up at indices i_n (T,) is the same with a_nt = onehot(i_nt):
a_nt . a_mt' = [i_nt == i_mt']. A ``nn.Conv2d`` is a linear map of its unfolded input
patches (T = output pixels). A weight used k times in one forward pass concatenates its k
uses along t. :class:`GhostRows` holds, per trainable parameter, either these factors (the
"ghost" route) or the materialised per-sample gradients of that parameter alone (N, size),
and implements the ``PerSampleRows`` contract of :mod:`ngdref` (``gram``, ``cross_gram``,
``matvec``, ``rmatvec``) from them. P vectors are flattened over the model's trainable
parameters in ``named_parameters()`` order.

Cost model (multiply-adds of the Gram matrix of one layer, Bu et al.'s "mixed ghost norm"):

===============  =================================  =====================================
layer            ghost                              materialised
===============  =================================  =====================================
linear / conv    N^2 T^2 (d_in + d_out)             N T d_in d_out + N^2 d_in d_out
embedding        N^2 T^2 (d + 1)                    N T d + N^2 V d
===============  =================================  =====================================

:func:`ghost_is_cheaper` chooses per layer. The ghost route also never holds the N x size
block (memory N T (d_in + d_out), activations the backward pass keeps anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import torch

__all__ = ["DenseBlock", "FactorBlock", "GhostRows", "ghost_is_cheaper", "stack_rows"]

#: entries of one (rows x columns) chunk of the ghost kernels (32 MiB in float64)
_CHUNK = 2**22
#: float64 entries of one column chunk of a materialised block's Gram (2 MiB)
_GRAM_CHUNK = 2**18


def ghost_is_cheaper(n: int, t: int, d_in: int, d_out: int, vocab: int | None = None) -> bool:
    """Whether the ghost Gram of a layer costs fewer multiply-adds than materialising it.

    ``vocab`` None: a linear map (d_out, d_in) used at T positions; else an embedding
    (vocab, d_out) looked up T times (d_in is ignored).
    """
    if vocab is None:
        ghost = n * n * t * t * (d_in + d_out)
        materialised = n * t * d_in * d_out + n * n * d_in * d_out
    else:
        ghost = n * n * t * t * (d_out + 1)
        materialised = n * t * d_out + n * n * vocab * d_out
    return ghost < materialised


@dataclass
class FactorBlock:
    """One weight, held as factors: g_n = vec(b_n^T a_n) at ``offset`` in theta.

    Attributes
    ----------
    offset : int
    shape : tuple of int
        The parameter's shape; its row-major flattening is (d_out, d_in) (a conv weight
        (C_out, C_in, kh, kw) flattens to (C_out, C_in kh kw), the unfold order).
    x : torch.Tensor
        (N, T, d_in) inputs a_n, or (N, T) integer indices for an embedding (V, d_out).
    b : torch.Tensor, (N, T, d_out)
        Output gradients (zero at an embedding's ``padding_idx`` positions).
    """

    offset: int
    shape: tuple[int, ...]
    x: torch.Tensor
    b: torch.Tensor
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = int(torch.Size(self.shape).numel())

    @property
    def embedding(self) -> bool:
        return not torch.is_floating_point(self.x)

    def _matrix(self, vector: torch.Tensor) -> torch.Tensor:
        """The slice of a (P,) vector for this weight, as (d_out, d_in) or (V, d)."""
        piece = vector[self.offset:self.offset + self.size]
        return piece.view(self.shape[0], -1) if not self.embedding else piece.view(self.shape)

    def materialise(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample gradients of this weight, (N, size), written into ``out`` (N, size)
        when given (a weight's bmm straight into it, e.g. its columns of a whole G)."""
        n, _, d = self.b.shape
        if not self.embedding:
            if out is None:
                return torch.bmm(self.b.transpose(1, 2), self.x).reshape(n, -1)
            torch.bmm(self.b.transpose(1, 2), self.x, out=out.view(n, self.shape[0], -1))
            return out
        vocab = self.shape[0]
        rows = (self.x + vocab * torch.arange(n, device=self.x.device)[:, None]).reshape(-1)
        grads = torch.zeros(n * vocab, d, dtype=self.b.dtype, device=self.b.device)
        grads = grads.index_add_(0, rows, self.b.reshape(-1, d)).view(n, -1)
        return grads if out is None else out.copy_(grads)

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """(G v)_n over this weight's slice, (N,)."""
        w = self._matrix(vector)
        image = w[self.x] if self.embedding else torch.matmul(self.x, w.T)
        return (image * self.b).sum(dim=(1, 2))

    def rmatvec(
        self, weights: torch.Tensor | None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sum_n w_n g_n flattened, (size,), written into ``out`` (size,) when given;
        ``weights=None``: w_n = 1 (the sum of the rows, with no product by ones)."""
        b = self.b if weights is None else weights[:, None, None] * self.b
        wb = b.reshape(-1, self.b.shape[-1])
        if out is None:
            out = torch.empty(self.size, dtype=self.b.dtype, device=self.b.device)
        if self.embedding:
            out.zero_().view(self.shape).index_add_(0, self.x.reshape(-1), wb)
            return out
        torch.mm(wb.T, self.x.reshape(-1, self.x.shape[-1]), out=out.view(self.shape[0], -1))
        return out

    def cross(self, other: FactorBlock) -> torch.Tensor:
        r"""<g_n, h_m> = <A_n A'_m^T, B_n B'_m^T>_F in float64, (N, M), in row chunks."""
        n, t = self.b.shape[:2]
        m, t2 = other.b.shape[:2]
        step = max(1, _CHUNK // max(1, t * m * t2))
        b2 = other.b.reshape(m * t2, -1)
        x2 = other.x.reshape(m * t2, -1) if not other.embedding else other.x.reshape(-1)
        out = []
        for start in range(0, n, step):
            x1, b1 = self.x[start:start + step], self.b[start:start + step]
            k = b1.shape[0]
            if self.embedding:
                kx = (x1.reshape(-1, 1) == x2[None, :]).to(torch.float64)
            else:
                kx = torch.matmul(x1.reshape(k * t, -1), x2.T).to(torch.float64)
            kb = torch.matmul(b1.reshape(k * t, -1), b2.T).to(torch.float64)
            out.append((kx * kb).view(k, t, m, t2).sum(dim=(1, 3)))
        return torch.cat(out)


@dataclass
class DenseBlock:
    """Materialised per-sample gradients of one parameter: ``rows`` (N, size) at ``offset``."""

    offset: int
    rows: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.rows.shape[1])

    def rmatvec(self, weights: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_n w_n (row n), (size,), written into ``out`` (size,) when given."""
        if out is None:
            return torch.mv(self.rows.T, weights)
        return torch.mv(self.rows.T, weights, out=out)


def _add_gram64(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += a b^T in float64; float32 columns are converted a chunk at a time.

    A fresh float64 copy of a large (N, size) block costs more (page faults, cache misses)
    than its product; the chunks reuse two small buffers (the sums are regrouped by chunk:
    float64 rounding, the conversion is exact).
    """
    if a.dtype == torch.float64 and b.dtype == torch.float64:
        total.addmm_(a, b.T)
        return
    step = max(1, _GRAM_CHUNK // max(a.shape[0], b.shape[0]))
    bufs = [torch.empty(t.shape[0], min(step, t.shape[1]), dtype=torch.float64,
                        device=t.device) for t in ((a,) if b is a else (a, b))]
    for start in range(0, a.shape[1], step):
        pieces = [buf[:, :min(step, a.shape[1] - start)].copy_(t[:, start:start + step])
                  for buf, t in zip(bufs, (a, b), strict=False)]
        total.addmm_(pieces[0], pieces[-1].T)


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
        Parameters whose per-sample gradients came from a ``torch.func`` fallback, and why.
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
                _add_gram64(total, d.rows, d.rows)
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
        mine = [(f.offset, f.embedding) for f in self.factors] + [d.offset for d in self.dense]
        theirs = [(f.offset, f.embedding) for f in other.factors] + [d.offset for d in other.dense]
        return mine == theirs

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


def stack_rows(parts: Sequence[Any]) -> Any:
    """The rows of several ``PerSampleRows`` of one model stacked: (sum of N_i, P).

    GhostRows of one layout stack block by block; anything else is materialised row-wise
    through ``as_rows`` (dense arrays stay dense).
    """
    from ngdref.rows import DenseRows, as_rows

    parts = [as_rows(p) for p in parts]
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if all(isinstance(p, GhostRows) and first._same_layout(p) for p in parts):
        factors = [
            FactorBlock(fs[0].offset, fs[0].shape, torch.cat([f.x for f in fs]),
                        torch.cat([f.b for f in fs]))
            for fs in zip(*(p.factors for p in parts), strict=True)
        ]
        dense = [
            DenseBlock(ds[0].offset, torch.cat([d.rows for d in ds]))
            for ds in zip(*(p.dense for p in parts), strict=True)
        ]
        notes = dict.fromkeys(f for p in parts for f in p.fallbacks)
        return GhostRows(
            sum(p.shape[0] for p in parts), first.shape[1], factors=factors, dense=dense,
            dtype=first.dtype, device=first.device, fallbacks=list(notes),
        )
    if all(isinstance(p, DenseRows) for p in parts):
        return DenseRows(torch.cat([p.array for p in parts]))
    raise TypeError("stack_rows: the parts must all be GhostRows of one layout or all dense")
