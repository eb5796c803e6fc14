"""One writer per run directory and per evaluation file: an exclusive, crash-safe lock.

A writer (``train`` on a run directory, ``evaluate`` / ``sweep`` on ``evaluation.json`` /
``sweep.json``) holds :class:`RunLock` for as long as it writes. The lock is an operating-system
advisory lock, ``flock(LOCK_EX | LOCK_NB)``, on a lock file in the run directory
(``.lock``, ``.evaluation.json.lock``, ...), and the file holds its holder's record
(pid, host, start time, command). A second writer does not wait: it is refused at once with
:class:`RunLockedError`, which names the directory and the holder.

Released on exit and on a crash
    The holder removes the lock file and closes it when it is done, whether it returns or
    raises. If it dies without doing so (killed, out of memory, a power cut of a remote
    client), the operating system releases the lock with the process's open files; the file
    then stays behind, unlocked.
Stale locks
    A lock file nobody holds is stale by construction: the next writer takes the lock at
    once (it never waits on a dead holder, whatever the recorded pid says), says whose record
    it found (``RunLock.stale``), and writes its own. Liveness is the kernel's lock, not
    a pid check, so a pid reused by another process cannot keep a run blocked.
Files that disappear
    The holder deletes the lock file while still holding it; another writer that opened the
    old file just before may then lock that unlinked file, so after locking every writer
    checks that the path still names the file it locked and starts again if not.

Limits: advisory locks bind the processes that take them (this runner), not other programs
that write into the directory. On NFS, Linux emulates ``flock`` with POSIX record locks, which
needs the lock daemon (NFSv3) or a v4 server; a client that vanishes keeps its lock until the
server's lease expires (about 90 s on NFSv4). On platforms without ``fcntl`` (Windows) no lock
is taken and a :class:`RuntimeWarning` says so.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from validation.experiments.io import storage_error

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock", "RunLockedError", "lock_path"]


class RunLockedError(OSError):
    """Another process holds the lock of the run directory or file; the message names both."""


def lock_path(target: str | os.PathLike[str]) -> Path:
    """The lock file of an existing directory (``DIR/.lock``) or of a file, existing or not
    (``DIR/.NAME.lock`` beside it)."""
    target = Path(target)
    return target / ".lock" if target.is_dir() else target.with_name(f".{target.name}.lock")


def _describe(record: dict[str, Any] | None) -> str:
    if not record:
        return "a process that has not written its record yet (it has just started)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return (f"pid {record.get('pid')} on {record.get('host')}, started {started} "
            f"({record.get('command', '?')})")


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 65536, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class RunLock:
    """The exclusive lock of one run directory or file, held from :meth:`acquire` to
    :meth:`release` (or as a context manager).

    Parameters
    ----------
    target : path
        A run directory (it must exist: a path that is not a directory is taken as a file),
        or a file in an existing directory.
    what : str
        What the holder does, recorded for a refused writer ("train", "evaluate", ...).

    Attributes
    ----------
    stale : dict or None
        After :meth:`acquire`: the record of a previous holder that died without releasing
        (found in the lock file), else None.
    """

    def __init__(self, target: str | os.PathLike[str], what: str = "") -> None:
        self.target = Path(target)
        self.path = lock_path(self.target)
        self.what = what or " ".join(sys.argv[:3])
        self.stale: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock now or raise :class:`RunLockedError` (never waits)."""
        if fcntl is None:
            warnings.warn(
                f"no advisory file locks on this platform: nothing stops a second writer of "
                f"{str(self.target)!r}", RuntimeWarning, stacklevel=2,
            )
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:  # a read-only or full directory: say so as a write would
                raise storage_error(self.path, exc) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_record(fd)
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunLockedError(
                    f"{str(self.target)!r} is being written by another process: "
                    f"{_describe(holder)}; wait for it to finish, or stop it (its lock is "
                    f"{str(self.path)!r}, released when it exits)"
                ) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder before us deleted the file we locked: again
        self.stale = _read_record(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "command": self.what}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Delete the lock file (still holding it) and close it; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass  # a read-only or vanished directory: the closing below still releases it
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def describe_stale(self) -> str | None:
        """A one-line notice about the stale record found by :meth:`acquire`, or None."""
        if self.stale is None:
            return None
        return (f"took over the lock of {str(self.target)!r} from {_describe(self.stale)}, "
                "which ended without releasing it")

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
