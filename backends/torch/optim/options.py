r"""Every keyword option of the torch optimisers, written once: its type, check and meaning, and
whether it is a hyperparameter.

The optimisers (:mod:`backends.torch.optim.methods`, :mod:`backends.torch.optim.kfac`) spell
their keywords out in explicit ``__init__`` signatures with their defaults, as
``torch.optim.AdamW`` does. Everything else about an option lives in :data:`OPTIONS`:

- its check, run at construction and, for a hyperparameter, again at every step and by
  ``load_state_dict`` (nothing changes before it passes);
- whether it is a *hyperparameter*, kept in ``param_groups[0]`` (where a scheduler or the user
  may change it between steps, and saved by ``state_dict``), or a *construction option*, held
  by the optimiser for its life;
- its numpydoc entry: each optimiser's ``Parameters`` section is written from it
  (:func:`document`), in the order of the signature, with the signature's defaults.

:func:`provider_keywords` is the one place where the optimisers' options become
:class:`backends.TorchProvider` keywords.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import ngdref
from ngdref import kfac as K
from ngdref.checks import check_choice, check_int, check_real
from ngdref.linalg import DAMPING_MODES, DEDUP_RULES
from ngdref.updates import DAMPING_SPACES

from ..kfac.curvature import BIAS_MODES, KFAC_FISHERS
from ..per_sample.policy import CERTIFY, ON_MISMATCH
from ..per_sample.routes import PER_SAMPLE
from ..per_sample.semantics import MODES

__all__ = [
    "OPTIONS",
    "PER_SAMPLE",
    "SF_DAMPING_MODES",
    "SF_OPTIONS",
    "Option",
    "document",
    "provider_keywords",
]

#: how :class:`backends.SF` reads its damping: "absolute", or "median" (the authors' negative one)
SF_DAMPING_MODES = ("absolute", "median")


@dataclass(frozen=True)
class Option:
    """One keyword of the optimisers.

    Attributes
    ----------
    type : str
        The numpydoc type, e.g. ``'{"sum", "mean"} or float'``.
    doc : str
        What it means (one paragraph).
    check : callable or None
        Raises ``TypeError`` / ``ValueError`` naming the option on a bad value.
    hyperparameter : bool
        Kept in ``param_groups[0]`` (checked at every step, saved by ``state_dict``); else a
        construction option.
    """

    type: str
    doc: str
    check: Callable[[Any], Any] | None = None
    hyperparameter: bool = False


def _seed(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {type(value).__name__}")


def _dedup(value: Any) -> None:
    if value is not None:
        check_real(value, "dedup_threshold", positive=True)
        if value > 1:
            raise ValueError(f"dedup_threshold must be None or in (0, 1], got {value}")


def _beta(value: Any) -> None:
    check_real(value, "running_average")
    if value >= 1:
        raise ValueError(f"running_average must be in [0, 1), got {value}")


def _callable(value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"output_fn must be callable or None, got {type(value).__name__}")


def _flag(name: str, optional: bool = False) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not (isinstance(value, bool) or (optional and value is None)):
            raise TypeError(f"{name} must be {'None or ' if optional else ''}a bool, got {value!r}")

    return check


def _choice(name: str, choices: tuple[Any, ...]) -> Callable[[Any], Any]:
    return lambda value: check_choice(value, name, choices)


def _int(name: str, optional: bool = False) -> Callable[[Any], Any]:
    return lambda value: check_int(value, name, optional=optional)


def _real(name: str, positive: bool = False) -> Callable[[Any], Any]:
    return lambda value: check_real(value, name, positive=positive)


def _choices(values: tuple[str, ...]) -> str:
    return "{" + ", ".join(f'"{v}"' for v in values) + "}"


def _hyper(type_: str, doc: str, check: Callable[[Any], Any]) -> Option:
    return Option(type_, doc, check, hyperparameter=True)


#: name -> :class:`Option`, for every keyword of every optimiser (SF's ``damping_mode``:
#: :data:`SF_OPTIONS`)
OPTIONS: dict[str, Option] = {
    # ---- the model and the loss (positional) ----
    "model": Option(
        "torch.nn.Module",
        "Its parameters with ``requires_grad=True`` (a peft model's adapters, or all of them) "
        "are optimised jointly, as one parameter group; freeze the others before constructing "
        "the optimiser.",
    ),
    "loss": Option(
        "ngdref.LogitLoss",
        "The per-sample loss of the logits, e.g. ``ngdref.SoftmaxCrossEntropy()``, or "
        "``ngdref.SequenceSoftmaxCrossEntropy(vocab_size)`` for a sequence-to-sequence model.",
    ),
    # ---- hyperparameters: param_groups[0] ----
    "lr": _hyper(
        "float >= 0",
        "eta, the step size of the update above (EF and SF: of the first step, then decaying "
        "linearly to 0 over ``total_steps``).",
        _real("lr"),
    ),
    "damping": _hyper(
        "float >= 0",
        "lambda of the update above, in the ``reduction`` convention (see the conventions "
        "page, :ref:`conv-damping-reduction`).",
        _real("damping"),
    ),
    "reduction": _hyper(
        '{"sum", "mean"} or float',
        'R: "sum" is the paper\'s L = sum_n l_n, "mean" takes R = 1/N, a float R scales the '
        "summed loss (e.g. 1 / label tokens: Hugging Face's token mean); every quantity comes "
        "from the R-scaled loss (:ref:`conv-reduction`).",
        lambda value: ngdref.reduction_factor(value, 1),
    ),
    "damping_mode": _hyper(
        _choices(DAMPING_MODES),
        '"absolute": lambda I; "relative": lambda max_n K_nn I (K = G G^T, scale-free, the '
        'authors\' negative damping); "diagonal_only": K replaced by diag(K), lambda unused; '
        '"levenberg_marquardt": lambda diag(K) (:ref:`conv-damping-modes`).',
        _choice("damping_mode", DAMPING_MODES),
    ),
    "damping_space": _hyper(
        _choices(DAMPING_SPACES),
        '"sample": lambda I_N in the Gram system, as the paper; "parameter": '
        "(F_iEF + lambda I_P)^{-1} g, i.e. lambda diag(s) in sample space.",
        _choice("damping_space", DAMPING_SPACES),
    ),
    "dedup_threshold": _hyper(
        "float in (0, 1] or None",
        "Drop near-duplicate per-sample gradients (rows whose cosine with another exceeds it "
        "in absolute value) before the solve, as the authors' training code does with 0.99; "
        "None keeps every row (:ref:`conv-dedup`).",
        _dedup,
    ),
    "dedup_rule": _hyper(
        _choices(DEDUP_RULES),
        '"all_pairs" (the authors\'): every close pair drops its smaller-norm row; "greedy": '
        "rows in decreasing norm, each kept unless close to one kept before it "
        "(:ref:`conv-dedup`).",
        _choice("dedup_rule", DEDUP_RULES),
    ),
    "total_steps": _hyper(
        "int >= 1",
        "T: step t takes the step size lr (T - t) / T; a step beyond T raises ``ValueError`` "
        "(:ref:`conv-normalised-steps`).",
        _int("total_steps"),
    ),
    "num_samples": _hyper(
        "int >= 1", "K, the labels drawn per sample at every step (the paper: 1).",
        _int("num_samples"),
    ),
    "seed": _hyper(
        "int",
        "The labels drawn at step t use the key of (seed, t) (:ref:`conv-sampling-keys`): a run "
        "is reproducible and resumes exactly from a ``state_dict``.",
        _seed,
    ),
    "cg_tol": _hyper(
        "float > 0 or None",
        "Conjugate gradient stops at ||(F + lambda I) u - g|| <= cg_tol ||g||; None: "
        ":func:`ngdref.cg.default_cg_tol` of the gradient's dtype (1e-10 in float64, 3.5e-4 "
        "in float32).",
        lambda value: value is None or check_real(value, "cg_tol", positive=True),
    ),
    "cg_maxiter": _hyper(
        "int >= 1 or None",
        "Iterations before ``ngdref.NotConvergedError`` (the parameters then unchanged); None: "
        "10 P.",
        _int("cg_maxiter", optional=True),
    ),
    "update_interval": _hyper(
        "int >= 1",
        "Recompute the Kronecker factors every k-th step and reuse them in between (the "
        "gradient is always the current batch's).",
        _int("update_interval"),
    ),
    "running_average": _hyper(
        "float in [0, 1)",
        "beta: each recomputed factor is blended into the kept ones, F <- beta F_old + "
        "(1 - beta) F_new; 0 keeps the newest only.",
        _beta,
    ),
    "damped_inverse": _hyper(
        _choices(K.DAMPED_INVERSES),
        '"exact": (B (x) A + lambda I)^{-1}; "pi": lambda split between the factors by pi '
        "(:ref:`conv-kfac`).",
        _choice("damped_inverse", K.DAMPED_INVERSES),
    ),
    "convention": _hyper(
        _choices(K.CONVENTIONS),
        "How a layer applied at several positions enters its factors (:ref:`conv-kfac`).",
        _choice("convention", K.CONVENTIONS),
    ),
    "normalisation": _hyper(
        _choices(K.NORMALISATIONS),
        "Whether the input factor A averages or sums its terms (:ref:`conv-kfac`).",
        _choice("normalisation", K.NORMALISATIONS),
    ),
    "bias": _hyper(
        _choices(BIAS_MODES),
        '"separate": a bias is its own block; "joint": it joins its weight\'s block as a '
        "column of ones in A.",
        _choice("bias", BIAS_MODES),
    ),
    "kfac_fisher": _hyper(
        _choices(KFAC_FISHERS),
        '"mc": B from one label drawn per sample (keyed by ``seed`` and the step); "type-2": '
        "from the columns of the logit Hessian's square root, the exact expectation.",
        _choice("kfac_fisher", KFAC_FISHERS),
    ),
    # ---- construction options ----
    "output_fn": Option(
        "callable or None",
        "Maps the model's output to its logits (None: the output, or its ``.logits``), as "
        "for :class:`backends.TorchProvider`.",
        _callable,
    ),
    "per_sample": Option(
        _choices(PER_SAMPLE),
        "How the per-sample gradients are computed; every route gives the same step, to "
        "rounding (the per-sample routes guide); ``diagnostics[\"routes\"]`` names each "
        "parameter's route.",
        _choice("per_sample", PER_SAMPLE),
    ),
    "chunk_size": Option(
        "int >= 1 or None",
        "Samples per pass, to bound the passes' memory (None: the whole batch): one hooked "
        'forward and backward pass per chunk for "auto", "ghost" and "hooks", the vmap '
        "batches, and the plain forward passes, as :class:`backends.TorchProvider` takes it.",
        _int("chunk_size", optional=True),
    ),
    "mode": Option(
        _choices(MODES),
        'The mode of every pass (:ref:`conv-eval-mode`): "eval" (dropout off, batch norm on '
        "its running statistics) as the paper's authors train, or \"train\"; modules without "
        "per-sample gradients in that mode are refused by name before the step; the model's "
        "own flags are restored after each pass.",
        _choice("mode", MODES),
    ),
    "certify": Option(
        _choices(CERTIFY),
        "When the per-sample rows are checked against an independent G v: at the first step "
        "of each model structure and input shapes, at every step, or never "
        "(``diagnostics[\"certificate\"]``: None where none ran).",
        _choice("certify", CERTIFY),
    ),
    "on_mismatch": Option(
        _choices(ON_MISMATCH),
        "A failed certificate raises (the parameters unchanged), or redoes the rows by the "
        "next exact route, reported in ``diagnostics[\"fallbacks\"]``.",
        _choice("on_mismatch", ON_MISMATCH),
    ),
    "certify_samples": Option(
        "int >= 1 or None",
        "Certify a seeded window of this many samples per step (None: all N).",
        _int("certify_samples", optional=True),
    ),
    "distributed": Option(
        "bool or None",
        "None: when ``torch.distributed`` is initialised, the batch is the union of the ranks' "
        "shards and every rank takes the step of that batch (the data-parallel guide); "
        "False: local steps; True: require it.",
        _flag("distributed", optional=True),
    ),
    "process_group": Option(
        "torch.distributed.ProcessGroup or None",
        "The ranks that share the batch (None: the whole world).",
    ),
    "per_sample_method": Option(
        "str or None",
        "Deprecated (a ``DeprecationWarning``): the earlier name of ``per_sample``.",
        lambda value: value is None or check_choice(value, "per_sample_method", PER_SAMPLE),
    ),
    "strict": Option(
        "bool",
        "Refuse parameters outside the supported layers instead of giving them the diagonal "
        "fallback block (``diagnostics[\"fallback\"]`` names them).",
        _flag("strict"),
    ),
}

#: :class:`backends.SF`'s own reading of ``damping_mode`` (it replaces the Gram solve's)
SF_OPTIONS: dict[str, Option] = {
    "damping_mode": _hyper(
        _choices(SF_DAMPING_MODES),
        '"absolute": lambda as given; "median": the authors\' negative SF damping, lambda '
        "times the median squared norm of the step's true-label rows R g_n over the rows "
        "their duplicate filter keeps (:func:`ngdref.updates.median_damping`); "
        '``diagnostics["damping"]`` is the absolute value used.',
        _choice("damping_mode", SF_DAMPING_MODES),
    ),
}


# ---- the docs -------------------------------------------------------------------------------
#: what every optimiser's docstring says of ``step`` (its Notes section)
BATCH_CONTRACT = """\
Each ``step`` takes one batch: ``opt.step(batch=(inputs, targets))``, or ``opt.step(closure)``
with a closure that takes no argument and returns that batch (exactly one of the two). The
batch is ``(inputs, targets)``, inputs as for :class:`backends.TorchProvider` (a tensor, or a
mapping of keyword tensors) and targets as the loss expects (e.g. (N,) class labels), or a
mapping of Hugging Face inputs holding their ``"labels"``. Unlike a closure for
``torch.optim.LBFGS``, it neither computes the loss nor calls ``backward()``: the optimiser
runs its own passes. ``step`` returns the batch loss R sum_n l_n before the update."""


def document(cls: type, options: Mapping[str, Option]) -> None:
    """Write ``cls``'s ``Parameters`` section from ``options`` and its signature, and the batch
    contract as its ``Notes``.

    The section goes before the first section of the class's own docstring (or at its end),
    the Notes last; a class without a docstring (``python -OO``) is left alone.
    """
    if not cls.__doc__:
        return
    lines = ["Parameters", "----------"]
    for name, parameter in inspect.signature(cls).parameters.items():
        option = options[name]
        default = "" if parameter.default is parameter.empty else (
            f", default {_literal(parameter.default)}"
        )
        lines.append(f"{name} : {option.type}{default}")
        note = " Per step, in ``param_groups[0]``." if option.hyperparameter else ""
        lines += textwrap.wrap(option.doc + note, 92, initial_indent="    ",
                               subsequent_indent="    ", break_on_hyphens=False)
    head = inspect.cleandoc(cls.__doc__).splitlines()
    first = next(
        (i for i in range(1, len(head)) if set(head[i]) == {"-"} and head[i - 1].strip()),
        None,
    )
    cut = len(head) if first is None else first - 1
    notes = ["Notes", "-----", *BATCH_CONTRACT.splitlines()]
    cls.__doc__ = "\n".join([*head[:cut], "", *lines, "", *head[cut:], "", *notes]).replace(
        "\n\n\n", "\n\n"
    )


def _literal(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


# ---- the provider ---------------------------------------------------------------------------
#: the provider keywords the optimisers' options give, by the same names
_PROVIDER_OPTIONS = ("output_fn", "per_sample", "chunk_size", "mode", "certify", "on_mismatch",
                     "certify_samples")


def provider_keywords(options: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The :class:`backends.TorchProvider` keywords of an optimiser's options at ``step``.

    Parameters
    ----------
    options : mapping
        ``output_fn``, ``per_sample``, ``chunk_size``, ``mode``, ``certify``, ``on_mismatch``
        and ``certify_samples`` (checked).
    step : int
        The step counter, passed as ``certify_seed`` (a fresh v every step, reproducibly).

    Returns
    -------
    dict
        The provider's keywords: the options by their names and ``certify_seed`` the step.
    """
    return {**{name: options[name] for name in _PROVIDER_OPTIONS}, "certify_seed": step}
