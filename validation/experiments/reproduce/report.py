"""The reproductions' numbers and report: reading runs, choosing learning rates, the paper's
claims checked, and ``results.md`` (used by :mod:`validation.experiments.reproduce.driver`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from validation.experiments.evaluate.kfac import kfac_claim
from validation.experiments.io import read_jsonl

__all__ = [
    "PAPER_ORDER",
    "Claim",
    "claims",
    "compact_results",
    "compare_ranking",
    "ef_worse_flags",
    "final_training_loss",
    "gamma_order_flags",
    "ief_robust_flags",
    "imbalance_mean",
    "rank",
    "rankings",
    "run_summary",
    "seed_stats",
    "select_lr",
]

#: the paper's MLP + CIFAR-10 test accuracy order (58.6, 56.6, 55.2, 54.4, 29.2)
PAPER_ORDER = ("ief", "adam", "sf", "sgd", "ef")
NAMES = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "ief": "iEF", "ef": "EF", "sf": "SF"}
_IMBALANCE_LABELS = {"max_min": "max / min", "tail_10": "mean of top 10% / bottom 10%"}


# ---- reading runs -------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """A run's ``metrics.jsonl`` (empty if absent); a damaged line names the file and line."""
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


def run_summary(directory: Path, epochs: int) -> dict[str, Any]:
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


def rankings(summary: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
    """The optimisers by final training loss (lower first) and by test accuracy (higher first)."""
    return {
        "final_training_loss": rank(
            {m: v["final_training_loss"] for m, v in summary.items()}, higher_is_better=False),
        "test_accuracy": rank(
            {m: v["test_accuracy"] for m, v in summary.items()}, higher_is_better=True),
    }


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
    show = " > ".join(NAMES.get(m, m) for m in seen)
    want = " > ".join(NAMES.get(m, m) for m in common)
    if held:
        statement = f"{what}: held. Observed {show}, the paper's order."
    else:
        first = "yes" if seen and seen[0] == common[0] else "no"
        last = "yes" if seen and seen[-1] == common[-1] else "no"
        statement = (
            f"{what}: did not hold exactly. Observed {show}; paper {want}; "
            f"{concordant} of {len(pairs)} pairs in the paper's order; "
            f"{NAMES.get(common[0], common[0])} best: {first}; "
            f"{NAMES.get(common[-1], common[-1])} worst: {last}."
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
    order = " > ".join(NAMES.get(m, m) for m in paper_order)
    ranked = rankings(summary)
    out = [
        compare_ranking(
            ranked["final_training_loss"], paper_order,
            what=f"final training loss ranking (lower is better) vs {order}",
        ),
        compare_ranking(
            ranked["test_accuracy"], paper_order, what=f"test accuracy ranking vs {order}",
        ),
    ]
    if evaluation is None:
        out.append(Claim("gamma", None, "gamma claims: not checked (no evaluation.json)."))
    else:
        out += _evaluation_claims(evaluation)
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


def _evaluation_claims(evaluation: Mapping[str, Any]) -> list[Claim]:
    """The gamma order, EF vs SGD, the K-FAC family and the imbalance's growth."""
    out = [
        _majority("gamma order", gamma_order_flags(evaluation),
                  "iEF < SF < EF in gamma (gamma_SF/gamma_iEF > 1 and gamma_SF/gamma_EF < 1)"),
        _majority("EF worse than SGD", ef_worse_flags(evaluation),
                  "EF worse than SGD (gamma_EF/gamma_SGD > 1)"),
    ]
    held, text = kfac_claim(evaluation)
    out.append(Claim(
        "K-FAC family", held,
        "ieKFAC ~ iEF, much better than KFAC and eKFAC (App. D.2.2): "
        f"{'not checked' if held is None else 'held' if held else 'did not hold'} ({text}).",
    ))
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
    return out


# ---- the report ------------------------------------------------------------------------------
def seed_stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof = 1; 0 for one value); inf if any value is inf."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    if np.any(np.isinf(arr)):
        return math.inf, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def compact_results(results: Mapping[str, Any]) -> dict[str, Any]:
    """``results.json`` without the per-seed runs and the per-batch values: the numbers the
    report states, small enough to keep beside it under ``validation/experiments/reference``."""

    def strip(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: strip(v) for k, v in obj.items() if k != "values"}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return {k: strip(v) for k, v in results.items() if k not in ("seeds", "evaluation_run")}
