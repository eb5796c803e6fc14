"""One home for the experiments' run files: atomic writes and the JSON Lines reader.

Every file is written into a temporary file next to it, flushed, fsynced, then moved over the
target with ``os.replace``: a reader (or a killed writer) sees the old file or the new one, never
a half-written one. The reader of ``*.jsonl`` names ``FILE:LINE`` on damaged content.

These functions write on every process; under torchrun the training and evaluation writers
gate them on ``dist_launch.is_writer()`` (see ``checkpoints.atomic_write``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["JsonlError", "atomic_write", "atomic_write_json", "atomic_write_text", "read_jsonl"]

PathLike = str | os.PathLike[str]


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
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    encoding = None if "b" in mode else "utf-8"
    with open(tmp, mode, encoding=encoding) as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
