"""The reproduction's plans and experiments: learning-rate grids, seeds, run configurations.

The driver :mod:`validation.experiments.reproduce.driver` runs them; its docstring describes the
plans.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from validation.experiments.reproduce.report import (
    PAPER_ORDER,
)

#: the optimisers of the paper's MLP experiment
OPTIMIZERS = ("adam", "sgd", "ief", "ef", "sf")
#: the paper's MLP learning rates (App. H.7, mean-reduced loss)
PAPER_LR: dict[str, float] = {"adam": 1e-4, "sgd": 0.1, "ief": 50.0, "ef": 1e-4, "sf": 0.1}
PAPER_TEST_ACCURACY: dict[str, float] = {
    "ief": 58.6, "adam": 56.6, "sf": 55.2, "sgd": 54.4, "ef": 29.2,
}
_BASELINES = ("adam", "adamw", "sgd")


class ReproduceError(RuntimeError):
    """The reproduction cannot run (a missing module, a plan that differs from the stored one)."""


@dataclass(frozen=True)
class Plan:
    """What :func:`reproduce` runs.

    Attributes
    ----------
    name : str
    epochs : int
        Training epochs of every run.
    step_epoch : int
        Adam's and SGD's learning rate is multiplied by 0.1 from this epoch on.
    lr_grid : dict of str to tuple of float
        Learning rates tried (with the first seed) per optimiser.
    seeds : tuple of int
        The first one selects the learning rate.
    hidden_sizes : tuple of int
    dtype : str
    max_train_samples : int or None
        Training rows used (None: all 1,077).
    eval_batches, eval_batch_size : int
        B and M of :func:`~validation.experiments.evaluate.framework.evaluate_run`.
    eval_every : int
        Evaluate the epoch checkpoints 0, k, 2k, ... (and the last).
    sweep_batches : int
        B of :func:`~validation.experiments.evaluate.framework.sweep_run` (first, middle, last
        checkpoint).
    sweep_dampings : tuple of float
        Its lambda grid (the protocol's convention).
    eval_protocol : str
        The evaluation framework's protocol ("authors": their evaluator, R = 1/40, one
        lambda for all methods, the all-pairs duplicate filter; "ngdref").
    batch_size : int
        Training batch size.
    pretrain_epochs, lora_rank : int
        The LoRA experiment's pretraining and adapter rank (0: not used).
    """

    name: str
    epochs: int
    step_epoch: int
    lr_grid: dict[str, tuple[float, ...]]
    seeds: tuple[int, ...]
    hidden_sizes: tuple[int, ...] = (128, 128)
    dtype: str = "float32"
    max_train_samples: int | None = None
    eval_batches: int = 20
    eval_batch_size: int = 160
    eval_every: int = 2
    sweep_batches: int = 10
    sweep_dampings: tuple[float, ...] = tuple(float(f"1e{k}") for k in range(-12, 3))
    eval_protocol: str = "authors"
    batch_size: int = 64
    pretrain_epochs: int = 0
    lora_rank: int = 0

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-able data (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def eval_checkpoints(self) -> list[str]:
        """The epoch checkpoints the evaluation framework scores."""
        epochs = sorted({*range(0, self.epochs + 1, self.eval_every), self.epochs})
        return [f"epoch-{k}" for k in epochs]


@dataclass(frozen=True)
class Experiment:
    """What differs between the reproductions :func:`reproduce` runs.

    Attributes
    ----------
    name : str
        "digits" (the train-from-scratch MLP) or "digits-lora" (LoRA fine-tuning of a
        pretrained network, :mod:`validation.experiments.reproduce.lora_digits`).
    optimizers : tuple of str
    baseline : str
        The optimiser whose selected seed-0 run the evaluation framework scores.
    paper_lr : dict of str to float
    paper_order : tuple of str
        The paper's test-metric order (best first) to compare with.
    paper_score : dict of str to float
        The paper's test metric per optimiser, shown beside ours.
    paper_score_label : str
    title : str
        The first heading of ``results.md``.
    run_config : callable
        ``(plan, optimizer, lr, seed, out) -> config`` of one run (``out``: the output
        directory).
    describe : callable
        ``(plan, steps_per_epoch) -> str``, the set-up paragraph of ``results.md``.
    prepare : callable or None
        ``(out, plan) -> None``, run once before the training tasks (e.g. pretraining).
    toy_figures : bool
        Also draw the paper's toy problems (:ref:`conv-toys`; the same for every experiment).
    """

    name: str
    optimizers: tuple[str, ...]
    baseline: str
    paper_lr: dict[str, float]
    paper_order: tuple[str, ...]
    paper_score: dict[str, float]
    paper_score_label: str
    title: str
    run_config: Callable[[Plan, str, float, int, Path], dict[str, Any]]
    describe: Callable[[Plan, int], str]
    prepare: Callable[[Path, Plan], None] | None = None
    toy_figures: bool = True


def decade_grid(
    paper_lr: Mapping[str, float], optimizers: Sequence[str], *, below: int, count: int
) -> dict[str, tuple[float, ...]]:
    """Per optimiser, ``count`` learning rates a decade apart (3 significant digits), the
    lowest ``below`` decades under the paper's: ``paper_lr[opt] / 10**below * 10**k``."""
    grid = {}
    for opt in optimizers:
        lowest = paper_lr[opt] / 10**below
        grid[opt] = tuple(float(f"{lowest * 10**k:.3g}") for k in range(count))
    return grid


