r"""Per-layer Kronecker factors of a torch model for KFAC, eKFAC and ieKFAC (:mod:`ngdref.kfac`).

:func:`kfac_curvature` runs one forward pass with hooks on every supported layer
and one backward pass of the true-label logit gradients e_n = dl_n/dz_n (sum
convention); "kfac" adds one backward pass of sampled-label gradients (or C
passes of the columns of the logit Hessian's square root, ``kfac_fisher="type-2"``).
A forward hook keeps each layer's inputs a_n (T, d_in), a hook on its output
its output gradients b_n (T, d_out); the factors are then
:func:`ngdref.kfac.input_factor` and :func:`ngdref.kfac.grad_factor` with the
weights :func:`ngdref.kfac.kfac_sample_weights` (one code path for the three).

Supported layers
    ``nn.Linear`` (any input shape (N, ..., d_in): the middle axes are the
    positions T; peft LoRA's ``lora_A`` / ``lora_B`` are plain ``nn.Linear``)
    and ``nn.Conv2d`` with ``groups=1``, zero padding given as numbers (the
    positions are the output pixels, a_n the unfolded patches, d_in = C_in kh kw,
    matching ``weight.reshape(C_out, -1)``). A layer called k times in one forward
    pass concatenates its k calls along T.
Shared (tied) parameters
    A parameter used by several modules has ONE block, named as ``named_parameters()``
    names it, in which every use is summed: when all its modules are supported layers
    of one type using it in one role (two ``nn.Linear`` sharing a weight), their
    positions are concatenated along T like the calls of one layer; when any use is
    elsewhere (a T5 output layer tied to its ``nn.Embedding``), the whole parameter
    takes the diagonal fallback below, whose per-sample gradients sum every use.
    ``bias="joint"`` refuses a shared weight whose modules do not share one bias.
Biases
    ``bias="separate"`` (default, curvlinops' ``separate_weight_and_bias=True``):
    a bias has its own block B (no input factor); ``"joint"``: a column of ones
    is appended to a_n and [W, b] (d_out, d_in + 1) is one block.
Fallback
    Trainable parameters outside supported layers (embeddings, layer norms,
    prompt-tuning tokens, layers of unsupported configuration, never called, or called on
    inputs without the batch axis first)
    get a diagonal block D = sum_n w_n g_n^2 from their per-sample gradients g_n
    (the method's rows and weights; :func:`ngdref.kfac.diagonal_factor`), taken
    with :meth:`backends.TorchProvider.vjp` (vmap) for all trainable parameters
    (cost of a per-sample gradient pass). They are listed with the reason in
    :attr:`KFACCurvature.fallback`; ``strict=True`` refuses them instead.

Vectors are flat (P,) over the model's trainable parameters in
``named_parameters()`` order, as :class:`backends.TorchProvider`'s; everything is
in the paper's sum convention (the curvature approximates sum_n g_n g_n^T).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import ngdref
from ngdref import kfac as K
from ngdref.checks import check_choice

from ..provider import TorchProvider
from .capture import Passes, Use, run_passes

__all__ = [
    "KFACBlock",
    "KFACCurvature",
    "kfac_curvature",
    "kfac_directions",
    "merge_curvatures",
]

BIAS_MODES = ("separate", "joint")
KFAC_FISHERS = ("mc", "type-2")


@dataclass(frozen=True)
class KFACBlock:
    """One block of the block-diagonal curvature.

    Attributes
    ----------
    name : str
        The module's name, or the parameter's name for a fallback block.
    index : torch.Tensor (int64)
        Positions in theta of the block's vector in its row-major layout ``shape``.
    shape : tuple of int
        (d_out, d_in) of a weight (d_in + 1 for a joint bias), (d_out,) of a bias,
        (p,) of a fallback diagonal block.
    factors : dict of str to ngdref.kfac.KroneckerFactors, or None
        Per method; None for a fallback block.
    diagonal : dict of str to torch.Tensor (p,), or None
        Per method, for a fallback block.
    input_terms : int
        The number of terms A averages over (N T under "expand", N under "reduce"), for
        :func:`merge_curvatures`.
    """

    name: str
    index: torch.Tensor
    shape: tuple[int, ...]
    factors: dict[str, K.KroneckerFactors] | None = None
    diagonal: dict[str, torch.Tensor] | None = None
    input_terms: int = 0


@dataclass
class KFACCurvature:
    """Block-diagonal K-FAC curvature of one batch (sum convention), per method.

    Attributes
    ----------
    blocks : list of KFACBlock
    grad : torch.Tensor, shape (P,)
        g = sum_n grad l_n of the batch.
    loss : float
        sum_n l_n.
    fallback : dict of str to str
        Trainable parameter name -> why it got the diagonal fallback block.
    num_params : int
    normalisation : {"mean", "sum"}
        Of the input factors A.
    """

    blocks: list[KFACBlock]
    grad: torch.Tensor
    loss: float
    fallback: dict[str, str] = field(default_factory=dict)
    num_params: int = 0
    normalisation: str = "mean"

    def inverse_apply(
        self, method: str, vector: torch.Tensor, *, damping: float, damped_inverse: str = "exact"
    ) -> torch.Tensor:
        r"""(K_method + lambda I)^-1 v block by block, (P,) -> (P,) (see :mod:`ngdref.kfac`)."""
        if tuple(vector.shape) != (self.num_params,):
            raise ValueError(
                f"vector must have shape ({self.num_params},), got {tuple(vector.shape)}"
            )
        out = torch.empty_like(vector)
        for block in self.blocks:
            piece = vector[block.index].reshape(block.shape)
            if block.factors is not None:
                result = K.kfac_inverse_apply(
                    _method(block.factors, method), piece, damping=damping,
                    damped_inverse=damped_inverse,
                )
            else:
                diagonal = _method(block.diagonal, method)
                result = K.diagonal_inverse_apply(diagonal, piece, damping=damping)
            out[block.index] = result.reshape(-1)
        return out

    def dense(self, method: str) -> torch.Tensor:
        """The block-diagonal matrix K_method (P, P) float64, for small models (tests)."""
        m = torch.zeros(self.num_params, self.num_params, dtype=torch.float64)
        for block in self.blocks:
            i = block.index
            if block.factors is not None:
                m[i[:, None], i[None, :]] = K.kfac_block_matrix(_method(block.factors, method))
            else:
                m[i, i] = _method(block.diagonal, method)
        return m


def _method(per_method: Mapping[str, Any] | None, method: str) -> Any:
    if per_method is None or method not in per_method:
        raise ValueError(
            f"method {method!r} was not computed; pass it in methods=... of kfac_curvature"
        )
    return per_method[method]


def _check_options(methods: tuple[str, ...], kfac_fisher: str, bias: str) -> None:
    if not methods or any(m not in K.KFAC_METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {K.KFAC_METHODS}, got {methods!r}")
    check_choice(kfac_fisher, "kfac_fisher", KFAC_FISHERS)
    check_choice(bias, "bias", BIAS_MODES)


def _param_index(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameter name -> its positions in theta (shaped like the parameter)."""
    index, offset = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            index[name] = torch.arange(offset, offset + p.numel()).reshape(p.shape)
            offset += p.numel()
    return index


