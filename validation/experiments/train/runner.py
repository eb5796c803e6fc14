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
:mod:`backends.torch.optim.methods` optimisers on the per-sample loss of ``Setup.loss``
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
    .lock                   while a process writes the run: its lock and its pid, host, start

One process writes a run directory at a time: ``train`` holds its lock
(:mod:`validation.experiments.runlock`) from the checks before the first write to the end, and
a second ``train`` (or ``--resume``) into the same directory is refused at once with the holder
named; the lock goes with its holder, however it ends. Checkpoints load with
``torch.load(weights_only=True)`` (their format: :mod:`validation.experiments.train.checkpoints`).
Every file is written atomically (a temporary file, then ``os.replace``); a full disk, a
read-only file system or a quota is one :class:`~validation.experiments.io.StorageError` line
naming the file and ``--out``, and leaves the files written before as they were (so the run
resumes once there is room). ``metrics.jsonl`` lines have ``kind`` "train" (``step`` = steps taken,
``epoch`` = fractional epochs, ``loss`` = the batch's mean loss before the update, ``lr``, and
for the per-sample optimisers their diagnostics: ``update_norm``, ``grad_norm_imbalance``,
``residual``, ``kept``, ``damping``), "validation" (the task's metrics, ``loss``, ``score`` =
the selection score, ``best``), "test" (the best checkpoint's test metrics) or "diverged"
(``step``: the steps taken, ``message``: why); every line has ``time``, the wall seconds of the
run so far (the only field that differs between identical runs).

Divergence: a step whose loss is NaN or infinite, whose update is, or whose loss exceeds
``train.divergence_factor`` (default 1000; null: off) times the first step's loss ends the
training (``train.on_divergence="stop"``: logged, ``results.json`` has ``"diverged": true`` and
``"diverged_step"``, the best earlier checkpoint is tested; "raise": an exception).

Progress: a tqdm bar when stderr is a terminal; otherwise (a log file) one line per
validation, checkpoint and epoch end, and a last one when the run finishes or diverges.

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

A resumed run says "resumed from CHECKPOINT at step N" on stderr. It never starts from zero:
a missing or empty run directory, or one without any checkpoint, is an error
(``resume_or_start=True`` / ``--resume-or-start`` starts a new run when the directory is
missing or empty). A configuration different from ``config.json``, a checkpoint of another
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

import contextlib
import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backends.torch.distributed import launch as dist_mod
from validation.experiments import io
from validation.experiments.config.load import (
    PER_SAMPLE_OPTIMIZERS,
    ConfigError,
    load_config,
)
from validation.experiments.data.splits import IGNORE_INDEX, Batch, Split
from validation.experiments.models.setup import (
    LabelWordSampledCE,
    Setup,
    build_setup,
    resolve_device,
)
from validation.experiments.progress import mode as progress_mode
from validation.experiments.progress import notice
from validation.experiments.runlock import RunLock
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

    Everything that can be checked is checked before anything is written: the configuration
    (:func:`~validation.experiments.config.load.load_config`), the device, the batch size
    against the torchrun ranks, the model and data (:func:`build_setup`, which refuses e.g. a
    tokenizer larger than the model's vocabulary), and whether ``run_dir`` may be started or
    resumed. The run then holds ``run_dir``'s lock (:mod:`validation.experiments.runlock`) until
    it returns or raises: a second writer is refused with the holder named.

    Parameters
    ----------
    config : mapping
        A resolved configuration (:func:`~validation.experiments.config.load.load_config`).
    run_dir : path
        Where the run's files go (module docstring). Without ``resume`` it must not hold a run
        already; a directory left by a start that never wrote its first checkpoint (a
        ``config.json`` alone) holds none and is started afresh, with a notice.
    resume : bool
        Continue the run in ``run_dir`` from its newest intact checkpoint: ``last.pt``, or,
        when that is damaged, the newest readable ``epoch-k.pt`` (a :class:`ResumeWarning` says
        so and the damaged file is renamed ``*.damaged``, not overwritten). The configuration
        must equal the stored ``config.json`` and the checkpoint's own. It never starts from
        zero: a missing or empty ``run_dir`` is an error. "resumed from CHECKPOINT at step N"
        is printed on stderr.
    resume_or_start : bool
        As ``resume``, but start a new run when ``run_dir`` is missing or holds nothing (no
        checkpoint or log lines).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    progress : bool, optional
        True: a tqdm bar (step, loss, ETA); False: nothing; None (default): the bar when
        stderr is a terminal, else a line per validation, checkpoint and epoch (log files).
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
    ConfigError
        A value that is not allowed (seed, lr, device, batch size against the ranks, ...),
        or resuming with a configuration that differs from the stored one (keys named).
    FileExistsError
        ``run_dir`` holds a run and neither ``resume`` nor ``resume_or_start`` is set.
    FileNotFoundError
        ``resume`` on a missing or empty ``run_dir``, or one without checkpoints.
    CheckpointError
        Resuming when no checkpoint is intact, or the newest intact one belongs to another
        configuration or model, or the log is shorter than the checkpoint's. No file is
        changed when resuming fails.
    RunLockedError
        Another process writes ``run_dir`` (it is named).
    StorageError
        A run file could not be written (no space, read-only, quota): the message names the
        file and ``--out``; the files written before are unchanged.
    """
    dist_mod.init_from_env()  # torchrun: join the process group (module docstring)
    config = dict(config)
    run = Path(run_dir)
    dev = resolve_device(device)
    _check_ranks(config)
    if resume and not has_run(run):
        resume_point(run, config, start_if_missing=False)  # raises: nothing to resume
    if not (resume or resume_or_start) and has_run(run):
        raise FileExistsError(_HOLDS_A_RUN.format(run=str(run)))
    mode = progress_mode(progress) if dist_mod.is_writer() else "off"
    torch.manual_seed(int(config["seed"]))
    np.random.seed(int(config["seed"]) % 2**32)  # noqa: NPY002
    random.seed(int(config["seed"]))
    if setup is None:
        setup = build_setup(config, dev)
    _check_batches(config, len(setup.train))
    with io.storage_hint("choose another run directory with --out (run_dir)"), _locked(run):
        return _train_locked(
            config, setup, run, resume or resume_or_start, resume_or_start, mode, stop_after,
            callback,
        )


_HOLDS_A_RUN = (
    "run_dir {run!r} already holds a run; pass resume=True (--resume) to continue it or "
    "choose another directory"
)


def _train_locked(
    config: dict[str, Any], setup: Setup, run: Path, continuing: bool, start_if_missing: bool,
    mode: str, stop_after: int | None, callback: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    """:func:`train` once it holds ``run``'s lock: check again, then start or resume, run,
    test."""
    point = None
    if continuing:
        point = resume_point(run, config, start_if_missing=start_if_missing)
    elif has_run(run):  # another writer finished a run here while this one was being built
        raise FileExistsError(_HOLDS_A_RUN.format(run=str(run)))
    dist_mod.barrier()  # every rank has checked run_dir before rank 0 writes to it
    state = _Run(setup, run, mode)
    if point is not None:
        state.restore(point)
    else:
        _start(run, state, config)
    state.say(f"{'continuing' if point is not None else 'started'} in {str(run)!r}")
    try:
        if not state.finished:
            state.run(stop_after, callback)
    except _Stop:
        return TrainResult(
            run, state.step, state.epoch, False, state.diverged, state.best,
            params=setup.params(), diverged_step=state.diverged_step,
        )
    test = state.test()
    return TrainResult(
        run, state.step, state.epoch, True, state.diverged, state.best, test, setup.params(),
        diverged_step=state.diverged_step,
    )


def _start(run: Path, state: _Run, config: Mapping[str, Any]) -> None:
    """A fresh start's files: config.json, an empty log, epoch-0.pt. If the first checkpoint
    cannot be written, the files this start wrote are removed: nothing blocks a retry."""
    if (run / "config.json").exists():
        notice(f"run_dir {str(run)!r} holds a start that never wrote its first checkpoint "
               "(config.json only): starting afresh there")
    text = json.dumps(config, indent=2) + "\n"
    written: list[Path] = []
    try:
        for path, content in ((run / "config.json", text), (state.log_path, "")):
            atomic_write(path, lambda fh, content=content: fh.write(content), mode="w")
            written.append(path)
        state.save_resume("epoch")
    except BaseException:
        if dist_mod.is_writer():
            for path in written:
                path.unlink(missing_ok=True)
            _remove_if_empty(state.ckpt_dir)
        raise


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or gone: leave it
        folder.rmdir()


@contextlib.contextmanager
def _locked(run: Path) -> Iterator[None]:
    """Hold ``run``'s lock (rank 0 under torchrun; every rank raises if it cannot); a run
    directory created here is removed again if it is still empty at the end."""
    created = not run.exists()
    lock, error = None, None
    if dist_mod.is_writer():
        try:
            io.make_dir(run)
            lock = RunLock(run, "train").acquire()
        except OSError as exc:
            error = exc
    failures = [e for e in dist_mod.gather_objects(error) if e is not None]
    if failures:
        if created and dist_mod.is_writer():
            _remove_if_empty(run)
        raise error if error is not None else failures[0]
    if lock is not None and lock.stale is not None:
        notice(str(lock.describe_stale()))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
        if created and dist_mod.is_writer():
            _remove_if_empty(run)


def _check_ranks(config: Mapping[str, Any]) -> None:
    """torchrun: every rank gets a share of each batch of the per-sample optimisers."""
    world, _ = dist_mod.world_and_rank()
    batch = config["train"]["batch_size"]
    if world > 1 and config["optimizer"] in PER_SAMPLE_OPTIMIZERS and batch < world:
        raise ConfigError(
            f"config key 'train.batch_size' is {batch} but {world} ranks share each batch: "
            f"use a batch size of at least {world}, or fewer processes"
        )


def _check_batches(config: Mapping[str, Any], num_train: int) -> None:
    """The last (partial) batch of an epoch must also reach every rank."""
    world, _ = dist_mod.world_and_rank()
    batch = config["train"]["batch_size"]
    last = num_train % batch
    if world > 1 and config["optimizer"] in PER_SAMPLE_OPTIMIZERS and 0 < last < world:
        raise ConfigError(
            f"the training split has {num_train} rows: with train.batch_size={batch} each "
            f"epoch ends with a batch of {last}, fewer than the {world} ranks that share it; "
            "change train.batch_size or data.max_train_samples"
        )
