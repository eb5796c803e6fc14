r"""Fingerprints of the reference reproductions: numbers that cannot drift silently.

A reference directory (``validation/experiments/reference/SETUP``) holds the tables of a full
reproduction (``results.md``, ``summary.json``, the figures), which take ten minutes or more to
regenerate. Beside them, ``fingerprint.json`` holds the numbers of a short deterministic
*slice* of the same reproduction, computed by the same code, which CI reruns in seconds
(``python -m validation.experiments reproduce --setup SETUP --fingerprint``):

* **training**: the reference plan cut to 2 epochs of a few batches (``data.max_train_samples``
  below), seed 0, every optimiser at the learning rate the reference tables selected (read
  from ``summary.json``); per optimiser the loss of every step, the validation loss after each
  epoch and the test loss of the best-validation checkpoint. For digits the baselines' step
  schedule drops at epoch 1, so it is exercised too;
* **evaluation**: the evaluation framework on the baseline's slice run (the reference's
  protocol, batch size and methods), one batch at its first and last checkpoint: every gamma
  ratio, both imbalance statistics and the rows kept; and the damping sweep on that batch at
  :data:`SWEEP_DAMPINGS`.

Tolerance (:data:`RTOL`): a value passes when ``|now - stored| <= RTOL |stored| + ATOL``.
Training runs in float32, the evaluation in float64 on the float32-trained weights, and BLAS
and torch split their sums by thread count and CPU instruction set, so the same code gives
slightly different numbers on another machine or thread count. Measured on the slices
(``tests/experiments/reproduce/test_fingerprint.py``): OMP/OpenBLAS threads 1 against 2 leave
the training bitwise equal and move the evaluation by < 1e-13; relative noise of float32's
unit roundoff in every per-sample logit gradient (another kernel's summation order) moves
values by up to 2e-5 (iEF's losses: its Gram solve at damping 1e-7 amplifies most). A change
of convention moves them by far more: EF's damping read in the sum convention by 2.3e-3 (the
smallest seen), iEF's by 0.5, SF's damping or its rows' R scaling by 0.07 to 1.3. RTOL = 1e-3
lies between: 50 times the rounding, below every convention change.

What it cannot do: a change of rounding alone (another CPU, or code that reorders a float32
sum) passes, yet over the full reproduction's 170 to 340 steps the chaotic runs (EF and SF at
lr 1) amplify it into differences as large as their spread over seeds. The check therefore
also reports how many values are bitwise equal to the stored ones (:class:`Verdict`), so such a
change is visible in the CI log without failing it.

Binding to the tables: ``fingerprint.json`` stores the SHA-256 of the reference
``summary.json`` and the commit that summary names (``"code"``, written by the driver), and
the check fails when the tables were regenerated but the fingerprint was not. ``--write``
refuses to store changed numbers for tables that were not regenerated: a change of numbers
means regenerating the tables (module :mod:`validation.experiments.reproduce.driver`), writing
the fingerprint for them, and a CHANGELOG entry that says what moved the numbers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from validation.experiments.io import atomic_write_text
from validation.experiments.reproduce.lora_digits import DIGITS_LORA, FULL_LORA
from validation.experiments.reproduce.origin import code_origin, machine
from validation.experiments.reproduce.plan import (
    DIGITS,
    FULL,
    Experiment,
    Plan,
    ReproduceError,
    run_dir,
)
from validation.experiments.reproduce.tasks import evaluate_task, sweep_task, train_task

__all__ = [
    "ATOL",
    "REFERENCE",
    "RTOL",
    "SETUPS",
    "SWEEP_DAMPINGS",
    "Verdict",
    "check_fingerprint",
    "compare",
    "compute",
    "slice_plan",
    "write_fingerprint",
]

#: the committed reference directories, one per setup
REFERENCE = Path(__file__).resolve().parents[1] / "reference"
FILE = "fingerprint.json"
#: relative tolerance of every value (module docstring: rounding moves values by up to 2e-5,
#: a change of convention by 2.3e-3 or more)
RTOL = 1e-3
#: absolute floor, for values that are zero (a rows-kept difference is at least 1)
ATOL = 1e-12
#: the slice's damping sweep, in the protocol's convention: near-undamped, the paper's value
#: and two where the damping dominates the curvature's small directions
SWEEP_DAMPINGS = (1e-12, 1e-7, 1e-3, 1e-1)
_WHY = (
    "float32 training, float64 evaluation, rounding by thread count and CPU: threads 1 vs 2 "
    "move values by < 1e-13, unit-roundoff noise in the logit gradients by up to 2e-5; a change "
    "of convention by 2.3e-3 (EF's damping in the sum convention) to 1.3 (module docstring)"
)


@dataclasses.dataclass(frozen=True)
class _Setup:
    experiment: Experiment
    plan: Plan
    #: training rows of the slice (2 epochs of max_train_samples / batch_size steps); at
    #: least the evaluation batch (160) so the evaluation can draw it
    max_train_samples: int


SETUPS: dict[str, _Setup] = {
    "digits": _Setup(DIGITS, FULL, 192),
    "digits-lora": _Setup(DIGITS_LORA, FULL_LORA, 160),
}


def _setup(setup: str) -> _Setup:
    if setup not in SETUPS:
        raise ReproduceError(f"setup: expected one of {sorted(SETUPS)}, got {setup!r}")
    return SETUPS[setup]


def slice_plan(setup: str, lrs: Mapping[str, float]) -> Plan:
    """The reference plan of ``setup`` cut to the fingerprint's slice (module docstring):
    2 epochs, seed 0, the learning rates ``lrs`` (optimiser -> lr), one evaluation batch."""
    spec = _setup(setup)
    plan = spec.plan
    return dataclasses.replace(
        plan,
        name=f"{plan.name}-fingerprint",
        epochs=2,
        step_epoch=min(plan.step_epoch, 1),
        lr_grid={opt: (float(lrs[opt]),) for opt in spec.experiment.optimizers},
        seeds=(0,),
        max_train_samples=spec.max_train_samples,
        eval_batches=1,
        sweep_batches=1,
        sweep_dampings=SWEEP_DAMPINGS,
    )


def selected_lrs(summary: Mapping[str, Any]) -> dict[str, float]:
    """The learning rate each optimiser's reference table selected."""
    return {opt: float(row["lr"]) for opt, row in summary["summary"].items()}


