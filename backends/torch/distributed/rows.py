r"""The per-sample gradients of a batch shared by the ranks of a process group.

:class:`DistributedRows` implements ngdref's ``PerSampleRows`` for the concatenation of every
rank's rows (see :mod:`backends.torch.distributed.comm` for what is sent): the Gram matrix from
layer pieces gathered to an owner rank per layer, G v and G^T w from each rank's own rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from ngdref.rows import DenseRows, as_rows, rows_device

from ..per_sample.rows import DenseBlock, FactorBlock, GhostRows, stack_rows

__all__ = ["Collectives", "DistributedRows", "pad"]


class Collectives(Protocol):
    """What :class:`DistributedRows` needs of a communicator (e.g.
    :class:`~backends.torch.distributed.comm.ProcessGroupComm`): this rank, the number of
    ranks, and the collectives it sends the rows with. Every call is a collective: all ranks
    make it in the same order."""

    rank: int
    world: int

    def gather(self, tensor: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along axis 0 (rank r's: ``sizes[r]`` rows)."""
        ...

    def gather_to(
        self, owner: int, flat: torch.Tensor, lengths: Sequence[int]
    ) -> list[torch.Tensor] | None:
        """Every rank's 1-d ``flat`` at rank ``owner``, one tensor per rank (None elsewhere)."""
        ...

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's ``tensor``, on every rank."""
        ...

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order, on every rank."""
        ...


def _blocks(rows: Any) -> list[Any]:
    """The blocks of one rank's rows, by offset: FactorBlock / DenseBlock (dense rows: one)."""
    if isinstance(rows, GhostRows):
        return sorted([*rows.factors, *rows.dense], key=lambda b: b.offset)
    return [DenseBlock(0, as_rows(rows).array)]


def _kind(block: Any) -> tuple[int, int, str, int]:
    """(offset, size, kind, floats per sample of its factors: T (d_in + d_out); 0 if dense)."""
    if isinstance(block, FactorBlock):
        t, d_out = block.b.shape[1:]
        d_in = 1 if block.embedding else block.x.shape[2]
        kind = "embedding" if block.embedding else "factor"
        return (block.offset, block.size, kind, int(t * (d_in + d_out)))
    return (block.offset, block.size, "dense", 0)


def _canonical(blocks: list[Any], layouts: list[list[tuple]]) -> list[Any]:
    """Per parameter, the form its rows travel in, the same on every rank.

    Factors where every rank has them (of one kind) and they are fewer floats per sample
    than the parameter (T (d_in + d_out) < size: a LoRA factor of rank 8 at T = 100 is
    sent materialised); else the materialised rows. Ranks may have chosen differently (the
    ghost/materialised choice depends on N_r; a vmap fallback on one rank); if their blocks
    do not even cover the same spans (dense vmap rows), all of G_r is materialised.
    """
    spans = [[layout_block[:2] for layout_block in layout] for layout in layouts]
    if any(span != spans[0] for span in spans):
        return [DenseBlock(0, torch.cat([_dense(b) for b in blocks], dim=1))]
    out = []
    for i, block in enumerate(blocks):
        agreed = len({layout[i][2] for layout in layouts}) == 1
        smaller = max(layout[i][3] for layout in layouts) < block.size
        out.append(block if agreed and smaller and isinstance(block, FactorBlock)
                   else DenseBlock(block.offset, _dense(block)))
    return out


def pad(tensor: torch.Tensor, width: Sequence[int], rows: int | None = None) -> torch.Tensor:
    """``tensor`` zero-padded to ``(rows, *width)`` (rows: its own by default), contiguous."""
    shape = (tensor.shape[0] if rows is None else rows, *width)
    if tuple(tensor.shape) == shape:
        return tensor.contiguous()
    out = tensor.new_zeros(shape)
    out[tuple(slice(0, k) for k in tensor.shape)] = tensor
    return out


def _column_split(blocks: list[Any], world: int) -> list[Any]:
    """Dense rows as one block (the vmap route) cut into ``world`` column slices to share."""
    if len(blocks) != 1 or not isinstance(blocks[0], DenseBlock):
        return blocks
    cuts = torch.tensor_split(torch.arange(blocks[0].size), world)
    return [DenseBlock(int(c[0]), blocks[0].rows[:, int(c[0]):int(c[-1]) + 1])
            for c in cuts if len(c)]


