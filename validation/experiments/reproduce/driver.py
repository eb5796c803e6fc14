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
3. **Evaluation framework** (:ref:`conv-evaluation`,
   :mod:`validation.experiments.evaluate.framework`) on the checkpoints of the Adam baseline
   run (selected learning rate, seed 0): the gamma ratios at every ``eval_every``-th epoch
   checkpoint, and a damping sweep at the first, middle and last.
4. **Report.** Figures (:mod:`validation.experiments.figures.plots`) and ``results.md``: final
   training loss and test accuracy (mean +- std over the seeds) per optimiser, the rankings, the
   gamma ratios per checkpoint, the sweep, and a plain statement of which of the paper's claims held
   (:func:`~validation.experiments.reproduce.report.claims`).

Scaling (``FULL`` in :mod:`validation.experiments.reproduce.plan`): a 64-128-128-10 ReLU MLP
in float32 (the runner's default is 256 wide in float64; float32 is the authors' practice and
the Gram solves stay in float64), 20 epochs of 17 steps, the schedule's step at epoch 5, 20
evaluation batches of 160 training samples (the paper: 100) at every second epoch checkpoint,
10 batches per sweep point. ``QUICK`` is a smoke test of every stage (192 training samples,
4 epochs, 2 learning rates, 2 seeds).

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
    summary.json                      results.json without per-seed runs and per-batch values
    toy_least_squares.{png,pdf}       toy_logistic.{png,pdf}
    training_curves.{png,pdf}         gamma_ratios.{png,pdf}    damping_sweep.{png,pdf}
    kfac_ratios.{png,pdf}             gamma of KFAC, eKFAC, ieKFAC over exact iEF's

The evaluation files are in the Adam run's directory (``runs/adam/lr.../seed0/``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from validation.experiments.evaluate.kfac import plot_kfac_ratios
from validation.experiments.evaluate.settings import METHODS
from validation.experiments.io import atomic_write_json, atomic_write_text
from validation.experiments.reproduce.markdown import results_markdown
from validation.experiments.reproduce.origin import code_origin, machine
from validation.experiments.reproduce.plan import (
    _BASELINES,
    DIGITS,
    FULL,
    QUICK,
    Experiment,
    Plan,
    ReproduceError,
    run_dir,
)
from validation.experiments.reproduce.report import (
    NAMES,
    claims,
    compact_results,
    rankings,
    run_summary,
    seed_stats,
    select_lr,
)
from validation.experiments.reproduce.tasks import (
    Scheduler,
    Task,
    evaluate_task,
    sweep_task,
    train_task,
)

__all__ = ["register_reproduce", "reproduce"]

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
    atomic_write_text(path, json.dumps(wanted, indent=2) + "\n")