# ---- computing the slice ------------------------------------------------------------------------
def _training_values(opt: str, run: Path) -> dict[str, float]:
    """Per step the training loss, per epoch the validation loss, and the test loss."""
    from validation.experiments.train.checkpoints import read_metrics

    values: dict[str, float] = {}
    for record in read_metrics(run):
        if record["kind"] == "train":
            values[f"train/{opt}/step{record['step']}/loss"] = float(record["loss"])
        elif record["kind"] == "validation":
            values[f"train/{opt}/epoch{round(record['epoch'])}/validation_loss"] = float(
                record["loss"]
            )
    result = json.loads((run / "results.json").read_text(encoding="utf-8"))
    values[f"train/{opt}/test_loss"] = float(result["test"]["loss"])
    return values


def _evaluation_values(run: Path) -> dict[str, float]:
    """Per checkpoint every gamma ratio, both imbalance statistics, the rows kept, and the
    sweep's ratios at each damping."""
    values: dict[str, float] = {}
    evaluation = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    for ckpt in evaluation["checkpoints"]:
        at = f"evaluate/{ckpt['name']}"
        for name, entry in ckpt["ratios"].items():
            values[f"{at}/{name}"] = float(entry["mean"])
        for name, entry in ckpt["imbalance"].items():
            values[f"{at}/imbalance_{name}"] = float(entry["mean"])
        values[f"{at}/rows_kept"] = float(ckpt["rows_kept"]["mean"])
    sweep = json.loads((run / "sweep.json").read_text(encoding="utf-8"))
    for ckpt in sweep["checkpoints"]:
        for name, entry in ckpt["ratios"].items():
            for damping, mean in zip(ckpt["dampings"], entry["mean"], strict=True):
                values[f"sweep/{ckpt['name']}/{name}/{damping:g}"] = float(mean)
    return values


