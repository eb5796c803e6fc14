r"""Independent oracles: peer libraries that nobody here wrote, against ngdref's products.

For a model on one batch, with random vectors V (P, 3):

=======================================  ==========================================================
oracle quantity                          compared with
=======================================  ==========================================================
``curvlinops.GGNLinearOperator``         :func:`ngdref.fisher_vp` (F = sum_n J_n^T H_n J_n)
``curvlinops.EFLinearOperator``          G^T G V from the reference per-sample gradients
                                         (:func:`ngdref.ef_matrix`); per token for sequences
``curvlinops.FisherMCLinearOperator``    :func:`ngdref.fisher_vp`, to Monte Carlo accuracy
                                         (sequences: with the ignored tokens kept)
``backpack.BatchGrad``                   the reference per-sample gradients G
``backpack.ggn_vector_product``          :func:`ngdref.fisher_vp`
``backpack.SqrtGGNExact``                :func:`ngdref.fisher_vp` (as V_bp^T (V_bp v))
=======================================  ==========================================================

Conventions bridged here (all of ngdref is in the paper's sum convention):

- every torch loss is built with ``reduction="sum"``, so neither library
  divides by N (curvlinops' ``_get_normalization_factor`` is 1 and its EF and
  MC-Fisher pseudo-losses use reduction factor 1);
- ``torch.nn.MSELoss(reduction="sum")`` is ``sum ||z - y||^2``, twice ngdref's
  ``0.5 ||z - y||^2``: its gradients are 2x, its GGN and MC Fisher 2x and its
  EF 4x ngdref's, and those factors are divided out explicitly;
- sequence losses (``ngdref.SequenceSoftmaxCrossEntropy``, T5): the logits
  (N, T*V) are viewed as (N, V, T) for ``CrossEntropyLoss(ignore_index=-100)``.
  The GGN is the same matrix (the per-sequence loss Hessian is block diagonal
  over tokens). curvlinops' EF flattens the tokens into the batch axis and so
  treats each token as a sample: it is sum_{n,t} g_nt g_nt^T with
  g_nt = J_nt^T e_nt the gradient of token t's loss alone, not ngdref's
  per-sequence EF sum_n (sum_t g_nt)(sum_t g_nt)^T. We reconstruct that
  per-token EF from ngdref quantities (one provider VJP per label position with
  the logit gradient restricted to that position) and compare it; the
  per-sequence EF's difference is reported as a note. curvlinops' MC sampler
  draws a label at every token, including ``ignore_index`` ones (its GGN and
  EF do respect the mask), so its MC Fisher estimates the Fisher with every
  position kept: it is compared with that (ngdref's Fisher with the ignored
  targets replaced by a valid id), and the masked Fisher's difference is a note.
- BackPACK runs on the models it supports (``nn.Linear``, ``nn.Conv2d``,
  ``nn.Tanh``, ``nn.Flatten`` stacks; not transformers), on a deep copy of the
  model (``extend`` installs hooks for good). ``SqrtGGNExact`` needs the loss
  module applied to the model output itself, so it is skipped for sequences.

Tolerances (relative Frobenius differences, one place: :data:`TOLERANCES`):
products only, no solves, so float64 models agree to rounding, a few eps
times sqrt(N*C*P) terms, < 1e-12: 1e-10 leaves a margin. Hugging Face models
compute parts of their forward in float32 (T5LayerNorm's variance, ViT's
eager softmax), so any two routes through them differ by float32 rounding,
eps_32 = 1.2e-7 relative, amplified by the products: 1e-5. The MC Fisher's
tolerance is statistical, from the spread of curvlinops' own independent
estimates (not from ngdref's sampled gradients), see :func:`fisher_mc_tolerance`.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import array_api_compat
import numpy as np

import ngdref
from backends.arrays import from_numpy, to_numpy
from validation.independent import Verdict, library_of

__all__ = [
    "MC_SAMPLES",
    "TOLERANCES",
    "OracleCheck",
    "OracleSetup",
    "fisher_mc_tolerance",
    "oracle_checks",
    "oracles_skipped",
    "unavailable",
]

#: relative tolerance per (kind, float32_internals); see the module docstring
TOLERANCES = {False: 1e-10, True: 1e-5}
#: Monte Carlo draws per sample of curvlinops' FisherMCLinearOperator, in all
MC_SAMPLES = 2000
#: ... split over this many independent operators (seeds 1 .. MC_RUNS), whose
#: spread gives the standard error (see :func:`fisher_mc_tolerance`)
MC_RUNS = 16
#: the tolerance is this many (estimated) standard errors
MC_SIGMAS = 5.0
NUM_VECTORS = 3


def unavailable(library: str) -> str:
    """Why ``library`` ("curvlinops" or "backpack") cannot be imported ('' when it can)."""
    try:
        importlib.import_module(library)
        if library == "backpack":
            importlib.import_module("backpack.extensions")
    except Exception as err:  # an oracle's own missing dependency shows up here too
        return f"{library} is not importable ({type(err).__name__}: {err})"
    return ""


@dataclass
class OracleCheck(Verdict):
    """One oracle quantity against ngdref's on one problem."""

    oracle: str
    quantity: str
    difference: float
    tolerance: float
    skipped: str = ""
    note: str = ""
    error: str = ""


