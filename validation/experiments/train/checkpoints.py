"""The training runner's files: checkpoints, the metrics log, and the choice of a resume point.

A checkpoint is a ``torch.save`` of a plain dictionary that ``torch.load(weights_only=True)``
reads: tensors, numbers, strings, ``None``, lists, tuples and dicts only, so that loading a file
from someone else cannot run code. What is not of those types is converted on the way in:
the epoch's permutation is an int64 tensor, numpy's RNG state is ``{"name", "keys" (tensor),
"pos", "has_gauss", "cached_gaussian"}`` and Python's a list.

Keys of every checkpoint: ``format`` (:data:`CHECKPOINT_FORMAT`), ``kind`` ("epoch", "best",
"resume"), ``params`` (``{name: CPU tensor}``), ``step``, ``epoch``, ``config``. ``last.pt``
("resume") and every ``epoch-k.pt`` also hold ``resume``: the optimiser state, RNG states, data
position, best-so-far, log length and elapsed time, so that either can continue the run exactly
(:func:`find_resume_state` falls back from a damaged ``last.pt`` to the newest intact epoch
checkpoint). ``best.pt`` holds ``metrics`` instead.

Every file is written atomically (a temporary file, then ``os.replace``): a killed run leaves
the old file or the new one, never a partial one.

Resuming (:func:`resume_point`) never starts from zero by accident: it needs a run directory
that holds a run, a ``config.json`` equal to the configuration, and an intact checkpoint
(:func:`find_resume_state`); the log is checked against the checkpoint (:func:`log_prefix`)
and a damaged checkpoint that is skipped is renamed (:func:`move_aside`), never overwritten.
"""

from __future__ import annotations

import io as stdio
import json
import os
import pickle
import random
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from backends.torch.distributed import launch as dist_launch
from validation.experiments import io
from validation.experiments.config.load import ConfigError, config_diff, with_new_defaults

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "ResumePoint",
    "atomic_write",
    "checkpoint_path",
    "find_resume_state",
    "has_run",
    "list_checkpoints",
    "load_checkpoint",
    "log_prefix",
    "move_aside",
    "read_checkpoint",
    "read_metrics",
    "restore_rng_state",
    "resume_point",
    "rng_state",
    "save_checkpoint",
]

