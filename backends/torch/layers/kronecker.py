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
:func:`ngdref.kfac.grad_factor` of the layer's inputs (or unfolded patches) and output
gradients. The part's block of the curvature is rows (x) cols (row-major vec):
``KroneckerFactors(input_factor=cols, grad_factor=rows)``; for a linear map the rows factor
is B, for a lookup table (x = one-hot rows) and a transposed convolution (x = the layer's
inputs on the rows) it is A (:attr:`KroneckerPart.inputs_on_rows`). A lookup table's A under
"expand" is diag(counts) / c, kept as its diagonal (V,) (:mod:`ngdref.kfac_diagonal`): the
V x V matrix is never formed. Under "reduce" its A = c^-1 sum_n xbar_n xbar_n^T is a dense
V x V matrix (:func:`kronecker_reason` says so; an engine takes the diagonal block). A bias
part has no input factor (A = [1], as ``bias="separate"``). :class:`~.parts.Rows` and uses
of mixed forms, and parts whose positions are not the layer's inputs (:attr:`Outer.kronecker`
False: an embedding bag's elements) have no Kronecker form: :func:`diagonal` gives
D = sum_n w_n g_n^2 for them. :func:`batch_gradient` sums the parts over the samples, for an
engine to check them against the batch gradient autograd gives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ngdref import kfac as K
from ngdref.checks import check_choice

from .parts import Grad, Outer, Rows, along_positions, materialise

__all__ = ["KroneckerPart", "batch_gradient", "corrected", "diagonal", "grad_factors",
           "input_factors", "joint", "kronecker", "kronecker_ready", "kronecker_reason"]


@dataclass(frozen=True)
class KroneckerPart:
    """One Kronecker block of a parameter: entries [start, start + prod(shape)) of its
    flattening, as a (rows, cols) matrix ((rows,) for a bias part).

    ``input_terms``: the number of terms c that A averaged over (N T or N), for merging
    micro-batches. ``inputs_on_rows``: A is the rows factor (``factors.grad_factor``) and
    B the columns factor (a lookup table, a transposed convolution)."""

    start: int
    shape: tuple[int, ...]
    factors: K.KroneckerFactors
    input_terms: int
    inputs_on_rows: bool = False


def _layout(use: Grad) -> tuple:
    return tuple(None if isinstance(p, Rows) or not p.kronecker else (
        p.start, p.lookup, p.grad, p.v is None, p.u.shape[-1] if not p.lookup else 0,
        None if p.v is None else p.v.shape[-1]) for p in use)


def kronecker_ready(uses: Sequence[Grad]) -> bool:
    """Whether the uses have one layout of Kronecker-ready Outer parts (else :func:`diagonal`)."""
    first = _layout(uses[0])
    return None not in first and all(_layout(u) == first for u in uses)


def kronecker_reason(uses: Sequence[Grad], convention: str = "expand") -> str | None:
    """Why the uses have no Kronecker block under ``convention`` (None: they have one)."""
    if not kronecker_ready(uses):
        forms = sorted({"per-sample rows" if isinstance(p, Rows) else "a lookup" if p.lookup
                        else "outer products" if p.kronecker else
                        "outer products over positions that are not the layer's inputs"
                        for use in uses for p in use})
        what = "uses of different layouts" if len({_layout(u) for u in uses}) > 1 else "parts"
        return f"no Kronecker factors: {what} ({'; '.join(forms)})"
    if convention == "reduce" and any(p.lookup for p in uses[0]):
        return ("no Kronecker factors under convention='reduce' for a lookup table: its input "
                "factor sum_n xbar_n xbar_n^T / c is a dense V x V matrix")
    return None


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
    """A of one-hot inputs e_{i_nt}: its diagonal counts / c (V,) under "expand"; the dense
    c^-1 sum_n abar_n abar_n^T (V, V) under "reduce"."""
    n, t = index.shape
    if convention == "expand":
        factor = torch.bincount(index.reshape(-1), minlength=rows).to(torch.float64)
        terms = n * t
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
    """Per part, A from its input side, float64: (d, d), or (V,) (its diagonal) for a lookup
    table under "expand"; None for a bias part."""
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
                                 K.KroneckerFactors(col_factor, row_factor), terms,
                                 p.grad == "v"))
    return out


def corrected(uses: Sequence[Grad], parts: Sequence[KroneckerPart], *,
              weights: torch.Tensor | None = None) -> list[torch.Tensor]:
    r"""Per part, the eigenvalue correction E (its ``shape``) of one backward pass's uses:
    E = sum_n w_n (U_rows^T G_n U_cols)^2, G_n the part's per-sample gradient, U the
    eigenvectors of the part's factors (:func:`ngdref.kfac.eigenvalue_correction`; a lookup
    table's rows basis is the identity of its diagonal A)."""
    out = []
    for p, part in zip(_joined(uses), parts, strict=True):
        if not p.lookup:
            out.append(K.eigenvalue_correction(part.factors, p.v, p.u,
                                               weights=weights).corrected_eigenvalues)
            continue
        if part.factors.grad_factor.ndim != 1:
            raise ValueError("the eigenvalue correction of a lookup table needs its diagonal "
                             "input factor (convention='expand')")
        basis = torch.linalg.eigh(part.factors.input_factor)[1]
        sample, row, sums = _pair_sums(p.u, p.v.to(torch.float64) @ basis, part.shape[0])
        scale = 1.0 if weights is None else weights.to(torch.float64)[sample, None]
        out.append(sums.new_zeros(part.shape).index_add_(0, row, scale * sums * sums))
    return out


