r"""A CPU reproduction of the paper's train-from-scratch MLP experiment on real data.

``python -m validation.experiments reproduce [--out results/digits] [--quick]`` runs, on
scikit-learn's 8x8 digits (the runner's ``mlp`` setup, 1,077 / 360 / 360 images), the protocol
of the paper's App. H.7 (CIFAR-10, 60 epochs, batch 64) scaled to this data and to a 20-minute
budget on two CPU cores:

1. **Training.** Adam and SGD with the step schedule (x0.1 after a quarter of the epochs, as
   the paper's epoch 15 of 60), iEF with a constant learning rate, EF and SF with their
   normalised update and linear decay to 0; no momentum, no weight decay, batch 64, the
   mean-reduced loss. The per-sample optimisers use the paper's damping 1e-7 (configs/mlp.json).
2. **Learning-rate selection.** A grid of three values per optimiser, the paper's learning rate
   and one and two decades above it (this run takes about 1/120 of the paper's 42,000 steps),
   each trained with seed 0; the one with the best validation accuracy among the runs that did
   not diverge is kept (ties: the smaller learning rate). Then seeds 1 and 2 at that value;
   seed 0's grid run is reused.
3. **Evaluation framework** (SPEC §5, :mod:`validation.experiments.evaluate`) on the
   checkpoints of the Adam baseline run (selected learning rate, seed 0): the gamma ratios at
   every ``eval_every``-th epoch checkpoint, and a damping sweep at the first, middle and last.
4. **Report.** Figures (:mod:`validation.experiments.figures`) and ``results.md``: final training
   loss and test accuracy (mean +- std over the seeds) per optimiser, the rankings, the gamma
   ratios per checkpoint, the sweep, and a plain statement of which of the paper's claims held
   (:func:`claims`).

Scaling (:data:`FULL`): a 64-128-128-10 ReLU MLP in float32 (the runner's default is 256 wide
in float64; float32 is the authors' practice and the Gram solves stay in float64), 20 epochs of
17 steps, the schedule's step at epoch 5, 20 evaluation batches of 160 training samples (the
paper: 100) at every second epoch checkpoint, 10 batches per sweep point. :data:`QUICK` is a
smoke test of every stage (192 training samples, 4 epochs, 2 learning rates, 2 seeds).

Parallelism: the runs are independent, so they go to ``workers`` processes (default 2, one per
core) with ``threads`` torch threads each (default 1: with two processes on two cores a
second intra-op thread per process only adds contention; measured on this machine, one thread
was also faster for a single process).

Resuming: every run directory with a ``results.json`` is reused as it is; an unfinished one is
continued (the runner's ``--resume``); ``evaluation.json`` and ``sweep.json`` skip the
checkpoints they already hold. The plan is stored in ``plan.json``: rerunning into the same
directory with another plan is refused (use another ``--out``).

Layout of ``--out``::

    plan.json                         the plan (epochs, grids, seeds, evaluation sizes)
    runs/OPT/lrLR/seedS/              the runner's run directories
    results.json, results.md          the numbers and the report
    toy_least_squares.{png,pdf}       toy_logistic.{png,pdf}
    training_curves.{png,pdf}         gamma_ratios.{png,pdf}    damping_sweep.{png,pdf}

The evaluation files are in the Adam run's directory (``runs/adam/lr.../seed0/``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FULL",
    "OPTIMIZERS",
    "PAPER_LR",
    "PAPER_ORDER",
    "PAPER_TEST_ACCURACY",
    "QUICK",
    "Claim",
    "Plan",
    "ReproduceError",
    "claims",
    "compare_ranking",
    "ef_worse_flags",
    "final_training_loss",
    "gamma_order_flags",
    "ief_robust_flags",
    "imbalance_mean",
    "rank",
    "register_reproduce",
    "reproduce",
    "results_markdown",
    "run_config",
    "run_dir",
    "select_lr",
]

#: the optimisers of the paper's MLP experiment
OPTIMIZERS = ("adam", "sgd", "ief", "ef", "sf")
#: the paper's MLP learning rates (App. H.7, mean-reduced loss)
PAPER_LR: dict[str, float] = {"adam": 1e-4, "sgd": 0.1, "ief": 50.0, "ef": 1e-4, "sf": 0.1}
#: the paper's MLP + CIFAR-10 test accuracy order (58.6, 56.6, 55.2, 54.4, 29.2)
PAPER_ORDER = ("ief", "adam", "sf", "sgd", "ef")
PAPER_TEST_ACCURACY: dict[str, float] = {
    "ief": 58.6, "adam": 56.6, "sf": 55.2, "sgd": 54.4, "ef": 29.2,
}
_NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "ief": "iEF", "ef": "EF", "sf": "SF"}
_BASELINES = ("adam", "adamw", "sgd")
_IMBALANCE_LABELS = {"max_min": "max / min", "tail_10": "mean of top 10% / bottom 10%"}


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
        B and M of :func:`~validation.experiments.evaluate.evaluate_run`.
    eval_every : int
        Evaluate the epoch checkpoints 0, k, 2k, ... (and the last).
    sweep_batches : int
        B of :func:`~validation.experiments.evaluate.sweep_run` (first, middle, last checkpoint).
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
        pretrained network, :mod:`validation.experiments.lora_digits`).
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


def _decades(lr: float, count: int) -> tuple[float, ...]:
    return tuple(float(f"{lr * 10**k:.3g}") for k in range(count))


#: the measured plan (module docstring): five learning rates per optimiser, from a decade
#: below the paper's value to three decades above (the earlier grid stopped at two above,
#: and two optimisers chose its top edge)
FULL = Plan(
    name="full",
    epochs=20,
    step_epoch=5,
    lr_grid={opt: _decades(PAPER_LR[opt] / 10, 5) for opt in OPTIMIZERS},
    seeds=(0, 1, 2),
)
#: a smoke test of every stage (about a minute)
QUICK = Plan(
    name="quick",
    epochs=4,
    step_epoch=1,
    lr_grid={opt: _decades(PAPER_LR[opt], 2) for opt in OPTIMIZERS},
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
    from validation.experiments.config import load_config

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


# ---- tasks (run in worker processes) ------------------------------------------------------------
def _init_worker(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(threads)


def _train_task(config: dict[str, Any], directory: str) -> float:
    """Train (or continue) one run unless it has finished; the seconds spent."""
    from validation.experiments.lora_digits import setup_for_run
    from validation.experiments.train import train

    started = time.perf_counter()
    run = Path(directory)
    if not (run / "results.json").is_file():
        setup = setup_for_run(config, run, "cpu")  # None: the runner builds it
        train(config, run, resume=(run / "config.json").is_file(), progress=False, setup=setup)
    return time.perf_counter() - started


def _evaluate_task(directory: str, kwargs: dict[str, Any]) -> float:
    from validation.experiments.evaluate import evaluate_run

    started = time.perf_counter()
    evaluate_run(directory, progress=False, **kwargs)
    return time.perf_counter() - started


def _sweep_task(directory: str, kwargs: dict[str, Any]) -> float:
    from validation.experiments.evaluate import sweep_run

    started = time.perf_counter()
    sweep_run(directory, progress=False, **kwargs)
    return time.perf_counter() - started


@dataclass
class _Task:
    key: tuple[Any, ...]
    func: Callable[..., float]
    args: tuple[Any, ...]
    cost: float  # relative, for longest-first scheduling
    urgent: bool = False  # other tasks wait for it


class _Scheduler:
    """Run tasks on ``workers`` processes, longest first among the ready ones.

    ``on_done(key)`` may return new tasks (those whose dependencies are now met). With
    ``progress`` a tqdm bar (stderr, the runner's convention) counts finished tasks; its
    total grows as tasks are added.
    """

    def __init__(
        self, workers: int, threads: int, log: Callable[[str], None], progress: bool = False
    ) -> None:
        self.workers = workers
        self.threads = threads
        self.log = log
        self.progress = progress

    def run(self, tasks: list[_Task], on_done: Callable[[_Task], list[_Task]]) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        from tqdm.auto import tqdm

        ready = list(tasks)
        running: dict[Any, _Task] = {}
        context = multiprocessing.get_context("spawn")
        bar = tqdm(total=len(ready), disable=not self.progress, desc="reproduce", unit="task",
                   dynamic_ncols=True)
        with bar, ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=_init_worker,
            initargs=(self.threads,),
        ) as pool:
            try:
                while ready or running:
                    while ready and len(running) < self.workers:
                        ready.sort(key=lambda t: (not t.urgent, -t.cost))
                        task = ready.pop(0)
                        running[pool.submit(task.func, *task.args)] = task
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for future in done:
                        task = running.pop(future)
                        seconds = future.result()
                        self.log(f"done {' '.join(map(str, task.key))} ({seconds:.0f} s)")
                        new = on_done(task)
                        ready += new
                        bar.total += len(new)
                        bar.update(1)
            except BaseException:
                # queued tasks are dropped; a run in progress keeps its last checkpoint
                pool.shutdown(wait=False, cancel_futures=True)
                raise


# ---- reading runs -------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl`` (empty if absent); a damaged line names the file and line."""
    from validation.experiments.figures import read_jsonl

    return read_jsonl(path) if path.is_file() else []


def imbalance_mean(checkpoint: Mapping[str, Any], statistic: str) -> float:
    """The mean over the batches of one imbalance statistic ("max_min" or "tail_10").

    Files written before both statistics existed hold max/min only.
    """
    entry = checkpoint.get("imbalance", {})
    if "mean" in entry:
        entry = {"max_min": entry}
    return float(entry.get(statistic, {}).get("mean", math.nan))


def final_training_loss(records: Sequence[Mapping[str, Any]], epochs: int) -> float:
    """The mean of the logged batch losses of the last epoch (steps in (epochs - 1, epochs]).

    Parameters
    ----------
    records : sequence of dict
        The lines of a run's ``metrics.jsonl``.
    epochs : int
        The run's number of epochs.

    Returns
    -------
    float
        +inf when the run diverged or did not reach its last epoch.
    """
    if any(r.get("kind") == "diverged" for r in records):
        return math.inf
    last = [
        float(r["loss"]) for r in records
        if r.get("kind") == "train" and float(r["epoch"]) > epochs - 1 + 1e-9
    ]
    if not last:
        return math.inf
    value = float(np.mean(last))
    return value if math.isfinite(value) else math.inf


def _run_summary(directory: Path, epochs: int) -> dict[str, Any]:
    results = json.loads((directory / "results.json").read_text(encoding="utf-8"))
    records = _read_jsonl(directory / "metrics.jsonl")
    score = results["best_validation"]["score"]
    times = [float(r["time"]) for r in records if "time" in r]
    return {
        "dir": str(directory),
        "diverged": bool(results["diverged"]),
        "validation_accuracy": math.nan if score is None else float(score),
        "test_accuracy": float(results["test"].get("accuracy", math.nan)),
        "final_training_loss": final_training_loss(records, epochs),
        "steps": int(results["steps"]),
        "train_seconds": max(times) if times else math.nan,
    }


# ---- selection, rankings, claims ----------------------------------------------------------------
def select_lr(grid: Mapping[float, Mapping[str, Any]]) -> float:
    """The learning rate with the best validation accuracy among the runs that did not diverge.

    Parameters
    ----------
    grid : mapping of lr to run summary
        Each summary has ``validation_accuracy`` (NaN: never validated) and ``diverged``.

    Returns
    -------
    float
        Ties go to the smaller learning rate; when every run diverged, the best validation
        accuracy among all of them (the smallest lr if none was ever validated).
    """
    lrs = sorted(grid)

    def best(candidates: list[float]) -> float | None:
        scored = [lr for lr in candidates if math.isfinite(grid[lr]["validation_accuracy"])]
        if not scored:
            return None
        top = max(grid[lr]["validation_accuracy"] for lr in scored)
        return min(lr for lr in scored if grid[lr]["validation_accuracy"] == top)

    chosen = best([lr for lr in lrs if not grid[lr]["diverged"]])
    if chosen is None:
        chosen = best(lrs)
    return lrs[0] if chosen is None else chosen


def rank(values: Mapping[str, float], *, higher_is_better: bool) -> list[str]:
    """Names ordered best first; NaN (and +inf for losses) last, ties by name."""

    def key(name: str) -> tuple[int, float, str]:
        v = values[name]
        if not math.isfinite(v):
            return (1, 0.0, name)
        return (0, -v if higher_is_better else v, name)

    return sorted(values, key=key)


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims checked against this reproduction.

    Attributes
    ----------
    name : str
    held : bool or None
        None when it could not be checked (missing data).
    statement : str
        A plain sentence saying what was found.
    """

    name: str
    held: bool | None
    statement: str


def compare_ranking(
    observed: Sequence[str], paper: Sequence[str] = PAPER_ORDER, *, what: str = "ranking"
) -> Claim:
    """Compare an observed order (best first) with the paper's.

    The claim holds when the two orders are identical; the statement also gives the number of
    pairs in the paper's relative order (Kendall concordance), and whether the paper's best and
    worst are best and worst here.
    """
    common = [m for m in paper if m in observed]
    position = {m: k for k, m in enumerate(observed)}
    pairs = [(a, b) for i, a in enumerate(common) for b in common[i + 1:]]
    concordant = sum(position[a] < position[b] for a, b in pairs)
    seen = [m for m in observed if m in common]
    held = seen == common
    show = " > ".join(_NAMES.get(m, m) for m in seen)
    want = " > ".join(_NAMES.get(m, m) for m in common)
    if held:
        statement = f"{what}: held. Observed {show}, the paper's order."
    else:
        first = "yes" if seen and seen[0] == common[0] else "no"
        last = "yes" if seen and seen[-1] == common[-1] else "no"
        statement = (
            f"{what}: did not hold exactly. Observed {show}; paper {want}; "
            f"{concordant} of {len(pairs)} pairs in the paper's order; "
            f"{_NAMES.get(common[0], common[0])} best: {first}; "
            f"{_NAMES.get(common[-1], common[-1])} worst: {last}."
        )
    return Claim(what, held, statement)


def _majority(name: str, flags: Sequence[bool], what: str, unit: str = "checkpoints") -> Claim:
    n, k = len(flags), int(sum(flags))
    if n == 0:
        return Claim(name, None, f"{what}: not checked (no {unit}).")
    if k == n:
        return Claim(name, True, f"{what}: held for all {unit} ({k} of {n}).")
    if 2 * k > n:
        return Claim(name, True, f"{what}: held for most {unit} ({k} of {n}).")
    return Claim(name, False, f"{what}: did not hold ({k} of {n} {unit}).")


def _ratio_mean(checkpoint: Mapping[str, Any], name: str) -> float:
    value = checkpoint.get("ratios", {}).get(name, {}).get("mean", math.nan)
    return math.nan if value is None else float(value)


def gamma_order_flags(evaluation: Mapping[str, Any]) -> list[bool]:
    r"""Per checkpoint: does gamma rank iEF < SF < EF?

    iEF < SF is ``mean(gamma_SF/gamma_iEF) > 1`` and SF < EF is ``mean(gamma_SF/gamma_EF) < 1``
    (the batch means of the per-batch ratios, as the paper reports them); NaN is False.
    """
    flags = []
    for c in evaluation.get("checkpoints", []):
        sf_ief, sf_ef = _ratio_mean(c, "sf/ief"), _ratio_mean(c, "sf/ef")
        flags.append(bool(sf_ief > 1.0 and sf_ef < 1.0))
    return flags


def ef_worse_flags(evaluation: Mapping[str, Any]) -> list[bool]:
    """Per checkpoint: ``mean(gamma_EF/gamma_SGD) > 1`` (EF worse than SGD)."""
    return [bool(_ratio_mean(c, "ef/sgd") > 1.0) for c in evaluation.get("checkpoints", [])]


def ief_robust_flags(
    sweep: Mapping[str, Any], *, near_zero: float = 1e-8, tolerance: float = 1.25
) -> list[bool]:
    r"""Per sweep checkpoint: is iEF good at near-zero damping?

    True when at every damping <= ``near_zero`` in the grid (the smallest one if none is)
    ``mean(gamma_iEF/gamma_SGD)`` is below 1 (better than SGD) and within ``tolerance`` times
    its minimum over the whole grid (no damping needs to be tuned).
    """
    flags = []
    for c in sweep.get("checkpoints", []):
        lam = np.asarray(c["dampings"], dtype=float)
        ief = np.asarray(c["ratios"]["ief/sgd"]["mean"], dtype=float)
        small = lam <= near_zero
        if not small.any():
            small = lam == lam.min()
        finite = ief[np.isfinite(ief)]
        if finite.size == 0 or not np.all(np.isfinite(ief[small])):
            flags.append(False)
            continue
        best = float(finite.min())
        flags.append(bool(np.all(ief[small] < 1.0) and np.all(ief[small] <= tolerance * best)))
    return flags


def claims(
    summary: Mapping[str, Mapping[str, float]],
    evaluation: Mapping[str, Any] | None,
    sweep: Mapping[str, Any] | None,
    paper_order: Sequence[str] = PAPER_ORDER,
) -> list[Claim]:
    """The paper's MLP and evaluation-framework claims, checked.

    Parameters
    ----------
    summary : mapping of optimiser to {"final_training_loss": mean, "test_accuracy": mean}
        Means over the seeds.
    evaluation : evaluation.json content, optional
    sweep : sweep.json content, optional
    paper_order : sequence of str
        The paper's order (best first) for both rankings (default: its MLP's).

    Returns
    -------
    list of Claim
        Final training loss ranking and test accuracy ranking against the paper's
        iEF > Adam > SF > SGD > EF; iEF < SF < EF in gamma for most checkpoints;
        gamma_EF/gamma_SGD > 1 for most checkpoints; iEF good at near-zero damping in the sweep
        (:func:`ief_robust_flags`); the gradient-norm imbalance grows with training.
    """
    order = " > ".join(_NAMES.get(m, m) for m in paper_order)
    out = [
        compare_ranking(
            rank({m: v["final_training_loss"] for m, v in summary.items()},
                 higher_is_better=False),
            paper_order, what=f"final training loss ranking (lower is better) vs {order}",
        ),
        compare_ranking(
            rank({m: v["test_accuracy"] for m, v in summary.items()}, higher_is_better=True),
            paper_order, what=f"test accuracy ranking vs {order}",
        ),
    ]
    if evaluation is None:
        out.append(Claim("gamma", None, "gamma claims: not checked (no evaluation.json)."))
    else:
        out.append(
            _majority("gamma order", gamma_order_flags(evaluation),
                      "iEF < SF < EF in gamma (gamma_SF/gamma_iEF > 1 and gamma_SF/gamma_EF < 1)")
        )
        out.append(
            _majority("EF worse than SGD", ef_worse_flags(evaluation),
                      "EF worse than SGD (gamma_EF/gamma_SGD > 1)")
        )
        for stat, label in _IMBALANCE_LABELS.items():
            imb = [imbalance_mean(c, stat) for c in evaluation["checkpoints"]]
            if len(imb) < 2 or not all(math.isfinite(v) for v in (imb[0], imb[-1])):
                continue
            grows = imb[-1] > imb[0]
            out.append(Claim(
                f"imbalance grows ({stat})", grows,
                f"gradient-norm imbalance ({label}) grows with training: "
                f"{'held' if grows else 'did not hold'} ({imb[0]:.3g} at the first checkpoint, "
                f"{imb[-1]:.3g} at the last).",
            ))
    if sweep is None:
        out.append(Claim("iEF damping", None, "iEF damping robustness: not checked (no sweep)."))
    else:
        out.append(
            _majority("iEF damping", ief_robust_flags(sweep),
                      "iEF robust at near-zero damping (gamma_iEF/gamma_SGD < 1 and within "
                      "1.25x of its best over the grid for every lambda <= 1e-8)",
                      "sweep checkpoints")
        )
    return out


# ---- the report ------------------------------------------------------------------------------
def _pm(mean: float, std: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "diverged" if mean == math.inf else "n/a"
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for one value); inf if any value is inf."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    if np.any(np.isinf(arr)):
        return math.inf, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _close_pairs(summary: Mapping[str, Mapping[str, float]], key: str, order: list[str]) -> str:
    """Neighbours of ``order`` whose ``key`` means differ by less than the larger std."""
    close = []
    for a, b in itertools.pairwise(order):
        ma, mb = summary[a][key], summary[b][key]
        spread = max(summary[a][f"{key}_std"], summary[b][f"{key}_std"])
        if math.isfinite(ma) and math.isfinite(mb) and abs(ma - mb) < spread:
            close.append(f"{_NAMES.get(a, a)}/{_NAMES.get(b, b)}")
    return ", ".join(close) if close else "none"


def _gamma_cell(c: Mapping[str, Any], name: str) -> str:
    r = c.get("ratios", {}).get(name)
    if not r:
        return "–"
    return f"{r['mean']:.3f} ± {r['std']:.3f}"


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


def results_markdown(results: Mapping[str, Any], experiment: Experiment | None = None) -> str:
    """``results.md`` from the ``results.json`` content of :func:`reproduce`."""
    experiment = DIGITS if experiment is None else experiment
    lines = [
        f"# {experiment.title}",
        "",
        results["description"],
        "",
        f"Wall time of this invocation: **{results['wall_seconds']:.0f} s** "
        f"({results['workers']} worker processes x {results['threads']} torch thread; runs "
        "reused from an earlier invocation are not re-timed; all invocations into this "
        f"directory: {', '.join(f'{w:.0f}' for w in results.get('wall_history', []))} s).",
        "",
        "## Learning-rate selection (seed 0, best validation accuracy)",
        "",
        "| optimiser | paper lr | grid: validation accuracy (diverged = d) | chosen |",
        "|---|---|---|---|",
    ]
    for opt, sel in results["selection"].items():
        cells = ", ".join(
            f"{float(lr):g}: {g['validation_accuracy'] * 100:.1f}{' d' if g['diverged'] else ''}"
            if math.isfinite(g["validation_accuracy"]) else f"{float(lr):g}: n/a d"
            for lr, g in sel["grid"].items()
        )
        lines.append(
            f"| {_NAMES[opt]} | {experiment.paper_lr[opt]:g} | {cells} | {sel['chosen']:g} |"
        )
    lines += [
        "",
        "## Final training loss and test accuracy",
        "",
        "| optimiser | lr | final training loss | test accuracy (%) | diverged runs | "
        f"paper, {experiment.paper_score_label} |",
        "|---|---|---|---|---|---|",
    ]
    for opt, row in results["summary"].items():
        lines.append(
            f"| {_NAMES[opt]} | {row['lr']:g} | "
            f"{_pm(row['final_training_loss'], row['final_training_loss_std'], '.3e')} | "
            f"{_pm(row['test_accuracy'] * 100, row['test_accuracy_std'] * 100, '.1f')} | "
            f"{row['diverged']} of {row['runs']} | {experiment.paper_score[opt]} |"
        )
    lines += [
        "",
        "Ranking by final training loss: "
        + " > ".join(_NAMES[m] for m in results["ranking"]["final_training_loss"]),
        "",
        "Ranking by test accuracy: "
        + " > ".join(_NAMES[m] for m in results["ranking"]["test_accuracy"]),
        "",
        f"Paper ({experiment.paper_score_label}): "
        + " > ".join(_NAMES[m] for m in experiment.paper_order) + ".",
        "",
        "Neighbours in a ranking whose means differ by less than the larger of their two stds "
        "(not resolved by these seeds): final training loss: "
        + _close_pairs(results["summary"], "final_training_loss",
                       results["ranking"]["final_training_loss"])
        + "; test accuracy: "
        + _close_pairs(results["summary"], "test_accuracy", results["ranking"]["test_accuracy"])
        + ".",
        "",
    ]
    evaluation = results.get("evaluation")
    if evaluation:
        s = evaluation["settings"]
        lines += [
            f"## gamma ratios over the {_NAMES[experiment.baseline]} run's checkpoints "
            "(evaluation framework)",
            "",
            f"{s.get('batches')} batches of {s.get('batch_size')} training samples per "
            f"checkpoint, protocol {s.get('protocol')} (model in {s.get('dtype')}); damping "
            f"{s.get('damping')}; mean ± std over the batches. "
            "Below 1: the numerator is the better approximation of NGD.",
            "",
            "| checkpoint | epoch | EF/SGD | iEF/SGD | SF/iEF | SF/EF | imbalance max/min | "
            "imbalance top/bottom 10% | iEF<SF<EF | EF>SGD |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        order = gamma_order_flags(evaluation)
        worse = ef_worse_flags(evaluation)
        for c, o, w in zip(evaluation["checkpoints"], order, worse, strict=True):
            lines.append(
                f"| {c['name']} | {c['epoch']} | {_gamma_cell(c, 'ef/sgd')} | "
                f"{_gamma_cell(c, 'ief/sgd')} | {_gamma_cell(c, 'sf/ief')} | "
                f"{_gamma_cell(c, 'sf/ef')} | {imbalance_mean(c, 'max_min'):.3g} | "
                f"{imbalance_mean(c, 'tail_10'):.3g} | "
                f"{'yes' if o else 'no'} | {'yes' if w else 'no'} |"
            )
        lines.append("")
    sweep = results.get("sweep")
    if sweep:
        lines += [
            "## Damping sweep (same ratios; one lambda for EF, iEF and SF)",
            "",
            f"{sweep['settings'].get('batches')} batches per checkpoint and lambda. Value at the "
            "smallest lambda of the grid, and the best value over the grid (at its lambda).",
            "",
            "| checkpoint | ratio | at smallest lambda | best (lambda) | worst (lambda) |",
            "|---|---|---|---|---|",
        ]
        for c in sweep["checkpoints"]:
            lam = np.asarray(c["dampings"], dtype=float)
            first = int(np.argmin(lam))
            for name, r in c["ratios"].items():
                mean = np.asarray(r["mean"], dtype=float)
                ok = np.isfinite(mean)
                if not ok.any():
                    continue
                lo = int(np.nanargmin(np.where(ok, mean, np.nan)))
                hi = int(np.nanargmax(np.where(ok, mean, np.nan)))
                lines.append(
                    f"| {c['name']} | {name} | {mean[first]:.3f} | {mean[lo]:.3f} "
                    f"({lam[lo]:g}) | {mean[hi]:.3f} ({lam[hi]:g}) |"
                )
        lines.append("")
    lines += ["## The paper's claims", ""]
    for claim in results["claims"]:
        lines.append(f"- {claim['statement']}")
    lines += ["", "## Figures", ""]
    for path in results["figures"]:
        if path.endswith(".png"):
            lines.append(f"![{Path(path).stem}]({path})")
    lines += ["", "PDF versions next to the PNGs.", ""]
    return "\n".join(lines)


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


# ---- the driver ------------------------------------------------------------------------------
def _check_plan(out: Path, plan: Plan) -> None:
    path = out / "plan.json"
    wanted = plan.to_json()
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != wanted:
            changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise ReproduceError(
                f"out: {str(out)!r} holds a reproduction with another plan (differs in "
                f"{changed}); use another --out or delete it"
            )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class _State:
    plan: Plan
    out: Path
    grid: dict[str, dict[float, dict[str, Any]]] = field(default_factory=dict)
    chosen: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, set[float]] = field(default_factory=dict)


def reproduce(
    out: str | os.PathLike[str] = "results/digits",
    plan: Plan = FULL,
    *,
    workers: int = 2,
    threads: int = 1,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Run (or resume) the reproduction and write its figures, ``results.json`` and ``results.md``.

    Parameters
    ----------
    out : path
        The output directory (module docstring).
    plan : Plan
        :data:`FULL` or :data:`QUICK` (or another).
    experiment : Experiment, optional
        :data:`DIGITS` (default) or :data:`validation.experiments.lora_digits.DIGITS_LORA`.
    workers : int
        Processes running training / evaluation tasks at once.
    threads : int
        torch threads per process.
    log : callable, optional
        Receives progress lines (default: printed to stderr with the elapsed time).
    progress : bool, optional
        A tqdm bar over the tasks (default: when stderr is a terminal, as ``train``).

    Returns
    -------
    dict
        The content of ``results.json``.

    Raises
    ------
    ReproduceError
        :mod:`validation.experiments.evaluate` is missing, or ``out`` holds another plan.
    ValueError
        ``workers`` or ``threads`` is not an int >= 1.
    """
    started = time.perf_counter()
    for name, value in (("workers", workers), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    try:
        from validation.experiments.evaluate import evaluate_run, sweep_run  # noqa: F401
    except ImportError as exc:
        raise ReproduceError(
            "the evaluation framework validation/experiments/evaluate.py (evaluate_run, "
            f"sweep_run) is needed for the gamma ratios and the damping sweep: {exc}"
        ) from exc
    from validation.experiments import figures

    experiment = DIGITS if experiment is None else experiment
    optimizers, baseline = experiment.optimizers, experiment.baseline
    if progress is None:
        progress = sys.stderr.isatty()
    if log is None:
        def log(line: str) -> None:
            from tqdm.auto import tqdm

            tqdm.write(f"[{time.perf_counter() - started:6.0f} s] {line}", file=sys.stderr)

    out_dir = Path(out)
    _check_plan(out_dir, plan)
    if experiment.prepare is not None:
        log(f"preparing {experiment.name}")
        experiment.prepare(out_dir, plan)
    state = _State(plan, out_dir)
    first_seed = plan.seeds[0]

    def train_task(opt: str, lr: float, seed: int) -> _Task:
        config = experiment.run_config(plan, opt, lr, seed, out_dir)
        cost = 1.0 if opt in _BASELINES else 20.0
        return _Task(
            ("train", opt, f"lr={lr:g}", f"seed={seed}"), _train_task,
            (config, str(run_dir(out_dir, opt, lr, seed))), cost * plan.epochs,
            urgent=opt == baseline and seed == first_seed,
        )

    base_dir: list[Path] = []

    def evaluation_tasks(directory: Path) -> list[_Task]:
        common = {"batch_size": plan.eval_batch_size, "protocol": plan.eval_protocol}
        ckpts = plan.eval_checkpoints()
        return [
            _Task(("evaluate", directory.name), _evaluate_task, (str(directory), {
                **common, "batches": plan.eval_batches, "checkpoints": ckpts,
            }), 5.0 * len(ckpts) * plan.eval_batches),
            _Task(("sweep", directory.name), _sweep_task, (str(directory), {
                **common, "batches": plan.sweep_batches, "dampings": list(plan.sweep_dampings),
                "checkpoints": "first,middle,last",
            }), 6.0 * 3 * plan.sweep_batches),
        ]

    def on_done(task: _Task) -> list[_Task]:
        if task.key[0] != "train":
            return []
        _, opt, lr_text, seed_text = task.key
        seed = int(seed_text.split("=")[1])
        if seed != first_seed:
            return []
        lr = float(lr_text.split("=")[1])
        state.grid.setdefault(opt, {})[lr] = _run_summary(run_dir(out_dir, opt, lr, seed),
                                                          plan.epochs)
        state.waiting[opt].discard(lr)
        if state.waiting[opt]:
            return []
        chosen = select_lr(state.grid[opt])
        state.chosen[opt] = chosen
        log(f"selected {opt} lr={chosen:g}")
        new = [train_task(opt, chosen, s) for s in plan.seeds[1:]]
        if opt == baseline:
            base_dir.append(run_dir(out_dir, opt, chosen, first_seed))
            new += evaluation_tasks(base_dir[0])
        return new

    tasks = []
    for opt in optimizers:
        state.waiting[opt] = set(plan.lr_grid[opt])
        tasks += [train_task(opt, lr, first_seed) for lr in plan.lr_grid[opt]]
    _Scheduler(workers, threads, log, progress).run(tasks, on_done)

    # ---- the numbers
    summary: dict[str, dict[str, Any]] = {}
    seeds: dict[str, list[dict[str, Any]]] = {}
    for opt in optimizers:
        lr = state.chosen[opt]
        rows = [_run_summary(run_dir(out_dir, opt, lr, s), plan.epochs) for s in plan.seeds]
        seeds[opt] = rows
        loss_mean, loss_std = _stats([r["final_training_loss"] for r in rows])
        acc_mean, acc_std = _stats([r["test_accuracy"] for r in rows])
        summary[opt] = {
            "lr": lr,
            "final_training_loss": loss_mean,
            "final_training_loss_std": loss_std,
            "test_accuracy": acc_mean,
            "test_accuracy_std": acc_std,
            "diverged": sum(r["diverged"] for r in rows),
            "runs": len(rows),
        }
    evaluation_path = base_dir[0] / "evaluation.json"
    sweep_path = base_dir[0] / "sweep.json"
    evaluation = figures.read_json(evaluation_path)
    sweep = figures.read_json(sweep_path)
    label = f"the {_NAMES[baseline]} run"

    # ---- the figures
    log("figures")
    written = []
    written += figures.plot_least_squares_toy(out_dir / "toy_least_squares")
    written += figures.plot_logistic_toy(out_dir / "toy_logistic")
    written += figures.plot_training_curves(
        {opt: [run_dir(out_dir, opt, state.chosen[opt], s) for s in plan.seeds]
         for opt in optimizers},
        out_dir / "training_curves",
        title=f"{experiment.name}, {len(plan.seeds)} seeds at the selected learning rates",
    )
    written += figures.plot_gamma_ratios(
        evaluation_path, out_dir / "gamma_ratios",
        title=f"gamma ratios on {label}'s checkpoints (lr {state.chosen[baseline]:g})",
    )
    written += figures.plot_damping_sweep(
        sweep_path, out_dir / "damping_sweep", title=f"damping sweep on {label}"
    )

    found = claims(summary, evaluation, sweep, experiment.paper_order)
    previous = out_dir / "results.json"
    history = []
    if previous.is_file():
        history = json.loads(previous.read_text(encoding="utf-8")).get("wall_history", [])
    wall = time.perf_counter() - started
    steps = state.grid[baseline][state.chosen[baseline]]["steps"] // plan.epochs
    results = {
        "experiment": experiment.name,
        "description": experiment.describe(plan, steps),
        "plan": plan.to_json(),
        "steps_per_epoch": steps,
        "workers": workers,
        "threads": threads,
        "selection": {
            opt: {"chosen": state.chosen[opt],
                  "grid": {f"{lr:g}": state.grid[opt][lr] for lr in sorted(state.grid[opt])}}
            for opt in optimizers
        },
        "summary": summary,
        "seeds": seeds,
        "ranking": {
            "final_training_loss": rank(
                {m: v["final_training_loss"] for m, v in summary.items()},
                higher_is_better=False),
            "test_accuracy": rank(
                {m: v["test_accuracy"] for m, v in summary.items()}, higher_is_better=True),
        },
        "evaluation_run": str(base_dir[0]),
        "evaluation": evaluation,
        "sweep": sweep,
        "claims": [dataclasses.asdict(c) for c in found],
        "figures": [os.path.relpath(p, out_dir) for p in written],
        "wall_seconds": wall,
        "wall_history": [*history, wall],
    }
    _write_json(out_dir / "results.json", results)
    (out_dir / "results.md").write_text(results_markdown(results, experiment), encoding="utf-8")
    log(f"wrote {out_dir / 'results.md'} ({results['wall_seconds']:.0f} s)")
    return results


# ---- command line -------------------------------------------------------------------------------
def _run_reproduce(args: Any) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.setup == "digits-lora":
        from validation.experiments.lora_digits import DIGITS_LORA, FULL_LORA, QUICK_LORA

        experiment, plan = DIGITS_LORA, QUICK_LORA if args.quick else FULL_LORA
    else:
        experiment, plan = DIGITS, QUICK if args.quick else FULL
    out = args.out or f"results/{args.setup}{'-quick' if args.quick else ''}"
    progress = None if args.progress == "auto" else args.progress == "on"
    try:
        results = reproduce(
            out, plan, workers=args.workers, threads=args.threads, progress=progress,
            experiment=experiment,
        )
    except ReproduceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for claim in results["claims"]:
        print(claim["statement"])
    return 0


def register_reproduce(subparsers: Any) -> None:
    """``reproduce``: the CPU reproductions on digits (MLP from scratch, or LoRA fine-tuning)."""
    parser = subparsers.add_parser(
        "reproduce",
        help="CPU reproductions on digits: the MLP experiment, or LoRA fine-tuning of a "
        "pretrained network (training, gamma evaluation, figures)",
    )
    parser.add_argument(
        "--setup", choices=("digits", "digits-lora"), default="digits",
        help="digits: the train-from-scratch MLP (App. H.7); digits-lora: pretrain on digits "
        "0-4, fine-tune LoRA adapters on 5-9 (the paper's PEFT setting)",
    )
    parser.add_argument(
        "--out", help="output directory (default results/SETUP, or results/SETUP-quick)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a ~1 minute smoke test of every stage"
    )
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--progress", choices=("auto", "on", "off"), default="auto",
        help="tqdm bar over the tasks (auto: when stderr is a terminal)",
    )
    parser.set_defaults(func=_run_reproduce)
