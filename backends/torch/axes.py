r"""Where the samples of a batch lie in a tensor: :class:`BatchAxis` and :func:`batch_first`.

A tensor computed from a batch of N samples carries them along one axis k when every
index i of that axis belongs to exactly one sample, the same map for every other index.
Axes that were merged with the batch axis (a ``reshape`` of (T, N, d) to (T N, d), or of
(N, T, d) to (N T, d)) keep that map: the axis then has length ``outer * N * inner`` and
index i belongs to sample

.. math:: n(i) = \lfloor i / \mathrm{inner} \rfloor \bmod N .

``outer == inner == 1`` is a plain batch axis. The layout is decided by how the tensor
was computed (its provenance), never by a dimension that happens to have length N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BATCH_FIRST", "BatchAxis", "batch_first"]


@dataclass(frozen=True)
class BatchAxis:
    """The samples along ``axis`` (non-negative), of length ``outer * N * inner``.

    Attributes
    ----------
    axis : int >= 0
    outer : int >= 1
        The length of the axes merged in front of the samples (slowest varying).
    inner : int >= 1
        The length of the axes merged behind the samples (fastest varying).
    """

    axis: int
    outer: int = 1
    inner: int = 1

    def __post_init__(self) -> None:
        if self.axis < 0 or self.outer < 1 or self.inner < 1:
            raise ValueError(f"BatchAxis needs axis >= 0 and outer, inner >= 1, got {self}")

    @property
    def plain(self) -> bool:
        """Whether the axis holds the samples alone (nothing merged into it)."""
        return self.outer == 1 and self.inner == 1


#: the samples first, nothing merged: the layout of a provider's inputs and logits
BATCH_FIRST = BatchAxis(0)


def batch_first(t: torch.Tensor, where: BatchAxis, num_samples: int) -> torch.Tensor:
    r"""``t`` with its samples on a new first axis: shape (N, \*before, outer, inner, \*after).

    ``before`` and ``after`` are the axes of ``t`` in front of and behind ``where.axis``;
    ``outer`` and ``inner`` (the merged parts of the batch axis) are kept as axes of their
    own, so a caller reshapes to the per-sample layout it needs, e.g. ``(N, -1, d)`` for the
    positions and features of a linear map. A view where the strides allow, else a copy.

    Raises
    ------
    ValueError
        If ``where.axis`` is not an axis of ``t`` or its length is not outer * N * inner.
    """
    k = where.axis
    if k >= t.ndim or t.shape[k] != where.outer * num_samples * where.inner:
        raise ValueError(
            f"batch_first: axis {k} of a tensor of shape {tuple(t.shape)} does not hold "
            f"outer * N * inner = {where.outer} * {num_samples} * {where.inner} entries"
        )
    split = t.reshape(*t.shape[:k], where.outer, num_samples, where.inner, *t.shape[k + 1:])
    return split.movedim(k + 1, 0)
