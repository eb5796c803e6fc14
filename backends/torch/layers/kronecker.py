r"""K-FAC factors of one parameter from the parts of its uses (:mod:`ngdref.kfac` conventions).

Per :class:`~.parts.Outer` part (rows [start, start + d_u) of the parameter as (rows, d_v)),
one side is the *input side* (known after the forward pass) and the other the *gradient
side* (one per backward pass; :attr:`Outer.grad` names it). With the input side x_nt and the
gradient side y_nt, over the N samples and T positions of all uses concatenated along T:

.. math::
    A = c^{-1} \sum_{n,t} x_{nt} x_{nt}^\top, \qquad B = \sum_n w_n \sum_t y_{nt} y_{nt}^\top

(``convention="expand"``; ``"reduce"`` first takes x_n = mean_t x_nt and y_n = sum_t y_nt;
c = N T, resp. N, under ``normalisation="mean"``, c = 1 under ``"sum"``; w_n = 1, or
1 / s_n for ieKFAC). These are :func:`ngdref.kfac.input_factor` and
:func:`ngdref.kfac.grad_factor` of the same arrays that ``backends/kfac.py`` forms for
``nn.Linear`` and ``nn.Conv2d`` (x = inputs or unfolded patches, y = output gradients), so
its blocks are reproduced. The part's block of the curvature is rows (x) cols (row-major
vec): ``KroneckerFactors(input_factor=cols, grad_factor=rows)``; for a linear map the rows
factor is B, for a lookup table (x = one-hot rows, A = diag(counts) / c under "expand") and
a transposed convolution (x = the layer's inputs on the rows) it is A. A bias part has no
input factor (A = [1], as ``bias="separate"``). :class:`~.parts.Rows` and uses of mixed
forms, and parts whose positions are not the layer's inputs (:attr:`Outer.kronecker`
False: an embedding bag's elements) have no Kronecker form: :func:`diagonal` gives
D = sum_n w_n g_n^2 for them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ngdref import kfac as K
from ngdref.checks import check_choice

from .parts import Grad, Outer, Rows, along_positions, materialise

__all__ = ["KroneckerPart", "diagonal", "grad_factors", "input_factors", "joint", "kronecker",
           "kronecker_ready"]


@dataclass(frozen=True)
class KroneckerPart:
    """One Kronecker block of a parameter: entries [start, start + prod(shape)) of its
    flattening, as a (rows, cols) matrix ((rows,) for a bias part).

    ``input_terms``: the number of terms c that A averaged over (N T or N), for merging
    micro-batches as ``backends.kfac.merge_curvatures`` does."""

    start: int
    shape: tuple[int, ...]
    factors: K.KroneckerFactors
    input_terms: int


def kronecker_ready(uses: Sequence[Grad]) -> bool:
    """Whether the uses have one layout of Kronecker-ready Outer parts (else :func:`diagonal`)."""
    def layout(use: Grad) -> tuple:
        return tuple(None if isinstance(p, Rows) or not p.kronecker else (
            p.start, p.lookup, p.grad, p.v is None, p.u.shape[-1] if not p.lookup else 0,
            None if p.v is None else p.v.shape[-1]) for p in use)

    first = layout(uses[0])
    return None not in first and all(layout(u) == first for u in uses)


def _joined(uses: Sequence[Grad]) -> list[Outer]:
    if not kronecker_ready(uses):
        raise ValueError("the uses have no common Kronecker form (use diagonal())")
    return [Outer(along_positions([p.u for p in ps]),
                  None if ps[0].v is None else along_positions([p.v for p in ps]),
                  ps[0].start, ps[0].grad) for ps in zip(*uses, strict=True)]


def _sides(p: Outer) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(input side, gradient side) of a joined part."""
    return (p.v, p.u) if p.grad == "u" else (p.u, p.v)


