r"""SF's sampled rows under the authors' evaluation filter (``remove_J_C_duplicates``).

Used by the "authors" protocol of :mod:`validation.experiments.evaluate.protocols`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["AUTHORS_SF_DEDUP_THRESHOLD", "authors_sf_rows"]

#: the authors' threshold for SF's sampled rows (``remove_J_C_duplicates(thresh=0.99)``)
AUTHORS_SF_DEDUP_THRESHOLD = 0.99



def _abs_cosines(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sq = np.clip(np.diag(gram), 0.0, None)
    norms = np.sqrt(sq)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.abs(gram) / np.outer(norms, norms)
    return np.nan_to_num(cos, nan=0.0), sq


def authors_sf_rows(
    gram: np.ndarray, threshold: float, duplicates: str
) -> tuple[np.ndarray, np.ndarray]:
    r"""SF's sampled rows after the authors' filter: (indices kept, scale of each).

    Rows in decreasing norm; for each row a not marked exactly duplicate, every later row b
    (not marked) with ``|cos| > threshold`` is removed and its squared norm added to a's
    accumulator (b is marked when the compared norms are equal). ``"drop"``: scales 1 (the
    released code, whose accumulator aliases the norms it is compared with); ``"merge"``: a
    kept row is scaled by sqrt(accumulated / own squared norm), the code's intent.
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
