"""What the long commands say on stderr: a tqdm bar on a terminal, else a line per stage.

``progress`` arguments (``--progress auto|on|off``) resolve to one of three modes
(:func:`mode`): "bar" (a tqdm bar; the default when stderr is a terminal), "lines" (one
plain line per epoch, checkpoint or evaluated checkpoint, for log files; the default when
stderr is not a terminal) and "off". Notices (:func:`notice`: a resumed run, a stale lock
taken over, a hub about to be contacted) are printed in every mode: they are facts about
what the command does, not progress. Under torchrun only rank 0 prints.
"""

from __future__ import annotations

import sys

__all__ = ["MODES", "mode", "notice"]

MODES = ("bar", "lines", "off")


def mode(progress: bool | None) -> str:
    """"bar" for True, "off" for False; None: "bar" on a terminal, else "lines"."""
    if progress is None:
        return "bar" if sys.stderr.isatty() else "lines"
    return "bar" if progress else "off"


def notice(message: str) -> None:
    """Print ``message`` on stderr now (rank 0 alone under torchrun)."""
    from backends.torch.distributed import launch as dist_launch

    if dist_launch.is_writer():
        print(message, file=sys.stderr, flush=True)
