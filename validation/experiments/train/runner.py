r"""The training runner of the paper's experiments (Wu et al. 2024, Sec. 7 and App. H).

One run trains one setup (``t5-lora``, ``t5-prompt``, ``vit-lora``, ``mlp``) on one task with one
optimiser and seed, validates every ``train.eval_every`` steps, keeps the best-validation
parameters and tests them at the end::

    from validation.experiments.config.load import load_config
    from validation.experiments.train.runner import train

    config = load_config("t5-lora", ["task=rte", "optimizer=ief", "data.source=glue_data"])
    result = train(config, "runs/rte-ief")

Optimisers
----------
``adam``, ``adamw``, ``sgd`` (torch) and ``adafactor`` (transformers) minimise the Hugging Face
mean loss (T5: the token mean of the cross-entropy over label word + EOS; classifiers: the batch
mean) by ordinary backpropagation. ``ief``, ``ef``, ``sf`` and ``ngd`` are the
:mod:`backends.torch.optim.methods` optimisers on the per-sample loss of :attr:`Setup.loss`
(:class:`ngdref.SequenceSoftmaxCrossEntropy` over the T5 vocabulary,
:class:`ngdref.SoftmaxCrossEntropy` otherwise) with ``reduction="hf"``: R = 1 / (label tokens
of the batch) for T5 and 1/N for the classifiers, so that their loss and gradient, and hence
the paper's (mean-convention) learning rates and damping, are those of the baselines' loss.
Every step runs with the model in eval mode (dropout off), as the paper's code does. SF on
T5 draws only the label word from the model and keeps the observed EOS, as the authors' code
(:class:`LabelWordSampledCE`; ``optimizers.sf.sample_positions: "all"`` draws every position).
One damping number damps EF, iEF and SF alike (the paper's and the authors' convention), so
the configs pass the paper's values unconverted.

:class:`Setup` and :func:`build_setup` live in :mod:`validation.experiments.models.setup`, the
splits in :mod:`validation.experiments.data.splits` and the checkpoint files in
:mod:`validation.experiments.train.checkpoints`; this module re-exports them.

Step sizes: ``schedule`` "constant", "linear" (to 0 at the last step) or "step" (times ``gamma``
at each epoch in ``milestones``), applied to ``lr``; EF and SF decay linearly to 0 by themselves
(and normalise their update), so their sections have no schedule.

Run directory
-------------
::

    config.json             the resolved configuration
    metrics.jsonl           one JSON object per line (see below)
    results.json            best validation and test metrics, written at the end
    checkpoints/epoch-0.pt  the initial model; epoch-k.pt at the end of epoch k (parameters
                            and the full resume state)
    checkpoints/best.pt     the best-validation parameters so far
    checkpoints/last.pt     the full resumable state (every train.checkpoint_every steps, at
                            each epoch end and at the end)

Checkpoints load with ``torch.load(weights_only=True)`` (their format:
:mod:`validation.experiments.train.checkpoints`). Every file is written atomically (a temporary
file, then ``os.replace``). ``metrics.jsonl`` lines have ``kind`` "train" (``step`` = steps taken,
``epoch`` = fractional epochs, ``loss`` = the batch's mean loss before the update, ``lr``, and
for the per-sample optimisers their diagnostics: ``update_norm``, ``grad_norm_imbalance``,
``residual``, ``kept``, ``damping``), "validation" (the task's metrics, ``loss``, ``score`` =
the selection score, ``best``), "test" (the best checkpoint's test metrics) or "diverged"; every
line has ``time``, the wall seconds of the run so far (the only field that differs between
identical runs).

Data parallel (torchrun)
------------------------
``torchrun --nproc_per_node=R -m validation.experiments train ...`` joins a process group (gloo on
CPU, NCCL on GPUs, :func:`backends.torch.distributed.launch.init_from_env`); every rank builds the
same global batch, the per-sample optimisers (iEF, EF, SF, NGD) take its exact step with each rank
computing on a contiguous 1/R of it, baselines repeat the whole step on every rank, and rank 0 alone
writes logs and checkpoints. The metrics equal a single-process run's to float tolerance.

Resuming
--------
``train(..., resume=True)`` (``--resume``) restores the newest intact checkpoint: ``last.pt``,
or, when it is missing, truncated, damaged or foreign, the newest readable ``epoch-k.pt``; a
:class:`ResumeWarning` names the file skipped and the one used, and the damaged file is renamed
``last.pt.damaged`` rather than overwritten. It restores the trainable parameters, the optimiser
state, the torch / numpy / python RNG states, the data order (the epoch's permutation and the
position in it), step, epoch, best-so-far and elapsed time, and truncates ``metrics.jsonl`` to
the lines up to that step. The data order and the CIFAR augmentation draws are functions of
(seed, epoch, step) and SF's label draws of (seed, step), so a killed and resumed run takes the
same steps, reaches the same parameters bitwise and writes the same log (``time`` aside) as an
uninterrupted one.

It never starts from zero: a missing or empty run directory, or one without any checkpoint, is
an error (``resume_or_start=True`` / ``--resume-or-start`` starts a new run when the directory
is missing or empty). A configuration different from ``config.json``, a checkpoint of another
configuration or model, or a log shorter than the checkpoint's is an error too, and a failed
resume changes no file.

Evaluation framework API
------------------------
:func:`build_setup` gives the model, losses, splits and batch builders of a configuration;
:func:`list_checkpoints` and :func:`load_checkpoint` read a run's checkpoints and
:meth:`Setup.load_params` puts one into the model::

    config = load_run_config("runs/rte-adamw")
    setup = build_setup(config)
    for info in list_checkpoints("runs/rte-adamw", kind="epoch"):
        params, step, epoch = load_checkpoint("runs/rte-adamw", info.name)
        setup.load_params(params)
        batch = setup.train.make(indices)          # Batch: .inputs for TorchProvider
        ...
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.torch.distributed import launch as dist_mod
from validation.experiments.config.load import (
    load_config,
)
from validation.experiments.data.splits import IGNORE_INDEX, Batch, Split
from validation.experiments.models.setup import (
    LabelWordSampledCE,
    Setup,
    build_setup,
    resolve_device,
)
from validation.experiments.train.checkpoints import (
    Checkpoint,
    CheckpointError,
    CheckpointInfo,
    atomic_write,
    has_run,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint,
    read_metrics,
    resume_point,
)
from validation.experiments.train.optimizers import (
    build_optimizer,
    epoch_permutation,
    steps_per_epoch,
)
from validation.experiments.train.state import ResumeWarning, TrainResult, _Run, _Stop

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "LabelWordSampledCE",
    "ResumeWarning",
    "Setup",
    "Split",
    "TrainResult",
    "build_optimizer",
    "build_setup",
    "epoch_permutation",
    "list_checkpoints",
    "load_checkpoint",
    "load_run_config",
    "read_checkpoint",
    "read_metrics",
    "resolve_device",
    "steps_per_epoch",
    "train",
]


# =============================================================================================
# Run files
# =============================================================================================
def load_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The resolved configuration a run was started with (its ``config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: {str(path)!r} does not exist")
    return load_config(path)


# =============================================================================================
# Training
# =============================================================================================
def train(
    config: Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    resume_or_start: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    setup: Setup | None = None,
) -> TrainResult:
    """Train, validate, checkpoint and test one configuration.

    Parameters
    ----------
    config : mapping
        A resolved configuration (:func:`config.load_config`).
    run_dir : path
        Where the run's files go (module docstring). Without ``resume`` it must not hold a run
        already.
    resume : bool
        Continue the run in ``run_dir`` from its newest intact checkpoint: ``last.pt``, or,
        when that is damaged, the newest readable ``epoch-k.pt`` (a :class:`ResumeWarning` says
        so and the damaged file is renamed ``*.damaged``, not overwritten). The configuration
        must equal the stored ``config.json`` and the checkpoint's own. It never starts from
        zero: a missing or empty ``run_dir`` is an error.
    resume_or_start : bool
        As ``resume``, but start a new run when ``run_dir`` is missing or holds nothing (no
        ``config.json``, checkpoint or log lines).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    progress : bool, optional
        tqdm progress bar (step, loss, ETA); default: when stderr is a terminal.
    stop_after : int, optional
        Abandon the run right after this many steps, writing nothing more (simulates a kill;
        for tests). The periodic checkpoints written before remain.
    callback : callable, optional
        Called with every train record.
    setup : Setup, optional
        A prebuilt :func:`build_setup` of ``config`` (its model is trained in place).

    Returns
    -------
    TrainResult

    Raises
    ------
    FileExistsError
        ``run_dir`` holds a run and neither ``resume`` nor ``resume_or_start`` is set.
    FileNotFoundError
        ``resume`` on a missing or empty ``run_dir``, or one without checkpoints.
    ConfigError
        Resuming with a configuration that differs from the stored one (the keys are named).
    CheckpointError
        Resuming when no checkpoint is intact, or the newest intact one belongs to another
        configuration or model, or the log is shorter than the checkpoint's. No file is
        changed when resuming fails.
    """
    dist_mod.init_from_env()  # torchrun: join the process group (module docstring)
    config = dict(config)
    run = Path(run_dir)
    point = None
    if resume or resume_or_start:
        point = resume_point(run, config, start_if_missing=resume_or_start)
    elif has_run(run):
        raise FileExistsError(
            f"run_dir {str(run)!r} already holds a run; pass resume=True (--resume) to "
            "continue it or choose another directory"
        )
    dist_mod.barrier()  # every rank has checked run_dir before rank 0 writes to it
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and dist_mod.is_writer()
    torch.manual_seed(int(config["seed"]))
    np.random.seed(int(config["seed"]) % 2**32)  # noqa: NPY002
    random.seed(int(config["seed"]))
    if setup is None:
        setup = build_setup(config, device)
    state = _Run(setup, run, progress)
    if point is not None:
        state.restore(point)
    else:
        run.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=2) + "\n"
        atomic_write(run / "config.json", lambda fh: fh.write(text), mode="w")
        atomic_write(state.log_path, lambda fh: fh.write(""), mode="w")
        state.save_resume("epoch")
    try:
        if not state.finished:
            state.run(stop_after, callback)
    except _Stop:
        return TrainResult(
            run, state.step, state.epoch, False, state.diverged, state.best,
            params=setup.params(),
        )
    test = state.test()
    return TrainResult(
        run, state.step, state.epoch, True, state.diverged, state.best, test, setup.params()
    )
