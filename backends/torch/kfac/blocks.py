r"""The blocks of the K-FAC curvature, one trainable parameter at a time, from the passes.

Every trainable parameter (theta order) gets its blocks in one of three ways; nothing here
knows a layer's type, only the parts its kind gave (:mod:`backends.torch.layers`):

Kronecker
    Its uses (all calls, every use summed: a shared or tied parameter has one set of blocks)
    have one Kronecker layout (:func:`backends.torch.layers.kronecker.kronecker_reason`):
    one block B (x) A per part (a weight of G groups: G blocks; attention's in-projection:
    one per q/k/v tap; a lookup table: one, with A = diag(counts) / c kept as its diagonal),
    A from the input side and B summed over the method's backward passes. A block acts on its
    part in the layout (d_grad, d_input), so that ``input_factor`` is always A: a part whose
    inputs lie on its rows (a lookup table, a transposed convolution) acts on the transpose
    of its rows (:attr:`KFACBlock.index` says where each entry sits in theta).
    ``bias="joint"``: a weight whose parts are linear maps and the bias of exactly the same
    calls form one block per part, [W_rows, b_rows] with a column of ones appended to the
    inputs; a weight whose calls have a bias that is not one parameter shared by exactly
    those calls is refused by name.
The diagonal of the parts
    Uses without a Kronecker form (norm layers' rows, embedding bags, uses of different
    layouts such as an embedding tied to an output layer, a lookup table under
    ``convention="reduce"``): D = sum_n w_n g_n^2 from the parts
    (:func:`backends.torch.layers.kronecker.diagonal`).
The diagonal of per-sample gradients from another route
    Parameters the passes refused (:mod:`backends.torch.kfac.capture`): D from per-sample
    gradients by ``vmap`` (or, where torch.func cannot run the model, a loop of single-sample
    passes).

Every diagonal block's parameter and reason is in :attr:`KFACCurvature.fallback`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ngdref import kfac as K

from ..layers.kronecker import (
    KroneckerPart,
    corrected,
    diagonal,
    grad_factors,
    input_factors,
    joint,
    kronecker,
    kronecker_reason,
)
from ..layers.parts import Grad, Outer
from ..layers.registry import describe
from ..provider import TorchProvider
from .capture import Passes, per_sample_grads

__all__ = ["KFACBlock", "build_blocks", "diagonal_reasons", "joint_biases"]


@dataclass(frozen=True)
class KFACBlock:
    """One block of the block-diagonal curvature.

    Attributes
    ----------
    name : str
        The parameter's name, without a trailing ".weight" for a Kronecker block (the
        module's name), with "[rows a:b]" where a parameter has several parts.
    index : torch.Tensor (int64)
        Positions in theta of the block's vector in its row-major layout ``shape``.
    shape : tuple of int
        (d_grad, d_input) of a Kronecker block (d_input + 1 for a joint bias), (d_out,) of a
        bias, (p,) of a diagonal block.
    factors : dict of str to ngdref.kfac.KroneckerFactors, or None
        Per method; None for a diagonal block. A may be a diagonal (d_input,).
    diagonal : dict of str to torch.Tensor (p,), or None
        Per method, for a diagonal block.
    input_terms : int
        The number of terms A averages over (N T under "expand", N under "reduce"), for
        :func:`backends.torch.kfac.curvature.merge_curvatures`.
    """

    name: str
    index: torch.Tensor
    shape: tuple[int, ...]
    factors: dict[str, K.KroneckerFactors] | None = None
    diagonal: dict[str, torch.Tensor] | None = None
    input_terms: int = 0


#: per backward pass of a source, the parts of each use of one parameter (or joint pair)
Passes_ = list[list[Grad]]


def _param_index(params: Mapping[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Trainable parameter name -> its positions in theta (shaped like the parameter)."""
    index, offset = {}, 0
    for name, p in params.items():
        index[name] = torch.arange(offset, offset + p.numel()).reshape(p.shape)
        offset += p.numel()
    return index


def _block_name(name: str) -> str:
    return name.removesuffix(".weight") if name.endswith(".weight") else name


