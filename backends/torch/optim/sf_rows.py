r"""SF's products over the true-label rows G and the sampled rows A of one step.

:class:`backends.torch.optim.methods.SF` computes (ngdref.woodbury.true_rows_inverse_apply)

.. math:: u = G^\top w + A^\top v, \quad w = 1/\lambda, \quad v = -c/\lambda, \qquad
    (A A^\top + \lambda I) c = A G^\top 1.

:class:`PairedRows` supplies both pieces block by block, each the cheaper way
(:func:`block_costs`): A G^T 1 from the block's cross-Gram (ghost factors at few positions)
or as A_b (G_b^T 1) (materialised rows, long sequences), keeping g_b = G_b^T 1 for u. A's
labels are drawn from the forward pass of G's, so per ghost weight the two share the inputs
X (N, T, d_in): G^T w + A^T v = X^T (diag(w) B_G + diag(v) B_A) is ONE product.
"""

from __future__ import annotations

from typing import Any

import torch

from ..per_sample.rows import DenseBlock, FactorBlock, GhostRows, TiedBlock

__all__ = ["PairedRows", "block_costs", "cross_gram_is_cheaper"]


def block_costs(block: FactorBlock | TiedBlock | DenseBlock, n: int, m: int) -> tuple[int, int]:
    r"""Multiply-adds of A_b G_b^T 1 by the block's (M, N) cross-Gram, and of A_b (G_b^T 1).

    ================  ===========================  ==========================
    block             cross-Gram                   A_b (G_b^T 1)
    ================  ===========================  ==========================
    factors           N M T^2 (d_in + d_out)       M T d_in d_out + size
    materialised      N M size                     M size + size
    ================  ===========================  ==========================

    (an embedding's d_in counts as 1: its products are gathers; "+ size" is the P-length
    work g_b - A_b^T c that the cross-Gram route folds into u's product; a tied block
    counts every pair of its forms).
    """
    if isinstance(block, DenseBlock):
        return n * m * block.size, (m + 1) * block.size
    if isinstance(block, TiedBlock):  # every pair of forms: (rows . rows')(cols . cols')
        pairs = [(f.b.shape[1], g.b.shape[1], 1 if f.embedding or g.embedding
                  else block.shape[0]) for f in block.uses for g in block.uses]
        direct = sum(m * f.b.shape[1] * (block.shape[1] if f.embedding else block.size)
                     for f in block.uses)
        return (sum(n * m * t * t2 * (block.shape[1] + d) for t, t2, d in pairs),
                direct + block.size)
    t, d_out = block.b.shape[1], block.b.shape[-1]
    d_in = 1 if block.embedding else block.size // d_out
    return n * m * t * t * (d_in + d_out), m * t * d_in * d_out + block.size


def cross_gram_is_cheaper(rows: Any, m: int) -> bool:
    """Whether the whole (M, N) cross-Gram beats A (G^T 1) (:func:`block_costs` summed): for
    rows that cannot choose per block (a DistributedRows is judged by its rank's shard);
    dense rows (vmap) and rows that are not GhostRows: False."""
    local = getattr(rows, "local", rows)
    if not isinstance(local, GhostRows):
        return False
    costs = [block_costs(b, rows.shape[0], m) for b in (*local.factors, *local.dense)]
    return sum(c for c, _ in costs) < sum(s for _, s in costs)


class PairedRows(GhostRows):
    """The true-label :class:`~backends.torch.per_sample.rows.GhostRows` G (the same blocks, no
    copy), with the two optional products ngdref's ``true_rows_inverse_apply`` uses when present."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sums: dict[int, torch.Tensor] = {}  # offset -> g_b, blocks taken as A_b g_b

    @classmethod
    def of(cls, rows: GhostRows) -> PairedRows:
        return cls(
            rows.shape[0], rows.shape[1], factors=rows.factors, dense=rows.dense,
            dtype=rows.dtype, device=rows.device, fallbacks=rows.fallbacks,
        )

    def cross_row_sums(self, other: Any) -> torch.Tensor:
        """A G^T 1 (M,) float64, A = ``other``, block by block the cheaper way."""
        if not (isinstance(other, GhostRows) and self._same_layout(other)):
            return other.cross_gram(self).sum(dim=1)
        n, m = self.shape[0], other.shape[0]
        out = torch.zeros(m, dtype=torch.float64, device=self.device)
        for mine, theirs in zip((*self.factors, *self.dense), (*other.factors, *other.dense),
                                strict=True):
            cross, direct = block_costs(mine, n, m)
            if not isinstance(mine, DenseBlock) and cross < direct:
                out += theirs.cross(mine).sum(dim=1)
                continue
            if not isinstance(mine, DenseBlock):
                g = mine.rmatvec(None)
                image = theirs.at(0).matvec(g)
            else:
                g = mine.rows.sum(dim=0)
                image = torch.matmul(theirs.rows, g)
            self._sums[mine.offset] = g
            out += image.to(torch.float64)
        return out

    def rmatvec_pair(self, other: Any, weights: torch.Tensor, other_weights: torch.Tensor
                     ) -> torch.Tensor:
        r""":math:`G^\top w + A^\top v` (P,) in ``dtype``, A = ``other`` (M, P).

        Per block: with g_b kept by :meth:`cross_row_sums` and a constant w (SF's 1/lambda),
        w g_b + A_b^T v; else per factor weight whose inputs A shares (equal X: one sample
        per label, K = 1; the hooks capture X afresh per backward pass, so equality is
        checked) one product X^T (diag(w) B_G + diag(v) B_A); else the two products summed.
        ``other`` of another layout: the two rmatvecs summed.
        """
        if not (isinstance(other, GhostRows) and self._same_layout(other)):
            return self.rmatvec(weights) + other.rmatvec(other_weights)
        self._check(weights, self.shape[0], "weights", "N")
        w, v = weights.to(self.dtype), other_weights.to(self.dtype)
        constant = float(w[0]) if bool(torch.all(w == w[0])) else None
        out = torch.empty(self.shape[1], dtype=self.dtype, device=self.device)
        for mine, theirs in zip((*self.factors, *self.dense), (*other.factors, *other.dense),
                                strict=True):
            piece = out[mine.offset:mine.offset + mine.size]
            kept = self._sums.get(mine.offset)
            if kept is not None and constant is not None:
                torch.add(theirs.rmatvec(v), kept, alpha=constant, out=piece)
            else:
                _pair_rmatvec(mine, theirs, w, v, piece)
        return out


def _pair_rmatvec(mine: Any, theirs: Any, w: torch.Tensor, v: torch.Tensor,
                  piece: torch.Tensor) -> torch.Tensor:
    """G_b^T w + A_b^T v into ``piece``: one product per factor pair whose inputs A shares
    (a tied block form by form), else the two products summed."""
    if isinstance(mine, TiedBlock):
        _pair_rmatvec(mine.uses[0], theirs.uses[0], w, v, piece)
        for f, g in zip(mine.uses[1:], theirs.uses[1:], strict=True):
            piece += _pair_rmatvec(f, g, w, v, torch.empty_like(piece))
        return piece
    if isinstance(mine, FactorBlock) and (
        mine.x is theirs.x or torch.equal(mine.x, theirs.x)  # 1/d_out of the product
    ):
        b = w[:, None, None] * mine.b + v[:, None, None] * theirs.b
        return FactorBlock(mine.offset, mine.shape, mine.x, b).rmatvec(None, piece)
    return torch.add(mine.rmatvec(w), theirs.rmatvec(v), out=piece)