#: 2: loadable with ``weights_only=True``; epoch checkpoints carry the resume state
CHECKPOINT_FORMAT = 2
_EPOCH_FILE = re.compile(r"^epoch-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A run file that cannot be used (damaged, foreign, or from another configuration).

    The message names the file.
    """


class Checkpoint(NamedTuple):
    """A checkpoint's trainable parameters (CPU tensors by name), step and epoch."""

    params: dict[str, torch.Tensor]
    step: int
    epoch: int


class CheckpointInfo(NamedTuple):
    """One checkpoint file: ``name`` ("epoch-3", "best", "last"), path, step, epoch, kind.

    ``kind`` is "epoch", "best", "resume", or "unreadable" (a damaged or foreign file; step and
    epoch are then -1).
    """

    name: str
    path: Path
    step: int
    epoch: int
    kind: str


class ResumePoint(NamedTuple):
    """The checkpoint a resumed run continues from, and the files skipped to reach it."""

    path: Path
    state: dict[str, Any]
    skipped: list[tuple[Path, str]]


# ---- writing ---------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """``io.atomic_write`` (temporary file, fsync, ``os.replace``) on the writing rank only.

    Under torchrun rank 0 alone writes files (the other ranks return at once).
    """
    if not dist_launch.is_writer():
        return
    io.atomic_write(path, write, mode)


def save_checkpoint(path: Path, obj: Mapping[str, Any]) -> None:
    """``torch.save`` a checkpoint dictionary atomically (its values must be weights-only safe).

    It is serialised in memory first: torch turns an ``OSError`` of the file it writes into
    a RuntimeError ("unexpected pos ..."), so a full disk would not be reported as such.
    """
    if not dist_launch.is_writer():
        return
    buffer = stdio.BytesIO()
    torch.save(dict(obj), buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


# ---- RNG states as weights-only types --------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The torch, numpy (legacy global) and Python RNG states, as tensors, lists and numbers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # the legacy global generator is saved because user code may draw from it
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": [int(version), list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Set the RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        (
            numpy_state["name"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- reading ---------------------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _refused(path: Path, exc: pickle.UnpicklingError) -> str:
    """Why a file was refused, without torch's advice on how to load it unsafely."""
    # torch's message opens with how to load the file without the safeguard: never passed on
    lines = [line.strip() for line in str(exc).splitlines()]
    code = next((line for line in lines if "GLOBAL" in line), None)
    if code is None:
        found = [line for line in lines if line.startswith(("Unsupported", "Trying"))]
        return (f"checkpoint {str(path)!r} cannot be read: it is truncated, damaged or not a "
                f"checkpoint of this runner (UnpicklingError: {found[0] if found else 'bad data'})")
    return (
        f"checkpoint {str(path)!r} was refused and not loaded: it holds a pickled object that "
        f"loading would execute ({code}), not only tensors, numbers, strings and containers; "
        "this runner never writes such a file, so it is not one of its checkpoints"
    )


def read_checkpoint(path: str | os.PathLike[str], *, mmap: bool = False) -> dict[str, Any]:
    """The whole dictionary stored in a checkpoint file of this runner.

    Loaded with ``torch.load(weights_only=True)``: a file holding anything but tensors,
    numbers, strings and containers is refused instead of being executed.

    Parameters
    ----------
    path : path
    mmap : bool
        Map the tensors lazily (cheap when only ``step`` / ``epoch`` are wanted).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    CheckpointError
        The file is truncated, damaged, not a ``torch.save`` file, holds objects other than
        the weights-only types, or is not a checkpoint of this runner (format
        :data:`CHECKPOINT_FORMAT`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refused(path, exc)) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ...
        raise CheckpointError(
            f"checkpoint {str(path)!r} cannot be read: it is truncated, damaged or not a "
            f"checkpoint of this runner ({_first_line(exc)})"
        ) from exc
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a checkpoint of this runner (a "
            f"{type(state).__name__} without a 'format' key)"
        )
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format {state['format']!r}; this runner reads format "
            f"{CHECKPOINT_FORMAT} (an older runner's file: retrain, or read it with that version)"
        )
    missing = [k for k in ("kind", "params", "step", "epoch", "config") if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks the keys {missing}")
    return state


def checkpoint_path(run_dir: str | os.PathLike[str], which: str | int) -> Path:
    """The file of checkpoint ``which`` ("epoch-k" or k, "best", "last") of a run."""
    folder = Path(run_dir) / "checkpoints"
    if isinstance(which, int) and not isinstance(which, bool):
        name = f"epoch-{which}"
    else:
        name = str(which)
    path = folder / (name if name.endswith(".pt") else f"{name}.pt")
    if not path.is_file():
        known = [info.name for info in list_checkpoints(run_dir)]
        raise FileNotFoundError(f"which: no checkpoint {name!r} in {str(folder)!r}; has {known}")
    return path


def load_checkpoint(run_dir: str | os.PathLike[str], which: str | int) -> Checkpoint:
    """Load a run's checkpoint.

    Parameters
    ----------
    run_dir : path
    which : str or int
        "epoch-k" or k (the end of epoch k; 0 = the initial model), "best" (best validation
        score) or "last" (the latest resumable state).

    Returns
    -------
    Checkpoint
        ``(params, step, epoch)``: params ``{name: CPU tensor}`` of the trainable parameters
        (put them into a ``build_setup`` model with ``Setup.load_params``), the number of steps
        taken and of completed epochs.

    Raises
    ------
    FileNotFoundError, CheckpointError
        See :func:`read_checkpoint`.
    """
    state = read_checkpoint(checkpoint_path(run_dir, which))
    return Checkpoint(state["params"], int(state["step"]), int(state["epoch"]))


def list_checkpoints(
    run_dir: str | os.PathLike[str], kind: str | None = None
) -> list[CheckpointInfo]:
    """The checkpoints of a run: epoch-0, epoch-1, ... (by epoch), then best, then last.

    A file that cannot be read is listed with kind "unreadable" (and a warning naming it), so
    that one damaged file does not hide the intact ones.

    Parameters
    ----------
    run_dir : path
    kind : {"epoch", "best", "resume", "unreadable"}, optional
        Only checkpoints of this kind (``last.pt`` is "resume").
    """
    folder = Path(run_dir) / "checkpoints"
    infos = []
    for path in folder.glob("*.pt") if folder.is_dir() else []:
        try:
            state = read_checkpoint(path, mmap=True)
        except CheckpointError as exc:
            warnings.warn(str(exc), stacklevel=2)
            infos.append(CheckpointInfo(path.stem, path, -1, -1, "unreadable"))
            continue
        infos.append(
            CheckpointInfo(path.stem, path, int(state["step"]), int(state["epoch"]), state["kind"])
        )
    order = {"epoch": 0, "best": 1, "resume": 2}
    infos.sort(key=lambda i: (order.get(i.kind, 3), i.epoch, i.step, i.name))
    return [i for i in infos if kind is None or i.kind == kind]


def read_metrics(run_dir: str | os.PathLike[str], kind: str | None = None) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (only those of ``kind`` if given).

    Raises
    ------
    CheckpointError
        A line that is not a JSON object (the message names the file and the line).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    try:
        records = io.read_jsonl(path)
    except io.JsonlError as exc:
        if exc.detail is None:
            message = f"{str(path)!r}, line {exc.lineno} is not a JSON object"
            raise CheckpointError(message) from None
        raise CheckpointError(
            f"{str(path)!r}, line {exc.lineno} is not valid JSON ({exc.detail}): the log is damaged"
        ) from None
    return [r for r in records if kind is None or r.get("kind") == kind]


# ---- choosing the resume point ---------------------------------------------------------------
def _resume_candidates(ckpt_dir: Path) -> list[Path]:
    """last.pt, then epoch-k.pt from the highest k down."""
    epochs = []
    for path in ckpt_dir.glob("epoch-*.pt") if ckpt_dir.is_dir() else []:
        match = _EPOCH_FILE.match(path.name)
        if match:
            epochs.append((int(match.group(1)), path))
    return [ckpt_dir / "last.pt", *(p for _, p in sorted(epochs, reverse=True))]


def find_resume_state(ckpt_dir: Path) -> ResumePoint:
    """The newest intact checkpoint of ``ckpt_dir`` that can continue a run.

    Tries ``last.pt``, then ``epoch-k.pt`` from the highest k down, and returns the first
    that reads as a format-:data:`CHECKPOINT_FORMAT` file with a resume state (a later file
    with a lower step is not preferred over ``last.pt``: it is the last one written).

    Raises
    ------
    FileNotFoundError
        No checkpoint file at all.
    CheckpointError
        Checkpoint files exist but none is usable; the message lists each and why.
    """
    candidates = [p for p in _resume_candidates(ckpt_dir) if p.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"resume: {str(ckpt_dir)!r} holds no checkpoint (last.pt or epoch-k.pt) to resume"
        )
    skipped: list[tuple[Path, str]] = []
    last = ckpt_dir / "last.pt"
    if not last.is_file():
        skipped.append((last, f"checkpoint {str(last)!r} is missing"))
    for path in candidates:
        try:
            state = read_checkpoint(path)
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            continue
        if "resume" not in state:
            skipped.append((path, f"checkpoint {str(path)!r} holds no resume state"))
            continue
        return ResumePoint(path, state, skipped)
    reasons = "; ".join(reason for _, reason in skipped)
    raise CheckpointError(f"resume: no intact checkpoint in {str(ckpt_dir)!r} ({reasons})")


def has_run(run: Path) -> bool:
    """Whether ``run`` holds anything a fresh start would lose: a checkpoint or a log line.

    A ``config.json`` alone (a start that failed before its first checkpoint) holds no run:
    a fresh start there overwrites it, so a refused or crashed start never blocks its retry.
    """
    log = run / "metrics.jsonl"
    ckpts = run / "checkpoints"
    return (log.exists() and log.stat().st_size > 0) or (
        ckpts.is_dir() and any(ckpts.glob("*.pt"))
    )


def _stored_config(path: Path) -> dict[str, Any]:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"resume: {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(stored, dict):
        raise CheckpointError(f"resume: {str(path)!r} does not hold a configuration object")
    return stored


def resume_point(
    run: Path, config: Mapping[str, Any], start_if_missing: bool
) -> ResumePoint | None:
    """The checkpoint to resume from, or None to start afresh (only with start_if_missing)."""
    if not has_run(run):
        if start_if_missing:
            return None
        what = "does not exist" if not run.exists() else "holds no run"
        raise FileNotFoundError(
            f"run_dir {str(run)!r} {what}: nothing to resume (use resume_or_start / "
            "--resume-or-start to start a new run there if it is empty)"
        )
    stored = run / "config.json"
    if not stored.is_file():
        raise FileNotFoundError(
            f"resume: {str(stored)!r} does not exist; run_dir {str(run)!r} is not a complete run"
        )
    changed = config_diff(with_new_defaults(_stored_config(stored)), dict(config))
    if changed:
        raise ConfigError(
            f"resume: the configuration differs from {str(stored)!r} in {changed}; resume "
            "with the stored configuration or start a new run directory"
        )
    return find_resume_state(run / "checkpoints")


def log_prefix(log_path: Path, lines: int, checkpoint: Path) -> str:
    """The first ``lines`` lines of the run's log, each checked to be a JSON object."""
    if not log_path.is_file():
        raise CheckpointError(
            f"resume: {str(log_path)!r} does not exist but {checkpoint.name!r} was written after "
            f"{lines} log lines"
        )
    with log_path.open(encoding="utf-8") as fh:
        kept = [line for _, line in zip(range(lines), fh, strict=False)]
    if len(kept) < lines or (kept and not kept[-1].endswith("\n")):
        raise CheckpointError(
            f"resume: {str(log_path)!r} has {len(kept)} complete lines but {checkpoint.name!r} "
            f"was written after {lines}: the log does not belong to this checkpoint"
        )
    for lineno, line in enumerate(kept, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"resume: {str(log_path)!r}, line {lineno} is not valid JSON ({exc.msg})"
            ) from None
    return "".join(kept)


def move_aside(path: Path) -> Path:
    """Rename a damaged file to ``NAME.damaged`` (``NAME.damaged-2``, ...) instead of losing it.

    Under torchrun rank 0 alone renames; the others return the name it will have.
    """
    aside = path.with_name(f"{path.name}.damaged")
    k = 1
    while aside.exists():
        k += 1
        aside = path.with_name(f"{path.name}.damaged-{k}")
    if dist_launch.is_writer():
        io.rename(path, aside)
    return aside
