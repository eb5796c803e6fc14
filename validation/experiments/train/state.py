"""The mutable state of one training run: steps, validation, checkpoints, the log, the test.

Driven by :func:`validation.experiments.train.runner.train`, whose docstring describes the run
files.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ngdref
from backends.torch.distributed import launch as dist_mod
from validation.experiments import io
from validation.experiments.config.load import (
    PER_SAMPLE_OPTIMIZERS,
    config_diff,
    with_new_defaults,
)
from validation.experiments.data.splits import Batch
from validation.experiments.models.setup import (
    Setup,
    _eval_mode,
)
from validation.experiments.progress import notice
from validation.experiments.train.checkpoints import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    ResumePoint,
    atomic_write,
    log_prefix,
    move_aside,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from validation.experiments.train.optimizers import (
    _augment_generator,
    _lr_factor,
    _total_steps,
    build_optimizer,
    epoch_permutation,
)


@dataclass
class TrainResult:
    """What :func:`~validation.experiments.train.runner.train` returns.

    Attributes
    ----------
    run_dir : Path
    step, epoch : int
        Steps taken and epochs completed.
    finished : bool
        False when stopped early by ``stop_after`` (a simulated kill).
    diverged : bool
        True when training stopped at a non-finite loss or update, or at a loss above
        ``train.divergence_factor`` times the first step's (``on_divergence="stop"``).
    best : dict
        ``score``, ``step``, ``epoch``, ``metrics`` of the best validation.
    test : dict
        Test metrics of the best checkpoint (empty if not tested).
    params : dict
        The final trainable parameters (CPU).
    diverged_step : int or None
        The steps taken when divergence stopped the run.
    """

    run_dir: Path
    step: int
    epoch: int
    finished: bool
    diverged: bool
    best: dict[str, Any]
    test: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    diverged_step: int | None = None


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
    """The mutable state of one training run (see
    :func:`~validation.experiments.train.runner.train`)."""

    def __init__(self, setup: Setup, run_dir: Path, mode: str) -> None:
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
        self.diverged_step: int | None = None
        self.first_loss: float | None = None  # the yardstick of train.divergence_factor
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.mode = mode  # "bar", "lines" or "off" (validation.experiments.progress)
        self.last_loss = math.nan

    # ---- bookkeeping ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def log(self, record: dict[str, Any]) -> None:
        record = {**record, "time": round(self.elapsed(), 3)}
        self.log_lines += 1
        if not dist_mod.is_writer():  # under torchrun rank 0 alone writes files
            return
        io.append_text(self.log_path, json.dumps(record, allow_nan=True) + "\n")

    def say(self, what: str) -> None:
        """One progress line (mode "lines": stderr is not a terminal)."""
        if self.mode == "lines":
            cfg = self.config
            loss = f"loss {self.last_loss:.4g}, " if math.isfinite(self.last_loss) else ""
            notice(f"{cfg['setup']}/{cfg['task']}/{self.name}: step {self.step}/{self.total}, "
                   f"epoch {self.epoch + self.position / self.n_train:.2f}, {loss}{what} "
                   f"[{self.elapsed():.0f} s]")

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
            "diverged_step": self.diverged_step,
            "first_loss": self.first_loss,
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
        changed = config_diff(with_new_defaults(state["config"]), self.config)
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
        self.diverged_step = resume.get("diverged_step")
        self.first_loss = resume.get("first_loss", _first_loss(records))  # older checkpoints
        self.elapsed_before = float(resume["elapsed"])
        self.started = time.perf_counter()
        # keep the log lines written before the checkpoint: the later ones are written again
        self.log_lines = int(resume["log_lines"])
        atomic_write(self.log_path, lambda fh: fh.write(records), mode="w")
        notice(f"resumed from {str(path)!r} at step {self.step} (epoch {self.epoch})")

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
        # a diverged model (non-finite outputs, or a loss grown past divergence_factor)
        # never becomes the best
        improved = (not self.diverged and math.isfinite(metrics["loss"])
                    and score > self.best["score"])
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
        self.say(f"validation score {score:.4g}{' (best so far: best.pt)' if improved else ''}")
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
        eval_every = tcfg["eval_every"]
        bar = _progress_bar(self.total, self.step, self.mode == "bar", self.config)
        try:
            while self.step < self.total and not self.diverged:
                if self.permutation is None:
                    self.permutation = epoch_permutation(self.seed, self.epoch, self.n_train)
                while self.position < self.n_train and self.step < self.total:
                    record = self._step()
                    if record is None:  # diverged
                        break
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                    if callback is not None:
                        callback(record)
                    if eval_every != "epoch" and self.step % eval_every == 0:
                        self.validate()
                    if self.step % tcfg["checkpoint_every"] == 0:
                        self.save_resume()
                        self.say("checkpoint last.pt")
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
                    self.say(f"end of epoch {self.epoch}: checkpoints epoch-{self.epoch}.pt, "
                             "last.pt")
        finally:
            bar.close()
        if self.last_eval_step != self.step:
            self.validate()
        self.finished = True
        self.save_resume()
        self.say("diverged: stopped" if self.diverged else "finished")

    def _step(self) -> dict[str, Any] | None:
        """Take, count and log the next step; None when it diverged (logged as such)."""
        tcfg = self.config["train"]
        assert self.permutation is not None
        rows = self.permutation[self.position : self.position + tcfg["batch_size"]]
        generator = _augment_generator(self.seed, self.epoch, self.step)
        batch = self.setup.train.make(rows, generator)
        try:
            record = self.take_step(batch)
        except (ngdref.NonFiniteError, ngdref.SingularMatrixError) as exc:
            if tcfg["on_divergence"] == "raise":
                raise
            self._diverge(str(exc))
            return None
        self.step += 1
        self.position += len(rows)
        record = {"kind": "train", "step": self.step,
                  "epoch": self.epoch + self.position / self.n_train, **record}
        if self.step % tcfg["log_every"] == 0 or self.step == self.total:
            self.log(record)
        self.last_loss = loss = float(record["loss"])
        if self.first_loss is None:
            self.first_loss = loss
        factor = tcfg.get("divergence_factor")
        if factor is not None and loss > factor * self.first_loss:
            self._diverge(
                f"loss {loss:.4g} at step {self.step} is above train.divergence_factor="
                f"{factor:g} times the first step's loss {self.first_loss:.4g}"
            )
            return None
        return record

    def _diverge(self, message: str) -> None:
        if self.config["train"]["on_divergence"] == "raise":
            raise FloatingPointError(message)
        self.diverged = True
        self.diverged_step = self.step
        self.log({"kind": "diverged", "step": self.step, "message": message})
        self.say(f"diverged: {message}")

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
            "diverged_step": self.diverged_step,
            "num_trainable": self.setup.num_trainable,
            "best_validation": {**self.best, "score": (
                self.best["score"] if math.isfinite(self.best["score"]) else None
            )},
            "test": results,
        }
        text = json.dumps(summary, indent=2, allow_nan=True) + "\n"
        atomic_write(self.run_dir / "results.json", lambda fh: fh.write(text), mode="w")
        return results


def _first_loss(log: str) -> float | None:
    """The first train record's loss in the text of a log (checkpoints from before
    ``first_loss`` was kept)."""
    for line in log.splitlines():
        record = json.loads(line)
        if record.get("kind") == "train":
            return float(record["loss"])
    return None


def _progress_bar(total: int, initial: int, enabled: bool, config: Mapping[str, Any]) -> Any:
    from tqdm.auto import tqdm

    desc = f"{config['setup']}/{config['task']}/{config['optimizer']}"
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
        dynamic_ncols=True,
    )