def joint(weight: Sequence[Grad], bias: Sequence[Grad]) -> list[Grad]:
    """The uses of [W, b] as one (rows, d_v + 1) matrix per part (``bias="joint"``): a column
    of ones appended to each weight part's input side.

    Needs, per use, weight parts that are linear maps (gradient side u, vectors) and bias
    parts of the same call covering their rows with the same gradient side (the same memory:
    ``nn.Linear``, a convolution of any groups, attention's in-projection).
    """
    out: list[Grad] = []
    for w, b in zip(weight, bias, strict=True):
        out.append(tuple(_joint_part(p, b) for p in w))
    return out


def _joint_part(p: Outer, bias: Grad) -> Outer:
    if isinstance(p, Outer) and not p.lookup and p.grad == "u" and p.v is not None:
        rows = p.u.shape[-1]
        for q in bias:
            if isinstance(q, Outer) and q.v is None and \
                    q.start <= p.start and p.start + rows <= q.start + q.u.shape[-1]:
                u = q.u[..., p.start - q.start:p.start - q.start + rows]
                if u.data_ptr() == p.u.data_ptr() and u.stride() == p.u.stride():
                    ones = torch.ones_like(p.v[..., :1])
                    return Outer(p.u, torch.cat([p.v, ones], dim=-1), p.start)
    raise ValueError("joint weight and bias blocks need, per use, one linear part of the "
                     "weight (one per group) and the bias part of the same call covering its "
                     "rows with the same output gradients")


def _pair_sums(index: torch.Tensor, values: torch.Tensor,
               rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per (sample n, row i) pair that occurs in ``index`` (N, T): n, i and
    sum_{t: index[n, t] = i} values[n, t] ((pairs, d)); O(N T d), never (N, rows, d)."""
    n, _, d = values.shape
    key = (torch.arange(n, device=index.device)[:, None] * rows + index).reshape(-1)
    pairs, where = torch.unique(key, return_inverse=True)
    sums = values.new_zeros(pairs.numel(), d).index_add_(0, where, values.reshape(-1, d))
    return pairs // rows, pairs % rows, sums


def diagonal(uses: Sequence[Grad], shape: tuple[int, ...], *,
             weights: torch.Tensor | None = None) -> torch.Tensor:
    """D = sum_n w_n g_n (.) g_n, (prod(shape),) float64, from the uses (summed per sample).

    Uses that are all one lookup part (embeddings, embedding bags, tied or not) are summed
    per (sample, row) pair, never materialised as (N, V d)."""
    if all(len(u) == 1 and isinstance(u[0], Outer) and u[0].lookup for u in uses):
        index = along_positions([u[0].u for u in uses])
        values = along_positions([u[0].v for u in uses]).to(torch.float64)
        sample, row, sums = _pair_sums(index, values, shape[0])
        scale = 1.0 if weights is None else weights.to(torch.float64)[sample, None]
        out = sums.new_zeros(shape[0], values.shape[-1]).index_add_(0, row, scale * sums**2)
        return out.reshape(-1)
    rows = None
    for use in uses:
        g = torch.cat([materialise(p, shape) for p in use], dim=1)
        rows = g if rows is None else rows + g
    if rows.shape[1] != math.prod(shape):
        raise ValueError(f"the parts cover {rows.shape[1]} entries of a parameter of shape "
                         f"{tuple(shape)}")
    return K.diagonal_factor(rows, weights=weights)


def batch_gradient(uses: Sequence[Grad], shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    r"""(sum_n g_n (prod(shape),), S): the parts summed over the samples, in their dtype, and
    S = sum_parts ||x||_F ||y||_F, with which the rounding of that sum (m terms per entry) is
    below m eps S (for :class:`~.parts.Rows`, ||rows||_F sqrt(N))."""
    pieces, scale = [], 0.0
    for use in uses:
        for p in use:
            g, s = _part_sum(p, shape)
            at = 0 if isinstance(p, Rows) or p.lookup else p.start * (
                1 if p.v is None else p.v.shape[-1])
            pieces.append((at, g))
            scale += s
    first = pieces[0][1]
    total = torch.zeros(math.prod(shape), dtype=first.dtype, device=first.device)
    for at, g in pieces:
        total[at:at + g.numel()] += g
    return total, scale


def _part_sum(p: Outer | Rows, shape: tuple[int, ...]) -> tuple[torch.Tensor, float]:
    if isinstance(p, Rows):
        n = p.rows.shape[0]
        return p.rows.sum(dim=0), float(torch.linalg.vector_norm(p.rows)) * math.sqrt(n)
    m = p.u.shape[0] * p.u.shape[1]
    if p.v is None:
        u = p.u.reshape(m, -1)
        return u.sum(dim=0), float(torch.linalg.vector_norm(u)) * math.sqrt(m)
    v = p.v.reshape(m, -1)
    if p.lookup:
        g = v.new_zeros(shape[0], v.shape[1]).index_add_(0, p.u.reshape(-1), v)
        return g.reshape(-1), float(torch.linalg.vector_norm(v)) * math.sqrt(m)
    u = p.u.reshape(m, -1)
    return (u.T @ v).reshape(-1), float(torch.linalg.vector_norm(u) * torch.linalg.vector_norm(v))
