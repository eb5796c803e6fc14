r"""Semantics without a per-sample meaning, refused by name before anything changes; the mode
policy of every pass.

Per-sample rows :math:`g_n = \nabla_\theta l_n` exist only when sample n's loss depends on
theta through sample n alone and the passes are deterministic. Some modules break that by
design, whatever route computes the rows (hooks, ghost factors, vmap, the loop):

=====================================  ==================================================
module (and when)                      why it has no per-sample rows
=====================================  ==================================================
``BatchNorm1d/2d/3d``,                 normalises by the statistics of the batch: each
``SyncBatchNorm``, ``LazyBatchNorm*``  sample's output depends on the others (and the
in train mode, or with                 running statistics are updated in place)
``track_running_stats=False``
``InstanceNorm*`` with                 updates its running statistics in place on every
``track_running_stats=True``, train    pass (a loop would update them N times)
``Embedding`` / ``EmbeddingBag``       divides each token's gradient by the token's count
with ``scale_grad_by_freq=True``       in the whole batch: sample n's gradient depends on
                                       the other samples' tokens
``Embedding`` / ``EmbeddingBag``       renormalises the looked-up rows of the weight in
with ``max_norm``                      place during the forward pass
dropout in train mode (``Dropout*``,   random masks: a hooked pass, a re-run forward and
``AlphaDropout``,                      the certificate's pass would each draw their own
``FeatureAlphaDropout``,               (unless a route honours per-sample masks,
``MultiheadAttention(dropout>0)``,     ``random_masks=True``)
``RNN/GRU/LSTM(dropout>0)``),
``RReLU`` in train mode
a lazy module not yet initialised      its parameters have no shape yet
=====================================  ==================================================

A random torch function called from a module's own ``forward`` (``F.dropout(x, p,
self.training)``, ``torch.rand``, ``bernoulli``) is invisible to an inspection of the
modules; :class:`RandomOps` watches a pass for them.

The mode policy (``mode``)
--------------------------
``"eval"`` (default): every pass runs with every submodule in eval mode (dropout off, batch
norm on its running statistics), as the paper's authors train (their ``eval_train: true``);
``"train"``: every submodule in train mode. Either way each module's own flag is restored
after the pass (:func:`applied_mode`): the user's model keeps its mode. The refusals above are
judged under the policy's flags, not the modules' current ones.

Layer kinds that a route cannot handle exactly (a ghost factor for a padding mode, K-FAC for
a layer) are the layer registry's refusals (``refuse(module, mode)``, same signature as
:func:`semantic_refusal`); :func:`refusals` takes them as extra ``rules``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.modules.lazy import LazyModuleMixin
from torch.overrides import TorchFunctionMode

from ngdref.checks import check_choice

__all__ = [
    "MODES",
    "PerSampleSemanticsError",
    "RandomOps",
    "Refusal",
    "applied_mode",
    "refusals",
    "refuse_semantics",
    "semantic_refusal",
]

MODES = ("eval", "train")

#: a rule: (module, mode) -> the reason it cannot be exact, or None
Rule = Callable[[nn.Module, str], "str | None"]


@dataclass(frozen=True)
class Refusal:
    """One module refused: its path in the model ("" for the model itself), class, reason."""

    path: str
    module: str
    reason: str

    def __str__(self) -> str:
        where = f"model.{self.path}" if self.path else "model"
        return f"{where} ({self.module}): {self.reason}"


class PerSampleSemanticsError(ValueError):
    """The model has modules (or random operations) without per-sample rows.

    Attributes
    ----------
    refusals : tuple of Refusal
    """

    def __init__(self, refusals: Sequence[Refusal], mode: str) -> None:
        self.refusals = tuple(refusals)
        lines = "\n  ".join(str(r) for r in self.refusals)
        super().__init__(
            f"per-sample gradients have no meaning for this model under mode={mode!r} "
            f"({len(self.refusals)} refused):\n  {lines}"
        )


_DROPOUT = "dropout in train mode draws random masks: the rows of a hooked pass and of a " \
    "re-run forward would not agree"


def _random_in_training(module: nn.Module) -> str | None:
    if isinstance(module, _DropoutNd) and module.p > 0:
        return _DROPOUT
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return f"attention {_DROPOUT}"
    if isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1:
        return f"inter-layer {_DROPOUT}"
    if isinstance(module, nn.RReLU):
        return "RReLU in train mode draws random slopes per element"
    return None


def semantic_refusal(module: nn.Module, mode: str, *, random_masks: bool = False) -> str | None:
    """Why ``module`` has no per-sample meaning under the policy ``mode``, or None.

    Parameters
    ----------
    module : torch.nn.Module
        Judged on its own (not its children).
    mode : {"eval", "train"}
    random_masks : bool
        Whether the route honours per-sample random masks (dropout in train mode allowed).
    """
    training = mode == "train"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return "a lazy module whose parameters are not initialised: run one forward pass first"
    if isinstance(module, _BatchNorm) and (
        training or (module.running_mean is None and module.running_var is None)
    ):
        return ("batch norm normalises by the statistics of the batch (train mode, or "
                "track_running_stats=False): each sample's output depends on the others")
    if isinstance(module, _InstanceNorm) and module.track_running_stats and training:
        return ("instance norm with track_running_stats=True updates its running statistics "
                "in place on every pass in train mode")
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        if module.scale_grad_by_freq:
            return ("scale_grad_by_freq=True divides each token's gradient by its count in the "
                    "whole batch: a sample's gradient depends on the other samples' tokens")
        if module.max_norm is not None:
            return ("max_norm renormalises the looked-up rows of the weight in place during "
                    "the forward pass")
    if training and not random_masks:
        return _random_in_training(module)
    return None


def refusals(
    model: nn.Module, mode: str = "eval", *, random_masks: bool = False,
    rules: Sequence[Rule] = (), modules: Sequence[tuple[str, nn.Module]] | None = None,
) -> list[Refusal]:
    """Every module of ``model`` refused by :func:`semantic_refusal` or by one of ``rules``
    (e.g. the layer registry's ``refuse``), in ``named_modules()`` order; the first reason of
    each module. ``modules``: ``model.named_modules()`` if the caller has them already."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice(mode, "mode", MODES)
    found = []
    for path, module in model.named_modules() if modules is None else modules:
        reason = semantic_refusal(module, mode, random_masks=random_masks)
        for rule in rules:
            if reason is not None:
                break
            reason = rule(module, mode)
        if reason is not None:
            found.append(Refusal(path, type(module).__name__, reason))
    return found


def refuse_semantics(
    model: nn.Module, mode: str = "eval", *, random_masks: bool = False,
    rules: Sequence[Rule] = (), modules: Sequence[tuple[str, nn.Module]] | None = None,
) -> None:
    """Raise :class:`PerSampleSemanticsError` naming every refused module (:func:`refusals`).

    It runs nothing and changes nothing: call it before the first pass of a step.

    Raises
    ------
    PerSampleSemanticsError
        Some module has no per-sample meaning under ``mode``.
    ValueError, TypeError
        ``mode`` not in :data:`MODES`; ``model`` not a module.
    """
    found = refusals(model, mode, random_masks=random_masks, rules=rules, modules=modules)
    if found:
        raise PerSampleSemanticsError(found, mode)


@contextlib.contextmanager
def applied_mode(model: nn.Module, mode: str = "eval", *,
                 modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """Every submodule's ``training`` flag set by the policy (``"eval"``: False, ``"train"``:
    True) inside the block, and each module's own flag restored after (also on error).
    ``modules``: ``model.modules()`` if the caller has them already."""
    check_choice(mode, "mode", MODES)
    training = mode == "train"
    flags = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    for m, flag in flags:
        if flag != training:  # Module.__setattr__ costs per module: only where it differs
            m.training = training
    try:
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:
                m.training = flag


#: torch functions whose result is random (the dropout family only with training=True, p > 0)
_RANDOM = frozenset({
    "bernoulli", "bernoulli_", "rand", "rand_like", "randn", "randn_like", "randint",
    "randint_like", "randperm", "normal", "normal_", "uniform_", "multinomial", "poisson",
    "exponential_", "geometric_", "cauchy_", "log_normal_", "random_", "rrelu", "rrelu_",
})
#: the dropout family: name -> the default of its ``training`` argument
_DROPOUTS = {
    "dropout": True, "dropout1d": True, "dropout2d": True, "dropout3d": True,
    "feature_dropout": True, "alpha_dropout": False, "feature_alpha_dropout": False,
}


class RandomOps(TorchFunctionMode):
    """Watches a pass for random torch functions (``with RandomOps() as watch: ...``).

    Catches what an inspection of the modules cannot: ``F.dropout(x, p, self.training)`` in a
    module's own ``forward``, ``torch.rand``, ``bernoulli``. :meth:`check` raises
    :class:`PerSampleSemanticsError` naming them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, None] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RANDOM or (name in _DROPOUTS and _dropping(args, kwargs, _DROPOUTS[name])):
            self.found[name] = None
        return func(*args, **kwargs)

    def check(self, mode: str = "eval") -> None:
        """Raise if the watched pass called a random function."""
        if self.found:
            raise PerSampleSemanticsError(
                [Refusal("", "forward", f"calls torch.{name}, which is random: the rows of "
                         "two passes would not agree") for name in self.found], mode)


def _dropping(args: Sequence[Any], kwargs: dict[str, Any], default: bool) -> bool:
    """Whether a dropout-family call (input, p, training, ...) drops anything."""
    p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
    training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else default))
    return bool(training) and float(p) > 0