@dataclass
class OracleSetup:
    """A model on one batch as the oracles need it, with ngdref's reference provider.

    Attributes
    ----------
    module : torch.nn.Module
        float64, eval mode; its trainable parameters (``named_parameters()``
        order) are theta.
    inputs : torch.Tensor or dict
        What ``module`` gets (positionally, or as keywords).
    targets : torch.Tensor
        Torch targets of the batch (class ids, token ids with -100, or reals).
    loss : ngdref.LogitLoss
    provider : ngdref.JacobianProvider
        The reference provider (any namespace); its Fisher-vector products and
        VJPs are the ngdref side of every comparison.
    provider_targets : array
        ``targets`` in the provider's namespace.
    per_sample_grads : numpy.ndarray, shape (N, P)
        The reference per-sample gradients.
    backpack : bool
        BackPACK supports every module of ``module``.
    float32_internals : bool
        The model computes parts of its forward in float32.
    """

    module: Any
    inputs: Any
    targets: Any
    loss: ngdref.LogitLoss
    provider: Any
    provider_targets: Any
    per_sample_grads: np.ndarray
    backpack: bool
    float32_internals: bool = False

    @property
    def sequence(self) -> bool:
        return isinstance(self.loss, ngdref.SequenceSoftmaxCrossEntropy)

    @property
    def tolerance(self) -> float:
        return TOLERANCES[self.float32_internals]


# ---- the ngdref side --------------------------------------------------------------------------
def _vectors(num_params: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_params, NUM_VECTORS))


def _in_provider(setup: OracleSetup, array: np.ndarray) -> Any:
    """A float64 host array moved to the reference provider's array library."""
    return from_numpy(array, library_of(setup.provider.logits()), dtype="float64")


def ngdref_fisher_products(
    setup: OracleSetup, vectors: np.ndarray, targets: Any = None
) -> np.ndarray:
    """F V by :func:`ngdref.fisher_vp` on the reference provider; (P, K).

    ``targets`` (provider namespace) default to the setup's; they matter only
    through a sequence loss's ignore mask.
    """
    targets = setup.provider_targets if targets is None else targets
    fvp = ngdref.fisher_vp(setup.provider, setup.loss, targets)
    columns = [to_numpy(fvp(_in_provider(setup, vectors[:, k]))) for k in range(vectors.shape[1])]
    return np.stack(columns, axis=1)


def per_token_grads(setup: OracleSetup) -> np.ndarray:
    """Rows g_nt = J_nt^T e_nt, the gradient of token t's loss of sample n; (N*T, P).

    One provider VJP per label position t, with the logit gradient e of
    :class:`ngdref.SequenceSoftmaxCrossEntropy` kept at position t only
    (ignored positions have e = 0, so their rows are zero).
    """
    loss = setup.loss
    if not isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        raise TypeError(f"per-token gradients need a sequence loss, got {type(loss).__name__}")
    logits = setup.provider.logits()
    e = loss.grad(logits, setup.provider_targets)
    vocab = loss.vocab_size
    positions = logits.shape[1] // vocab
    columns = np.arange(logits.shape[1]) // vocab
    rows = []
    for t in range(positions):
        keep = _in_provider(setup, (columns == t).astype(np.float64))
        rows.append(to_numpy(setup.provider.vjp(e * keep[None, :])))
    return np.concatenate(rows, axis=0)


