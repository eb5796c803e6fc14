"""One home for the experiments' run files: atomic writes, appends and the JSON Lines reader.

Every file is written into a temporary file next to it, flushed, fsynced, then moved over the
target with ``os.replace``: a reader (or a killed writer) sees the old file or the new one, never
a half-written one. The reader of ``*.jsonl`` names ``FILE:LINE`` on damaged content.

Storage faults
    A write that fails on the storage (no space left, ENOSPC; a read-only file system, EROFS;
    a disk quota, EDQUOT; or any other ``OSError`` of the write, fsync or rename) becomes one
    :class:`StorageError`, whose message names the file, the cause and the option to change
    (set by the command with :func:`storage_hint`, e.g. ``--out`` for ``train``). The
    temporary file is removed and the target keeps its previous content; a failed append
    (:func:`append_text`) is cut back to the file's previous length.

These functions write on every process; under torchrun the training and evaluation writers
gate them on ``dist_launch.is_writer()`` (see ``checkpoints.atomic_write``).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "JsonlError",
    "StorageError",
    "append_text",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "make_dir",
    "read_jsonl",
    "rename",
    "storage_error",
    "storage_hint",
]

PathLike = str | os.PathLike[str]

#: what the running command lets the user change to write elsewhere (:func:`storage_hint`)
_HINT: contextvars.ContextVar[str] = contextvars.ContextVar(
    "storage_hint", default="write to another directory"
)
_ADVICE = {
    errno.ENOSPC: "free some space there",
    errno.EDQUOT: "free some of your disk quota there",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "this user may not write there",
}


class StorageError(OSError):
    """A run file could not be written; ``str()`` is one line naming the file, the cause and
    the option to change. ``errno`` and ``filename`` are the failed call's."""

    #: what to change to write elsewhere (:func:`storage_hint` of the command)
    hint: str = ""

    def __str__(self) -> str:
        name = errno.errorcode.get(self.errno or 0, "EIO")
        advice = _ADVICE.get(self.errno or 0, "check the disk")
        return (f"cannot write {self.filename!r}: {self.strerror} ({name}); {advice}, or "
                f"{self.hint}. Nothing written before was changed")


@contextlib.contextmanager
def storage_hint(text: str) -> Iterator[None]:
    """Within the block, a :class:`StorageError` suggests ``text`` (e.g. "choose another
    run directory with --out")."""
    token = _HINT.set(text)
    try:
        yield
    finally:
        _HINT.reset(token)


def storage_error(path: Path, exc: OSError) -> StorageError:
    """The :class:`StorageError` of ``exc``, raised while writing ``path``."""
    error = StorageError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path))
    error.hint = _HINT.get()
    return error


class JsonlError(ValueError):
    """A line of a JSON Lines file that is not a JSON object; the message names FILE:LINE.

    ``path``, ``lineno`` and ``detail`` (the JSON decoder's message, or ``None`` when the line
    parsed but is not an object) let a caller re-raise in its own words.
    """

    def __init__(self, path: PathLike, lineno: int, detail: str | None, message: str) -> None:
        super().__init__(f"{os.fspath(path)}:{lineno}: {message}")
        self.path = Path(path)
        self.lineno = lineno
        self.detail = detail


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through ``write(fh)`` into a temporary file, fsync, then ``os.replace``.

    The parent folder is created if missing. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8 text).

    Raises
    ------
    StorageError
        An ``OSError`` of the writing (module docstring); the temporary file is removed and
        ``path`` is unchanged.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    encoding = None if "b" in mode else "utf-8"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, encoding=encoding) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from exc


def rename(source: PathLike, target: PathLike) -> None:
    """``os.replace``; a failure is a :class:`StorageError` naming ``target``."""
    try:
        os.replace(source, target)
    except OSError as exc:
        raise storage_error(Path(target), exc) from exc


def make_dir(path: PathLike) -> None:
    """``mkdir -p``; a failure is a :class:`StorageError` naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(path, exc) from exc


def append_text(path: PathLike, text: str) -> None:
    """Append ``text`` (UTF-8) to ``path``; on a storage fault cut it back to its old length.

    Raises
    ------
    StorageError
    """
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            size = fh.tell()
            try:
                fh.write(text)
                fh.flush()
            except OSError:
                with contextlib.suppress(OSError):
                    fh.truncate(size)  # no partial line after the complete ones
                raise
    except OSError as exc:
        raise storage_error(path, exc) from exc


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write the string ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN and infinities allowed) plus a newline, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


def read_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines file, one JSON object per non-blank line.

    Raises
    ------
    JsonlError
        A line is not a JSON object (a truncated or damaged file): names the file and line.
    FileNotFoundError
        No such file.
    """
    records = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JsonlError(
                    path,
                    number,
                    exc.msg,
                    f"not a JSON record ({exc.msg} at column {exc.colno}); the file is damaged "
                    "or was cut off while being written",
                ) from None
            if not isinstance(record, dict):
                raise JsonlError(
                    path, number, None, f"expected a JSON object, got {type(record).__name__}"
                )
            records.append(record)
    return records