def _method_factors(
    a: torch.Tensor | None,
    rows: dict[str, list[torch.Tensor]],
    weights: dict[str, torch.Tensor | None],
    options: dict[str, Any],
) -> dict[str, K.KroneckerFactors]:
    """Per method: A (shared, None for a bias block), B from its rows, E if asked."""
    factor_a = None if a is None else K.input_factor(
        a, convention=options["convention"], normalisation=options["normalisation"]
    )
    out = {}
    for m, bs in rows.items():
        factor_b = sum(K.grad_factor(b, weights=weights[m], convention=options["convention"])
                       for b in bs)
        factors = K.KroneckerFactors(factor_a, factor_b)
        if options["eigenvalue_correction"]:
            e = sum(K.eigenvalue_correction(factors, a, b, weights=weights[m]).corrected_eigenvalues
                    for b in bs)
            factors = K.KroneckerFactors(factor_a, factor_b, e)
        out[m] = factors
    return out


def _inputs_of(passes: Passes, use: Use) -> torch.Tensor:
    """The inputs (N, T, d_in) of every module that calls a parameter, concatenated along T."""
    return torch.cat([passes.recorder.layer_inputs(m) for m in use.modules], dim=1)


def _grads_of(passes: Passes, use: Use, source: str) -> list[torch.Tensor]:
    """Per backward pass of ``source``, the output gradients (N, T, d_out) of every module
    that calls a parameter, concatenated along T in the order of :func:`_inputs_of`."""
    per_module = [passes.output_grads[source][m] for m in use.modules]
    return [torch.cat(calls, dim=1) for calls in zip(*per_module, strict=True)]