def fisher_mc_tolerance(products: np.ndarray, fisher: np.ndarray) -> float:
    r"""Relative tolerance of the mean of MC_RUNS independent MC Fisher products against F V.

    ``products`` (R, P, K) are curvlinops' own products X_r, each from
    MC_SAMPLES / R draws per sample with seed r: independent and unbiased for
    F V. Their spread s^2 = sum_r ||X_r - mean||^2 / (R - 1) estimates
    E||X_r - F V||^2 without reference to ngdref (a wrong F V does not widen
    it), so the standard error of the mean is sqrt(s^2 / R). The error of the
    mean is a sum of many independent terms: its norm concentrates near one
    standard error. With R - 1 = 15 degrees of freedom, s underestimates the
    true spread by more than a factor 0.59 with probability < 1% (chi^2_15),
    so MC_SIGMAS = 5 estimated errors are at least 3 true ones; the seeds are
    fixed, so the outcome is deterministic.
    """
    r = products.shape[0]
    mean = products.mean(axis=0)
    spread = float(np.sum((products - mean) ** 2)) / (r - 1)
    return MC_SIGMAS * math.sqrt(spread / r) / float(np.linalg.norm(fisher))


# ---- the torch side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _TorchLoss:
    module: Any  # a torch.nn loss with reduction="sum"
    to_loss_input: Callable[[Any], Any]  # logits -> what the loss module takes
    scale: float  # torch loss = scale * ngdref loss (gradients x scale, GGN x scale, EF x scale^2)


def _torch_loss(loss: ngdref.LogitLoss) -> _TorchLoss:
    from torch import nn

    def identity(z: Any) -> Any:
        return z

    if isinstance(loss, ngdref.SequenceSoftmaxCrossEntropy):
        vocab = loss.vocab_size

        def to_nvt(z: Any) -> Any:
            return z.reshape(z.shape[0], -1, vocab).transpose(1, 2)

        return _TorchLoss(
            nn.CrossEntropyLoss(reduction="sum", ignore_index=loss.ignore_index),
            to_nvt, 1.0,
        )
    if isinstance(loss, ngdref.SoftmaxCrossEntropy):
        return _TorchLoss(nn.CrossEntropyLoss(reduction="sum"), identity, 1.0)
    if isinstance(loss, ngdref.SigmoidBinaryCrossEntropy):
        return _TorchLoss(nn.BCEWithLogitsLoss(reduction="sum"), identity, 1.0)
    if isinstance(loss, ngdref.SquaredError):
        return _TorchLoss(nn.MSELoss(reduction="sum"), identity, 2.0)
    raise TypeError(f"no torch loss for {type(loss).__name__}")


def _logits(output: Any) -> Any:
    import torch

    return output if isinstance(output, torch.Tensor) else output.logits


def _call(module: Any, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(inputs)


def _output_model(module: Any, to_loss_input: Callable[[Any], Any]) -> Any:
    """An ``nn.Module`` mapping the inputs to what the torch loss takes (same parameters)."""
    from torch import nn

    class OutputModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = module

        def forward(self, inputs: Any) -> Any:
            return to_loss_input(_logits(_call(self.net, inputs)))

    return OutputModel().eval()


def _trainable(module: Any) -> list[Any]:
    return [p for p in module.parameters() if p.requires_grad]


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Mapping):
        return int(next(v for v in inputs.values() if hasattr(v, "shape")).shape[0])
    return int(inputs.shape[0])


