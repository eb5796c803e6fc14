"""The report of ``python -m validation.bench.steps``: the machine, the tables and the targets.

The step bench measures each workload into a :class:`Measured` record; this module prints the
records: the medians, the ratios of every measured route, the cross-checks against
curvlinops, the peak memory, and last the table of the performance targets (the one the
benchmarks page shows), as Markdown. Nothing here measures anything.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import torch

from validation.bench.peers import GHOST_STEP, PER_SAMPLE_STEP

# ---- the measured things' names and the targets ------------------------------------------------
PLAIN = "forward+backward"
ADAMW = "AdamW step"
ADAMW_AGAIN = "AdamW step (again)"  # a second AdamW instance: the run's noise floor
SGD = "SGD step"
FVP = "FVP (fisher_vp: jvp+vjp_sum)"

IEF_TARGET = 1.2  # iEF (auto) / AdamW: LoRA, prompt tuning, all-parameter MLPs
IEF_TRANSFORMER_TARGET = 2.0  # iEF (auto) / AdamW: all-parameter transformers
PEER_TARGET = 1.0  # iEF (auto) / each Opacus step
SF_TARGET = 1.5  # SF / iEF, same route
MEMORY_TARGET = 1.0  # iEF peak / AdamW peak (its .grad, m, v included), all-parameter models
ALWAYS_TARGET = 1.3  # iEF with certify="always" / with certify="never"
FVP_TARGET = 1.0  # ngdref FVP / curvlinops GGN matvec


def step_name(method: str, route: str, certify: str | None = None) -> str:
    """ "iEF step (auto)", or "iEF step (auto, certify='never')"."""
    return f"{method} step ({route}" + ("" if certify is None else f", certify={certify!r}") + ")"


IEF_AUTO = step_name("iEF", "auto")
SF_AUTO = step_name("SF", "auto")
NEVER = step_name("iEF", "auto", "never")
ALWAYS = step_name("iEF", "auto", "always")


@dataclass
class Measured:
    """One workload's measurements (seconds, bytes) and what the reader must know about them.

    ``peaks[kind][thing]`` is the peak above the step's start, in bytes (None: not readable);
    AdamW's ``.grad``, m and v, which live across its steps, are added when printed.
    """

    name: str
    description: str
    num_params: int
    total_params: int
    num_samples: int
    trainable_bytes: int
    param_bytes: int
    full_parameter: bool
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    peaks: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def ief_target(self) -> float:
        """2 on an all-parameter transformer, 1.2 elsewhere (LoRA, prompt tuning, MLPs)."""
        transformer = not self.name.startswith("mlp")
        return IEF_TRANSFORMER_TARGET if self.full_parameter and transformer else IEF_TARGET

    def peak(self, kind: str, thing: str) -> float | None:
        """The peak of ``thing``, AdamW's state (3 x trainable bytes) added to its own."""
        value = self.peaks.get(kind, {}).get(thing)
        if value is None:
            return None
        return value + (3 * self.trainable_bytes if thing == ADAMW else 0)


# ---- the machine ------------------------------------------------------------------------------
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
    gpu = f"; {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"# {cpu}, {os.cpu_count()} cores{gpu}, {platform.system()} {platform.machine()}; "
        f"python {platform.python_version()}\n"
        f"# torch {torch.__version__} ({torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op; set_num_threads({threads})), "
        f"transformers {installed('transformers')}, peft {installed('peft')}, "
        f"opacus {installed('opacus')}, curvlinops-for-pytorch "
        f"{installed('curvlinops-for-pytorch')}"
    )


def _load() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg()) + " (1/5/15 min)"
    except OSError:
        return "unknown"


def _device(requested: str) -> torch.device:
    if requested == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda")
        print("# --device cuda: CUDA is not available here (torch.cuda.is_available() is "
              "False); running on the CPU instead")
    return torch.device("cpu")


# ---- cells ------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return f"{'-':>10}" if seconds is None else f"{1e3 * seconds:10.2f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "n/a"
    return "met" if value <= target else "missed"


def _count(p: int) -> str:
    """5942794 -> "5.94M", 98304 -> "98.3k", 275 -> "275"."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if p >= scale:
            return f"{p / scale:.3g}{suffix}"
    return str(p)


def _table(title: str, rows: list[tuple[str, list[str], str]], names: list[str],
           width: int) -> None:
    cell = max(10, *(len(k) + 2 for k in names))
    print(f"\n{title:<{width}}" + "".join(f"{k:>{cell}}" for k in names))
    for label, cells, tail in rows:
        print(f"{label:<{width}}" + "".join(f"{c:>{cell}}" for c in cells) + tail)


# ---- the detail sections ----------------------------------------------------------------------
WIDTH = 48  # the labels' column


def print_medians(records: list[Measured], cpu_time: bool) -> None:
    """Every measured thing's median, wall clock (and process CPU time, all threads)."""
    names = [r.name for r in records]
    things = list(dict.fromkeys(t for r in records for t in r.wall))
    cell = max(14, *(len(k) + 7 for k in names))
    title = "median [ms]: wall" + (", process CPU" if cpu_time else "")
    print(f"\n{title:<{WIDTH}}" + "".join(
        f"{k + ' wall':>{cell}}" + (f"{'cpu':>8}" if cpu_time else "") for k in names))
    for thing in things:
        print(f"{thing:<{WIDTH}}" + "".join(
            f"{_ms(r.wall.get(thing)):>{cell}}"
            + (f"{_ms(r.cpu.get(thing))[2:]:>8}" if cpu_time else "") for r in records))


