"""Real processes for the run-directory tests: a lock holder, and the command line.

:func:`hold` starts ``python -c HOLDER`` in a fresh interpreter: it takes the
:class:`~validation.experiments.runlock.RunLock` of a directory or file, prints ``held`` and
keeps it until its stdin is closed (then releases it, or kills itself with SIGKILL when asked,
which leaves the lock file behind as a crash does). :func:`cli` runs
``python -m validation.experiments ...`` with stderr a pipe (not a terminal) and offline
Hugging Face. Every wait is bounded.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds for any one command

HOLDER = """
import os, signal, sys
from validation.experiments.runlock import RunLock
lock = RunLock(sys.argv[1], "holder").acquire()
print("held", flush=True)
sys.stdin.read()
if sys.argv[2] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
lock.release()
"""


def env(**extra: str) -> dict[str, str]:
    """The child environment: the repository importable, Hugging Face offline, one thread."""
    base = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return {**base, **extra}


def hold(target: Path, then: str = "release") -> subprocess.Popen:
    """A process holding ``target``'s lock (``then``: "release" or "kill" when stdin closes)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(target), then], cwd=ROOT, env=env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    if not ready or proc.stdout.readline().strip() != "held":
        proc.kill()
        raise RuntimeError(f"the lock holder did not start: {proc.stderr.read()}")
    return proc


def finish(proc: subprocess.Popen) -> int:
    """Close the holder's stdin (it releases, or dies) and wait for it."""
    proc.stdin.close()
    return proc.wait(timeout=60)


def cli(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m validation.experiments ARGS`` (stderr is a pipe, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "validation.experiments", *args], cwd=ROOT,
        env=env(**extra_env), capture_output=True, text=True, timeout=TIMEOUT,
    )


def start_cli(*args: str) -> subprocess.Popen:
    """As :func:`cli`, without waiting."""
    return subprocess.Popen(
        [sys.executable, "-m", "validation.experiments", *args], cwd=ROOT, env=env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
