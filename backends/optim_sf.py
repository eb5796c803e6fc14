r"""SF's products over the true-label rows G and the sampled rows A of one step.

:class:`backends.optim.SF` computes (ngdref.woodbury.true_rows_inverse_apply)

.. math:: u = G^\top w + A^\top v, \qquad w = 1/\lambda, \quad v = -c/\lambda,

with A g from the (M, N) cross-Gram when :func:`cross_gram_is_cheaper`. A's labels are drawn
from the forward pass of G's, so per ghost weight the two share the inputs X (N, T, d_in)
and differ only in the output gradients: G^T w + A^T v = X^T (diag(w) B_G + diag(v) B_A)
is ONE product of the size of a single rmatvec (:meth:`PairedRows.rmatvec_pair`), not two
and a P-length sum.
"""

from __future__ import annotations

from typing import Any

import torch

from .ghost import FactorBlock, GhostRows

__all__ = ["PairedRows", "cross_gram_is_cheaper"]


class PairedRows(GhostRows):
    """The true-label :class:`~backends.ghost.GhostRows` G, with :meth:`rmatvec_pair`.

    The same blocks (no copy); ngdref calls ``rmatvec_pair`` where it is present.
    """

    @classmethod
    def of(cls, rows: GhostRows) -> PairedRows:
        return cls(
            rows.shape[0], rows.shape[1], factors=rows.factors, dense=rows.dense,
            dtype=rows.dtype, device=rows.device, fallbacks=rows.fallbacks,
        )

    def rmatvec_pair(self, other: Any, weights: torch.Tensor, other_weights: torch.Tensor
                     ) -> torch.Tensor:
        r""":math:`G^\top w + A^\top v` (P,) in ``dtype``, A = ``other`` (M, P).

        Per factor weight whose inputs A shares (equal X: one sample per label, K = 1; the
        hooks capture X afresh per backward pass, so equality is checked), one product
        X^T (diag(w) B_G + diag(v) B_A); otherwise per block the two products summed.
        ``other`` of another layout: the two rmatvecs summed.
        """
        if not (isinstance(other, GhostRows) and self._same_layout(other)):
            return self.rmatvec(weights) + other.rmatvec(other_weights)
        self._check(weights, self.shape[0], "weights", "N")
        w, v = weights.to(self.dtype), other_weights.to(self.dtype)
        out = torch.empty(self.shape[1], dtype=self.dtype, device=self.device)
        for f, g in zip(self.factors, other.factors, strict=True):
            piece = out[f.offset:f.offset + f.size]
            if f.x is g.x or torch.equal(f.x, g.x):  # a pass over X, 1/d_out of the product
                b = w[:, None, None] * f.b + v[:, None, None] * g.b
                _factor_rmatvec(f, b, piece)
            else:
                torch.add(f.rmatvec(w), g.rmatvec(v), out=piece)
        for d, e in zip(self.dense, other.dense, strict=True):
            piece = out[d.offset:d.offset + d.size]
            torch.addmv(torch.matmul(w, d.rows), e.rows.T, v, out=piece)
        return out


def _factor_rmatvec(block: FactorBlock, b: torch.Tensor, out: torch.Tensor) -> None:
    """sum_n vec(b_n^T x_n) of ``block``'s inputs and the output gradients ``b`` into ``out``
    (the slice of the weight), written in place for a linear map (no (size,) temporary)."""
    if block.embedding:
        ones = torch.ones(b.shape[0], dtype=b.dtype, device=b.device)
        out.copy_(FactorBlock(block.offset, block.shape, block.x, b).rmatvec(ones))
        return
    x = block.x.reshape(-1, block.x.shape[-1])
    torch.matmul(b.reshape(-1, b.shape[-1]).T, x, out=out.view(b.shape[-1], x.shape[1]))


def cross_gram_is_cheaper(rows: Any, m: int) -> bool:
    r"""Whether SF's A g is cheaper from the (M, N) cross-Gram (A G^T) 1 than as A (G^T 1).

    Multiply-adds against the M rows A that the cross-Gram route saves (the A g pass and the
    P-length g - A^T c; g's own pass is replaced by the rmatvec of G in u = G^T w + A^T v):

    ================  ===========================  ==========================
    block             cross-Gram                   saved
    ================  ===========================  ==========================
    factors           N M T^2 (d_in + d_out)       M T d_in d_out + size
    materialised      N M size                     M size + size
    ================  ===========================  ==========================

    (an embedding's d_in counts as 1: its products are gathers). Dense rows (vmap) and any
    rows that are not :class:`backends.ghost.GhostRows` take A (G^T 1); a
    :class:`backends.dist_rows.DistributedRows` is judged by its rank's shard.
    """
    local = getattr(rows, "local", rows)
    if not isinstance(local, GhostRows):
        return False
    n = rows.shape[0]
    cross = saved = 0
    for f in local.factors:
        t, d_out = f.b.shape[1], f.b.shape[-1]
        d_in = 1 if f.embedding else f.size // d_out
        cross += n * m * t * t * (d_in + d_out)
        saved += m * t * d_in * d_out + f.size
    for d in local.dense:
        cross += n * m * d.size
        saved += (m + 1) * d.size
    return cross < saved
