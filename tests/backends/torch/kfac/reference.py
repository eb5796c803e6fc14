r"""The independent route for the K-FAC capture's tests: a loop of single-sample passes.

Each sample's forward pass runs alone in float64 through the model's own ``__call__`` while
the layer tests' spy (:class:`tests.backends.torch.layers.test_kfac.Spy`) sees torch's own
calls of ``F.linear`` (also inside ``F.multi_head_attention_forward``), ``F.embedding``,
``F.conv{1,2,3}d`` and ``F.conv_transpose{1,2,3}d`` with a trainable weight or a row block
of one; per call and row block it gives the input side x_t and the gradient side y_t of
every position (:func:`tests.backends.torch.layers.test_kfac._sides`, by autograd probes,
never by the registry). One backward pass per cotangent of the method: e_n (eKFAC, ieKFAC)
or the C columns of the logit Hessian's square root (KFAC, type-2). From these:

.. math::
    A = c^{-1} \sum_{n, t} x_{nt} x_{nt}^\top, \qquad
    B = \sum_n w_n \sum_k \sum_t y_{ntk} y_{ntk}^\top \quad (\text{expand}),

x_n = mean_t x_nt and y_nk = sum_t y_ntk (reduce); w_n = 1 or 1 / s_n (ieKFAC); a joint
bias appends 1 to x. The dense block sits at the parameter's entries in row-major order,
B (x) A for a linear map (y on the rows), A (x) B where x indexes the rows (a lookup table,
a transposed convolution). Diagonal blocks: D = sum_n w_n sum_k g_nk^2 from the per-sample
gradients of the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import ngdref
from tests.backends.torch.layers.test_kfac import Spy, _sides

CE = ngdref.SoftmaxCrossEntropy()
_ROWS_ARE_INPUTS = {F.embedding, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


@dataclass
class Side:
    """One row block of one parameter: per sample, per cotangent, its calls' (x, y)."""

    name: str
    first: int
    rows_are_inputs: bool
    onehot: bool
    pairs: list[list[list[tuple]]] = field(default_factory=list)


@dataclass
class Reference:
    """What the loop gave: the row blocks' sides, the per-sample gradients (N, K, P) and
    the weights w_n."""

    sides: dict[tuple[str, int, str], Side]
    grads: torch.Tensor
    weights: torch.Tensor
    offsets: dict[str, int]


def cotangents(method: str, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    if method != "kfac":
        return [CE.grad(z, y)]
    root = CE.hessian_sqrt(z, y)
    return [root[:, :, c] for c in range(root.shape[-1])]


def reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str) -> Reference:
    """The loop over the samples (module docs); KFAC with the type-2 rows."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = {id(p): n for n, p in named}
    sides: dict[tuple[str, int, str], Side] = {}
    grads, weights = [], []
    for i in range(x.shape[0]):
        spy = Spy([p for _, p in named])
        with spy:
            z = model(x[i:i + 1])
        e = CE.grad(z.detach(), y[i:i + 1])
        weights.append(1.0 / float((e * e).sum()) if method == "iekfac" else 1.0)
        per_sample = []
        for k, u in enumerate(cotangents(method, z.detach(), y[i:i + 1])):
            found = torch.autograd.grad(z, [c[-1] for c in spy.calls] + [p for _, p in named],
                                        u, retain_graph=True, allow_unused=True,
                                        materialize_grads=True)
            per_sample.append(torch.cat([(g.to_dense() if g.is_sparse else g).reshape(-1)
                                         for g in found[len(spy.calls):]]))
            _collect(sides, spy.calls, found, names, i, k)
        grads.append(torch.stack(per_sample))
    offsets, at = {}, 0
    for n, p in named:
        offsets[n], at = at, at + p.numel()
    return Reference(sides, torch.stack(grads), torch.tensor(weights, dtype=torch.float64),
                     offsets)


def _collect(sides: dict, calls: list, found: tuple, names: dict, i: int, k: int) -> None:
    """Add sample i's (x, y) of cotangent k to each row block's side."""
    for (role, p, start, func, call_args, result), g in zip(calls, found, strict=False):
        for row, xs, ys in _sides(role, func, call_args, result, g, p, start):
            key = (names[id(p)], row, role)
            side = sides.setdefault(key, Side(names[id(p)], row, func in _ROWS_ARE_INPUTS,
                                              func is F.embedding))
            while len(side.pairs) <= i:
                side.pairs.append([])
            while len(side.pairs[i]) <= k:
                side.pairs[i].append([])
            side.pairs[i][k].append((None if xs is None else xs.detach(), ys.detach()))


def factors(side: Side, weights: torch.Tensor, convention: str,
            ones: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(A (mean normalisation) or None for a bias, B) of one row block (module docs)."""
    xs = [torch.cat([x for x, _ in per[0]]) for per in side.pairs] \
        if side.pairs[0][0][0][0] is not None else None
    if xs is not None and ones:
        xs = [torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1) for x in xs]
    ys = [[torch.cat([y for _, y in calls]) for calls in per] for per in side.pairs]
    if convention == "expand":
        a = None if xs is None else sum(x.T @ x for x in xs) / sum(x.shape[0] for x in xs)
        b = sum(w * sum(y.T @ y for y in per) for w, per in zip(weights, ys, strict=True))
    else:
        a = None if xs is None else sum(torch.outer(x.mean(0), x.mean(0)) for x in xs) / len(xs)
        b = sum(w * sum(torch.outer(y.sum(0), y.sum(0)) for y in per)
                for w, per in zip(weights, ys, strict=True))
    return a, b


