"""``results.md`` of the reproduction: the tables of its results.

The results are those of :func:`~validation.experiments.reproduce.driver.reproduce`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from validation.experiments.reproduce.report import (
    NAMES,
    ef_worse_flags,
    gamma_order_flags,
    imbalance_mean,
)

if TYPE_CHECKING:
    from validation.experiments.reproduce.plan import Experiment


def _pm(mean: float, std: float, fmt: str) -> str:
    if not math.isfinite(mean):
        return "diverged" if mean == math.inf else "n/a"
    return f"{format(mean, fmt)} ± {format(std, fmt)}"


def _close_pairs(summary: Mapping[str, Mapping[str, float]], key: str, order: list[str]) -> str:
    """Neighbours of ``order`` whose ``key`` means differ by less than the larger std."""
    close = []
    for a, b in itertools.pairwise(order):
        ma, mb = summary[a][key], summary[b][key]
        spread = max(summary[a][f"{key}_std"], summary[b][f"{key}_std"])
        if math.isfinite(ma) and math.isfinite(mb) and abs(ma - mb) < spread:
            close.append(f"{NAMES.get(a, a)}/{NAMES.get(b, b)}")
    return ", ".join(close) if close else "none"


def _gamma_cell(c: Mapping[str, Any], name: str) -> str:
    r = c.get("ratios", {}).get(name)
    if not r:
        return "–"
    return f"{r['mean']:.3f} ± {r['std']:.3f}"


def _md_origin(results: Mapping[str, Any]) -> list[str]:
    """The code's commit and the machine (absent from results written before they were kept)."""
    code, host = results.get("code"), results.get("machine")
    if not code or not host:
        return []
    commit = code["commit"] or "unknown"
    dirty = " with uncommitted changes" if code["dirty"] else ""
    return [
        f"Code: commit `{commit}`{dirty}, run {code['date']}. Machine: {host['cpu']} "
        f"({host['cores']} logical cores), {host['platform']}, Python {host['python']}, torch "
        f"{host['torch']}, NumPy {host['numpy']}.",
        "",
    ]


def _md_selection(results: Mapping[str, Any], experiment: Experiment) -> list[str]:
    """The title, the description, the wall time and the learning-rate selection table."""
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
        *_md_origin(results),
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
            f"| {NAMES[opt]} | {experiment.paper_lr[opt]:g} | {cells} | {sel['chosen']:g} |"
        )
    return lines


def _md_summary(results: Mapping[str, Any], experiment: Experiment) -> list[str]:
    """The final training loss / test accuracy table and the rankings."""
    lines = [
        "",
        "## Final training loss and test accuracy",
        "",
        "| optimiser | lr | final training loss | test accuracy (%) | diverged runs | "
        f"paper, {experiment.paper_score_label} |",
        "|---|---|---|---|---|---|",
    ]
    for opt, row in results["summary"].items():
        lines.append(
            f"| {NAMES[opt]} | {row['lr']:g} | "
            f"{_pm(row['final_training_loss'], row['final_training_loss_std'], '.3e')} | "
            f"{_pm(row['test_accuracy'] * 100, row['test_accuracy_std'] * 100, '.1f')} | "
            f"{row['diverged']} of {row['runs']} | {experiment.paper_score[opt]} |"
        )
    lines += [
        "",
        "Ranking by final training loss: "
        + " > ".join(NAMES[m] for m in results["ranking"]["final_training_loss"]),
        "",
        "Ranking by test accuracy: "
        + " > ".join(NAMES[m] for m in results["ranking"]["test_accuracy"]),
        "",
        f"Paper ({experiment.paper_score_label}): "
        + " > ".join(NAMES[m] for m in experiment.paper_order) + ".",
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
    return lines


def _md_evaluation(evaluation: Mapping[str, Any], experiment: Experiment) -> list[str]:
    """The gamma ratios over the checkpoints (and the K-FAC family's, when evaluated)."""
    s = evaluation["settings"]
    lines = [
        f"## gamma ratios over the {NAMES[experiment.baseline]} run's checkpoints "
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
    if any("iekfac/ief" in c["ratios"] for c in evaluation["checkpoints"]):
        lines += [
            "K-FAC family (App. D.2.2) against exact iEF, same batches, g and Fisher "
            "(figure `kfac_ratios`):",
            "",
            "| checkpoint | epoch | KFAC/iEF | eKFAC/iEF | ieKFAC/iEF |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['name']} | {c['epoch']} | {_gamma_cell(c, 'kfac/ief')} | "
            f"{_gamma_cell(c, 'ekfac/ief')} | {_gamma_cell(c, 'iekfac/ief')} |"
            for c in evaluation["checkpoints"]
        ]
        lines.append("")
    return lines


def _md_sweep(sweep: Mapping[str, Any]) -> list[str]:
    """The damping sweep: each ratio at the smallest, the best and the worst lambda."""
    lines = [
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
    return lines


def _md_claims_and_figures(results: Mapping[str, Any]) -> list[str]:
    lines = ["## The paper's claims", ""]
    for claim in results["claims"]:
        lines.append(f"- {claim['statement']}")
    lines += ["", "## Figures", ""]
    for path in results["figures"]:
        if path.endswith(".png"):
            lines.append(f"![{Path(path).stem}]({path})")
    lines += ["", "PDF versions next to the PNGs.", ""]
    return lines


def results_markdown(results: Mapping[str, Any], experiment: Experiment) -> str:
    """``results.md`` from the ``results.json`` content of
    :func:`~validation.experiments.reproduce.driver.reproduce`."""
    lines = _md_selection(results, experiment) + _md_summary(results, experiment)
    evaluation = results.get("evaluation")
    if evaluation:
        lines += _md_evaluation(evaluation, experiment)
    sweep = results.get("sweep")
    if sweep:
        lines += _md_sweep(sweep)
    lines += _md_claims_and_figures(results)
    return "\n".join(lines)