def _ratio_row(records: list[Measured], label: str, top: str, bottom: str,
               target: float | None, clock: str = "wall") -> tuple[str, list[str], str]:
    values = [_ratio(getattr(r, clock).get(top), getattr(r, clock).get(bottom)) for r in records]
    cells = ["-" if v is None else f"{v:.2f}" for v in values]
    tail = ""
    if target is not None:
        tail = f"  <= {target:g}: " + ", ".join(_verdict(v, target) for v in values)
    return (label, cells, tail)


def print_ratios(records: list[Measured], routes: tuple[str, ...]) -> None:
    """Every route's steps against AdamW, SF against iEF, the parts and the products."""
    rows = [_ratio_row(records, f"{ADAMW_AGAIN} / {ADAMW}", ADAMW_AGAIN, ADAMW, None)]
    for method, bottom in (("iEF", ADAMW), ("EF", ADAMW), ("SF", "iEF")):
        for route in routes:
            under = bottom if bottom == ADAMW else step_name(bottom, route)
            target = SF_TARGET if method == "SF" else None
            rows.append(_ratio_row(records, f"{step_name(method, route)} / {under}",
                                   step_name(method, route), under, target))
    rows += [
        _ratio_row(records, f"{IEF_AUTO} / fwd+bwd", IEF_AUTO, PLAIN, None),
        _ratio_row(records, f"{PER_SAMPLE_STEP} / {ADAMW}", PER_SAMPLE_STEP, ADAMW, None),
        _ratio_row(records, f"{GHOST_STEP} / {ADAMW}", GHOST_STEP, ADAMW, None),
        _ratio_row(records, "FVP / curvlinops GGN matvec", FVP, "curvlinops GGN matvec",
                   FVP_TARGET),
        _ratio_row(records, "G by vmap / by hooks", "  G by vmap (provider.vjp)",
                   "  G by hooks (provider.vjp)", None),
        _ratio_row(records, "gamma (quadratic form) / FVP", "gamma (fisher_quadratic_form)",
                   FVP, None),
        _ratio_row(records, "curvlinops EF / GGN matvec", "curvlinops EF matvec",
                   "curvlinops GGN matvec", None),
    ]
    names = [r.name for r in records]
    _table("ratio (wall)", [row for row in rows if set(row[1]) != {"-"}], names, WIDTH)


def print_checks_and_notes(records: list[Measured]) -> None:
    """ngdref's products against curvlinops', and every workload's notes."""
    if any(r.gaps for r in records):
        names = [r.name for r in records if r.gaps]
        rows = []
        for label, what in (("GGN", "FVP vs GGN matvec"), ("EF", "G^T G v vs EF matvec")):
            values = [r.gaps.get(label) for r in records if r.gaps]
            rows.append(("  " + what, ["-" if v is None else f"{v:.1e}" for v in values], ""))
        _table("check: |ngdref - curvlinops| / |curvlinops|", rows, names, WIDTH)
    print()
    for r in records:
        for note in r.notes:
            print(f"  ({r.name}) {note}")


def print_memory(records: list[Measured], things: tuple[str, ...]) -> None:
    """Peaks of one step above its start, and each iEF route's over AdamW's (grad, m, v in)."""

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x / 2**20:.2f}"

    names = [r.name for r in records]
    kinds = list(dict.fromkeys(k for r in records for k in r.peaks))
    rows = []
    for kind in kinds:
        for t in things:
            label = f"  {kind}: {t}" + (" + grad, m, v" if t == ADAMW else "")
            rows.append((label, [mb(r.peak(kind, t)) for r in records], ""))
        for t in things[1:]:
            values = [_ratio(r.peak(kind, t), r.peak(kind, ADAMW)) for r in records]
            verdicts = ", ".join(_verdict(v, MEMORY_TARGET)
                                 for r, v in zip(records, values, strict=True)
                                 if r.full_parameter)
            rows.append((f"  {kind}: {t} / AdamW",
                         ["-" if v is None else f"{v:.2f}" for v in values],
                         f"  <= 1 (all-parameter): {verdicts}" if verdicts else ""))
    rows.append(("  model parameters (all)", [mb(r.param_bytes) for r in records], ""))
    rows.append(("  G = N*P*4 bytes", [mb(4 * r.num_samples * r.num_params) for r in records],
                 ""))
    _table("peak memory of one step above its start [MB]", rows, names, WIDTH)
    print("  AdamW's .grad, m and v (3 x trainable bytes) live across steps: added to its peak.\n"
          "  tensors: torch.profiler(profile_memory=True) in this process, after a warm-up\n"
          "  step. RSS: a fresh process per cell, MALLOC_MMAP_THRESHOLD_=131072 (RSS follows\n"
          "  the live memory); VmHWM above VmRSS just before the step, after a warm-up step.\n"
          "  CUDA tensors: torch.cuda.max_memory_allocated above the allocated at the start.")