def _kronecker_blocks(
    passes: Passes,
    index: dict[str, torch.Tensor],
    source: dict[str, str],
    weights: dict[str, torch.Tensor | None],
    options: dict[str, Any],
) -> list[KFACBlock]:
    """One block per Kronecker-factored parameter (a joint bias: one with its weight).

    A weight block is named after the first module that calls it, a bias block after the
    bias parameter, and a parameter shared by several modules sums their uses (their
    positions are concatenated along T).
    """
    joint = _joint_biases(passes.kronecker) if options["bias"] == "joint" else {}
    blocks = []
    for pname, use in passes.kronecker.items():
        if use.role == "bias" and pname in joint.values():
            continue  # in its weight's block
        rows = {m: _grads_of(passes, use, source[m]) for m in weights}
        if use.role == "bias":
            blocks.append(KFACBlock(
                pname, index[pname], tuple(index[pname].shape),
                factors=_method_factors(None, rows, weights, options),
            ))
            continue
        a = _inputs_of(passes, use)
        w_index = index[pname].reshape(index[pname].shape[0], -1)
        if pname in joint:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            w_index = torch.cat([w_index, index[joint[pname]][:, None]], dim=1)
        terms = a.shape[0] * (a.shape[1] if options["convention"] == "expand" else 1)
        blocks.append(KFACBlock(
            use.modules[0], w_index.reshape(-1), tuple(w_index.shape),
            factors=_method_factors(a, rows, weights, options), input_terms=terms,
        ))
    return blocks


def _joint_biases(kronecker: Mapping[str, Use]) -> dict[str, str]:
    """Weight name -> the bias that ``bias="joint"`` puts in its block (called by exactly the
    same modules); a weight whose modules have other biases is refused by name."""
    biases = {use.modules: name for name, use in kronecker.items() if use.role == "bias"}
    out = {}
    for name, use in kronecker.items():
        if use.role != "weight":
            continue
        if use.modules in biases:
            out[name] = biases[use.modules]
        elif any(m in b for b in biases for m in use.modules):
            raise ValueError(
                f"bias='joint': weight {name!r} is shared by the modules {list(use.modules)}, "
                "whose biases are not one shared parameter; use bias='separate'"
            )
    return out


def kfac_curvature(
    model: nn.Module,
    loss: ngdref.LogitLoss,
    inputs: torch.Tensor | Mapping[str, Any],
    targets: Any = None,
    *,
    methods: tuple[str, ...] = K.KFAC_METHODS,
    key: int = 0,
    kfac_fisher: str = "mc",
    convention: str = "expand",
    normalisation: str = "mean",
    bias: str = "separate",
    output_fn: Callable[[Any], torch.Tensor] | None = None,
    strict: bool = False,
    eigenvalue_correction: bool = False,
) -> KFACCurvature:
    r"""Kronecker factors of every supported layer for the given K-FAC methods, one batch.

    Parameters
    ----------
    model, inputs, output_fn
        As for :class:`backends.TorchProvider` (eval mode during the passes).
    loss : ngdref.LogitLoss
    targets : optional
        Default: the ``"labels"`` of dict inputs.
    methods : subset of {"kfac", "ekfac", "iekfac"}
    key : int
        Seed of KFAC's label draw (``loss.sample``).
    kfac_fisher : {"mc", "type-2"}
        KFAC's B from one sampled label per sample, or from the C columns of
        the logit Hessian's square root (its expectation; curvlinops "type-2").
    convention, normalisation
        See :mod:`ngdref.kfac`.
    bias : {"separate", "joint"}
    strict : bool
        Raise ``ValueError`` instead of using the diagonal fallback.
    eigenvalue_correction : bool
        Replace each block's Kronecker eigenvalues by the per-sample gradients' second
        moments in its eigenbasis (:func:`ngdref.kfac.eigenvalue_correction`; curvlinops'
        ``EKFACLinearOperator``). Only ``damped_inverse="exact"`` applies to such blocks.

    Returns
    -------
    KFACCurvature
    """
    _check_options(tuple(methods), kfac_fisher, bias)
    provider = TorchProvider(model, inputs, output_fn=output_fn, per_sample_method="vmap")
    targets = provider.targets if targets is None else targets
    if targets is None:
        raise ValueError("targets is required (or a 'labels' entry in dict inputs)")
    passes = run_passes(provider, loss, targets, tuple(methods), key, kfac_fisher, strict)
    weights = {m: K.kfac_sample_weights(m, passes.logit_grad_sq_norms) for m in methods}
    source = {m: "sampled" if m == "kfac" else "true" for m in methods}
    options = {"convention": convention, "normalisation": normalisation, "bias": bias,
               "eigenvalue_correction": eigenvalue_correction}
    index = _param_index(model)
    blocks = _kronecker_blocks(passes, index, source, weights, options)
    blocks += _fallback_blocks(provider, index, passes.reasons, passes.rows, weights, source)
    return KFACCurvature(
        blocks, passes.grad, passes.loss, dict(passes.reasons), provider.num_params,
        normalisation,
    )


