r"""The training runner of the paper's experiments (Wu et al. 2024, Sec. 7 and App. H).

One run trains one setup (``t5-lora``, ``t5-prompt``, ``vit-lora``, ``mlp``) on one task with one
optimiser and seed, validates every ``train.eval_every`` steps, keeps the best-validation
parameters and tests them at the end::

    from validation.experiments.config import load_config
    from validation.experiments.train import train

    config = load_config("t5-lora", ["task=rte", "optimizer=ief", "data.source=glue_data"])
    result = train(config, "runs/rte-ief")

Optimisers
----------
``adam``, ``adamw``, ``sgd`` (torch) and ``adafactor`` (transformers) minimise the Hugging Face
mean loss (T5: the token mean of the cross-entropy over label word + EOS; classifiers: the batch
mean) by ordinary backpropagation. ``ief``, ``ef``, ``sf`` and ``ngd`` are the
:mod:`backends.optim` optimisers on the per-sample loss of :attr:`Setup.loss`
(:class:`ngdref.SequenceSoftmaxCrossEntropy` over the T5 vocabulary,
:class:`ngdref.SoftmaxCrossEntropy` otherwise) with ``reduction="hf"``: R = 1 / (label tokens
of the batch) for T5 and 1/N for the classifiers, so that their loss and gradient, and hence
the paper's (mean-convention) learning rates and damping, are those of the baselines' loss.
Every step runs with the model in eval mode (dropout off), as the paper's code does. SF on
T5 draws only the label word from the model and keeps the observed EOS, as the authors' code
(:class:`LabelWordSampledCE`; ``optimizers.sf.sample_positions: "all"`` draws every position).
One damping number damps EF, iEF and SF alike (the paper's and the authors' convention), so
the configs pass the paper's values unconverted.

:class:`Setup` and :func:`build_setup` live in :mod:`validation.experiments.setup`, the splits
in :mod:`validation.experiments.splits` and the checkpoint files in
:mod:`validation.experiments.checkpoints`; this module re-exports them.

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
:mod:`validation.experiments.checkpoints`). Every file is written atomically (a temporary file,
then ``os.replace``). ``metrics.jsonl`` lines have ``kind`` "train" (``step`` = steps taken,
``epoch`` = fractional epochs, ``loss`` = the batch's mean loss before the update, ``lr``, and
for the per-sample optimisers their diagnostics: ``update_norm``, ``grad_norm_imbalance``,
``residual``, ``kept``, ``damping``), "validation" (the task's metrics, ``loss``, ``score`` =
the selection score, ``best``), "test" (the best checkpoint's test metrics) or "diverged"; every
line has ``time``, the wall seconds of the run so far (the only field that differs between
identical runs).

Data parallel (torchrun)
------------------------
``torchrun --nproc_per_node=R -m validation.experiments train ...`` joins a process group
(gloo on CPU, NCCL on GPUs, :func:`backends.dist_launch.init_from_env`); every rank builds the
same global batch, the per-sample optimisers (iEF, EF, SF, NGD) take its exact step with each
rank computing on a contiguous 1/R of it, baselines repeat the whole step on every rank, and
rank 0 alone writes logs and checkpoints. The metrics equal a single-process run's to float
tolerance.

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
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ngdref
from backends import dist_launch as dist_mod
from validation.experiments.checkpoints import (
    CHECKPOINT_FORMAT,
    Checkpoint,
    CheckpointError,
    CheckpointInfo,
    ResumePoint,
    atomic_write,
    has_run,
    list_checkpoints,
    load_checkpoint,
    log_prefix,
    move_aside,
    read_checkpoint,
    read_metrics,
    restore_rng_state,
    resume_point,
    rng_state,
    save_checkpoint,
)
from validation.experiments.config import (
    KFAC_OPTIMIZERS,
    PER_SAMPLE_OPTIMIZERS,
    ConfigError,
    config_diff,
    load_config,
)
from validation.experiments.setup import (
    LabelWordSampledCE,
    Setup,
    _eval_mode,
    build_setup,
    resolve_device,
)
from validation.experiments.splits import IGNORE_INDEX, Batch, Split

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
# Optimisers and schedules
# =============================================================================================
def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """ceil(num_train / batch_size): the last batch of an epoch may be smaller."""
    return math.ceil(num_train / batch_size)


def _total_steps(config: Mapping[str, Any], num_train: int) -> int:
    train_cfg = config["train"]
    total = train_cfg["epochs"] * steps_per_epoch(num_train, train_cfg["batch_size"])
    if train_cfg["max_steps"] is not None:
        total = min(total, train_cfg["max_steps"])
    return total


def build_optimizer(setup: Setup, total_steps: int) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable parameters of ``setup.model``.

    Parameters
    ----------
    setup : Setup
    total_steps : int
        T, the horizon of EF's and SF's linear decay and of the "linear" schedule.

    Notes
    -----
    With ``reduction: "hf"`` a T5 per-sample optimiser is built with R = 1 and the runner sets
    ``param_groups[0]["reduction"] = setup.reduction(batch)`` (1 / label tokens) before each
    step; do the same when stepping it yourself.
    """
    import backends.optim as ngd_optim

    cfg = setup.config
    name = cfg["optimizer"]
    o = cfg["optimizers"][name]
    params = [p for _, p in setup.trainable]
    if name == "adam":
        return torch.optim.Adam(
            params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=o["lr"],
            weight_decay=o["weight_decay"],
            scale_parameter=o["scale_parameter"],
            relative_step=o["relative_step"],
            warmup_init=o["warmup_init"],
        )
    common = {
        "reduction": 1.0 if o["reduction"] == "hf" and setup.label_words else (
            "mean" if o["reduction"] == "hf" else o["reduction"]
        ),
        "output_fn": setup.output_fn,
        "per_sample_method": cfg["train"]["per_sample_method"],
        "chunk_size": cfg["train"]["chunk_size"],
    }
    if name == "ief":
        return ngd_optim.IEF(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"],
            damping_mode=o["damping_mode"], damping_space=o["damping_space"],
            dedup_threshold=o["dedup_threshold"], **common,
        )
    if name == "ef":
        return ngd_optim.EF(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"], total_steps=total_steps,
            damping_mode=o["damping_mode"], dedup_threshold=o["dedup_threshold"], **common,
        )
    if name == "sf":
        sf_loss = setup.loss
        if setup.label_words is not None and o["sample_positions"] == "label_word":
            sf_loss = LabelWordSampledCE(setup.loss.vocab_size, ignore_index=IGNORE_INDEX)
        return ngd_optim.SF(
            setup.model, sf_loss, lr=o["lr"], damping=o["damping"], total_steps=total_steps,
            num_samples=o["num_samples"], seed=int(cfg["seed"]), **common,
        )
    if name in KFAC_OPTIMIZERS:
        from backends import kfac_optim

        cls = {"kfac": kfac_optim.KFAC, "ekfac": kfac_optim.EKFAC, "iekfac": kfac_optim.IEKFAC}
        extra = {"seed": int(cfg["seed"])} if name == "kfac" else {}
        return cls[name](
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"],
            update_interval=o["update_interval"], running_average=o["running_average"],
            damped_inverse=o["damped_inverse"], reduction=common["reduction"],
            output_fn=setup.output_fn, **extra,
        )
    if name == "ngd":
        return ngd_optim.NGD(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"], cg_tol=o["cg_tol"],
            cg_maxiter=o["cg_maxiter"], **common,
        )
    raise ConfigError(f"config key 'optimizer': unknown optimizer {name!r}")


