r"""One block per parameter from the parts of all its uses: ghost factors or materialised rows.

:func:`assemble` is the one place where parts (:mod:`.parts`) become the blocks of
:class:`backends.torch.per_sample.rows.GhostRows`:

* every use of the parameter has the same layout of :class:`~.parts.Outer` parts (same
  starts and widths; a weight used k times, tied weights): the uses are concatenated
  along positions, part by part,

  .. math:: g_n = \sum_{k} \operatorname{vec}(U_{nk}^\top V_{nk})
      = \operatorname{vec}\big([U_{n1}; \dots; U_{nK}]^\top [V_{n1}; \dots; V_{nK}]\big),

  giving a :class:`FactorBlock` (one part) or a :class:`SplitBlock`
  (contiguous row blocks: a grouped convolution's groups, attention's q, k, v rows), kept
  as factors when the route or the cost model (:mod:`.cost`) says so;
* every use is one part over the whole matrix but the forms differ (an embedding tied to
  an output layer): a :class:`TiedBlock` of one :class:`FactorBlock` per form, when the
  route or the cost model (:func:`.cost.tied_cost`) says so;
* otherwise (a bias, :class:`~.parts.Rows`) each use is materialised and the uses are
  summed into one :class:`DenseBlock`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .cost import BALANCE, PartShape, factor_cost, tied_cost
from .parts import Grad, Outer, Rows, along_positions, materialise, part_size

__all__ = ["ROUTES", "DenseBlock", "FactorBlock", "SplitBlock", "TiedBlock", "assemble",
           "shapes_of"]

#: entries of one (rows x columns) chunk of the ghost kernels (32 MiB in float64)
_CHUNK = 2**22

#: per-parameter choice: the cost model, factors wherever possible, materialised everywhere
ROUTES = ("auto", "ghost", "materialise")


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
        r"""<g_n, h_m> = <A_n A'_m^T, B_n B'_m^T>_F in float64, (N, M), in row chunks
        (``other`` may be of the other form, a lookup against an output layer of one table)."""
        return _cross(self, other)

    def at(self, offset: int) -> FactorBlock:
        """The same factors as the block of a parameter at ``offset``."""
        return FactorBlock(offset, self.shape, self.x, self.b)


def _sides(f: FactorBlock) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of the (rows, columns) matrix: rows side (indices (N, T) or (N, T, rows)),
    columns side (N, T, columns)."""
    return (f.x, f.b) if f.embedding else (f.b, f.x)