def _canonical(part: KroneckerPart) -> K.KroneckerFactors:
    """The part's factors with A in ``input_factor`` (its transpose if A is on the rows)."""
    f = part.factors
    if not part.inputs_on_rows:
        return f
    e = f.corrected_eigenvalues
    return K.KroneckerFactors(f.grad_factor, f.input_factor, None if e is None else e.T)


def _summed(per_pass: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Part by part, the sum over backward passes."""
    return [sum(ts[1:], ts[0]) for ts in zip(*per_pass, strict=True)]


def _method_parts(uses: Mapping[str, Passes_], shape: tuple[int, ...], weights: Any,
                  source: Mapping[str, str], options: Mapping[str, Any]
                  ) -> dict[str, list[KroneckerPart]]:
    """Per method, the Kronecker parts: A from the true pass, B (and E) over its passes."""
    convention = options["convention"]
    first = uses["true"][0]
    a = input_factors(first, shape, convention=convention,
                      normalisation=options["normalisation"])
    out = {}
    for m, w in weights.items():
        passes = uses[source[m]]
        b = _summed([grad_factors(u, weights=w, convention=convention) for u in passes])
        parts = kronecker(first, shape, a, b, convention=convention)
        if options["eigenvalue_correction"]:
            e = _summed([corrected(u, parts, weights=w) for u in passes])
            parts = [dataclasses.replace(p, factors=K.KroneckerFactors(
                p.factors.input_factor, p.factors.grad_factor, ei)) for p, ei in zip(
                parts, e, strict=True)]
        out[m] = parts
    return out


def _kronecker_blocks(name: str, uses: Mapping[str, Passes_], shape: tuple[int, ...],
                      flat_index: torch.Tensor, weights: Any, source: Mapping[str, str],
                      options: Mapping[str, Any]) -> list[KFACBlock]:
    """The blocks of one parameter (or a joint weight and bias), one per part."""
    per_method = _method_parts(uses, shape, weights, source, options)
    parts = next(iter(per_method.values()))
    blocks = []
    for j, part in enumerate(parts):
        idx = flat_index[part.start:part.start + math.prod(part.shape)].reshape(part.shape)
        label = _block_name(name)
        if len(parts) > 1:
            first = part.start // (part.shape[1] if len(part.shape) == 2 else 1)
            label += f"[rows {first}:{first + part.shape[0]}]"
        idx = idx.T.contiguous() if part.inputs_on_rows else idx
        blocks.append(KFACBlock(label, idx.reshape(-1), tuple(idx.shape),
                                factors={m: _canonical(ps[j]) for m, ps in per_method.items()},
                                input_terms=part.input_terms))
    return blocks


def _is_bias(uses: Sequence[Grad]) -> bool:
    return all(isinstance(p, Outer) and p.v is None for use in uses for p in use)


def _is_linear(uses: Sequence[Grad]) -> bool:
    return all(isinstance(p, Outer) and not p.lookup and p.grad == "u" and p.v is not None
               for use in uses for p in use)


def joint_biases(passes: Passes, kron: Sequence[str]) -> dict[str, str]:
    """Weight name -> the bias that ``bias="joint"`` puts in its blocks: the bias-like
    parameter of exactly the same calls. A linear weight whose calls have another bias-like
    parameter (shared weight, own biases) is refused by name."""
    first = passes.uses["true"][0]
    params = passes.params
    calls = {n: tuple(id(c) for c in passes.users[params[n]]) for n in kron}
    biases = {calls[n]: n for n in kron if _is_bias(first[params[n]])}
    out = {}
    for n in kron:
        if not _is_linear(first[params[n]]):
            continue
        if calls[n] in biases:
            out[n] = biases[calls[n]]
        elif any(set(calls[n]) & set(k) for k in biases):
            modules = sorted({c.module.__class__.__name__ for c in passes.users[params[n]]})
            raise ValueError(
                f"bias='joint': weight {n!r} is shared by calls ({', '.join(modules)}) whose "
                "biases are not one shared parameter; use bias='separate'")
    return out


def _joint_uses(passes: Passes, weight: str, bias: str) -> dict[str, Passes_]:
    w, b = passes.params[weight], passes.params[bias]
    return {source: [joint(u[w], u[b]) for u in per_pass]
            for source, per_pass in passes.uses.items()}


def _joint_index(index: Mapping[str, torch.Tensor], weight: str, bias: str) -> torch.Tensor:
    w = index[weight].reshape(index[weight].shape[0], -1)
    return torch.cat([w, index[bias].reshape(-1, 1)], dim=1).reshape(-1)


def _parts_diagonal(name: str, passes: Passes, weights: Any,
                    source: Mapping[str, str]) -> dict[str, torch.Tensor]:
    p = passes.params[name]
    return {m: sum(diagonal(u[p], tuple(p.shape), weights=w) for u in passes.uses[source[m]])
            for m, w in weights.items()}


def _route_diagonals(provider: TorchProvider, passes: Passes, names: Sequence[str],
                     index: Mapping[str, torch.Tensor], weights: Any,
                     source: Mapping[str, str]) -> tuple[dict[str, dict[str, torch.Tensor]], str]:
    """Per refused parameter and method, D from per-sample gradients by another route."""
    ranges = [(int(index[n].reshape(-1)[0]), index[n].numel()) for n in names]
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    route = ""
    for kind in sorted({source[m] for m in weights}):
        for u in passes.rows[kind]:
            grads, route = per_sample_grads(provider, u, ranges)
            for m, w in weights.items():
                if source[m] != kind:
                    continue
                for n, g in zip(names, grads, strict=True):
                    d = K.diagonal_factor(g, weights=w)
                    out[n][m] = d if m not in out[n] else out[n][m] + d
    return out, route


def diagonal_reasons(passes: Passes, convention: str) -> dict[str, str]:
    """Parameter name -> why its block is diagonal (refused by the passes, or without a
    Kronecker form), in theta order; the others get Kronecker blocks."""
    first = passes.uses["true"][0]
    reasons = {}
    for name, p in passes.params.items():
        if name in passes.refused:
            reasons[name] = passes.refused[name]
            continue
        reason = kronecker_reason(first[p], convention)
        if reason is not None:
            layers = ", ".join(dict.fromkeys(describe(c.module) for c in passes.users[p]))
            reasons[name] = f"{layers}: {reason}; its diagonal from the parts"
    return reasons


def build_blocks(provider: TorchProvider, passes: Passes, reasons: Mapping[str, str],
                 weights: Mapping[str, Any], source: Mapping[str, str],
                 options: Mapping[str, Any]) -> tuple[list[KFACBlock], dict[str, str]]:
    """The blocks of every trainable parameter, in theta order (:func:`diagonal_reasons`
    says which are diagonal), and those reasons with the route of the refused ones."""
    index = _param_index(passes.params)
    kron = [n for n in passes.params if n not in reasons]
    pairs = joint_biases(passes, kron) if options["bias"] == "joint" else {}
    routed = [n for n in passes.params if n in passes.refused]
    route_d, route = _route_diagonals(provider, passes, routed, index, weights, source) \
        if routed else ({}, "")
    blocks: list[KFACBlock] = []
    for name, p in passes.params.items():
        if name in pairs.values():
            continue  # in its weight's blocks
        if name in pairs:
            blocks += _kronecker_blocks(name, _joint_uses(passes, name, pairs[name]),
                                        tuple(p.shape), _joint_index(index, name, pairs[name]),
                                        weights, source, options)
        elif name not in reasons:
            uses = {s: [u[p] for u in us] for s, us in passes.uses.items()}
            blocks += _kronecker_blocks(name, uses, tuple(p.shape), index[name].reshape(-1),
                                        weights, source, options)
        else:
            d = route_d[name] if name in route_d else _parts_diagonal(name, passes, weights,
                                                                       source)
            blocks.append(KFACBlock(name, index[name].reshape(-1), (p.numel(),), diagonal=d))
    out = dict(reasons)
    for name in routed:
        out[name] += f"; its diagonal from per-sample gradients by {route}"
    return blocks, out
