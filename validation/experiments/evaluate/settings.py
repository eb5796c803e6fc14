"""Settings, checks, files and progress of the evaluation framework (:mod:`.framework`).

The defaults (methods, ratios, damping, batches), the checks of every argument of
:func:`~validation.experiments.evaluate.framework.evaluate_run` and
:func:`~validation.experiments.evaluate.framework.sweep_run` (each error names the argument), the
checkpoint names, and the resumable JSON files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

import ngdref
from validation.experiments.evaluate.kfac import KFAC_RATIOS
from validation.experiments.evaluate.protocols import (
    DAMPING_SCALES,
    PROTOCOLS,
    SF_DUPLICATES,
    EvaluationError,
)

if TYPE_CHECKING:
    import torch

    from validation.experiments.train.runner import CheckpointInfo, Setup

EVALUATION_FILE = "evaluation.json"
SWEEP_FILE = "sweep.json"
#: exact methods, then the K-FAC family (App. D.2.2, :mod:`validation.experiments.evaluate.kfac`)
METHODS = ("sgd", "ef", "ief", "sf", "kfac", "ekfac", "iekfac")
#: what ``evaluate`` scores by default: all of them. The K-FAC family cost 1.2x the exact
#: methods' time on a checkpoint of the digits MLP (4 batches of 160, authors' protocol,
#: median of 3, shared 2-core machine)
DEFAULT_METHODS = METHODS
#: ratio name -> (numerator method, denominator method)
RATIOS: dict[str, tuple[str, str]] = {
    "ef/sgd": ("ef", "sgd"),
    "ief/sgd": ("ief", "sgd"),
    "sf/ief": ("sf", "ief"),
    "sf/ef": ("sf", "ef"),
    **KFAC_RATIOS,
}
#: lambda per method in the mean convention (R = 1/M). iEF: near-undamped, as the authors'
#: evaluator; EF and SF: the paper's damping of its T5-LoRA / ViT EF and SF runs (App. H). EF
#: and SF need a task-specific value (:ref:`conv-evaluation`): check it with :func:`sweep_run`.
#: The K-FAC family (no value in the paper; an ngdref choice): KFAC and eKFAC as SF and EF,
#: ieKFAC as iEF; the inputs of a layer often span a subspace only, so the damping is what
#: inverts A there, but g has no component in that null space (g = sum b a^T).
DEFAULT_DAMPING: dict[str, float] = {
    "ef": 1e-7, "ief": 1e-12, "sf": 1e-7, "kfac": 1e-7, "ekfac": 1e-7, "iekfac": 1e-12,
}
#: the authors' protocol: one lambda for EF, iEF and SF (the paper's T5-LoRA / ViT value)
AUTHORS_DAMPING = 1e-7
#: batches per checkpoint by default. The paper uses 100; on a checkpoint of the default
#: digits MLP (P = 85k, float64, 2 shared CPU cores) one batch of 160 took 1.1-1.8 s, so
#: the paper's 100 take 2-3 minutes per checkpoint while 20 take 20-40 s (with a progress
#: bar). Pass ``batches=100`` (``--batches 100``) for the paper's number.
DEFAULT_BATCHES = 20
DEFAULT_SWEEP_BATCHES = 10
DTYPES = ("float64", "float32")
#: 1e-12, 1e-11, ..., 1e2
DEFAULT_SWEEP_DAMPINGS: tuple[float, ...] = tuple(float(f"1e{k}") for k in range(-12, 3))
#: settings that may differ between a run and its resumption
_RESUMABLE = ("checkpoints", "device")
#: settings added after files were written without them: their value in such a file
_ADDED_LATER = {"damping_scale": "absolute", "dedup_zero_rows": "drop"}
_WORDS = ("first", "middle", "last")


def positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EvaluationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def damping_value(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvaluationError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise EvaluationError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def resolve_damping(
    damping: float | Mapping[str, float] | None, protocol: str
) -> dict[str, float]:
    """A number for every damped method: one number for all, or a partial dict over defaults.

    The authors' protocol passes ONE lambda to every method: a dict with different values is
    refused there, and its default is ``AUTHORS_DAMPING`` for all three.
    """
    defaults = (
        dict.fromkeys(DEFAULT_DAMPING, AUTHORS_DAMPING) if protocol == "authors"
        else dict(DEFAULT_DAMPING)
    )
    if damping is None:
        return defaults
    if isinstance(damping, Mapping):
        unknown = sorted(set(damping) - set(DEFAULT_DAMPING))
        if unknown:
            raise EvaluationError(
                f"damping: unknown method(s) {unknown}; damped methods are "
                f"{sorted(DEFAULT_DAMPING)}"
            )
        out = dict(defaults)
        for method, value in damping.items():
            out[method] = damping_value(f"damping[{method!r}]", value)
        if protocol == "authors" and len(set(out.values())) > 1:
            raise EvaluationError(
                f"damping: the authors' protocol uses one lambda for all methods, got {out}; "
                "pass a single number"
            )
        return out
    value = damping_value("damping", damping)
    return dict.fromkeys(DEFAULT_DAMPING, value)


def resolve_methods(methods: Iterable[str] | str) -> tuple[str, ...]:
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    unknown = [m for m in items if m not in METHODS]
    if unknown or not items:
        raise EvaluationError(
            f"methods must be a non-empty subset of {METHODS}, got {list(items)!r}"
        )
    return tuple(m for m in METHODS if m in items)


def _check_dedup(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise EvaluationError(f"dedup_threshold must be None or in (0, 1], got {value!r}")
    return float(value)


def _check_reduction(reduction: Any) -> str | float:
    try:
        ngdref.reduction_factor(reduction, 1)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"reduction: {exc}") from None
    return reduction


def resolve_checkpoints(
    run_dir: str | os.PathLike[str],
    checkpoints: str | int | Sequence[str | int] | None = None,
) -> list[CheckpointInfo]:
    """The checkpoints of ``run_dir`` to evaluate, in the run's order.

    Parameters
    ----------
    run_dir : path
    checkpoints : None, str, int or sequence
        None: every epoch checkpoint (epoch-0, epoch-1, ...). Otherwise names
        (a comma-separated string or a sequence): a checkpoint name of the run ("epoch-3",
        "best"), an int k for "epoch-k", or "first", "middle", "last" for the first, middle
        ((E-1)//2-th of E) and last epoch checkpoint ("last" is the last epoch checkpoint, not
        the resumable ``last.pt``). Duplicates are removed.

    Raises
    ------
    EvaluationError
        ``run_dir`` has no epoch checkpoint, or a name is not a checkpoint of the run.
    """
    from validation.experiments.train.runner import list_checkpoints

    listed = list_checkpoints(run_dir)  # reads every file once: keep it to one call
    epochs = [info for info in listed if info.kind == "epoch"]
    if not epochs:
        raise EvaluationError(
            f"run_dir: {os.fspath(run_dir)!r} has no epoch checkpoints "
            "(checkpoints/epoch-K.pt); point it at a run directory of the training runner"
        )
    if checkpoints is None:
        return epochs
    if isinstance(checkpoints, str):
        names: list[Any] = [c.strip() for c in checkpoints.split(",") if c.strip()]
    elif isinstance(checkpoints, int):
        names = [checkpoints]
    else:
        names = list(checkpoints)
    if not names:
        raise EvaluationError("checkpoints is empty: name at least one checkpoint")
    known = {info.name: info for info in listed if info.kind != "resume"}
    chosen: list[CheckpointInfo] = []
    for name in names:
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            name = f"epoch-{int(name)}"
        if name == "first":
            info = epochs[0]
        elif name == "middle":
            info = epochs[(len(epochs) - 1) // 2]
        elif name == "last":
            info = epochs[-1]
        elif isinstance(name, str) and name in known:
            info = known[name]
        else:
            raise EvaluationError(
                f"checkpoints: unknown checkpoint {name!r}; {os.fspath(run_dir)!r} has "
                f"{list(known)} (or {', '.join(_WORDS)})"
            )
        if info.name not in [c.name for c in chosen]:
            chosen.append(info)
    order = {info.name: k for k, info in enumerate(listed)}
    return sorted(chosen, key=lambda info: order[info.name])


def check_batch_size(batch_size: int, setup: Setup) -> None:
    n = len(setup.train)
    if batch_size > n:
        raise EvaluationError(
            f"batch_size={batch_size} is larger than the training split ({n} samples): "
            "the evaluation batches are drawn without replacement"
        )


# =============================================================================================
# Files
# =============================================================================================
def load_previous(path: Path, settings: Mapping[str, Any], overwrite: bool) -> list[dict]:
    """The checkpoint entries of an earlier run of the same settings (resume)."""
    if overwrite or not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        old = previous["settings"]
        entries = list(previous["checkpoints"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EvaluationError(
            f"run_dir: {str(path)!r} exists but is not a file of this evaluator ({exc}); "
            "delete it or pass overwrite=True (--overwrite)"
        ) from None
    old = {**_ADDED_LATER, **old}
    changed = sorted(
        k for k in set(old) | set(settings)
        if k not in _RESUMABLE and old.get(k) != settings.get(k)
    )
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise EvaluationError(
            f"run_dir: {str(path)!r} was written with other settings ({detail}); resume with "
            "the same settings or pass overwrite=True (--overwrite) to start afresh"
        )
    return entries


def summarize(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean, std = float(np.mean(arr)), float(np.std(arr))
    return {"mean": mean, "std": std, "values": [float(x) for x in arr]}


def settings_json(settings: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so that comparisons see what the file will hold."""
    return json.loads(json.dumps(settings, allow_nan=True))