def _row_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a_i . b_j) (K, M) float64 for rows-side factors, each (K,) / (M,) indices (one-hot
    rows) or (K, V) / (M, V) vectors: an equality, a gather (one term: exact) or a product."""
    if a.dim() == 1 and b.dim() == 1:
        return (a[:, None] == b[None, :]).to(torch.float64)
    if a.dim() == 1:
        return torch.index_select(b, 1, a).T.to(torch.float64)
    if b.dim() == 1:
        return torch.index_select(a, 1, b).to(torch.float64)
    return torch.matmul(a, b.T).to(torch.float64)


def _cross(f: FactorBlock, g: FactorBlock) -> torch.Tensor:
    r"""<g_n, h_m> = sum_{t,t'} (l_nt . l'_mt')(r_nt . r'_mt') in float64, (N, M), for two
    blocks of one (rows, columns) matrix (l, r: :func:`_sides`), in chunks of rows."""
    l1, r1 = _sides(f)
    l2, r2 = _sides(g)
    n, t = r1.shape[:2]
    m, t2 = r2.shape[:2]
    step = max(1, _CHUNK // max(1, t * m * t2))
    l2 = l2.reshape(m * t2, *l2.shape[2:])
    r2 = r2.reshape(m * t2, -1)
    out = []
    for start in range(0, n, step):
        a, c = l1[start:start + step], r1[start:start + step]
        k = c.shape[0]
        kl = _row_kernel(a.reshape(k * t, *a.shape[2:]), l2)
        kr = torch.matmul(c.reshape(k * t, -1), r2.T).to(torch.float64)
        out.append((kl * kr).view(k, t, m, t2).sum(dim=(1, 3)))
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


@dataclass
class SplitBlock:
    """A parameter whose rows are contiguous blocks, each a :class:`FactorBlock` (the
    per-sample gradient of each block is its own outer product). Offers what GhostRows
    asks of a factor block: ``materialise``, ``matvec``, ``rmatvec``, ``cross``."""

    offset: int
    shape: tuple[int, ...]
    parts: tuple[FactorBlock, ...]
    size: int = field(init=False)
    embedding = False

    def __post_init__(self) -> None:
        self.size = math.prod(self.shape)
        if sum(p.size for p in self.parts) != self.size:
            raise ValueError(f"SplitBlock parts cover {sum(p.size for p in self.parts)} "
                             f"entries of a parameter of shape {self.shape}")

    def _slice(self, p: FactorBlock) -> slice:
        return slice(p.offset - self.offset, p.offset - self.offset + p.size)

    def materialise(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample gradients (N, size), written into ``out`` when given."""
        if out is None:
            n = self.parts[0].b.shape[0]
            out = torch.empty(n, self.size, dtype=self.parts[0].b.dtype,
                              device=self.parts[0].b.device)
        for p in self.parts:
            p.materialise(out[:, self._slice(p)])
        return out

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """(G v)_n over this parameter's slice of the (P,) ``vector``, (N,)."""
        return sum(p.matvec(vector) for p in self.parts)

    def rmatvec(self, weights: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_n w_n g_n, (size,), into ``out`` when given (``weights=None``: w_n = 1)."""
        if out is None:
            out = torch.empty(self.size, dtype=self.parts[0].b.dtype,
                              device=self.parts[0].b.device)
        for p in self.parts:
            p.rmatvec(weights, out[self._slice(p)])
        return out

    def cross(self, other: SplitBlock) -> torch.Tensor:
        """<g_n, h_m> (N, M) float64: the parts are disjoint coordinates, so their sum."""
        if [(p.offset, p.size) for p in self.parts] != [(q.offset, q.size) for q in other.parts]:
            raise ValueError("SplitBlock.cross needs the other block's parts at the same rows")
        return sum(p.cross(q) for p, q in zip(self.parts, other.parts, strict=True))


@dataclass
class TiedBlock:
    r"""One (rows, columns) matrix read in several forms, each a :class:`FactorBlock` of the
    whole matrix at ``offset`` (a lookup table tied to an output layer, T5's shared
    vocabulary embedding): g_n = sum_k g_n^{(k)}, and the Gram's cross terms between forms
    are kernels too (a lookup against an output layer's gradients is a gather), so the
    N x rows x columns rows are never made. Offers what GhostRows asks of a factor block."""

    offset: int
    shape: tuple[int, ...]
    uses: tuple[FactorBlock, ...]
    size: int = field(init=False)
    embedding = False

    def __post_init__(self) -> None:
        self.size = math.prod(self.shape)
        if any((u.offset, u.size) != (self.offset, self.size) for u in self.uses):
            raise ValueError(f"TiedBlock uses must each cover the whole parameter of shape "
                             f"{self.shape} at offset {self.offset}")

    def materialise(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample gradients (N, size), the forms summed, into ``out`` when given."""
        out = self.uses[0].materialise(out)
        for u in self.uses[1:]:
            out += u.materialise()
        return out

    @property
    def rows(self) -> torch.Tensor:
        """:meth:`materialise` d, for code that knows only factor and dense blocks."""
        return self.materialise()

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """(G v)_n over this parameter's slice of the (P,) ``vector``, (N,)."""
        return sum(u.matvec(vector) for u in self.uses)

    def rmatvec(self, weights: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """sum_n w_n g_n, (size,), into ``out`` when given (``weights=None``: w_n = 1)."""
        out = self.uses[0].rmatvec(weights, out)
        for u in self.uses[1:]:
            out += u.rmatvec(weights)
        return out

    def cross(self, other: TiedBlock) -> torch.Tensor:
        """<g_n, h_m> (N, M) float64: every pair of forms' cross kernels, summed."""
        if [u.embedding for u in self.uses] != [u.embedding for u in other.uses]:
            raise ValueError("TiedBlock.cross needs the other block's forms in the same order")
        return sum(_cross(f, g) for f in self.uses for g in other.uses)

    def at(self, offset: int) -> TiedBlock:
        """The same factors as the block of a parameter at ``offset``."""
        return TiedBlock(offset, self.shape, tuple(u.at(offset) for u in self.uses))


def _layout(use: Grad) -> tuple:
    return tuple(
        ("rows",) if isinstance(p, Rows) else
        ("outer", p.start, p.lookup, p.v is None, p.u.shape[-1] if not p.lookup else 0,
         None if p.v is None else p.v.shape[-1])
        for p in use)


def _factorable(uses: Sequence[Grad]) -> bool:
    first = _layout(uses[0])
    return all(_layout(u) == first for u in uses) and all(
        x[0] == "outer" and not x[3] for x in first)


def shapes_of(uses: Sequence[Grad], shape: tuple[int, ...]) -> tuple[PartShape, ...]:
    """The :class:`PartShape` s of a parameter's block (its uses concatenated along T)."""
    if not _factorable(uses):
        total = math.prod(shape)
        t = sum(max((p.positions for p in use if isinstance(p, Outer)), default=1)
                for use in uses)
        return (PartShape(t, total, 0),)
    return _outer_shapes(uses, shape)


def _outer_shapes(uses: Sequence[Grad], shape: tuple[int, ...]) -> tuple[PartShape, ...]:
    out = []
    for parts in zip(*uses, strict=True):
        t = sum(p.positions for p in parts)
        p = parts[0]
        d_u = shape[0] if p.lookup else int(p.u.shape[-1])
        out.append(PartShape(t, d_u, int(p.v.shape[-1]), p.lookup))
    return tuple(out)


def _factor_block(offset: int, shape: tuple[int, ...], parts: Sequence[Outer]) -> FactorBlock:
    u = along_positions([p.u for p in parts])
    v = along_positions([p.v for p in parts])
    if parts[0].lookup:
        return FactorBlock(offset, tuple(shape), u, v)
    d_u, d_v = u.shape[-1], v.shape[-1]
    return FactorBlock(offset + parts[0].start * d_v, (d_u, d_v), v, u)


def assemble(
    offset: int,
    shape: tuple[int, ...],
    uses: Sequence[Grad],
    *,
    route: str = "auto",
    balance: float = BALANCE,
) -> FactorBlock | SplitBlock | DenseBlock:
    """The block of one parameter (at ``offset`` in theta, of ``shape``) from its uses.

    Parameters
    ----------
    uses : sequence of Grad
        Per call that used the parameter, its parts (:meth:`LayerKind.factors`).
    route : {"auto", "ghost", "materialise"}
        "auto": factors where :func:`.cost.factor_cost` estimates them cheaper (time =
        multiply-adds + ``balance`` x bytes); "ghost": factors wherever the uses allow.
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if not uses:
        raise ValueError("assemble needs at least one use of the parameter")
    if route != "materialise" and _factorable(uses):
        first = uses[0][0]
        if route == "ghost" or factor_cost(int(first.u.shape[0]), _outer_shapes(uses, shape),
                                           first.v.element_size()).ghost_cheaper(balance):
            blocks = [_factor_block(offset, shape, parts) for parts in zip(*uses, strict=True)]
            return blocks[0] if len(blocks) == 1 else SplitBlock(offset, tuple(shape),
                                                                tuple(blocks))
    if route != "materialise" and _tieable(uses, shape):
        block = _tied(offset, shape, uses, route, balance)
        if block is not None:
            return block
    return DenseBlock(offset, _dense(uses, shape))


def _tieable(uses: Sequence[Grad], shape: tuple[int, ...]) -> bool:
    """Whether every use is one :class:`~.parts.Outer` part over the whole matrix (a table
    lookup or an output layer of it), in more than one form."""
    whole = [len(u) == 1 and isinstance(u[0], Outer) and u[0].v is not None
             and u[0].start == 0 and part_size(u[0], shape) == math.prod(shape) for u in uses]
    return len(shape) == 2 and all(whole) and len({_layout(u) for u in uses}) > 1


def _tied(offset: int, shape: tuple[int, ...], uses: Sequence[Grad], route: str,
          balance: float) -> TiedBlock | None:
    """The uses grouped by form (each group concatenated along positions) as a
    :class:`TiedBlock`, where the route or :func:`.cost.tied_cost` says so."""
    groups: dict[tuple, list[Outer]] = {}
    for use in uses:
        groups.setdefault(_layout(use), []).append(use[0])
    first = uses[0][0]
    shapes = tuple(PartShape(sum(p.positions for p in g), shape[0], shape[1], g[0].lookup)
                   for g in groups.values())
    if route != "ghost" and not tied_cost(int(first.u.shape[0]), shapes,
                                          first.v.element_size()).ghost_cheaper(balance):
        return None
    return TiedBlock(offset, tuple(shape),
                     tuple(_factor_block(offset, shape, g) for g in groups.values()))


def _dense(uses: Sequence[Grad], shape: tuple[int, ...]) -> torch.Tensor:
    """The uses materialised and summed, (N, prod(shape)); each part at its own rows."""
    if len(uses) == 1 and len(uses[0]) == 1 and part_size(uses[0][0], shape) == math.prod(
            shape) and (isinstance(uses[0][0], Rows) or uses[0][0].start == 0):
        return materialise(uses[0][0], shape)  # one part, the whole parameter: as it is
    total = None
    for use in uses:
        for p in use:
            rows = materialise(p, shape)
            if total is None:
                total = rows.new_zeros(rows.shape[0], math.prod(shape))
            first = 0 if isinstance(p, Rows) else p.start * (
                1 if p.v is None or p.lookup else int(p.v.shape[-1]))
            if first + part_size(p, shape) > total.shape[1]:
                raise ValueError(f"a part at row {first} of {part_size(p, shape)} entries "
                                 f"overruns a parameter of shape {tuple(shape)}")
            total[:, first:first + rows.shape[1]] += rows
    return total
