"""Peak-memory probes of ``python -m validation.bench.steps``: live tensors, RSS, CUDA.

The RSS probe runs in a fresh child process per measured step (:func:`run_child`), so that
nothing another step left behind counts.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


# ---- peak memory ------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (kineto prints its start and stop lines there from C++)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _live_tensor_peak(fn: Callable[[], object]) -> float | None:
    """Peak bytes of live CPU tensors during one call of ``fn``, above those live at its start.

    torch's profiler with ``profile_memory=True`` records every allocation and free of the
    CPU allocator; their running sum in time order is the live tensor memory. Counts tensor
    storage only (no allocator slack, no Python objects). None if the profiler's events are
    not readable in this torch version.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        changes = sorted(
            (e.start_ns(), e.nbytes()) for e in events
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return float(peak)


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss_increase(fn: Callable[[], object]) -> tuple[float, float, str]:
    """Peak RSS increase of one call of ``fn`` in bytes, the RSS before it, and the method.

    Linux: after a warm-up call, free memory is handed back to the OS (``gc.collect``,
    glibc ``malloc_trim(0)``), the kernel's high-water mark VmHWM is reset to the current RSS
    (``echo 5 > /proc/self/clear_refs``) and fn runs once: VmHWM - VmRSS before is its peak.
    This counts every page the call touches (torch tensors, autograd buffers, allocator
    slack), not only tensor bytes. Elsewhere, ``ru_maxrss`` on a first call (no warm-up).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        resettable = _status_kib("VmHWM") is not None
    except OSError:
        resettable = False
    if not resettable:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return float(after - before), float(before), "ru_maxrss, first call (no warm-up)"
    fn()  # warm-up: lazy initialisation, optimiser state
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        raise RuntimeError("/proc/self/status has no VmRSS or VmHWM line")
    method = "VmHWM reset (/proc/self/clear_refs) after a warm-up step and malloc_trim"
    return 1024.0 * (peak - before), 1024.0 * before, method


def _cuda_peak(fn: Callable[[], object]) -> float:
    """Peak bytes of CUDA tensors during one call of ``fn`` above those live at its start."""
    fn()  # warm-up, as for the other measurements
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


#: glibc's fixed mmap threshold: every block above 128 KiB is its own mapping, returned to the
#: OS when freed (the default threshold grows with freed blocks up to 32 MiB, after which such
#: blocks come from the heap, whose holes RSS keeps)
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(arguments: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """``python -m validation.bench.steps ARGUMENTS`` in a fresh interpreter: its last line as
    JSON (the child prints ``_peak_rss_increase``'s result), or ``{"error": why}``."""
    done = subprocess.run(
        [sys.executable, "-m", "validation.bench.steps", *arguments], capture_output=True,
        text=True, check=False, env={**os.environ, **(env or {})},
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])