def _fallback_blocks(
    provider: TorchProvider,
    index: dict[str, torch.Tensor],
    reasons: dict[str, str],
    rows: dict[str, list[torch.Tensor]],
    weights: dict[str, torch.Tensor | None],
    source: dict[str, str],
) -> list[KFACBlock]:
    """Diagonal blocks D = sum_n w_n g_n^2 of the parameters in ``reasons``."""
    if not reasons:
        return []
    columns = torch.cat([index[name].reshape(-1) for name in reasons])
    grads = {
        kind: [provider.vjp(u)[:, columns] for u in cotangents]
        for kind, cotangents in rows.items()
    }
    diagonal = {
        m: sum(K.diagonal_factor(g, weights=weights[m]) for g in grads[source[m]])
        for m in weights
    }
    blocks, start = [], 0
    for name in reasons:
        size = index[name].numel()
        blocks.append(KFACBlock(
            name, index[name].reshape(-1), (size,),
            diagonal={m: d[start:start + size] for m, d in diagonal.items()},
        ))
        start += size
    return blocks


def kfac_directions(
    model: nn.Module,
    loss: ngdref.LogitLoss,
    inputs: torch.Tensor | Mapping[str, Any],
    targets: Any = None,
    *,
    damping: float,
    methods: tuple[str, ...] = K.KFAC_METHODS,
    damped_inverse: str = "exact",
    **options: Any,
) -> dict[str, torch.Tensor]:
    r"""The K-FAC family's updates d_m = (K_m + lambda I)^-1 g of one batch, (P,) each.

    g = sum_n grad l_n (sum convention); the keyword ``options`` go to
    :func:`kfac_curvature`. The result has the layout of
    :func:`ngdref.directions`'s, so gamma and the other diagnostics apply as they are.
    """
    curvature = kfac_curvature(model, loss, inputs, targets, methods=methods, **options)
    return {
        m: curvature.inverse_apply(
            m, curvature.grad, damping=damping, damped_inverse=damped_inverse
        )
        for m in methods
    }


def merge_curvatures(curvatures: list[KFACCurvature]) -> KFACCurvature:
    r"""The curvature of the union of disjoint micro-batches from each one's curvature.

    Exact for every factor: B, the diagonal blocks, g and the loss add up; A adds up under
    ``normalisation="sum"`` and is the term-weighted mean sum_i c_i A_i / sum_i c_i under
    "mean" (c_i = :attr:`KFACBlock.input_terms`). The curvatures must come from one model
    with the same options (KFAC's draws are the micro-batches' own).
    """
    if not curvatures:
        raise ValueError("curvatures must hold at least one KFACCurvature")
    first = curvatures[0]
    if any(
        c.num_params != first.num_params or c.normalisation != first.normalisation
        or [b.name for b in c.blocks] != [b.name for b in first.blocks]
        for c in curvatures
    ):
        raise ValueError("curvatures must come from one model with the same options")
    if any(f.corrected_eigenvalues is not None
           for c in curvatures for b in c.blocks for f in (b.factors or {}).values()):
        raise ValueError(
            "curvatures with corrected eigenvalues cannot be merged (each E belongs to its "
            "own factors' eigenbasis): compute the correction on the whole batch"
        )
    blocks = [_merge_blocks([c.blocks[i] for c in curvatures], first.normalisation)
              for i in range(len(first.blocks))]
    return dataclasses.replace(
        first,
        blocks=blocks,
        grad=sum(c.grad for c in curvatures),
        loss=sum(c.loss for c in curvatures),
    )


def _merge_blocks(blocks: list[KFACBlock], normalisation: str) -> KFACBlock:
    first = blocks[0]
    if first.factors is None:
        diagonal = {m: sum(b.diagonal[m] for b in blocks) for m in first.diagonal}
        return dataclasses.replace(first, diagonal=diagonal)
    terms = sum(b.input_terms for b in blocks)
    factors = {}
    for m, f in first.factors.items():
        a = None
        if f.input_factor is not None:
            parts = [b.factors[m].input_factor for b in blocks]
            a = (
                sum(parts) if normalisation == "sum"
                else sum(b.input_terms * p for b, p in zip(blocks, parts, strict=True)) / terms
            )
        factors[m] = K.KroneckerFactors(a, sum(b.factors[m].grad_factor for b in blocks))
    return dataclasses.replace(first, factors=factors, input_terms=terms)