def _owners(sizes: Sequence[int], world: int) -> list[int]:
    """An owner rank per block: largest first to the least loaded rank (the same everywhere)."""
    load, owners = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += sizes[i]
    return owners


def _block_gram(block: Any, pieces: list[torch.Tensor]) -> torch.Tensor:
    """The N x N Gram matrix (float64) of one block from the pieces of every rank."""
    if isinstance(block, FactorBlock):
        whole = FactorBlock(block.offset, block.shape, pieces[0], pieces[1])
        return whole.cross(whole)
    rows = pieces[0].to(torch.float64)
    return rows @ rows.T


def _dense(block: Any) -> torch.Tensor:
    return block.materialise() if isinstance(block, FactorBlock) else block.rows


def _tensors(blocks: list[Any]) -> list[torch.Tensor]:
    return [t for b in blocks for t in ((b.x, b.b) if isinstance(b, FactorBlock) else (b.rows,))]


class DistributedRows:
    r"""The per-sample gradients G (N, P) of the whole group, from each rank's shard G_r.

    Implements ngdref's ``PerSampleRows`` (rows in rank order). Rank r holds its own rows
    (any ``PerSampleRows``: the ghost route's :class:`~backends.torch.per_sample.rows.GhostRows` or
    dense); ``gram`` all-gathers the others' ghost factors / materialised layer rows once, forms
    its block row :math:`G_r G^\top` and all-gathers the block rows; ``matvec`` all-gathers
    the shards' :math:`G_r v`; ``rmatvec`` all-reduces :math:`G_r^\top w_r`. Every method
    is a collective: all ranks must call it in the same order.
    """

    def __init__(self, local: Any, comm: Collectives) -> None:
        self.local = as_rows(local, name="rows")
        self.comm = comm
        n, p = self.local.shape
        self._blocks = _blocks(local)
        # one control exchange: every rank's size and layout, and its tensors' shapes
        meta = comm.gather_objects((n, p, [_kind(b) for b in self._blocks]))
        if any(m[1] != p for m in meta):
            raise ValueError(f"rows: the ranks' rows have P = {[m[1] for m in meta]} columns")
        self.sizes = [m[0] for m in meta]
        self._layouts = [m[2] for m in meta]
        self.shape = (sum(self.sizes), p)
        self.dtype = self.local.dtype
        self.device = rows_device(self.local)
        self.offset = sum(self.sizes[: comm.rank])
        self.fallbacks = tuple(getattr(local, "fallbacks", ()))
        self._gram: torch.Tensor | None = None
        self._everyone: Any = None
        self._canonical: Any = None

    def array_namespace(self) -> Any:
        return self.local.array_namespace()

    def _mine(self) -> Any:
        """This rank's rows in the layout shared by all ranks."""
        if self._canonical is None:
            blocks = _canonical(self._blocks, self._layouts)
            self._canonical = self._assemble(blocks, self.local.shape[0])
        return self._canonical

    def _assemble(self, blocks: list[Any], n: int) -> Any:
        first = blocks[0]
        if len(blocks) == 1 and isinstance(first, DenseBlock) and first.size == self.shape[1]:
            return DenseRows(first.rows, name="rows")
        return GhostRows(
            n, self.shape[1], factors=[b for b in blocks if isinstance(b, FactorBlock)],
            dense=[b for b in blocks if isinstance(b, DenseBlock)],
            dtype=self.dtype, device=_device(blocks),
        )

    def everyone(self) -> Any:
        """The rows of all ranks stacked (N, P), in the shared layout: one all-gather."""
        if self._everyone is None:
            blocks = _blocks(self._mine())
            tensors = _tensors(blocks)
            shapes = self.comm.gather_objects([tuple(t.shape) for t in tensors])
            per_rank: list[list[torch.Tensor]] = [[] for _ in range(self.comm.world)]
            for i, tensor in enumerate(tensors):
                width = [max(s[i][d] for s in shapes) for d in range(1, tensor.ndim)]
                flat = pad(tensor, width).reshape(tensor.shape[0], -1)
                rows = self.comm.gather(flat, [s[i][0] for s in shapes])
                parts = torch.split(rows, [s[i][0] for s in shapes])
                for rank, part in enumerate(parts):
                    per_rank[rank].append(part.reshape(-1, *width))
            self._everyone = stack_rows(
                [self._rebuild(blocks, parts, n) for parts, n in zip(per_rank, self.sizes,
                                                                      strict=True)]
            )
        return self._everyone

    def _rebuild(self, blocks: list[Any], tensors: list[torch.Tensor], n: int) -> Any:
        it = iter(tensors)
        out = [
            FactorBlock(b.offset, b.shape, next(it), next(it)) if isinstance(b, FactorBlock)
            else DenseBlock(b.offset, next(it))
            for b in blocks
        ]
        return self._assemble(out, n)

    def gram(self) -> torch.Tensor:
        """G G^T (N, N) float64, symmetrised.

        Each parameter block (a layer's ghost factors or materialised columns; dense rows
        cut into R column slices) has an owner rank (:func:`_owners`), to which every rank
        sends its part of the block (a gather: each piece crosses the network once); the
        owner forms that block's N x N Gram matrix, and one all-reduce sums the owners'.
        """
        if self._gram is None:
            blocks = _column_split(_blocks(self._mine()), self.comm.world)
            tensors = _tensors(blocks)
            shapes = self.comm.gather_objects([tuple(t.shape) for t in tensors])
            owners = _owners([b.size for b in blocks], self.comm.world)
            counts = [2 if isinstance(b, FactorBlock) else 1 for b in blocks]
            received = self._to_owners(
                tensors, shapes, [o for o, c in zip(owners, counts, strict=True) for _ in range(c)]
            )
            n = self.shape[0]
            partial = torch.zeros(n, n, dtype=torch.float64, device=self.device)
            i = 0
            for block, owner, count in zip(blocks, owners, counts, strict=True):
                if self.comm.rank == owner:
                    partial += _block_gram(block, [received[j] for j in range(i, i + count)])
                i += count
            full = self.comm.all_sum(partial)
            self._gram = 0.5 * (full + full.T)
        return self._gram

    def _to_owners(
        self, tensors: list[torch.Tensor], shapes: list[list[tuple]], owners: list[int]
    ) -> dict[int, torch.Tensor]:
        """At its owner, each tensor with every rank's rows concatenated ({index: tensor}).

        One gather per (owner, dtype), the tensors packed flat with trailing axes
        zero-padded to the largest of any rank (a factor's T may differ between ranks;
        zero positions add nothing to a Gram matrix).
        """
        widths = [[max(s[j][d] for s in shapes) for d in range(1, len(t.shape))]
                  for j, t in enumerate(tensors)]
        groups: dict[tuple[int, str], list[int]] = {}
        for j, tensor in enumerate(tensors):
            groups.setdefault((owners[j], str(tensor.dtype)), []).append(j)
        out: dict[int, torch.Tensor] = {}
        for (owner, _), index in sorted(groups.items()):
            sizes = [[s[j][0] * math.prod(widths[j]) for j in index] for s in shapes]
            flat = torch.cat([pad(tensors[j], widths[j]).reshape(-1) for j in index])
            parts = self.comm.gather_to(owner, flat, [sum(z) for z in sizes])
            if parts is None:
                continue
            split = [torch.split(part, z) for part, z in zip(parts, sizes, strict=True)]
            for k, j in enumerate(index):
                out[j] = torch.cat([pieces[k].reshape(-1, *widths[j]) for pieces in split])
        return out

    def cross_gram(self, other: Any) -> torch.Tensor:
        """G H^T (N, M) float64 with ``other`` the DistributedRows of the same group."""
        if not isinstance(other, DistributedRows) or other.comm is not self.comm:
            raise TypeError("other must be DistributedRows of the same process group")
        block = as_rows(self._mine()).cross_gram(other.everyone())
        return self.comm.gather(block, self.sizes)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """G v (N,): the shards' G_r v all-gathered."""
        return self.comm.gather(self.local.matvec(v), self.sizes)

    def rmatvec(self, w: torch.Tensor) -> torch.Tensor:
        """G^T w (P,): the shards' G_r^T w_r all-reduced."""
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (self.shape[0],):
            raise ValueError(f"w must be a torch.Tensor of shape ({self.shape[0]},)")
        mine = w[self.offset:self.offset + self.local.shape[0]]
        return self.comm.all_sum(self.local.rmatvec(mine).to(self.dtype))


def _device(blocks: list[Any]) -> torch.device:
    first = blocks[0]
    return (first.b if isinstance(first, FactorBlock) else first.rows).device