def compute(
    setup: str,
    lrs: Mapping[str, float],
    *,
    optimizers: Iterable[str] | None = None,
    evaluation: bool = True,
    workdir: str | os.PathLike[str] | None = None,
) -> dict[str, float]:
    """The slice's numbers (module docstring), by name.

    Parameters
    ----------
    setup : {"digits", "digits-lora"}
    lrs : mapping of str to float
        The learning rate of each optimiser (the reference tables' selection).
    optimizers : iterable of str, optional
        Train only these (default: all of the setup's); the evaluation needs the baseline.
    evaluation : bool
        Also run the evaluation framework and the sweep on the baseline's slice run.
    workdir : path, optional
        Where the slice's runs go (default: a temporary directory, removed afterwards).

    Returns
    -------
    dict of str to float
        E.g. ``"train/sf/step3/loss"``, ``"evaluate/epoch-2/sf/ief"``,
        ``"sweep/epoch-0/ief/sgd/1e-07"``.
    """
    spec = _setup(setup)
    experiment = spec.experiment
    chosen = list(experiment.optimizers if optimizers is None else optimizers)
    if evaluation and experiment.baseline not in chosen:
        chosen.append(experiment.baseline)
    plan = slice_plan(setup, lrs)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="ngdref-fingerprint-") as tmp:
            return compute(setup, lrs, optimizers=chosen, evaluation=evaluation, workdir=tmp)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    if experiment.prepare is not None:
        experiment.prepare(out, plan)
    values: dict[str, float] = {}
    for opt in chosen:
        lr = plan.lr_grid[opt][0]
        run = run_dir(out, opt, lr, 0)
        train_task(experiment.run_config(plan, opt, lr, 0, out), str(run))
        values.update(_training_values(opt, run))
    if evaluation:
        values.update(_evaluate(plan, run_dir(out, experiment.baseline,
                                              plan.lr_grid[experiment.baseline][0], 0)))
    return dict(sorted(values.items()))


def _evaluate(plan: Plan, run: Path) -> dict[str, float]:
    from validation.experiments.evaluate.settings import METHODS

    common = {"batch_size": plan.eval_batch_size, "protocol": plan.eval_protocol, "batches": 1}
    evaluate_task(str(run), {**common, "checkpoints": "first,last", "methods": list(METHODS)})
    sweep_task(str(run), {**common, "dampings": list(plan.sweep_dampings),
                          "checkpoints": "first,last"})
    return _evaluation_values(run)


# ---- comparing, checking, writing ---------------------------------------------------------------
def compare(
    now: Mapping[str, float], stored: Mapping[str, float], *, rtol: float = RTOL,
    atol: float = ATOL,
) -> list[str]:
    """One line per value that moved past ``rtol |stored| + atol`` (or appeared, vanished, or
    became non-finite where it was finite); empty when the two agree."""
    lines = [f"{k}: in the fingerprint, not computed now" for k in sorted(set(stored) - set(now))]
    lines += [f"{k}: computed now, not in the fingerprint" for k in sorted(set(now) - set(stored))]
    for key in sorted(set(now) & set(stored)):
        a, b = float(now[key]), float(stored[key])
        if math.isfinite(a) and math.isfinite(b):
            if abs(a - b) <= rtol * abs(b) + atol:
                continue
            rel = abs(a - b) / abs(b) if b else math.inf
            lines.append(f"{key}: fingerprint {b:.9g}, now {a:.9g} (relative {rel:.2g})")
        elif not (a == b or (math.isnan(a) and math.isnan(b))):
            lines.append(f"{key}: fingerprint {b!r}, now {a!r}")
    return lines


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReproduceError(f"reference: {str(path)!r} does not exist")
    return json.loads(path.read_text(encoding="utf-8"))


def _how_to(setup: str) -> str:
    return (
        "If the change is deliberate: regenerate the tables (python -m validation.experiments "
        f"reproduce --setup {setup} --out results/{setup}), copy its results.md, summary.json "
        f"and figures into validation/experiments/reference/{setup}/, write the fingerprint for "
        f"them (python -m validation.experiments reproduce --setup {setup} --fingerprint "
        "--write), and add a CHANGELOG entry saying which change moved the numbers."
    )