def diagonal(ref: Reference, name: str, size: int) -> torch.Tensor:
    at = ref.offsets[name]
    g = ref.grads[:, :, at:at + size]
    return (ref.weights[:, None, None] * g * g).sum(dim=(0, 1))


def dense(ref: Reference, model: nn.Module, convention: str, diagonal_names: set[str],
          joint: dict[str, str]) -> torch.Tensor:
    """The block-diagonal K-FAC matrix placed by the reference's own reading of each block."""
    params = dict(model.named_parameters())
    size = sum(p.numel() for p in params.values() if p.requires_grad)
    out = torch.zeros(size, size, dtype=torch.float64)
    for name in diagonal_names:
        at, numel = ref.offsets[name], params[name].numel()
        idx = torch.arange(at, at + numel)
        out[idx, idx] = diagonal(ref, name, numel)
    for (name, row, _), side in ref.sides.items():
        if name in diagonal_names or name in joint.values():
            continue
        p, at = params[name], ref.offsets[name]
        a, b = factors(side, ref.weights, convention, ones=name in joint)
        cols = p.numel() // p.shape[0]
        if a is None:
            rows = torch.arange(at + row, at + row + b.shape[0])
            out[rows[:, None], rows[None, :]] = b
            continue
        n_rows = a.shape[0] if side.rows_are_inputs else b.shape[0]
        idx = at + (row + torch.arange(n_rows))[:, None] * cols + torch.arange(cols)[None, :]
        if name in joint:
            bias = ref.offsets[joint[name]] + row + torch.arange(n_rows)
            idx = torch.cat([idx, bias[:, None]], dim=1)
        idx = idx.reshape(-1)
        block = torch.kron(a, b) if side.rows_are_inputs else torch.kron(b, a)
        out[idx[:, None], idx[None, :]] = block
    return out


def _basis(factor: torch.Tensor | None, identity: bool, size: int) -> tuple[torch.Tensor, float]:
    """(eigenvectors, ||factor|| / smallest gap between its eigenvalues above rounding)."""
    if factor is None or identity:
        return torch.eye(size, dtype=torch.float64), 1.0
    values, vectors = torch.linalg.eigh(factor)
    scale = float(values.abs().max())
    gaps = torch.diff(values)
    gaps = gaps[gaps > 64 * size * 2.0**-52 * scale]
    return vectors, scale / float(gaps.min()) if gaps.numel() else 1.0


def corrected_dense(ref: Reference, model: nn.Module,
                    diagonal_names: set[str]) -> tuple[torch.Tensor, float]:
    r"""The eigenvalue-corrected block-diagonal matrix ("expand"), and the largest
    ||factor|| / eigen-gap (the eigenbasis is only that accurate): per row block
    (U (x) V) diag(E) (U (x) V)^T with E = sum_n w_n sum_k (U^T G_nk V)^2, G_nk = sum_t y x^T,
    U, V the eigenvectors of B, A (the identity for one-hot inputs)."""
    out = dense(ref, model, "expand", diagonal_names, {})
    params, spread = dict(model.named_parameters()), 1.0
    for (name, row, _), side in ref.sides.items():
        if name in diagonal_names:
            continue
        a, b = factors(side, ref.weights, "expand")
        u, su = _basis(b, False, b.shape[0])
        v, sv = _basis(a, side.onehot, 1 if a is None else a.shape[0])
        spread = max(spread, su, sv)
        grads = [[sum(y.T @ (torch.ones(y.shape[0], 1, dtype=y.dtype) if x is None else x)
                      for x, y in calls) for calls in per] for per in side.pairs]
        e = sum(w * sum((u.T @ g @ v) ** 2 for g in per)
                for w, per in zip(ref.weights, grads, strict=True))
        q = torch.kron(u.contiguous(), v.contiguous())
        block = q @ torch.diag(e.reshape(-1)) @ q.T  # in the (y, x) layout
        idx = _indices(ref, params[name], name, row, b.shape[0], None if a is None else
                       a.shape[0], side.rows_are_inputs)
        out[idx[:, None], idx[None, :]] = block
    return out, spread


def _indices(ref: Reference, p: nn.Parameter, name: str, row: int, d_y: int, d_x: int | None,
             rows_are_inputs: bool) -> torch.Tensor:
    """The entries of theta of a row block, in its (y, x) layout."""
    at = ref.offsets[name]
    if d_x is None:
        return at + row + torch.arange(d_y)
    cols = p.numel() // p.shape[0]
    n_rows = d_x if rows_are_inputs else d_y
    idx = at + (row + torch.arange(n_rows))[:, None] * cols + torch.arange(cols)[None, :]
    return (idx.T if rows_are_inputs else idx).reshape(-1)
