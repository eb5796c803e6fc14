r"""Block-diagonal Kronecker factors of a torch model: KFAC, eKFAC, ieKFAC (:mod:`ngdref.kfac`).

:func:`kfac_curvature` runs one forward pass that records every call of a layer of a
registered kind (:mod:`backends.torch.layers`, the definition of each layer the per-sample
routes share; the batch axis of each call by provenance, never by a shape) and one backward
pass of the true-label logit gradients e_n = dl_n/dz_n (sum convention); "kfac" adds one
backward pass of sampled-label gradients (or C passes of the columns of the logit Hessian's
square root, ``kfac_fisher="type-2"``). Per layer call the registry gives its input side a_n
(T, d_in) and its gradient side b_n (T, d_out); the factors are then
:func:`ngdref.kfac.input_factor` and :func:`ngdref.kfac.grad_factor` with the weights
:func:`ngdref.kfac.kfac_sample_weights` (one code path for the three methods).

Kronecker blocks
    ``nn.Linear`` (any leading axes, batch first, sequence first or merged into one axis;
    peft LoRA's ``lora_A`` / ``lora_B``), ``nn.Conv1d/2d/3d`` (any stride, padding, string
    padding, padding mode, dilation; one block per group), ``nn.ConvTranspose1d/2d/3d`` (the
    inputs on the weight's rows, one block per group), ``nn.Embedding`` (A = diag(counts) / c
    kept as its diagonal, never a V x V matrix; ``convention="expand"`` only) and
    ``nn.MultiheadAttention``'s projections (one block per q, k, v row block of a packed
    ``in_proj_weight``, the separate ``q/k/v_proj_weight``, ``out_proj`` as an ``nn.Linear``).
    A layer called k times concatenates its calls along T.
Shared (tied) parameters
    A parameter used by several calls or modules has one set of blocks in which every use is
    summed: when its uses have one Kronecker layout (two ``nn.Linear`` or two
    ``nn.Embedding`` sharing a weight) their positions are concatenated along T; otherwise
    (an embedding tied to an output layer) its block is the diagonal below, which sums every
    use per sample. ``bias="joint"`` refuses a shared weight whose calls do not share one bias.
Biases
    ``bias="separate"`` (default, curvlinops' ``separate_weight_and_bias=True``): a bias has
    its own block B (no input factor); ``"joint"``: a column of ones is appended to a_n and
    [W, b] (d_out, d_in + 1) is one block (per group), where W is a linear map of the inputs.
Diagonal blocks
    Parameters without a Kronecker form (norm layers, ``nn.EmbeddingBag``, ``bias_k`` /
    ``bias_v``, uses of different layouts, an embedding under ``convention="reduce"``) get
    D = sum_n w_n g_n^2 from the registry's parts; parameters outside registered layers (or
    refused by their kind, called on inputs without a batch axis, or used outside their
    layers' calls, e.g. by ``F.linear``) get D from per-sample gradients by ``vmap`` (or a
    loop of single-sample passes where torch.func cannot run the model). Each is listed with
    its reason in :attr:`KFACCurvature.fallback`; ``strict=True`` refuses them instead.
Refused by name
    Modules without per-sample meaning under the eval-mode policy
    (:func:`backends.torch.per_sample.semantics.refuse_semantics`:
    ``scale_grad_by_freq``, ``max_norm``, batch norm without running statistics, ...).

Vectors are flat (P,) over the model's trainable parameters in ``named_parameters()``
order, as :class:`backends.TorchProvider`'s; everything is in the paper's sum convention
(the curvature approximates sum_n g_n g_n^T).
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

from ..per_sample.semantics import MODES, refuse_semantics
from ..provider import TorchProvider
from .blocks import KFACBlock, build_blocks, diagonal_reasons
from .capture import run_passes

__all__ = [
    "KFACBlock",
    "KFACCurvature",
    "kfac_curvature",
    "kfac_directions",
    "merge_curvatures",
]

BIAS_MODES = ("separate", "joint")
KFAC_FISHERS = ("mc", "type-2")


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
        Trainable parameter name -> why its block is diagonal (and by which route).
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


def _check_options(methods: tuple[str, ...], options: Mapping[str, Any]) -> None:
    if not methods or any(m not in K.KFAC_METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {K.KFAC_METHODS}, got {methods!r}")
    check_choice(options["kfac_fisher"], "kfac_fisher", KFAC_FISHERS)
    check_choice(options["bias"], "bias", BIAS_MODES)
    check_choice(options["convention"], "convention", K.CONVENTIONS)
    check_choice(options["normalisation"], "normalisation", K.NORMALISATIONS)


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
    mode: str = "eval",
) -> KFACCurvature:
    r"""The block-diagonal curvature of the given K-FAC methods on one batch (module docs).

    Parameters
    ----------
    model, inputs, output_fn, mode
        As for :class:`backends.TorchProvider` (``mode="eval"`` during the passes by default;
        ``"train"`` refuses modules without per-sample meaning in train mode, by name).
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
        Raise ``ValueError`` instead of giving any parameter a diagonal block.
    eigenvalue_correction : bool
        Replace each block's Kronecker eigenvalues by the per-sample gradients' second
        moments in its eigenbasis (:func:`ngdref.kfac.eigenvalue_correction`; curvlinops'
        ``EKFACLinearOperator``). Only ``damped_inverse="exact"`` applies to such blocks.

    Returns
    -------
    KFACCurvature

    Raises
    ------
    backends.torch.per_sample.semantics.PerSampleSemanticsError
        A module has no per-sample meaning under ``mode`` (named), before any pass.
    ValueError
        Bad options (named); ``strict`` and a diagonal block; ``bias="joint"`` and a shared
        weight whose calls do not share one bias.
    """
    options = {"convention": convention, "normalisation": normalisation, "bias": bias,
               "eigenvalue_correction": eigenvalue_correction, "kfac_fisher": kfac_fisher}
    _check_options(tuple(methods), options)
    refuse_semantics(model, check_choice(mode, "mode", MODES))
    provider = TorchProvider(model, inputs, output_fn=output_fn, per_sample="vmap", mode=mode)
    targets = provider.targets if targets is None else targets
    if targets is None:
        raise ValueError("targets is required (or a 'labels' entry in dict inputs)")
    passes = run_passes(provider, loss, targets, tuple(methods), key, kfac_fisher)
    reasons = diagonal_reasons(passes, convention)
    if strict and reasons:
        raise ValueError(f"model has trainable parameters outside supported layers (no "
                         f"Kronecker factors): {reasons}")
    weights = {m: K.kfac_sample_weights(m, passes.logit_grad_sq_norms) for m in methods}
    source = {m: "sampled" if m == "kfac" else "true" for m in methods}
    blocks, fallback = build_blocks(provider, passes, reasons, weights, source, options)
    return KFACCurvature(blocks, passes.grad, passes.loss, fallback, provider.num_params,
                         normalisation)


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
