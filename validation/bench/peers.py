r"""Opacus as a peer of the step bench: its per-sample step and its ghost-clipping step.

Opacus is the per-sample gradient engine that DP-SGD users already know. On a workload of the
step bench (:class:`validation.bench.workloads.Workload`) it gives two training steps,
each a callable the bench times in its alternated loop:

``"Opacus per-sample step"``
    ``GradSampleModule`` + ``DPOptimizer`` around AdamW: every per-sample gradient
    ``p.grad_sample`` (N, \*p.shape) is materialised, their norms taken, the clip factors
    min(1, C / (||g_n|| + 1e-6)) applied, the sum formed, and AdamW steps.
``"Opacus ghost clipping step"``
    ``GradSampleModuleFastGradientClipping(use_ghost_clipping=True)`` +
    ``DPOptimizerFastGradientClipping`` around AdamW + ``DPLossFastGradientClipping``: a first
    backward pass gives the per-sample gradient norms without materialising the gradients
    (ghost norms of linear layers, materialised norms elsewhere), a second one the gradient of
    sum_n c_n l_n, and AdamW steps.

Both run with ``noise_multiplier=0`` and C = :data:`MAX_GRAD_NORM` = 1e9, far above every
per-sample gradient norm here, so every c_n = 1: the peers do all of their per-sample work
but change nothing, and ``p.grad`` is the mean gradient (1/N) sum_n grad l_n. The per-sample
loss l_n is sample n's cross-entropy: a sequence's mean over its non-ignored label tokens
(as Opacus' ``DPLossFastGradientClipping`` defines it), an image's or a vector's loss; the
batch loss is mean_n l_n (``loss_reduction="mean"``).

Each peer works on its own deep copy of the workload's model, in train mode: Opacus' hooks
capture only modules that are training, and the workloads have dropout 0, so train mode
computes the same function as the eval mode of the bench's other steps, which thereby run
without Opacus' hooks. Building a peer runs its step once (its warm-up); a peer that raises
there, or whose per-sample gradients (or norms) do not have one row per sample, is reported
with why instead of a time.

The step bench (``python -m validation.bench.steps``) times both beside AdamW and ngdref's
steps, in the same alternated loop; nothing is asserted.
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from backends import default_output_fn
from validation.bench.workloads import Workload

__all__ = ["MAX_GRAD_NORM", "PEERS", "Peer", "opacus_peers", "per_sample_losses"]

#: Opacus' clipping bound C: far above every per-sample gradient norm, so clipping is inactive
MAX_GRAD_NORM = 1e9
IGNORE_INDEX = -100
PER_SAMPLE_STEP = "Opacus per-sample step"
GHOST_STEP = "Opacus ghost clipping step"
PEERS = (PER_SAMPLE_STEP, GHOST_STEP)

#: what Opacus' errors on these workloads mean (the message alone does not say)
_WHY = {
    "stack expects each tensor to be equal size": (
        "a trainable layer's input has no sample axis first: T5's relative_attention_bias "
        "embeds the (query, key) bucket matrix that all samples share, so Opacus' per-sample "
        "gradient of it has as many rows as queries, not samples"
    ),
    "Parameter tying is not supported": "T5 ties its input embedding to its output layer",
}


@dataclass
class Peer:
    """One peer step on one workload, or the reason it cannot run.

    Attributes
    ----------
    name : str
        One of :data:`PEERS`.
    run : callable or None
        One training step (forward, backward, ``optimizer.step()``), Opacus' warnings
        silenced; None if it cannot run.
    reason : str
        Why ``run`` is None ("" otherwise): Opacus' error, with what it means here.
    module : torch.nn.Module or None
        The Opacus wrapper of the peer's own model copy (its ``per_sample_gradient_norms``
        after a ghost-clipping step).
    params : dict of str to torch.nn.Parameter
        The copy's trainable parameters by name, in the order of ``Workload.trainable``
        (their ``grad_sample`` and ``grad`` after a step).
    """

    name: str
    run: Callable[[], object] | None
    reason: str = ""
    module: nn.Module | None = None
    params: dict[str, nn.Parameter] = field(default_factory=dict)


def per_sample_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Per-sample cross-entropies l_n, shape (N,).

    .. math:: l_n = \frac{1}{|T_n|} \sum_{t \in T_n} -\log \mathrm{softmax}(z_{nt})_{y_{nt}}

    for sequence logits (N, T, V) with targets (N, T), T_n the positions whose target is not
    -100 (an all-ignored sample gives 0); ``-log softmax(z_n)[y_n]`` for logits (N, C) with
    targets (N,).
    """
    if logits.dim() == 2:
        return nn.functional.cross_entropy(logits, targets, reduction="none")
    token = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none",
        ignore_index=IGNORE_INDEX,
    ).view(targets.shape)
    return token.sum(dim=1) / (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)


