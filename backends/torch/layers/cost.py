r"""Cost model of one parameter's block: ghost factors against materialised rows.

The work counted is that of one step of the Gram-form methods: the Gram matrix G G^T and
one product G^T w (IEF, EF and SF all need both), for N samples. Per :class:`PartShape`
(T positions, factors of widths d_u and d_v, element size s bytes):

====================  ===================================  ========================================
route                 multiply-adds                        bytes moved
====================  ===================================  ========================================
ghost                 N^2 T^2 (d_u + d_v) + N T d_u d_v    2 s N T (d_u + d_v) + (N T)^2 (2 s + 24)
                                                           + s d_u d_v
materialised          N T d_u d_v + N^2 d_u d_v            s N T (d_u + d_v) + N d_u d_v (3 s + 8)
                      + N d_u d_v
ghost, lookup (V, d)  N^2 T^2 (d + 1) + N T d              2 s N T d + (N T)^2 (s + 32) + s V d
materialised, lookup  N T d + N^2 V d + N V d              2 s N T d + N V d (3 s + 8)
bias (v = 1), rows    N T d_u + N^2 d_u + N d_u            as materialised (no ghost form)
tied forms k, l       each form's, plus per ordered pair     (N T_k)(N T_l)(2 s + 24) per pair
                      N^2 T_k T_l (d + V, or d + 1 with a
                      lookup): :func:`tied_cost`
====================  ===================================  ========================================

The ghost kernels are (N T) x (N T) matrices made in the rows' dtype, converted to float64
and multiplied (the 2 s + 24 bytes per entry); a materialised block is written once, read
by its float64 Gram (converted in chunks: s + 8) and by G^T w. Time is estimated as
multiply-adds + ``balance`` x bytes, with ``balance`` the machine's multiply-adds per byte of
memory traffic (:data:`BALANCE`; an engine may calibrate it). Counting bytes is what makes
the ghost route win for long sequences of wide layers, where a flop count alone would
materialise N copies of d_u x d_v weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BALANCE", "Cost", "PartShape", "Work", "factor_cost", "tied_cost"]

#: multiply-adds per byte moved at which compute and memory traffic take equal time
#: (about 50 GFLOP/s over 6 GB/s per CPU core; GPUs are near 10-20 too)
BALANCE = 8.0


@dataclass(frozen=True)
class PartShape:
    """The sizes of one part: T positions, widths d_u (rows, or the table's V for a
    lookup) and d_v (0 for a bias, or for materialised :class:`~.parts.Rows` of size d_u)."""

    positions: int
    d_u: int
    d_v: int
    lookup: bool = False


@dataclass(frozen=True)
class Work:
    """Multiply-adds and bytes moved."""

    flops: float
    bytes: float

    def time(self, balance: float = BALANCE) -> float:
        """Estimated time in multiply-adds: flops + balance * bytes."""
        return self.flops + balance * self.bytes

    def __add__(self, other: Work) -> Work:
        return Work(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Cost:
    """The work of one parameter's block by each route; ``ghost`` None: not factorable."""

    ghost: Work | None
    materialised: Work

    def ghost_cheaper(self, balance: float = BALANCE) -> bool:
        return self.ghost is not None and (
            self.ghost.time(balance) < self.materialised.time(balance))


def _part(n: int, p: PartShape, s: int) -> tuple[Work | None, Work]:
    t, du, dv = p.positions, p.d_u, p.d_v
    if p.lookup:
        ghost = Work(n * n * t * t * (dv + 1) + n * t * dv,
                     2 * s * n * t * dv + (n * t) ** 2 * (s + 32) + s * du * dv)
        return ghost, Work(n * t * dv + n * n * du * dv + n * du * dv,
                           2 * s * n * t * dv + n * du * dv * (3 * s + 8))
    if dv == 0:  # a bias (sum over positions) or materialised rows: nothing to factor
        return None, Work(n * t * du + n * n * du + n * du, s * n * t * du + n * du * (3 * s + 8))
    ghost = Work(n * n * t * t * (du + dv) + n * t * du * dv,
                 2 * s * n * t * (du + dv) + (n * t) ** 2 * (2 * s + 24) + s * du * dv)
    dense = Work(n * t * du * dv + n * n * du * dv + n * du * dv,
                 s * n * t * (du + dv) + n * du * dv * (3 * s + 8))
    return ghost, dense


def factor_cost(n: int, shapes: Sequence[PartShape], itemsize: int = 4) -> Cost:
    """The :class:`Cost` of one parameter whose parts have ``shapes``, for N = ``n``.

    A parameter is ghost only as a whole: its ghost work is None if any part has none.
    """
    ghost: Work | None = Work(0, 0)
    dense = Work(0, 0)
    for p in shapes:
        g, d = _part(n, p, itemsize)
        ghost = None if g is None or ghost is None else ghost + g
        dense = dense + d
    return Cost(ghost, dense)


def tied_cost(n: int, shapes: Sequence[PartShape], itemsize: int = 4) -> Cost:
    r"""The :class:`Cost` of one (V, d) matrix read in several forms (a lookup table tied to
    an output layer), ``shapes`` one per form, each covering the whole matrix.

    The ghost work is that of each form alone (:func:`factor_cost`) plus, per ordered pair
    of forms k != l, the cross kernels: N^2 T_k T_l (d + V) multiply-adds where neither is
    a lookup (d + 1 otherwise: the table side is a gather) and (N T_k)(N T_l)(2 s + 24)
    bytes. Materialised: every form's rows, as :func:`factor_cost` counts them.
    """
    alone = factor_cost(n, shapes, itemsize)
    if alone.ghost is None:
        return alone
    ghost = alone.ghost
    for k, a in enumerate(shapes):
        for b in shapes[k + 1:]:
            width = a.d_v + (1 if a.lookup or b.lookup else a.d_u)
            pair = Work(n * n * a.positions * b.positions * width,
                        (n * a.positions) * (n * b.positions) * (2 * itemsize + 24))
            ghost = ghost + pair + pair
    return Cost(ghost, alone.materialised)