def _lr_factor(opt_cfg: Mapping[str, Any], step: int, epoch: int, total: int) -> float:
    """The schedule's multiplier of ``lr`` for the step taken at (step, epoch)."""
    schedule = opt_cfg.get("schedule", "constant")
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return (total - step) / total
    return float(opt_cfg["gamma"]) ** sum(1 for m in opt_cfg["milestones"] if epoch >= m)


def epoch_permutation(seed: int, epoch: int, num_train: int) -> np.ndarray:
    """The training order of ``epoch``: ``numpy.random.default_rng([seed, epoch]).permutation``."""
    return np.random.default_rng([seed, epoch]).permutation(num_train)


def _augment_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    key = int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(key)


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
@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    run_dir : Path
    step, epoch : int
        Steps taken and epochs completed.
    finished : bool
        False when stopped early by ``stop_after`` (a simulated kill).
    diverged : bool
        True when training stopped at a non-finite loss or update (``on_divergence="stop"``).
    best : dict
        ``score``, ``step``, ``epoch``, ``metrics`` of the best validation.
    test : dict
        Test metrics of the best checkpoint (empty if not tested).
    params : dict
        The final trainable parameters (CPU).
    """

    run_dir: Path
    step: int
    epoch: int
    finished: bool
    diverged: bool
    best: dict[str, Any]
    test: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class ResumeWarning(UserWarning):
    """A resumed run skipped a damaged checkpoint (the message names it and the one used)."""


class _Stop(Exception):
    """Raised by ``stop_after`` to abandon the run without writing anything (a kill)."""


def _shard(batch: Batch) -> Batch:
    """This rank's contiguous share of ``batch`` under torch.distributed (else ``batch``).

    The global batch is built (tokenised, padded, augmented) on every rank alike and then
    cut, so the shards share its padding and the per-sample optimisers take its step.
    """
    part = dist_mod.shard_slice(batch.size)
    if part is None:
        return batch
    return Batch({k: v[part] for k, v in batch.inputs.items()}, batch.class_labels[part])


class _Run:
    """The mutable state of one training run (see :func:`train`)."""

    def __init__(self, setup: Setup, run_dir: Path, progress: bool) -> None:
        self.setup = setup
        self.config = setup.config
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.log_path = run_dir / "metrics.jsonl"
        self.seed = int(self.config["seed"])
        self.n_train = len(setup.train)
        self.total = _total_steps(self.config, self.n_train)
        self.name = self.config["optimizer"]
        self.opt_cfg = self.config["optimizers"][self.name]
        self.optimizer = build_optimizer(setup, self.total)
        self.per_sample = self.name in PER_SAMPLE_OPTIMIZERS
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.permutation: np.ndarray | None = None
        self.best: dict[str, Any] = {"score": -math.inf, "step": None, "epoch": None, "metrics": {}}
        self.best_params: dict[str, torch.Tensor] | None = None
        self.last_eval_step = -1
        self.log_lines = 0
        self.finished = False
        self.diverged = False
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.progress = progress

    # ---- bookkeeping ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def log(self, record: dict[str, Any]) -> None:
        record = {**record, "time": round(self.elapsed(), 3)}
        self.log_lines += 1
        if not dist_mod.is_writer():  # under torchrun rank 0 alone writes files
            return
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "params": self.setup.params(),
            "step": self.step,
            "epoch": self.epoch,
            "config": self.config,
        }

    def _resume_state(self) -> dict[str, Any]:
        """Everything beyond the parameters that continues the run (weights-only types)."""
        permutation = None if self.permutation is None else torch.from_numpy(self.permutation)
        return {
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "position": self.position,
            "permutation": permutation,
            "best": self.best,
            "best_params": self.best_params,
            "last_eval_step": self.last_eval_step,
            "log_lines": self.log_lines,
            "finished": self.finished,
            "diverged": self.diverged,
            "elapsed": self.elapsed(),
            "total_steps": self.total,
        }

    def save_resume(self, kind: str = "resume") -> None:
        """``last.pt`` (kind "resume") or, at an epoch end, ``epoch-k.pt`` (kind "epoch")."""
        state = {**self._base(kind), "resume": self._resume_state()}
        name = "last.pt" if kind == "resume" else f"epoch-{self.epoch}.pt"
        save_checkpoint(self.ckpt_dir / name, state)

    def restore(self, point: ResumePoint) -> None:
        """Continue from ``point``; every check runs before any file is changed."""
        path, state = point.path, point.state
        changed = config_diff(state["config"], self.config)
        if changed:
            raise CheckpointError(
                f"resume: checkpoint {str(path)!r} was written with a configuration that "
                f"differs in {changed}; it belongs to another run"
            )
        resume = state["resume"]
        if resume["total_steps"] != self.total:
            raise CheckpointError(
                f"resume: checkpoint {str(path)!r} was written for {resume['total_steps']} total "
                f"steps, this configuration (and its data) has {self.total}"
            )
        try:
            self.setup.load_params(state["params"])
            self.optimizer.load_state_dict(resume["optimizer"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(
                f"resume: checkpoint {str(path)!r} does not fit the model or optimiser of this "
                f"configuration: {exc}"
            ) from exc
        records = log_prefix(self.log_path, int(resume["log_lines"]), path)
        for damaged, reason in point.skipped:
            moved = f"; moved it to {move_aside(damaged).name!r}" if damaged.exists() else ""
            warnings.warn(
                f"{reason}{moved}; resumed from {path.name!r} (step {int(state['step'])})",
                ResumeWarning,
                stacklevel=3,
            )
        restore_rng_state(resume["rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.position = int(resume["position"])
        perm = resume["permutation"]
        self.permutation = None if perm is None else perm.numpy()
        self.best, self.best_params = resume["best"], resume["best_params"]
        self.last_eval_step = int(resume["last_eval_step"])
        self.finished, self.diverged = bool(resume["finished"]), bool(resume["diverged"])
        self.elapsed_before = float(resume["elapsed"])
        self.started = time.perf_counter()
        # keep the log lines written before the checkpoint: the later ones are written again
        self.log_lines = int(resume["log_lines"])
        atomic_write(self.log_path, lambda fh: fh.write(records), mode="w")

    # ---- one step ---------------------------------------------------------------------------
    def take_step(self, batch: Batch) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        if self.name not in ("ef", "sf"):
            group["lr"] = self.opt_cfg["lr"] * _lr_factor(
                self.opt_cfg, self.step, self.epoch, self.total
            )
        if self.per_sample:
            group["reduction"] = self.setup.reduction(batch, self.opt_cfg["reduction"])
            shard = _shard(batch)  # torchrun: this rank's samples of the global batch
            loss = self.optimizer.step(lambda: shard.inputs)
            diag = dict(self.optimizer.diagnostics)
            diag.pop("step", None)
            diag.pop("loss", None)
            return {"loss": loss, **diag}
        self.optimizer.zero_grad(set_to_none=True)
        with _eval_mode(self.setup.model):
            loss_t = self.setup.hf_loss(batch)
            loss = float(loss_t.detach())
            if not math.isfinite(loss):
                raise ngdref.NonFiniteError(f"loss is {loss} at step {self.step}")
            loss_t.backward()
        self.optimizer.step()
        return {"loss": loss, "lr": float(group["lr"])}

    def validate(self) -> None:
        limit = None  # max_eval_samples already trimmed the split
        metrics = self.setup.evaluate(self.setup.validation, limit)
        score = self.setup.score(metrics)
        # a model with non-finite outputs (a diverged baseline) never becomes the best
        improved = math.isfinite(metrics["loss"]) and score > self.best["score"]
        if improved:
            self.best = {
                "score": score,
                "step": self.step,
                "epoch": self.epoch + self.position / self.n_train,
                "metrics": metrics,
            }
            self.best_params = self.setup.params()
            best = self._base("best")
            best["metrics"] = metrics
            save_checkpoint(self.ckpt_dir / "best.pt", best)
        self.last_eval_step = self.step
        self.log(
            {
                "kind": "validation",
                "step": self.step,
                "epoch": self.epoch + self.position / self.n_train,
                **metrics,
                "score": score,
                "best": improved,
            }
        )

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, stop_after: int | None, callback: Callable[[dict], None] | None) -> None:
        tcfg = self.config["train"]
        batch_size = tcfg["batch_size"]
        eval_every = tcfg["eval_every"]
        bar = _progress_bar(self.total, self.step, self.progress, self.config)
        try:
            while self.step < self.total and not self.diverged:
                if self.permutation is None:
                    self.permutation = epoch_permutation(self.seed, self.epoch, self.n_train)
                while self.position < self.n_train and self.step < self.total:
                    rows = self.permutation[self.position : self.position + batch_size]
                    generator = _augment_generator(self.seed, self.epoch, self.step)
                    batch = self.setup.train.make(rows, generator)
                    try:
                        record = self.take_step(batch)
                    except (ngdref.NonFiniteError, ngdref.SingularMatrixError) as exc:
                        if tcfg["on_divergence"] == "raise":
                            raise
                        self._diverge(str(exc))
                        break
                    self.step += 1
                    self.position += len(rows)
                    record = {
                        "kind": "train",
                        "step": self.step,
                        "epoch": self.epoch + self.position / self.n_train,
                        **record,
                    }
                    if self.step % tcfg["log_every"] == 0 or self.step == self.total:
                        self.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                    if callback is not None:
                        callback(record)
                    if eval_every != "epoch" and self.step % eval_every == 0:
                        self.validate()
                    if self.step % tcfg["checkpoint_every"] == 0:
                        self.save_resume()
                    if stop_after is not None and self.step >= stop_after:
                        raise _Stop
                if self.diverged:
                    break
                if self.position >= self.n_train:
                    self.epoch += 1
                    self.position = 0
                    self.permutation = None
                    if eval_every == "epoch":
                        self.validate()
                    self.save_resume("epoch")
                    self.save_resume()
        finally:
            bar.close()
        if self.last_eval_step != self.step:
            self.validate()
        self.finished = True
        self.save_resume()

    def _diverge(self, message: str) -> None:
        if self.config["train"]["on_divergence"] == "raise":
            raise FloatingPointError(message)
        self.diverged = True
        self.log({"kind": "diverged", "step": self.step, "message": message})

    def test(self) -> dict[str, Any]:
        """Test the best-validation parameters (if any), restore the final ones, write results.

        Nothing is tested when the test labels are private or no validation had finite outputs.
        """
        results: dict[str, Any] = {}
        if self.setup.test and self.best_params is not None:
            final = self.setup.params()
            self.setup.load_params(self.best_params)
            for name, split in self.setup.test.items():
                metrics = self.setup.evaluate(split)
                several = len(self.setup.test) > 1
                results.update({f"{name}_{k}" if several else k: v for k, v in metrics.items()})
            self.setup.load_params(final)
            self.log({"kind": "test", "step": self.best["step"], **results})
        summary = {
            "setup": self.config["setup"],
            "task": self.config["task"],
            "optimizer": self.name,
            "seed": self.seed,
            "steps": self.step,
            "epochs": self.epoch,
            "diverged": self.diverged,
            "num_trainable": self.setup.num_trainable,
            "best_validation": {**self.best, "score": (
                self.best["score"] if math.isfinite(self.best["score"]) else None
            )},
            "test": results,
        }
        text = json.dumps(summary, indent=2, allow_nan=True) + "\n"
        atomic_write(self.run_dir / "results.json", lambda fh: fh.write(text), mode="w")
        return results


def _progress_bar(total: int, initial: int, enabled: bool, config: Mapping[str, Any]) -> Any:
    from tqdm.auto import tqdm

    desc = f"{config['setup']}/{config['task']}/{config['optimizer']}"
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
        dynamic_ncols=True,
    )


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