#: the measured plan (module docstring): five learning rates per optimiser, from a decade
#: below the paper's value to three decades above (the earlier grid stopped at two above,
#: and two optimisers chose its top edge)
FULL = Plan(
    name="full",
    epochs=20,
    step_epoch=5,
    lr_grid=decade_grid(PAPER_LR, OPTIMIZERS, below=1, count=5),
    seeds=(0, 1, 2),
)
#: a smoke test of every stage (about a minute)
QUICK = Plan(
    name="quick",
    epochs=4,
    step_epoch=1,
    lr_grid=decade_grid(PAPER_LR, OPTIMIZERS, below=0, count=2),
    seeds=(0, 1),
    max_train_samples=192,
    eval_batches=2,
    eval_every=2,
    sweep_batches=2,
    sweep_dampings=(1e-12, 1e-8, 1e-4, 1.0),
)


# ---- configurations and run directories --------------------------------------------------------
def run_config(
    plan: Plan, optimizer: str, lr: float, seed: int, out: Path | None = None
) -> dict[str, Any]:
    """The runner's resolved ``mlp`` configuration of one run of ``plan`` (``out`` unused)."""
    from validation.experiments.config.load import load_config

    overrides: list[tuple[str, Any]] = [
        ("task", "digits"),
        ("optimizer", optimizer),
        ("seed", seed),
        ("train.epochs", plan.epochs),
        ("model.hidden_sizes", list(plan.hidden_sizes)),
        ("model.dtype", plan.dtype),
        ("train.batch_size", plan.batch_size),
        ("data.max_train_samples", plan.max_train_samples),
        (f"optimizers.{optimizer}.lr", float(lr)),
    ]
    if optimizer in _BASELINES:
        overrides += [
            (f"optimizers.{optimizer}.schedule", "step"),
            (f"optimizers.{optimizer}.milestones", [plan.step_epoch]),
            (f"optimizers.{optimizer}.gamma", 0.1),
        ]
    return load_config("mlp", overrides)


def run_dir(out: Path, optimizer: str, lr: float, seed: int) -> Path:
    """``out/runs/OPT/lrLR/seedS``."""
    return out / "runs" / optimizer / f"lr{lr:g}" / f"seed{seed}"


def _describe_digits(plan: Plan, steps_per_epoch: int) -> str:
    return (
        f"Plan `{plan.name}`: MLP 64-{'-'.join(map(str, plan.hidden_sizes))}-10 "
        f"({plan.dtype}), batch {plan.batch_size}, {plan.epochs} epochs of {steps_per_epoch} "
        f"steps, mean loss; Adam/SGD x0.1 from epoch {plan.step_epoch}; iEF constant lr; "
        "EF/SF normalised with linear decay; damping 1e-7 (iEF, EF, SF). Learning rate chosen "
        "on validation accuracy (seed 0) from the grid below; then seeds "
        f"{', '.join(map(str, plan.seeds))} at that value. Test accuracy is that of the "
        "best-validation checkpoint; the final training loss is the mean of the last epoch's "
        "batch losses. Mean ± sample std over the seeds."
    )


#: the train-from-scratch MLP on digits (App. H.7 scaled)
DIGITS = Experiment(
    name="digits",
    optimizers=OPTIMIZERS,
    baseline="adam",
    paper_lr=PAPER_LR,
    paper_order=PAPER_ORDER,
    paper_score=PAPER_TEST_ACCURACY,
    paper_score_label="MLP + CIFAR-10 test (%)",
    title="MLP reproduction on scikit-learn digits (Wu et al. 2024, App. H.7 scaled)",
    run_config=run_config,
    describe=_describe_digits,
)
