r"""Figures of the paper's experiments: the toy problems, training curves, gamma ratios, sweeps.

Every plotting function takes paths (or nothing, for the toy problems), an output prefix
``out`` and an optional ``title``, and writes ``out.png`` and ``out.pdf`` (matplotlib's Agg
canvas, no pyplot state, no display needed); it returns the written paths.

================================  ============================================================
function                          what it shows
================================  ============================================================
:func:`plot_least_squares_toy`    least-squares toy: SGD, NGD (= iEF) and EF direction
                                  fields over a theta grid with trajectories from one start
:func:`plot_logistic_toy`         logistic toy: SGD, NGD, iEF (= GN) and EF
:func:`plot_training_curves`      training loss (and validation accuracy) per optimiser from
                                  runs' ``metrics.jsonl``: mean over seeds, band = min..max
:func:`plot_gamma_ratios`         gamma ratios over the checkpoints of ``evaluation.json``,
                                  error bars = std over the batches; the imbalance
:func:`plot_damping_sweep`        the ratios of ``sweep.json`` against lambda (log x), one
                                  panel per checkpoint, band = +-std over the batches
================================  ============================================================

The toy fields are computed with :mod:`ngdref` (:func:`ngdref.ef_update`,
:func:`ngdref.ief_update`, :func:`ngdref.ngd_update`, undamped, sum convention) on the
closed-form providers of :mod:`backends.arrays.analytic`; :func:`least_squares_toy_updates` and
:func:`logistic_toy_updates` return the raw vectors so that they can be checked against the
closed forms (:func:`backends.arrays.analytic.least_squares_toy_closed_form`).

Command line::

    python -m validation.experiments figures --toy --out results/figures
    python -m validation.experiments figures --runs results/digits/runs/*/lr*/seed* \
        --evaluation RUN/evaluation.json --sweep RUN/sweep.json --out results/figures
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from validation.experiments import io
from validation.experiments.figures.style import (
    _RATIO_COLORS,
    OPTIMIZER_COLORS,
    RATIO_LABELS,
    PathLike,
    _figure,
    _name,
    _save,
)
from validation.experiments.figures.toy import (
    field,
    least_squares_toy_updates,
    logistic_toy_updates,
    plot_least_squares_toy,
    plot_logistic_toy,
    toy_trajectory,
)

__all__ = [
    "OPTIMIZER_COLORS",
    "RATIO_LABELS",
    "FiguresError",
    "field",
    "group_runs",
    "least_squares_toy_updates",
    "logistic_toy_updates",
    "plot_damping_sweep",
    "plot_gamma_ratios",
    "plot_least_squares_toy",
    "plot_logistic_toy",
    "plot_training_curves",
    "read_json",
    "register_figures",
    "toy_trajectory",
]

# ---- training curves --------------------------------------------------------------------------
class FiguresError(ValueError):
    """An input file of the figures cannot be read; the message names the file and line."""


def group_runs(
    runs: Mapping[str, Sequence[PathLike]] | Sequence[PathLike],
) -> dict[str, list[Path]]:
    """Run directories grouped by label.

    Parameters
    ----------
    runs : mapping or sequence
        ``{label: [run_dir, ...]}`` is returned as is; a plain sequence of run directories is
        grouped by the ``optimizer`` of each run's ``config.json`` (the seeds of one optimiser).

    Raises
    ------
    FileNotFoundError
        A run directory of a plain sequence without ``config.json``.
    """
    if isinstance(runs, Mapping):
        return {str(k): [Path(p) for p in v] for k, v in runs.items()}
    groups: dict[str, list[Path]] = {}
    for run in runs:
        path = Path(run) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"runs: {str(path)!r} does not exist (no optimizer to group by)"
            )
        config = json.loads(path.read_text(encoding="utf-8"))
        groups.setdefault(str(config["optimizer"]), []).append(Path(run))
    return groups


def _epoch_curve(records: Sequence[Mapping[str, Any]], key: str) -> dict[int, float]:
    """Per-epoch mean of ``key`` over train records (epoch k holds steps in (k-1, k])."""
    sums: dict[int, list[float]] = {}
    for r in records:
        value = r.get(key)
        if value is None:
            continue
        epoch = max(1, math.ceil(float(r["epoch"]) - 1e-9))
        sums.setdefault(epoch, []).append(float(value))
    return {k: float(np.mean(v)) for k, v in sorted(sums.items())}


def _band(curves: Sequence[Mapping[int, float]]) -> tuple[np.ndarray, ...]:
    """x, mean, min, max over the curves that reach each x (a diverged seed stops early)."""
    xs = sorted({x for c in curves for x in c})
    mean, lo, hi = [], [], []
    for x in xs:
        vals = np.array([c[x] for c in curves if x in c and math.isfinite(c[x])])
        mean.append(vals.mean() if vals.size else np.nan)
        lo.append(vals.min() if vals.size else np.nan)
        hi.append(vals.max() if vals.size else np.nan)
    return np.asarray(xs, float), np.asarray(mean), np.asarray(lo), np.asarray(hi)


def plot_training_curves(
    runs: Mapping[str, Sequence[PathLike]] | Sequence[PathLike],
    out: PathLike,
    *,
    title: str | None = None,
) -> list[Path]:
    """Training loss (log scale) and validation accuracy per epoch, per optimiser.

    The training loss of epoch k is the mean of the logged batch losses of its steps (the
    batch's mean loss before each update); validation accuracy is the runner's end-of-epoch
    validation. Lines are the mean over a group's runs (seeds), the band spans their min..max;
    a diverged run's curve ends where it diverged and an x marks it.

    Parameters
    ----------
    runs : mapping or sequence
        See :func:`group_runs`.
    """
    groups = group_runs(runs)
    fig, axes = _figure(2, width=4.6, height=3.5)
    ax_loss, ax_acc = axes[0]
    first_epoch: list[float] = []
    for label, dirs in groups.items():
        color = OPTIMIZER_COLORS.get(label, None)
        losses, accs, ends = [], [], []
        for run in dirs:
            records = io.read_jsonl(Path(run) / "metrics.jsonl")
            train = [r for r in records if r.get("kind") == "train"]
            losses.append(_epoch_curve(train, "loss"))
            val = [r for r in records if r.get("kind") == "validation"]
            accs.append(
                {max(0, round(float(r["epoch"]))): float(r["accuracy"]) for r in val
                 if "accuracy" in r}
            )
            if any(r.get("kind") == "diverged" for r in records) and train:
                ends.append((float(train[-1]["epoch"]), float(train[-1]["loss"])))
        x, mean, lo, hi = _band(losses)
        first_epoch += [float(m) for m in mean[:1] if math.isfinite(m)]
        (line,) = ax_loss.plot(x, mean, "-", color=color, label=f"{_name(label)} (n={len(dirs)})")
        ax_loss.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        for ex, ey in ends:
            if math.isfinite(ey) and ey > 0:
                ax_loss.plot(ex, ey, "x", color=line.get_color())
        x, mean, lo, hi = _band(accs)
        ax_acc.plot(x, mean, "-", color=line.get_color(), label=_name(label))
        ax_acc.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax_loss.set_yscale("log")
    if first_epoch:
        # a diverged run's astronomic losses would flatten every other curve
        low, high = ax_loss.get_ylim()
        ax_loss.set_ylim(low, min(high, 10.0 * float(np.median(first_epoch))))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (epoch mean of batch losses)")
    ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy")
    return _save(fig, out, title)


# ---- the evaluation framework -----------------------------------------------------------------
def read_json(path: PathLike, keys: Sequence[str] = ("settings", "checkpoints")) -> dict:
    """An ``evaluation.json`` / ``sweep.json`` with its top-level ``keys`` checked.

    Raises
    ------
    FiguresError
        Not JSON (e.g. truncated: names the file, line and column), or a key is missing.
    FileNotFoundError
        No such file.
    """
    wanted = "an evaluation.json or sweep.json (written by the evaluate / sweep commands)"
    if Path(path).is_dir():
        raise FiguresError(f"{os.fspath(path)!r} is a directory; give {wanted} in it")
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if _is_json_lines(text):
            raise FiguresError(
                f"{os.fspath(path)!r} holds one JSON record per line (JSON Lines, such as a "
                f"run's metrics.jsonl), not {wanted}: give RUN_DIR/evaluation.json, or plot a "
                "run's training curves with --runs RUN_DIR"
            ) from None
        raise FiguresError(
            f"{os.fspath(path)}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
            "the file is damaged or truncated: rerun the command that wrote it"
        ) from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise FiguresError(f"{os.fspath(path)}: missing {missing}; it is not {wanted}")
    return data


def _is_json_lines(text: str) -> bool:
    """Whether every non-blank line of ``text`` (two or more) is a JSON object."""
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) < 2:
        return False
    try:
        return all(isinstance(json.loads(line), dict) for line in lines)
    except json.JSONDecodeError:
        return False


def _imbalance_series(checkpoints: Sequence[Mapping[str, Any]]) -> dict[str, tuple]:
    """statistic -> (mean, std) arrays; older files hold one max/min summary."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    entries = [c.get("imbalance") for c in checkpoints]
    if not entries or any(e is None for e in entries):
        return out
    if all("mean" in e for e in entries):
        entries = [{"max_min": e} for e in entries]
    for stat in entries[0]:
        out[stat] = (
            np.array([e[stat]["mean"] for e in entries], dtype=float),
            np.array([e[stat]["std"] for e in entries], dtype=float),
        )
    return out


def _log_yerr(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(2, n) error bars for a log axis: +std above, below clipped to stay above mean / 20."""
    return np.vstack([np.minimum(std, 0.95 * np.abs(mean)), std])


def plot_gamma_ratios(
    evaluation: PathLike, out: PathLike, *, title: str | None = None
) -> list[Path]:
    """gamma ratios over a run's checkpoints (``evaluation.json``), and the imbalance.

    Left: the mean over the batches of gamma_EF/gamma_SGD, gamma_iEF/gamma_SGD,
    gamma_SF/gamma_iEF and gamma_SF/gamma_EF against the checkpoint's epoch, error bars = the
    std over the batches (below the mean clipped at mean / 20 where std >= mean, which a log
    axis cannot show), log scale, 1 marked (below 1: the numerator is better). Right: the
    gradient-norm imbalance max_n ||grad l_n|| / min_n ||grad l_n||.

    Parameters
    ----------
    evaluation : path
        An ``evaluation.json`` of :func:`validation.experiments.evaluate.framework.evaluate_run`.
    """
    data = read_json(evaluation)
    checkpoints = data["checkpoints"]
    x = np.array([float(c["epoch"]) for c in checkpoints])
    fig, axes = _figure(2, width=4.6, height=3.5)
    ax, ax_imb = axes[0]
    names = [k for k in RATIO_LABELS if any(k in c.get("ratios", {}) for c in checkpoints)]
    for k, name in enumerate(names):
        mean = np.array([c["ratios"].get(name, {}).get("mean", np.nan) for c in checkpoints])
        std = np.array([c["ratios"].get(name, {}).get("std", np.nan) for c in checkpoints])
        shift = (k - (len(names) - 1) / 2) * 0.06 * (np.ptp(x) / max(len(x) - 1, 1) or 1.0)
        ax.errorbar(
            x + shift, mean, yerr=_log_yerr(mean, std), fmt="o-", ms=3.5, capsize=2.5,
            color=_RATIO_COLORS.get(name), label=RATIO_LABELS[name],
        )
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("checkpoint (epoch)")
    ax.set_ylabel("gamma ratio (mean +- std over batches)")
    ax.legend(fontsize=8)
    styles = {"max_min": ("k", "max / min"), "tail_10": ("tab:gray", "top 10% / bottom 10%")}
    for stat, (imb_mean, imb_std) in _imbalance_series(checkpoints).items():
        color, label = styles.get(stat, (None, stat))
        ax_imb.errorbar(
            x, imb_mean, yerr=_log_yerr(imb_mean, imb_std), fmt="o-", ms=3.5, capsize=2.5,
            color=color, label=label,
        )
        ax_imb.set_yscale("log")
        ax_imb.legend(fontsize=8)
    ax_imb.set_xlabel("checkpoint (epoch)")
    ax_imb.set_ylabel(r"gradient-norm imbalance of $\|\nabla l_n\|$")
    return _save(fig, out, title)


def plot_damping_sweep(sweep: PathLike, out: PathLike, *, title: str | None = None) -> list[Path]:
    """The gamma ratios of ``sweep.json`` against the damping, one panel per checkpoint.

    Log x (lambda; non-positive values are left out) and log y; lines are the mean over the
    batches, bands +-std (clipped to positive values); 1 is marked.

    Parameters
    ----------
    sweep : path
        A ``sweep.json`` of :func:`validation.experiments.evaluate.framework.sweep_run`.
    """
    data = read_json(sweep)
    checkpoints = data["checkpoints"]
    fig, axes = _figure(max(1, len(checkpoints)), width=3.8, height=3.4)
    for ax, ckpt in zip(axes[0], checkpoints, strict=False):
        lam = np.asarray(ckpt["dampings"], dtype=float)
        keep = lam > 0
        for name, label in RATIO_LABELS.items():
            if name not in ckpt["ratios"]:
                continue
            mean = np.asarray(ckpt["ratios"][name]["mean"], dtype=float)[keep]
            std = np.asarray(ckpt["ratios"][name]["std"], dtype=float)[keep]
            color = _RATIO_COLORS.get(name)
            ax.plot(lam[keep], mean, "o-", ms=3, color=color, label=label)
            low = np.where(mean - std > 0, mean - std, mean * 0.5)
            ax.fill_between(lam[keep], low, mean + std, color=color, alpha=0.15, lw=0)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(r"damping $\lambda$")
        ax.set_title(f"{ckpt['name']} (epoch {ckpt.get('epoch', '?')})", fontsize=9)
    axes[0][0].set_ylabel("gamma ratio (mean +- std over batches)")
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, title)


# ---- command line -----------------------------------------------------------------------------
def _run_figures(args: Any) -> int:
    try:
        return _write_figures(args)
    except (FiguresError, io.JsonlError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _write_figures(args: Any) -> int:
    out = Path(args.out)
    written: list[Path] = []
    if args.toy:
        written += plot_least_squares_toy(out / "toy_least_squares")
        written += plot_logistic_toy(out / "toy_logistic")
    if args.runs:
        written += plot_training_curves(args.runs, out / "training_curves")
    if args.evaluation:
        written += plot_gamma_ratios(args.evaluation, out / "gamma_ratios")
    if args.sweep:
        written += plot_damping_sweep(args.sweep, out / "damping_sweep")
    if not written:
        print("error: nothing to plot; give --toy, --runs, --evaluation or --sweep",
              file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def register_figures(subparsers: Any) -> None:
    """``figures``: plot the toy problems, training curves, gamma ratios and damping sweeps."""
    parser = subparsers.add_parser(
        "figures", help="plot toy problems, training curves, gamma ratios, damping sweeps"
    )
    parser.add_argument("--out", default="figures", help="output directory (default figures)")
    parser.add_argument("--toy", action="store_true", help="the paper's two toy problems (App. B)")
    parser.add_argument(
        "--runs", nargs="+", metavar="RUN_DIR",
        help="run directories; grouped by optimiser, mean over seeds",
    )
    parser.add_argument("--evaluation", metavar="FILE", help="an evaluation.json")
    parser.add_argument("--sweep", metavar="FILE", help="a sweep.json")
    parser.set_defaults(func=_run_figures)
