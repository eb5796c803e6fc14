"""The resumable pass over a run's checkpoints shared by ``evaluate`` and ``sweep``.

:func:`over_checkpoints` loads the run once, skips the checkpoints its file already holds (same
settings: resume), and scores the others in rounds of one checkpoint per rank (torchrun; one
rank alone scores them one after the other). After each round every rank holds every result;
rank 0 rewrites the file atomically, so a killed evaluation loses at most one round.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from validation.experiments.evaluate.settings import (
    check_batch_size,
    load_previous,
    prepare,
    progress_bar,
)
from validation.experiments.io import atomic_write_json, storage_hint
from validation.experiments.progress import notice
from validation.experiments.runlock import RunLock

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
    progress: str,
    process: Process,
) -> dict[str, Any]:
    """Run ``process`` on every checkpoint not yet in ``run_dir/filename``, resumably.

    ``process(setup, info, advance)`` returns the checkpoint's entry and a one-line summary
    and calls ``advance()`` after each batch (the progress bar). The file is rewritten
    atomically after each checkpoint, so a killed evaluation loses at most one. ``progress``
    is "bar" (a bar, and the lines through it), "lines" (a line per checkpoint and a summary
    at the end, for log files) or "off". The file's lock
    (:mod:`validation.experiments.runlock`) is held throughout: a second writer of the same
    file is refused with the holder named.
    """
    from backends.torch.distributed import launch as dist_launch

    dist_launch.init_from_env()  # torchrun: the checkpoints are shared out among the ranks
    world, rank = dist_launch.world_and_rank()
    if not dist_launch.is_writer():
        progress = "off"
    run, infos, setup = prepare(run_dir, checkpoints, settings["device"], settings["dtype"])
    settings["checkpoints"] = [info.name for info in infos]
    check_batch_size(settings["batch_size"], setup)
    path = run / filename
    hint = f"make room in {str(run)!r} ({kind} writes {filename} there), or copy the run elsewhere"
    with storage_hint(hint), _file_lock(path, kind):
        entries = load_previous(path, settings, overwrite)
        done = {entry["name"] for entry in entries}
        todo = [info for info in infos if info.name not in done]
        say = _Lines(progress, progress_bar(
            len(todo) * settings["batches"], progress == "bar", f"{kind} {run.name}"
        ))
        with say.bar as bar:
            say(f"{kind} {run.name}: {len(todo)} checkpoint(s) to score, "
                f"{settings['batches']} batches each, into {str(path)!r}")
            for info in infos:
                if info.name in done:
                    say(f"{kind} {info.name}: already in {path}, skipped")
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
                        say(item[1])
        say(f"{kind} {run.name}: {len(entries)} checkpoint(s) in {str(path)!r} "
            f"({len(todo)} scored now, {len(done)} from an earlier run)")
    return {"settings": settings, "checkpoints": entries}


class _Lines:
    """Print a line through the bar ("bar"), on stderr ("lines"), or not at all ("off")."""

    def __init__(self, mode: str, bar: Any) -> None:
        self.mode, self.bar = mode, bar

    def __call__(self, line: str) -> None:
        if self.mode == "bar":
            self.bar.write(line, file=sys.stderr)
        elif self.mode == "lines":
            notice(line)


@contextlib.contextmanager
def _file_lock(path: Path, kind: str) -> Iterator[None]:
    """Hold ``path``'s lock on rank 0 (every rank raises if it cannot be taken)."""
    from backends.torch.distributed import launch as dist_launch

    lock, error = None, None
    if dist_launch.is_writer():
        try:
            lock = RunLock(path, kind).acquire()
        except OSError as exc:
            error = exc
    failures = [e for e in dist_launch.gather_objects(error) if e is not None]
    if failures:
        raise error if error is not None else failures[0]
    if lock is not None and lock.stale is not None:
        notice(str(lock.describe_stale()))
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
