"""Where a reproduction's numbers came from: the code's commit and the machine that ran it.

Stored in ``results.json`` / ``summary.json`` (``"code"``, ``"machine"``) and in the reference
fingerprints (:mod:`validation.experiments.reproduce.fingerprint`), so a reference table names
the commit it was regenerated at and a fingerprint names the tables it belongs to.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["code_origin", "machine"]

_ROOT = Path(__file__).resolve().parents[3]
#: the directories whose uncommitted changes can move a reproduction's numbers (not the
#: committed results themselves)
_CODE = ("ngdref", "backends", "validation", ":(exclude)validation/experiments/reference")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_origin() -> dict[str, Any]:
    """The checkout's commit (None outside a git checkout), whether the code directories hold
    uncommitted changes (``dirty``: then the commit alone does not name the code) and the
    UTC date and time now."""
    status = _git("status", "--porcelain", "--untracked-files=no", "--", *_CODE)
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The CPU, its logical cores, the OS and the versions of Python, torch and NumPy."""
    import numpy as np
    import torch

    return {
        "cpu": _cpu(), "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
    }
