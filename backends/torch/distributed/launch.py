"""Launching data-parallel runs: join a process group, share a batch, one writer.

:func:`init_from_env` joins the group torchrun describes in the environment and
:func:`leave` tears it down; :func:`join_local` / :func:`local_group` and :func:`launch_local`
run R processes of a module on one machine over gloo and the loopback interface (tests and
benchmarks); :func:`shard_slice` is a rank's share of a global batch, :func:`is_writer`
whether it writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = [
    "barrier",
    "gather_objects",
    "init_from_env",
    "is_writer",
    "join_local",
    "launch_local",
    "leave",
    "local_group",
    "shard_slice",
    "world_and_rank",
]

#: seconds every collective may wait (init_from_env); NGDREF_DIST_TIMEOUT overrides
DEFAULT_TIMEOUT = 600.0


def init_from_env() -> bool:
    """Join the torchrun process group (WORLD_SIZE > 1 in the environment) if not joined yet.

    gloo on CPU, NCCL when CUDA is available (each process on ``cuda:LOCAL_RANK``); every
    collective times out after ``NGDREF_DIST_TIMEOUT`` seconds (default 600). Returns whether
    torch.distributed is initialised afterwards.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    timeout = datetime.timedelta(seconds=float(os.environ.get("NGDREF_DIST_TIMEOUT",
                                                              DEFAULT_TIMEOUT)))
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def _up() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_writer() -> bool:
    """Whether this process writes files and logs: rank 0, or the only process."""
    return not _up() or dist.get_rank() == 0


def world_and_rank() -> tuple[int, int]:
    """(R, rank) of the default group; (1, 0) without torch.distributed."""
    return (dist.get_world_size(), dist.get_rank()) if _up() else (1, 0)


def gather_objects(obj: object) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without torch.distributed)."""
    if not _up():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (nothing to do without torch.distributed)."""
    if _up():
        dist.barrier()


def shard_slice(num_samples: int) -> slice | None:
    """This rank's contiguous share of a global batch (None without torch.distributed).

    Contiguous blocks of sizes as ``numpy.array_split`` (the first N mod R ranks one more),
    so the shards concatenated in rank order are the global batch in its own order, which
    SF's label draws (keyed by the global sample index) and the duplicate filter's ties
    depend on.
    """
    if not _up():
        return None
    world, rank = dist.get_world_size(), dist.get_rank()
    if num_samples < world:
        raise ValueError(
            f"a batch of {num_samples} samples cannot be shared by {world} ranks: use a batch "
            "size (and a data set size) of at least the number of processes"
        )
    base, extra = divmod(num_samples, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def join_local(rank: int, world: int, folder: Path, timeout: float = 60.0) -> None:
    """Join a gloo group of ``world`` local processes by a FileStore in ``folder``.

    No port is chosen (the rendezvous is a file); gloo's sockets use the interface named by
    GLOO_SOCKET_IFNAME (:func:`launch_local` sets the loopback ``lo``). Collectives time out
    after ``timeout`` seconds.
    """
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(folder) / "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def leave(*, synchronise: bool = True) -> None:
    """Leave the default process group, if joined: a barrier, then ``destroy_process_group``.

    The barrier (skipped with ``synchronise=False``, for a rank that failed and whose peers
    may not reach it) keeps any rank from tearing its group down while a peer still talks to
    it: without it, gloo aborted a rank at exit ("terminate called without an active
    exception", SIGABRT) in about one run in three of two local ranks.
    """
    if not _up():
        return
    try:
        if synchronise:
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def local_group(rank: int, world: int, folder: Path, timeout: float = 60.0) -> Iterator[None]:
    """:func:`join_local` for the body, then :func:`leave` (synchronised if the body succeeded)."""
    join_local(rank, world, folder, timeout)
    ok = False
    try:
        yield
        ok = True
    finally:
        leave(synchronise=ok)


def launch_local(
    world: int, module: str, folder: Path, args: Sequence[str] = (), timeout: float = 300.0
) -> list[str]:
    """Run ``python -m module RANK WORLD FOLDER *args`` for every rank and wait.

    Each process should run in :func:`local_group` (join, and leave together). All are
    killed after ``timeout`` seconds or when one fails; their outputs are returned.

    Raises
    ------
    RuntimeError
        A process exited with an error or ran out of time (the outputs are in the message).
    """
    root = Path(__file__).resolve().parents[3]  # above backends/
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "GLOO_SOCKET_IFNAME": "lo",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(r), str(world), str(folder), *args],
            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{module}: ranks still running after {timeout} s") from exc
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"{module}: a rank failed:\n" + "\n".join(
            f"rank {r} exited with {p.returncode}:\n{log}"
            for r, (p, log) in enumerate(zip(procs, logs, strict=True))
        ))
    return logs
