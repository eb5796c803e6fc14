r"""One evaluation batch, scored under the "ngdref" or the authors' protocol (SPEC §5, §9).

Both protocols take the SAME per-sample quantities of M training samples, computed in the sum
convention (``G`` (M, P), ``s`` (M,), SF's sampled gradients ``G_hat`` (K M, P)) and scale them
by one reduction factor R, as the mean loss of the paper and the authors' code does:
rows R G, ``R^2 s``, sampled rows ``R G_hat`` (the gradient of the mean loss on sampled labels,
R times the sum-convention row, NOT sqrt(R)), ``g = R sum_n g_n`` and ``F = R sum_n J_n^T H_n
J_n``. One damping number then damps EF, iEF and SF alike (SPEC §9).

=====================  ==========================================  ==========================
                       ``"ngdref"``                                ``"authors"``
=====================  ==========================================  ==========================
R                      1 / M (the mean over the batch)             1 / micro_batch (their
                                                                   micro-batch means of 40,
                                                                   rows concatenated unscaled)
damping                one number per method (EF, iEF, SF)         one lambda for all methods
duplicate filter       inside the EF / iEF solves (``ngdref``'s    before everything: every
                       ``dedup_threshold``, its default rule)      pair with ``|cos| > 0.95``
                                                                   drops its smaller-norm row
                                                                   (all pairs compared)
g (updates and gamma)  R times the sum of all M rows               R times the sum of the
                                                                   KEPT rows
imbalance              over all M rows                             over the kept rows
SF's sampled rows      all K M                                     near-duplicates
                                                                   (``|cos| > 0.99``) removed
                                                                   (``sf_duplicates``)
F in gamma             all M samples                               all M samples
=====================  ==========================================  ==========================

The authors' rules are those of ``update_generation`` and ``remove_J_C_duplicates`` in
``example_glue_sst2_preconditioner.py`` / ``glue_sst2_utils.py`` of their release. Their SF
filter scans the sampled rows in decreasing norm and removes every later row with
``|cos| > 0.99`` to the current one; it is written to MERGE the removed row into the kept one
(scale the kept row so that its squared norm is the pair's sum, which leaves
``G_hat^T G_hat`` unchanged for exact duplicates), but the accumulator aliases the reference
norms (``new_iJ_norm_sqr = iJ_norm_sqr``), so the scale-up test ``new > old`` is never true
and the released code DROPS the row. ``sf_duplicates="drop"`` (default) is what the released
code computes, ``"merge"`` what it was written to do.

Imbalance statistics (:data:`IMBALANCE_STATISTICS`): ``"max_min"`` = max_n ||g_n|| /
min_n ||g_n|| (the authors' evaluation prints this), ``"tail_10"`` = mean of the largest
floor(M/10) norms over the mean of the smallest floor(M/10) (at least one; the authors'
optimiser logs this). Both are ratios, independent of R.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import ngdref

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMBALANCE_STATISTICS",
    "PROTOCOLS",
    "SF_DUPLICATES",
    "BatchScorer",
    "authors_keep",
    "authors_sf_rows",
    "imbalance",
]

PROTOCOLS = ("ngdref", "authors")
IMBALANCE_STATISTICS = ("max_min", "tail_10")
SF_DUPLICATES = ("drop", "merge")
#: the authors' thresholds: true rows (their evaluation) and SF's sampled rows
AUTHORS_DEDUP_THRESHOLD = 0.95
AUTHORS_SF_DEDUP_THRESHOLD = 0.99


def imbalance(norms: np.ndarray, statistic: str) -> float:
    r"""Gradient-norm imbalance of row norms (M,): "max_min" or "tail_10" (module docstring).

    +inf when the denominator is 0.
    """
    ordered = np.sort(np.asarray(norms, dtype=np.float64))
    if statistic == "max_min":
        low, high = ordered[0], ordered[-1]
    elif statistic == "tail_10":
        k = max(1, ordered.size // 10)
        low, high = ordered[:k].mean(), ordered[-k:].mean()
    else:
        raise ValueError(f"statistic must be one of {IMBALANCE_STATISTICS}, got {statistic!r}")
    return float("inf") if low == 0.0 else float(high / low)


def _abs_cosines(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sq = np.clip(np.diag(gram), 0.0, None)
    norms = np.sqrt(sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.abs(gram) / np.outer(norms, norms)
    return np.nan_to_num(cos, nan=0.0), sq


def authors_keep(gram: np.ndarray, threshold: float) -> np.ndarray:
    r"""The authors' all-pairs duplicate filter: bool mask (M,) of the rows kept.

    For every pair i < j with :math:`|K_{ij}| / \sqrt{K_{ii} K_{jj}} >` ``threshold``, row i
    is dropped if :math:`K_{jj} > K_{ii}`, else row j (a dropped row still takes part in
    other pairs).
    """
    cos, sq = _abs_cosines(gram)
    i, j = np.nonzero(np.triu(cos > threshold, k=1))
    keep = np.ones(gram.shape[0], dtype=bool)
    keep[np.where(sq[j] > sq[i], i, j)] = False
    return keep


def authors_sf_rows(
    gram: np.ndarray, threshold: float, duplicates: str
) -> tuple[np.ndarray, np.ndarray]:
    r"""SF's sampled rows after the authors' filter: (indices kept, scale of each).

    Rows in decreasing norm; for each row a not marked exactly duplicate, every later row b
    (not marked) with ``|cos| > threshold`` is removed and its squared norm added to a's
    accumulator (b is marked when the accumulators are equal). ``"drop"``: scales 1 (the
    released code); ``"merge"``: a kept row is scaled by sqrt(accumulated / own squared norm).
    """
    cos, sq = _abs_cosines(gram)
    order = np.argsort(-sq, kind="stable")
    close = np.triu(cos[np.ix_(order, order)] > threshold, k=1)
    own = sq[order]
    acc = own.copy()
    # the released code compares (and adds) the accumulated norms, its intent the own ones
    compared = acc if duplicates == "drop" else own
    removed: set[int] = set()
    exact: set[int] = set()
    for a in range(order.size):
        if a in exact:
            continue
        for b in np.flatnonzero(close[a]):
            if b in exact:
                continue
            removed.add(int(b))
            if compared[a] == compared[b]:
                exact.add(int(b))
            acc[a] += compared[b]
    kept = np.array([a for a in range(order.size) if a not in removed], dtype=np.int64)
    scale = np.ones(kept.size)
    if duplicates == "merge":
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(own[kept] > 0, np.sqrt(acc[kept] / own[kept]), 1.0)
    return order[kept], scale


@dataclass
class BatchScorer:
    """The R-scaled quantities of one batch under one protocol, and gamma of any update.

    Attributes
    ----------
    rows : torch.Tensor, shape (M', P)
        R g_n of the rows the updates use (authors: the kept rows; ngdref: all M).
    sq_norms : torch.Tensor, shape (M',)
        R^2 s_n of the same rows.
    grad : torch.Tensor, shape (P,)
        g = sum of ``rows`` (R-scaled).
    sampled : torch.Tensor or None, shape (K M'', P)
        R times SF's sampled gradients (authors: filtered, see :func:`authors_sf_rows`).
    form : ngdref.QuadraticForm
        v -> v^T F v with F = R sum over all M samples.
    dedup_threshold : float or None
        Passed to ``ngdref.ef_update`` / ``ief_update`` (authors: None, already filtered).
    num_samples : int
        K of ``sampled`` (authors after filtering: 1, the rows are no longer K per sample).
    imbalance : dict of str to float
        Both statistics, over the rows of the protocol.
    kept : int
        M', the rows the EF / iEF updates and g use.
    """

    rows: torch.Tensor
    sq_norms: torch.Tensor
    grad: torch.Tensor
    sampled: torch.Tensor | None
    form: ngdref.QuadraticForm
    dedup_threshold: float | None
    num_samples: int
    imbalance: dict[str, float]
    kept: int

    def gamma(self, update: torch.Tensor) -> float:
        r""":math:`\sqrt{d^\top F d} / |d^\top g|` with this batch's F and g."""
        return float(ngdref.gamma(update, self.form, self.grad))

    def update(self, method: str, damping: float) -> torch.Tensor:
        """SGD's g, or EF's, iEF's or SF's update at ``damping`` (sample space for EF / iEF)."""
        if method == "sgd":
            return self.grad
        if method == "ef":
            return ngdref.ef_update(
                self.rows, damping=damping, dedup_threshold=self.dedup_threshold
            )
        if method == "ief":
            return ngdref.ief_update(
                self.rows, self.sq_norms, damping=damping, dedup_threshold=self.dedup_threshold
            )
        if method == "sf":
            if self.sampled is None:
                raise ValueError("method 'sf' needs the sampled gradients (with_sf=True)")
            return ngdref.sf_update(
                self.grad, self.sampled, damping=damping, num_samples=self.num_samples
            )
        raise ValueError(f"method must be one of sgd, ef, ief, sf, got {method!r}")


def score_batch(
    per_sample_grads: torch.Tensor,
    logit_grad_sq_norms: torch.Tensor,
    sampled_grads: torch.Tensor | None,
    form_sum: Callable[[float], ngdref.QuadraticForm],
    *,
    protocol: str,
    factor: float,
    dedup_threshold: float | None,
    num_samples: int,
    sf_duplicates: str = "drop",
) -> BatchScorer:
    """A :class:`BatchScorer` from sum-convention quantities (module docstring's table).

    Parameters
    ----------
    per_sample_grads, logit_grad_sq_norms, sampled_grads
        G (M, P), s (M,), G_hat (K M, P) in the sum convention (R = 1).
    form_sum : callable
        ``form_sum(R)`` -> the Fisher's quadratic form with factor R over all M samples.
    protocol : {"ngdref", "authors"}
    factor : float
        R.
    dedup_threshold : float or None
        The true rows' filter threshold (None: off).
    """
    import torch

    r = float(factor)
    rows, s = r * per_sample_grads, (r * r) * logit_grad_sq_norms
    sampled = None if sampled_grads is None else r * sampled_grads
    form = form_sum(r)
    if protocol == "ngdref":
        norms = torch.linalg.vector_norm(rows, dim=1).cpu().numpy()
        stats = {k: imbalance(norms, k) for k in IMBALANCE_STATISTICS}
        return BatchScorer(rows, s, rows.sum(dim=0), sampled, form, dedup_threshold,
                           num_samples, stats, rows.shape[0])
    if protocol != "authors":
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if dedup_threshold is not None:
        gram = ngdref.gram_matrix(rows).cpu().numpy()
        keep = torch.as_tensor(authors_keep(gram, dedup_threshold), device=rows.device)
        rows, s = rows[keep], s[keep]
    norms = torch.linalg.vector_norm(rows, dim=1).cpu().numpy()
    stats = {k: imbalance(norms, k) for k in IMBALANCE_STATISTICS}
    if sampled is not None:
        gram = ngdref.gram_matrix(sampled).cpu().numpy()
        index, scale = authors_sf_rows(gram, AUTHORS_SF_DEDUP_THRESHOLD, sf_duplicates)
        sampled = sampled[torch.as_tensor(index, device=sampled.device)] * torch.as_tensor(
            scale, dtype=sampled.dtype, device=sampled.device
        )[:, None]
    return BatchScorer(rows, s, rows.sum(dim=0), sampled, form, None, 1, stats, rows.shape[0])