def _check_authors(reduction: Any, batch_size: int, micro_batch: int) -> None:
    """The authors' protocol: R fixed at 1/micro_batch, equal micro-batches."""
    if reduction is not None:
        raise EvaluationError(
            "reduction: the authors' protocol fixes R = 1/micro_batch (their micro-batch "
            f"means); leave reduction unset, got {reduction!r}"
        )
    if batch_size % micro_batch:
        raise EvaluationError(
            f"batch_size={batch_size} must be a multiple of micro_batch={micro_batch} under "
            "the authors' protocol (their batch is micro-batches of equal size)"
        )


class CommonOptions(TypedDict, total=False):
    """The keyword arguments :func:`evaluate_run` and :func:`sweep_run` share with
    :func:`common_settings` (documented in :func:`evaluate_run`, defaults in
    :func:`common_settings`)."""

    protocol: str
    batch_size: int
    micro_batch: int
    seed: int
    dedup_threshold: float | None
    reduction: str | float | None
    num_samples: int
    dtype: str
    sf_duplicates: str
    damping_scale: str
    dedup_zero_rows: str
    device: str | torch.device | None


def common_settings(
    *,
    batches: int,
    protocol: str = "ngdref",
    batch_size: int = 160,
    micro_batch: int = 40,
    seed: int = 0,
    dedup_threshold: float | None = 0.95,
    reduction: str | float | None = None,
    num_samples: int = 1,
    dtype: str = "float64",
    sf_duplicates: str = "drop",
    damping_scale: str = "absolute",
    dedup_zero_rows: str = "drop",
    device: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """The checked settings shared by :func:`evaluate_run` and :func:`sweep_run`."""
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    for name, value, allowed in (
        ("damping_scale", damping_scale, DAMPING_SCALES),
        ("dedup_zero_rows", dedup_zero_rows, ngdref.linalg.ZERO_ROWS),
    ):
        if value not in allowed:
            raise EvaluationError(f"{name} must be one of {allowed}, got {value!r}")
    if dtype not in DTYPES:
        raise EvaluationError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if sf_duplicates not in SF_DUPLICATES:
        raise EvaluationError(
            f"sf_duplicates must be one of {SF_DUPLICATES}, got {sf_duplicates!r}"
        )
    batch_size = positive_int("batch_size", batch_size)
    micro_batch = positive_int("micro_batch", micro_batch)
    if protocol == "authors":
        _check_authors(reduction, batch_size, micro_batch)
    return {
        "protocol": protocol,
        "batches": positive_int("batches", batches),
        "batch_size": batch_size,
        "micro_batch": micro_batch,
        "seed": positive_int("seed", seed, minimum=0),
        "dedup_threshold": _check_dedup(dedup_threshold),
        "reduction": (
            "1/micro_batch" if protocol == "authors"
            else _check_reduction("mean" if reduction is None else reduction)
        ),
        "num_samples": positive_int("num_samples", num_samples),
        "dtype": dtype,
        "sf_duplicates": sf_duplicates if protocol == "authors" else None,
        "damping_scale": damping_scale,
        "dedup_zero_rows": dedup_zero_rows,
        "checkpoints": None,
        "device": None if device is None else str(device),
    }


def prepare(
    run_dir: str | os.PathLike[str],
    checkpoints: Any,
    device: str | torch.device | None,
    dtype: str,
) -> tuple[Path, list[CheckpointInfo], Setup]:
    """The run's setup with its model in ``dtype`` (checkpoints are cast when loaded)."""
    import torch

    from validation.experiments.reproduce.lora_digits import setup_of_run_dir
    from validation.experiments.train.runner import build_setup, load_run_config

    run = Path(run_dir)
    setup = setup_of_run_dir(run, device)  # a digits-lora run (no runner schema), or None
    if setup is None:
        setup = build_setup(load_run_config(run), device)  # FileNotFoundError naming run_dir
    infos = resolve_checkpoints(run, checkpoints)
    setup.model.to(getattr(torch, dtype))
    return run, infos, setup


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """The runner's tqdm convention (stderr, dynamic width); one unit per batch."""
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="batch", dynamic_ncols=True)


def resolve_progress(progress: bool | None) -> str:
    """"bar", "lines" or "off" (:func:`validation.experiments.progress.mode`)."""
    from validation.experiments.progress import mode

    return mode(progress)
