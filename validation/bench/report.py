"""The report helpers of ``python -m validation.bench.steps``: machine, load, table cells.
"""

from __future__ import annotations

import os
import platform

import torch


# ---- report -----------------------------------------------------------------------------------
def _machine(threads: int) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"# {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}; "
        f"python {platform.python_version()}\n"
        f"# torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op; set_num_threads({threads})), "
        f"transformers {installed('transformers')}, peft {installed('peft')}, "
        f"curvlinops-for-pytorch {installed('curvlinops-for-pytorch')}"
    )


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "unknown"


def _ms(seconds: float | None) -> str:
    return f"{'-':>10}" if seconds is None else f"{1e3 * seconds:10.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return "met" if value <= target else "missed"


def _device(requested: str) -> torch.device:
    if requested == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("# --device cuda: CUDA is not available here (torch.cuda.is_available() is "
              "False); running on the CPU instead")
    return torch.device("cpu")


def _table(
    title: str, rows: list[tuple[str, list[str], str]], names: list[str], width: int
) -> None:
    print(f"\n{title:<{width}}" + "".join(f"{k:>10}" for k in names))
    for label, cells, tail in rows:
        print(f"{label:<{width}}" + "".join(f"{c:>10}" for c in cells) + tail)
