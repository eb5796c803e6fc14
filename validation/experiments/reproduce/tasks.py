"""Tasks of the reproductions and the process pool that runs them (longest first).

The task functions run in worker processes (``spawn``), so they live at module level and
import what they need themselves.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Scheduler", "Task", "evaluate_task", "sweep_task", "train_task"]


def init_worker(threads: int) -> None:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(threads)


def train_task(config: dict[str, Any], directory: str) -> float:
    """Train (or continue) one run unless it has finished; the seconds spent."""
    from validation.experiments.reproduce.lora_digits import setup_for_run
    from validation.experiments.train.runner import train

    started = time.perf_counter()
    run = Path(directory)
    if not (run / "results.json").is_file():
        setup = setup_for_run(config, run, "cpu")  # None: the runner builds it
        # a killed run continues; one that never wrote its first checkpoint starts afresh
        train(config, run, resume_or_start=True, progress=False, setup=setup)
    return time.perf_counter() - started


def evaluate_task(directory: str, kwargs: dict[str, Any]) -> float:
    from validation.experiments.evaluate.framework import evaluate_run

    started = time.perf_counter()
    evaluate_run(directory, progress=False, **kwargs)
    return time.perf_counter() - started


def sweep_task(directory: str, kwargs: dict[str, Any]) -> float:
    from validation.experiments.evaluate.framework import sweep_run

    started = time.perf_counter()
    sweep_run(directory, progress=False, **kwargs)
    return time.perf_counter() - started


@dataclass
class Task:
    key: tuple[Any, ...]
    func: Callable[..., float]
    args: tuple[Any, ...]
    cost: float  # relative, for longest-first scheduling
    urgent: bool = False  # other tasks wait for it


class Scheduler:
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

    def run(self, tasks: list[Task], on_done: Callable[[Task], list[Task]]) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        from tqdm.auto import tqdm

        ready = list(tasks)
        running: dict[Any, Task] = {}
        context = multiprocessing.get_context("spawn")
        bar = tqdm(total=len(ready), disable=not self.progress, desc="reproduce", unit="task",
                   dynamic_ncols=True)
        with bar, ProcessPoolExecutor(
            self.workers, mp_context=context, initializer=init_worker,
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