# ---- the table of the performance targets -------------------------------------------------------
#: the step columns: (header, thing), each over the AdamW step of the same run
STEP_COLUMNS = (
    ("AdamW again", ADAMW_AGAIN),
    ("fwd+bwd", PLAIN),
    ("iEF (auto)", IEF_AUTO),
    ("SF (auto)", SF_AUTO),
    ("Opacus per-sample", PER_SAMPLE_STEP),
    ("Opacus ghost", GHOST_STEP),
)


def _cell(value: float | None, target: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" + ("" if target is None else f" {_verdict(value, target)}")


def _target_cells(r: Measured, clock: str, memory_kind: str | None) -> list[str]:
    """The cells of one workload's row of the targets table (see :func:`print_summary`)."""
    times = getattr(r, clock)

    def over(top: str, bottom: str) -> float | None:
        return _ratio(times.get(top), times.get(bottom))

    again = over(ADAMW_AGAIN, ADAMW)
    noise = None if again is None else 1 + abs(again - 1)
    memory = None if memory_kind is None else _ratio(r.peak(memory_kind, IEF_AUTO),
                                                     r.peak(memory_kind, ADAMW))
    return [
        _cell(over(IEF_AUTO, ADAMW), r.ief_target),
        _cell(over(IEF_AUTO, PER_SAMPLE_STEP), PEER_TARGET),
        _cell(over(IEF_AUTO, GHOST_STEP), PEER_TARGET),
        _cell(over(SF_AUTO, IEF_AUTO), SF_TARGET),
        _cell(memory, MEMORY_TARGET if r.full_parameter else None),
        _cell(over(IEF_AUTO, NEVER), noise),
        _cell(over(ALWAYS, NEVER), ALWAYS_TARGET),
    ]


TARGET_HEADERS = (
    f"iEF / AdamW <= {IEF_TARGET:g} ({IEF_TRANSFORMER_TARGET:g}: all-param. transformers)",
    f"iEF / Opacus per-sample <= {PEER_TARGET:g}",
    f"iEF / Opacus ghost <= {PEER_TARGET:g}",
    f"SF / iEF <= {SF_TARGET:g}",
    f"iEF peak memory / AdamW's <= {MEMORY_TARGET:g} (all-param.)",
    "certify 'first' / 'never' <= 1 + noise",
    f"certify 'always' / 'never' <= {ALWAYS_TARGET:g}",
)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def print_summary(records: list[Measured], clock: str, memory_kind: str | None) -> None:
    """The two Markdown tables the benchmarks page shows, on ``clock`` ("wall" or "cpu").

    The steps over the AdamW step of the same run ("AdamW again", a second AdamW instance, is
    the noise floor), then every target with its verdict: iEF (auto) / AdamW, iEF / each
    Opacus step, SF / iEF, the peak memory of an iEF step over AdamW's (``memory_kind``'s
    measurement; the target on all-parameter models), and the certificate's cost: the
    default ``certify="first"`` over ``"never"`` (within the noise floor ``1 + |again - 1|``)
    and ``"always"`` over ``"never"``.
    """
    what = {"wall": "wall clock", "cpu": "process CPU time (all threads)"}[clock]
    steps = [[r.name, _count(r.num_params), f"{1e3 * getattr(r, clock)[ADAMW]:.1f}"]
             + [_cell(_ratio(getattr(r, clock).get(thing), getattr(r, clock)[ADAMW]), None)
                for _, thing in STEP_COLUMNS] for r in records]
    print(f"\n## Step / AdamW step, {what}\n")
    print(_markdown(["workload", "P", "AdamW [ms]", *(h for h, _ in STEP_COLUMNS)], steps))
    rows = [[r.name, *_target_cells(r, clock, memory_kind)] for r in records]
    verdicts = [c.rsplit(" ", 1)[-1] for row in rows for c in row[1:] if " " in c]
    print(f"\n## Targets, {what}{'' if memory_kind is None else '; memory: ' + memory_kind}\n")
    print(_markdown(["workload", *TARGET_HEADERS], rows))
    print(f"\n{verdicts.count('met')} of {len(verdicts)} targets met; '-': not measured "
          "(a peer that refuses, a row that cannot run: see the notes above).")