def _logits(module: nn.Module, batch: Any) -> torch.Tensor:
    """The logits of the workload's batch: a dict (with its labels) as keywords, or (x, y)."""
    if isinstance(batch, dict):
        return default_output_fn(module(**batch))
    return default_output_fn(module(batch[0]))


def _copy(w: Workload) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    model = copy.deepcopy(w.model).train()
    return model, {name: p for name, p in model.named_parameters() if p.requires_grad}


def _per_sample_step(w: Workload, lr: float) -> Peer:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model, params = _copy(w)
    module = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.AdamW(list(params.values()), lr=lr), noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM, expected_batch_size=w.num_samples, loss_reduction="mean",
    )

    def run() -> object:
        optimizer.zero_grad(set_to_none=True)
        loss = per_sample_losses(_logits(module, w.batch), w.targets).mean()
        loss.backward()
        optimizer.step()
        return loss

    return Peer(PER_SAMPLE_STEP, run, module=module, params=params)


def _ghost_step(w: Workload, lr: float) -> Peer:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    model, params = _copy(w)
    module = GradSampleModuleFastGradientClipping(
        model, batch_first=True, loss_reduction="mean", max_grad_norm=MAX_GRAD_NORM,
        use_ghost_clipping=True,
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.AdamW(list(params.values()), lr=lr), noise_multiplier=0.0,
        max_grad_norm=MAX_GRAD_NORM, expected_batch_size=w.num_samples, loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(
        module, optimizer, nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX), "mean"
    )

    def run() -> object:
        optimizer.zero_grad(set_to_none=True)
        logits = _logits(module, w.batch)
        # sequences: Opacus reshapes the (N*T,) token losses to (N, T) and takes row means
        shape = logits.shape[:2] if logits.dim() == 3 else None
        loss = criterion(logits.reshape(-1, logits.shape[-1]), w.targets.reshape(-1),
                         shape=shape)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return Peer(GHOST_STEP, run, module=module, params=params)


def _rows_missing(peer: Peer, num_samples: int) -> str:
    """Why ``peer``'s per-sample quantities after a step do not have one row per sample, or "".

    A layer called on an input without the sample axis first (peft's prompt encoder embeds
    one row of prompt tokens and expands its output to the batch) gives Opacus a "batch" of
    another size; with a single such parameter nothing raises, and what Opacus takes for
    per-sample gradients are batch sums: not the work the step is timed for.
    """
    if peer.name == GHOST_STEP:
        rows = {"per-sample gradient norms": peer.module.per_sample_gradient_norms}
    else:
        rows = {f"grad_sample of {name}": p.grad_sample for name, p in peer.params.items()}
    for what, value in rows.items():
        if not isinstance(value, torch.Tensor) or value.shape[0] != num_samples:
            got = value.shape[0] if isinstance(value, torch.Tensor) else type(value).__name__
            return (f"Opacus' {what} has {got} rows for N = {num_samples} samples: a layer saw "
                    "its input without the sample axis first (peft's prompt encoder embeds one "
                    "row of prompt tokens and expands its output), so Opacus' per-sample "
                    "quantities are batch sums, silently")
    return ""


def _quiet(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


def _reason(err: Exception) -> str:
    message = (str(err).strip().splitlines() or [""])[0]
    why = next((text for key, text in _WHY.items() if key in message), "")
    return f"{type(err).__name__}: {message}" + (f" ({why})" if why else "")


def opacus_peers(w: Workload, *, lr: float) -> dict[str, Peer]:
    """The Opacus steps on ``w``, each run once; those that cannot do the work carry why.

    A peer cannot run where Opacus raises (its error) or where its per-sample gradients
    (or norms) after the step do not have one row per sample (Opacus then silently treats
    something else as the samples).

    Parameters
    ----------
    w : Workload
        A step-bench workload; its model is copied, never changed.
    lr : float
        AdamW's learning rate inside both peers (the step bench's 1e-12: every step costs
        what it costs at any lr, and the parameters stay put).

    Returns
    -------
    dict
        :data:`PEERS` name -> :class:`Peer`; ``run`` is None where Opacus cannot run, with
        the reason.
    """
    out: dict[str, Peer] = {}
    for name, make in ((PER_SAMPLE_STEP, _per_sample_step), (GHOST_STEP, _ghost_step)):
        try:
            with warnings.catch_warnings():  # Opacus' advice on secure RNG and hooks
                warnings.simplefilter("ignore")
                peer = make(w, lr)
                peer.run()  # type: ignore[misc]
            missing = _rows_missing(peer, w.num_samples)
            peer = Peer(name, None, missing) if missing else peer
            if peer.run is not None:  # Opacus warns on every step about secure RNG and hooks
                peer.run = _quiet(peer.run)
        except Exception as err:  # a peer that cannot run is reported, not fatal
            peer = Peer(name, None, _reason(err))
        out[name] = peer
        gc.collect()
    return out
