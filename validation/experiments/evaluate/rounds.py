"""The resumable pass over a run's checkpoints shared by ``evaluate`` and ``sweep``.

:func:`over_checkpoints` loads the run once, skips the checkpoints its file already holds (same
settings: resume), and scores the others in rounds of one checkpoint per rank (torchrun; one
rank alone scores them one after the other). After each round every rank holds every result;
rank 0 rewrites the file atomically, so a killed evaluation loses at most one round.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from validation.experiments.evaluate.settings import (
    check_batch_size,
    load_previous,
    prepare,
    progress_bar,
)
from validation.experiments.io import atomic_write_json

# torch and the runner are imported where they are used, so that the command line
# (``python -m validation.experiments --help``) registers the commands without them
if TYPE_CHECKING:
    from validation.experiments.train.runner import CheckpointInfo, Setup

__all__ = ["Process", "over_checkpoints"]

#: ``process(setup, info, advance)`` -> (the checkpoint's entry, a one-line summary)
Process = Callable[["Setup", "CheckpointInfo", Callable[[], None]], tuple[dict[str, Any], str]]


def _score(
    kind: str, run: Path, setup: Setup, info: CheckpointInfo, process: Process, bar: Any
) -> tuple[dict[str, Any], str] | Exception:
    """Load checkpoint ``info`` into ``setup`` and ``process`` it: (entry, line) or the error."""
    from validation.experiments.train.runner import load_checkpoint

    started = time.perf_counter()
    try:
        params, _, _ = load_checkpoint(run, info.name)
        setup.load_params(params)
        bar.set_postfix_str(info.name)
        entry, summary = process(setup, info, bar.update)
    except Exception as exc:  # every rank raises it (no rank waits forever)
        return exc
    line = (f"{kind} {info.name} (epoch {info.epoch}, step {info.step}): "
            f"{summary}, {time.perf_counter() - started:.1f} s]")
    return entry, line


def over_checkpoints(
    kind: str,
    run_dir: str | Path,
    checkpoints: Any,
    settings: dict[str, Any],
    filename: str,
    overwrite: bool,
    progress: bool,
    process: Process,
) -> dict[str, Any]:
    """Run ``process`` on every checkpoint not yet in ``run_dir/filename``, resumably.

    ``process(setup, info, advance)`` returns the checkpoint's entry and a one-line summary
    and calls ``advance()`` after each batch (the progress bar). The file is rewritten
    atomically after each checkpoint, so a killed evaluation loses at most one.
    """
    from backends.torch.distributed import launch as dist_launch

    dist_launch.init_from_env()  # torchrun: the checkpoints are shared out among the ranks
    world, rank = dist_launch.world_and_rank()
    progress = progress and dist_launch.is_writer()
    run, infos, setup = prepare(run_dir, checkpoints, settings["device"], settings["dtype"])
    settings["checkpoints"] = [info.name for info in infos]
    check_batch_size(settings["batch_size"], setup)
    path = run / filename
    entries = load_previous(path, settings, overwrite)
    done = {entry["name"] for entry in entries}
    todo = [info for info in infos if info.name not in done]
    bar = progress_bar(len(todo) * settings["batches"], progress, f"{kind} {run.name}")
    with bar:
        for info in infos:
            if info.name in done and progress:
                bar.write(f"{kind} {info.name}: already in {path}, skipped", file=sys.stderr)
        for start in range(0, len(todo), world):  # a round: one checkpoint per rank
            result: Any = None
            if start + rank < len(todo):
                result = _score(kind, run, setup, todo[start + rank], process, bar)
            for item in dist_launch.gather_objects(result):
                if isinstance(item, Exception):
                    raise item
                if item is not None:
                    entries.append(item[0])
                    entries.sort(key=lambda e: (e["epoch"], e.get("step", 0), e["name"]))
                    if dist_launch.is_writer():  # torchrun: rank 0 writes
                        atomic_write_json(path, {"settings": settings, "checkpoints": entries})
                    if progress:
                        bar.write(item[1], file=sys.stderr)
    return {"settings": settings, "checkpoints": entries}