def _count_factor(index: torch.Tensor, rows: int, convention: str,
                  normalisation: str) -> torch.Tensor:
    """A of one-hot inputs e_{i_nt}: diag(counts) (expand) or sum_n abar_n abar_n^T."""
    n, t = index.shape
    if convention == "expand":
        counts = torch.bincount(index.reshape(-1), minlength=rows).to(torch.float64)
        factor, terms = torch.diag(counts), n * t
    else:
        mean = torch.zeros(n, rows, dtype=torch.float64, device=index.device)
        mean.scatter_add_(1, index, torch.full(index.shape, 1.0 / t, dtype=torch.float64,
                                                device=index.device))
        factor, terms = mean.T @ mean, n
    return factor / terms if normalisation == "mean" else factor


def input_factors(
    uses: Sequence[Grad], shape: tuple[int, ...], *, convention: str = "expand",
    normalisation: str = "mean",
) -> list[torch.Tensor | None]:
    """Per part, A from its input side, (d, d) float64 (None for a bias part)."""
    out: list[torch.Tensor | None] = []
    for p in _joined(uses):
        x, _ = _sides(p)
        if x is None:
            out.append(None)
        elif not torch.is_floating_point(x):
            check_choice(convention, "convention", K.CONVENTIONS)
            check_choice(normalisation, "normalisation", K.NORMALISATIONS)
            out.append(_count_factor(x, shape[0], convention, normalisation))
        else:
            out.append(K.input_factor(x, convention=convention, normalisation=normalisation))
    return out


def grad_factors(
    uses: Sequence[Grad], *, weights: torch.Tensor | None = None, convention: str = "expand",
) -> list[torch.Tensor]:
    """Per part, B = sum_n w_n sum_t y_nt y_nt^T from its gradient side, float64."""
    return [K.grad_factor(_sides(p)[1], weights=weights, convention=convention)
            for p in _joined(uses)]


def kronecker(
    uses: Sequence[Grad], shape: tuple[int, ...], inputs: Sequence[torch.Tensor | None],
    grads: Sequence[torch.Tensor], *, convention: str = "expand",
) -> list[KroneckerPart]:
    """The parameter's Kronecker blocks from :func:`input_factors` and :func:`grad_factors`."""
    out = []
    for p, a, b in zip(_joined(uses), inputs, grads, strict=True):
        n, t = p.u.shape[:2]
        terms = n * (t if convention == "expand" else 1)
        d_v = None if p.v is None else int(p.v.shape[-1])
        rows = shape[0] if p.lookup else int(p.u.shape[-1])
        if d_v is None:
            out.append(KroneckerPart(p.start, (rows,), K.KroneckerFactors(None, b), terms))
            continue
        row_factor, col_factor = (b, a) if p.grad == "u" else (a, b)
        out.append(KroneckerPart(p.start * d_v, (rows, d_v),
                                 K.KroneckerFactors(col_factor, row_factor), terms))
    return out


def joint(weight: Sequence[Grad], bias: Sequence[Grad]) -> list[Grad]:
    """The uses of [W, b] as one (rows, d_v + 1) matrix (``bias="joint"`` of
    ``backends/kfac.py``): a column of ones appended to the weight's input side.

    Needs, per use, one linear part of the weight and the bias part of the same call (the
    same gradient side u: ``nn.Linear``, an ungrouped convolution).
    """
    out: list[Grad] = []
    for w, b in zip(weight, bias, strict=True):
        p = w[0]
        if len(w) != 1 or len(b) != 1 or not isinstance(p, Outer) or p.lookup or \
                p.grad != "u" or not isinstance(b[0], Outer) or b[0].u is not p.u:
            raise ValueError("joint weight and bias blocks need, per use, one linear part of "
                             "the weight and the bias part of the same call")
        out.append((Outer(p.u, torch.cat([p.v, torch.ones_like(p.v[..., :1])], dim=-1)),))
    return out


def diagonal(uses: Sequence[Grad], shape: tuple[int, ...], *,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """D = sum_n w_n g_n (.) g_n, (prod(shape),) float64, from the materialised uses (summed)."""
    rows = None
    for use in uses:
        g = torch.cat([materialise(p, shape) for p in use], dim=1)
        rows = g if rows is None else rows + g
    if rows.shape[1] != math.prod(shape):
        raise ValueError(f"the parts cover {rows.shape[1]} entries of a parameter of shape "
                         f"{tuple(shape)}")
    return K.diagonal_factor(rows, weights=weights)