def _binding_problems(setup: str, stored: Mapping[str, Any], summary_path: Path) -> list[str]:
    """Whether ``stored`` belongs to the tables in ``summary_path`` (hash and commit)."""
    bound = stored.get("reference", {})
    if bound.get("summary_sha256") == _sha256(summary_path):
        return []
    commit = _read(summary_path).get("code", {}).get("commit")
    return [
        f"{summary_path} (regenerated at commit {commit}) is not the summary this fingerprint "
        f"was written for (commit {bound.get('commit')}): the tables were regenerated without "
        f"their fingerprint, or edited. Write it: python -m validation.experiments reproduce "
        f"--setup {setup} --fingerprint --write"
    ]


class Verdict(NamedTuple):
    """What :func:`check_fingerprint` found."""

    #: why the fingerprint does not hold (empty when it does)
    problems: list[str]
    #: how many values are bitwise equal to the stored ones, and the largest relative change of
    #: the others: a change of rounding (another machine, or code that reorders a sum) moves
    #: values without failing the check, and stays visible here
    note: str


def _rounding_note(now: Mapping[str, float], stored: Mapping[str, float]) -> str:
    common = sorted(set(now) & set(stored))
    changed = [abs(now[k] - stored[k]) / abs(stored[k]) for k in common
               if now[k] != stored[k] and stored[k] and math.isfinite(now[k] - stored[k])]
    note = f"{len(common) - len(changed)} of {len(common)} values bitwise equal"
    return note + (f", the others within {max(changed):.1g} relative" if changed else "")


def check_fingerprint(setup: str, reference: str | os.PathLike[str] | None = None) -> Verdict:
    """Check ``reference/fingerprint.json`` (default: the committed reference of ``setup``):
    the fingerprint of the tables there, and the slice recomputed within its tolerance."""
    folder = Path(reference) if reference is not None else REFERENCE / setup
    summary_path = folder / "summary.json"
    stored = _read(folder / FILE)
    problems = _binding_problems(setup, stored, summary_path)
    tol = stored["tolerance"]
    now = compute(setup, selected_lrs(_read(summary_path)))
    moved = compare(now, stored["values"], rtol=tol["rtol"], atol=tol["atol"])
    if moved:
        problems += [f"{len(moved)} numbers of the {setup} slice moved past the tolerance "
                     f"(rtol {tol['rtol']:g}) since the tables were regenerated:", *moved,
                     _how_to(setup)]
    return Verdict(problems, _rounding_note(now, stored["values"]))


def write_fingerprint(setup: str, reference: str | os.PathLike[str] | None = None) -> Path:
    """Compute the slice and write ``reference/fingerprint.json`` for the tables there.

    Raises
    ------
    ReproduceError
        The stored fingerprint belongs to the same ``summary.json`` (the tables were not
        regenerated) and numbers moved past the tolerance: regenerate the tables first.
    """
    folder = Path(reference) if reference is not None else REFERENCE / setup
    summary_path = folder / "summary.json"
    summary = _read(summary_path)
    values = compute(setup, selected_lrs(summary))
    path = folder / FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not _binding_problems(setup, stored, summary_path):
            common = set(values) & set(stored["values"])
            moved = compare({k: values[k] for k in common},
                            {k: stored["values"][k] for k in common})
            if moved:
                raise ReproduceError("\n".join([
                    f"the {setup} slice's numbers moved but {summary_path} was not regenerated; "
                    "refusing to hide the change:", *moved, _how_to(setup),
                ]))
    code = summary.get("code", {})
    document = {
        "setup": setup,
        "about": f"{__name__}: the numbers of a short slice of the {setup} reproduction. "
        + _how_to(setup),
        "reference": {"summary_sha256": _sha256(summary_path), "commit": code.get("commit"),
                      "date": code.get("date")},
        "computed": {**code_origin(), "machine": machine()},
        "tolerance": {"rtol": RTOL, "atol": ATOL, "why": _WHY},
        "values": values,
    }
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    return path