def _relative(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def _curvlinops_checks(
    setup: OracleSetup, vectors: np.ndarray, fisher: np.ndarray
) -> list[OracleCheck]:
    import torch
    from curvlinops import EFLinearOperator, FisherMCLinearOperator, GGNLinearOperator

    spec = _torch_loss(setup.loss)
    model = _output_model(setup.module, spec.to_loss_input)
    params = _trainable(model)
    data = [(setup.inputs, setup.targets)]
    options: dict[str, Any] = {}
    if isinstance(setup.inputs, Mapping):
        options["batch_size_fn"] = _batch_size
    v = torch.from_numpy(vectors)
    tol = setup.tolerance
    checks = []

    ggn = GGNLinearOperator(model, spec.module, params, data, **options)
    product = (ggn @ v).detach().numpy() / spec.scale
    checks.append(OracleCheck("curvlinops.GGNLinearOperator", "F v vs ngdref.fisher_vp",
                              _relative(product, fisher), tol))

    ef = EFLinearOperator(model, spec.module, params, data, **options)
    ef_product = (ef @ v).detach().numpy() / spec.scale**2
    per_sample_ef = ngdref.ef_matrix(setup.per_sample_grads) @ vectors
    if setup.sequence:
        reference = ngdref.ef_matrix(per_token_grads(setup)) @ vectors
        checks.append(OracleCheck(
            "curvlinops.EFLinearOperator", "per-token EF v vs ngdref.ef_matrix(per-token G)",
            _relative(ef_product, reference), tol,
            note="curvlinops' EF treats each token as a sample; ngdref's per-sequence EF "
            f"differs from it by {_relative(ef_product, per_sample_ef):.2g} (a different matrix)",
        ))
    else:
        checks.append(OracleCheck("curvlinops.EFLinearOperator", "EF v vs ngdref.ef_matrix(G)",
                                  _relative(ef_product, per_sample_ef), tol))

    def make_mc(seed: int) -> Any:
        return FisherMCLinearOperator(
            model, spec.module, params, data, mc_samples=MC_SAMPLES // MC_RUNS, seed=seed,
            check_deterministic=False, **options,
        )

    checks.append(_mc_fisher_check(setup, vectors, fisher, make_mc, spec.scale))
    return checks


def _mc_fisher_check(
    setup: OracleSetup, vectors: np.ndarray, fisher: np.ndarray,
    make_mc: Callable[[int], Any], scale: float,
) -> OracleCheck:
    """The mean of MC_RUNS independent curvlinops MC Fisher products against F V."""
    import torch

    v = torch.from_numpy(vectors)
    products = np.stack([
        (make_mc(seed) @ v).detach().numpy() / scale for seed in range(1, MC_RUNS + 1)
    ])
    mc_product = products.mean(axis=0)
    quantity = f"F_MC v ({MC_SAMPLES} draws) vs ngdref.fisher_vp"
    note = (f"tolerance = {MC_SIGMAS:g} standard errors from the spread of {MC_RUNS} "
            "independent curvlinops operators")
    if setup.sequence:
        # curvlinops draws a label at every token, ignore_index ones included: its
        # expectation is the Fisher of the sequence with every position kept
        targets = setup.provider_targets
        xp = array_api_compat.array_namespace(targets)
        targets = xp.where(targets == setup.loss.ignore_index, xp.zeros_like(targets), targets)
        masked = fisher
        fisher = ngdref_fisher_products(setup, vectors, targets)
        quantity += " (ignored tokens kept)"
        note += (
            "; curvlinops samples labels at ignore_index tokens too, so it is compared with "
            "the Fisher of all positions; the masked sequence Fisher differs from it by "
            f"{_relative(mc_product, masked):.2g}"
        )
    return OracleCheck(
        "curvlinops.FisherMCLinearOperator", quantity, _relative(mc_product, fisher),
        fisher_mc_tolerance(products, fisher), note=note,
    )


def _backpack_checks(
    setup: OracleSetup, vectors: np.ndarray, fisher: np.ndarray
) -> list[OracleCheck]:
    import torch
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, SqrtGGNExact
    from backpack.hessianfree.ggnvp import ggn_vector_product

    spec = _torch_loss(setup.loss)
    targets = setup.targets
    tol = setup.tolerance
    checks = []

    # per-sample gradients: BatchGrad on an extended copy of the model
    net = extend(copy.deepcopy(setup.module))
    params = _trainable(net)
    n = _batch_size(setup.inputs)
    loss = spec.module(spec.to_loss_input(_logits(_call(net, setup.inputs))), targets)
    with backpack(BatchGrad()):
        loss.backward()
    grads = torch.cat([p.grad_batch.reshape(n, -1) for p in params], dim=1)
    checks.append(OracleCheck(
        "backpack.BatchGrad", "per-sample grads vs reference G",
        _relative(grads.detach().numpy() / spec.scale, setup.per_sample_grads), tol,
    ))

    # GGN-vector products by BackPACK's autodiff (R-op, loss Hessian, L-op)
    output = _logits(_call(setup.module, setup.inputs))
    loss = spec.module(spec.to_loss_input(output), targets)
    plain = _trainable(setup.module)
    columns = []
    for k in range(vectors.shape[1]):
        pieces = torch.split(torch.from_numpy(vectors[:, k]), [p.numel() for p in plain])
        v = [x.reshape(p.shape) for x, p in zip(pieces, plain, strict=True)]
        product = ggn_vector_product(loss, output, setup.module, v)
        columns.append(torch.cat([x.reshape(-1) for x in product]).detach().numpy())
    checks.append(OracleCheck(
        "backpack.ggn_vector_product", "F v vs ngdref.fisher_vp",
        _relative(np.stack(columns, axis=1) / spec.scale, fisher), tol,
    ))

    # the GGN's square root backpropagated by BackPACK's module extensions
    name = "backpack.SqrtGGNExact"
    if setup.sequence:
        checks.append(OracleCheck(
            name, "V^T V v vs ngdref.fisher_vp", math.nan, math.nan,
            skipped="needs the loss applied to the model output itself (no reshape)",
        ))
        return checks
    net = extend(copy.deepcopy(setup.module))
    loss_module = extend(copy.deepcopy(spec.module))
    loss = loss_module(_logits(_call(net, setup.inputs)), targets)
    try:
        with backpack(SqrtGGNExact()):
            loss.backward()
    except NotImplementedError as err:  # BackPACK declines, e.g. BCE with C > 1
        checks.append(OracleCheck(name, "V^T V v vs ngdref.fisher_vp", math.nan, math.nan,
                                  skipped=f"BackPACK: {err}"))
        return checks
    factors = [p.sqrt_ggn_exact for p in _trainable(net)]
    root = torch.cat([f.reshape(f.shape[0] * f.shape[1], -1) for f in factors], dim=1)
    root = root.detach().numpy()
    product = root.T @ (root @ vectors) / spec.scale
    checks.append(OracleCheck(name, "V^T V v vs ngdref.fisher_vp",
                              _relative(product, fisher), tol))
    return checks


def oracle_checks(setup: OracleSetup) -> list[OracleCheck]:
    """Every applicable oracle on ``setup`` (skipped rows say why the others do not run).

    Parameters
    ----------
    setup : OracleSetup

    Returns
    -------
    list of OracleCheck
    """
    vectors = _vectors(setup.per_sample_grads.shape[1])
    try:
        fisher = ngdref_fisher_products(setup, vectors)
    except Exception as err:  # the ngdref side failed: every comparison fails
        return [OracleCheck("ngdref.fisher_vp", "F v", math.nan, math.nan,
                            error=f"{type(err).__name__}: {err}".splitlines()[0])]
    checks: list[OracleCheck] = []
    reason = unavailable("curvlinops")
    if reason:
        checks.append(_missing("curvlinops", reason))
    else:
        checks += _guarded("curvlinops", lambda: _curvlinops_checks(setup, vectors, fisher))
    reason = unavailable("backpack")
    if reason:
        checks.append(_missing("backpack", reason))
    elif not setup.backpack:
        checks.append(OracleCheck("backpack", "all", math.nan, math.nan,
                                  skipped="BackPACK does not support this model's modules"))
    else:
        with warnings.catch_warnings():
            # BackPACK's module hooks fire on outputs when the inputs need no
            # gradient, which is what we want; torch warns about it every time.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            checks += _guarded("backpack", lambda: _backpack_checks(setup, vectors, fisher))
    return checks


def _missing(library: str, reason: str) -> OracleCheck:
    """A required oracle that cannot be imported: a failure (``--no-oracles`` opts out)."""
    return OracleCheck(library, "all", math.nan, math.nan,
                       error=f"{reason}; pass --no-oracles to run without the oracles")


def oracles_skipped() -> list[OracleCheck]:
    """The rows of a run with ``--no-oracles``."""
    return [OracleCheck(library, "all", math.nan, math.nan, skipped="--no-oracles")
            for library in ("curvlinops", "backpack")]


def _guarded(library: str, fn: Callable[[], list[OracleCheck]]) -> list[OracleCheck]:
    """``fn()``, or one failing check naming the exception if it raised."""
    try:
        return fn()
    except Exception as err:  # an oracle that crashes is a failed check, not a crashed suite
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        return [OracleCheck(library, "all", math.nan, math.nan, error=message)]