@dataclass
class _Graph:
    """The task graph of one reproduction: the seed-0 learning-rate grid, then the other seeds
    at the selected rate, and the evaluation of the baseline's selected run."""

    plan: Plan
    experiment: Experiment
    out: Path
    log: Callable[[str], None]
    grid: dict[str, dict[float, dict[str, Any]]] = field(default_factory=dict)
    chosen: dict[str, float] = field(default_factory=dict)
    waiting: dict[str, set[float]] = field(default_factory=dict)
    evaluated: list[Path] = field(default_factory=list)

    def training(self, opt: str, lr: float, seed: int) -> Task:
        config = self.experiment.run_config(self.plan, opt, lr, seed, self.out)
        cost = 1.0 if opt in _BASELINES else 20.0
        return Task(
            ("train", opt, f"lr={lr:g}", f"seed={seed}"), train_task,
            (config, str(run_dir(self.out, opt, lr, seed))), cost * self.plan.epochs,
            urgent=opt == self.experiment.baseline and seed == self.plan.seeds[0],
        )

    def first_tasks(self) -> list[Task]:
        tasks = []
        for opt in self.experiment.optimizers:
            self.waiting[opt] = set(self.plan.lr_grid[opt])
            tasks += [self.training(opt, lr, self.plan.seeds[0]) for lr in self.plan.lr_grid[opt]]
        return tasks

    def evaluation_tasks(self, directory: Path) -> list[Task]:
        plan = self.plan
        common = {"batch_size": plan.eval_batch_size, "protocol": plan.eval_protocol}
        ckpts = plan.eval_checkpoints()
        return [
            Task(("evaluate", directory.name), evaluate_task, (str(directory), {
                **common, "batches": plan.eval_batches, "checkpoints": ckpts,
                "methods": list(METHODS),  # the K-FAC family too (App. D.2.2)
            }), 5.0 * len(ckpts) * plan.eval_batches),
            Task(("sweep", directory.name), sweep_task, (str(directory), {
                **common, "batches": plan.sweep_batches, "dampings": list(plan.sweep_dampings),
                "checkpoints": "first,middle,last",
            }), 6.0 * 3 * plan.sweep_batches),
        ]

    def on_done(self, task: Task) -> list[Task]:
        """New tasks once a seed-0 grid of an optimiser is complete."""
        if task.key[0] != "train":
            return []
        _, opt, lr_text, seed_text = task.key
        seed, first = int(seed_text.split("=")[1]), self.plan.seeds[0]
        if seed != first:
            return []
        lr = float(lr_text.split("=")[1])
        self.grid.setdefault(opt, {})[lr] = run_summary(
            run_dir(self.out, opt, lr, seed), self.plan.epochs
        )
        self.waiting[opt].discard(lr)
        if self.waiting[opt]:
            return []
        chosen = self.chosen[opt] = select_lr(self.grid[opt])
        self.log(f"selected {opt} lr={chosen:g}")
        new = [self.training(opt, chosen, s) for s in self.plan.seeds[1:]]
        if opt == self.experiment.baseline:
            self.evaluated.append(run_dir(self.out, opt, chosen, first))
            new += self.evaluation_tasks(self.evaluated[0])
        return new

    def summary(self) -> tuple[dict[str, dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """Per optimiser: the seeds' mean and std at the selected rate, and each seed's run."""
        summary: dict[str, dict[str, Any]] = {}
        seeds: dict[str, list[dict[str, Any]]] = {}
        for opt in self.experiment.optimizers:
            lr = self.chosen[opt]
            rows = [run_summary(run_dir(self.out, opt, lr, s), self.plan.epochs)
                    for s in self.plan.seeds]
            seeds[opt] = rows
            loss_mean, loss_std = seed_stats([r["final_training_loss"] for r in rows])
            acc_mean, acc_std = seed_stats([r["test_accuracy"] for r in rows])
            summary[opt] = {
                "lr": lr, "final_training_loss": loss_mean, "final_training_loss_std": loss_std,
                "test_accuracy": acc_mean, "test_accuracy_std": acc_std,
                "diverged": sum(r["diverged"] for r in rows), "runs": len(rows),
            }
        return summary, seeds

    def figures(self) -> list[Path]:
        """The toy problems, the training curves, the gamma ratios and the damping sweep."""
        from validation.experiments.figures import plots as figures

        out, base = self.out, self.experiment.baseline
        label = f"the {NAMES[base]} run"
        written: list[Path] = []
        if self.experiment.toy_figures:
            written += figures.plot_least_squares_toy(out / "toy_least_squares")
            written += figures.plot_logistic_toy(out / "toy_logistic")
        written += figures.plot_training_curves(
            {opt: [run_dir(out, opt, self.chosen[opt], s) for s in self.plan.seeds]
             for opt in self.experiment.optimizers},
            out / "training_curves",
            title=f"{self.experiment.name}, {len(self.plan.seeds)} seeds at the selected "
            "learning rates",
        )
        written += figures.plot_gamma_ratios(
            self.evaluated[0] / "evaluation.json", out / "gamma_ratios",
            title=f"gamma ratios on {label}'s checkpoints (lr {self.chosen[base]:g})",
        )
        written += plot_kfac_ratios(
            self.evaluated[0] / "evaluation.json", out / "kfac_ratios",
            title=f"K-FAC family vs exact iEF on {label}'s checkpoints",
        )
        written += figures.plot_damping_sweep(
            self.evaluated[0] / "sweep.json", out / "damping_sweep",
            title=f"damping sweep on {label}",
        )
        return written

    def results(
        self,
        evaluation: dict[str, Any] | None,
        sweep: dict[str, Any] | None,
        written: list[Path],
        *,
        workers: int,
        threads: int,
    ) -> dict[str, Any]:
        """``results.json`` but for the wall times: plan, selection, summary, rankings, claims."""
        plan, experiment = self.plan, self.experiment
        summary, seeds = self.summary()
        steps = self.grid[experiment.baseline][self.chosen[experiment.baseline]]["steps"]
        return {
            "experiment": experiment.name,
            "description": experiment.describe(plan, steps // plan.epochs),
            "plan": plan.to_json(), "steps_per_epoch": steps // plan.epochs,
            "workers": workers, "threads": threads,
            "selection": {
                opt: {"chosen": self.chosen[opt],
                      "grid": {f"{lr:g}": self.grid[opt][lr] for lr in sorted(self.grid[opt])}}
                for opt in experiment.optimizers
            },
            "summary": summary, "seeds": seeds,
            "ranking": rankings(summary),
            "evaluation_run": str(self.evaluated[0]), "evaluation": evaluation, "sweep": sweep,
            "claims": [
                dataclasses.asdict(c)
                for c in claims(summary, evaluation, sweep, experiment.paper_order)
            ],
            "figures": [os.path.relpath(p, self.out) for p in written],
        }


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
        ``FULL`` or ``QUICK`` of :mod:`validation.experiments.reproduce.plan` (or another).
    experiment : Experiment, optional
        ``DIGITS`` (default) or :data:`validation.experiments.reproduce.lora_digits.DIGITS_LORA`.
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
        :mod:`validation.experiments.evaluate.framework` is missing, or ``out`` holds another plan.
    ValueError
        ``workers`` or ``threads`` is not an int >= 1.
    """
    started = time.perf_counter()
    _check_ready(workers, threads)
    code = code_origin()  # before the first task: the commit that computes the numbers
    from validation.experiments.figures.plots import read_json

    experiment = DIGITS if experiment is None else experiment
    if progress is None:
        progress = sys.stderr.isatty()
    log = _elapsed_log(started) if log is None else log
    out_dir = Path(out)
    _check_plan(out_dir, plan)
    if experiment.prepare is not None:
        log(f"preparing {experiment.name}")
        experiment.prepare(out_dir, plan)
    graph = _Graph(plan, experiment, out_dir, log)
    Scheduler(workers, threads, log, progress).run(graph.first_tasks(), graph.on_done)
    evaluation = read_json(graph.evaluated[0] / "evaluation.json")
    sweep = read_json(graph.evaluated[0] / "sweep.json")
    log("figures")
    written = graph.figures()
    results = graph.results(evaluation, sweep, written, workers=workers, threads=threads)
    previous = out_dir / "results.json"
    history = read_json(previous, ()).get("wall_history", []) if previous.is_file() else []
    wall = time.perf_counter() - started
    results.update(wall_seconds=wall, wall_history=[*history, wall], code=code, machine=machine())
    _write_results(out_dir, results, experiment)
    log(f"wrote {out_dir / 'results.md'} ({results['wall_seconds']:.0f} s)")
    return results


def _check_ready(workers: int, threads: int) -> None:
    """``workers`` and ``threads`` are ints >= 1 and the evaluation framework is there."""
    for name, value in (("workers", workers), ("threads", threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    try:
        from validation.experiments.evaluate.framework import evaluate_run, sweep_run  # noqa: F401
    except ImportError as exc:
        raise ReproduceError(
            "the evaluation framework validation/experiments/evaluate/framework.py (evaluate_run, "
            f"sweep_run) is needed for the gamma ratios and the damping sweep: {exc}"
        ) from exc


def _elapsed_log(started: float) -> Callable[[str], None]:
    """The default ``log``: a line on stderr (above the tqdm bar) with the elapsed time."""

    def log(line: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"[{time.perf_counter() - started:6.0f} s] {line}", file=sys.stderr)

    return log


def _write_results(out_dir: Path, results: dict[str, Any], experiment: Experiment) -> None:
    """``results.json``, its compact ``summary.json`` and the ``results.md`` report."""
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_json(out_dir / "summary.json", compact_results(results))
    (out_dir / "results.md").write_text(results_markdown(results, experiment), encoding="utf-8")


# ---- command line -------------------------------------------------------------------------------
def _run_fingerprint(args: Any) -> int:
    """``--fingerprint [--write]``: check (or write) the reference fingerprint of a setup."""
    from validation.experiments.reproduce import fingerprint

    started = time.perf_counter()
    try:
        if args.write:
            path = fingerprint.write_fingerprint(args.setup, args.reference)
            print(f"wrote {path} ({time.perf_counter() - started:.0f} s)")
            return 0
        verdict = fingerprint.check_fingerprint(args.setup, args.reference)
    except ReproduceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if verdict.problems:
        print(f"error: the {args.setup} reference fingerprint does not hold:", file=sys.stderr)
        print("\n".join(f"  {line}" for line in verdict.problems), file=sys.stderr)
        return 1
    print(f"the {args.setup} reference fingerprint holds: {verdict.note} "
          f"({time.perf_counter() - started:.0f} s)")
    return 0


def _run_reproduce(args: Any) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.write and not args.fingerprint:
        print("error: --write: only with --fingerprint", file=sys.stderr)
        return 2
    if args.fingerprint:
        return _run_fingerprint(args)
    if args.setup == "digits-lora":
        from validation.experiments.reproduce.lora_digits import DIGITS_LORA, FULL_LORA, QUICK_LORA

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
    parser.add_argument(
        "--fingerprint", action="store_true",
        help="rerun a few-second deterministic slice of the setup and compare it with the "
        "reference fingerprint (validation/experiments/reference/SETUP/fingerprint.json)",
    )
    parser.add_argument(
        "--write", action="store_true",
        help="with --fingerprint: write the fingerprint for the reference tables (refused when "
        "its numbers moved but the tables were not regenerated)",
    )
    parser.add_argument(
        "--reference", help="with --fingerprint: the reference directory (default: the "
        "committed validation/experiments/reference/SETUP)",
    )
    parser.set_defaults(func=_run_reproduce)
