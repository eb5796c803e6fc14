"""Benchmark: an exact iEF step against AdamW and Opacus, at the paper's shapes, on one command.

``python -m validation.bench.steps`` prints, per workload, the cost of ngdref's training steps
against an AdamW step and against the per-sample engine DP-SGD users run, Opacus, and last the
table of the performance targets that the benchmarks page shows. Nothing is asserted: these
are measurements, and the targets are printed beside them with "met" or "missed".

Workloads (float32, eval mode, one batch each, random weights): by default the paper-shape
ones a 2-core CPU affords (:data:`DEFAULT_WORKLOADS`, from
:mod:`validation.bench.paper_workloads`: t5-small's widths and vocabulary with LoRA, prompt
tuning and all parameters, ViT-S/16's widths with LoRA and all parameters, the paper's MLP
784-1536x3-10); ``--workloads`` picks others (t5-base and ViT-B/16 widths, and the small
models of :mod:`validation.bench.workloads`), ``--full-shapes`` gives the paper workloads
their checkpoints' own depths (for a GPU), ``--quick`` every workload at tiny widths (a smoke
run). On each, in one process, alternating within every repeat after a warm-up, the median
time of

* a plain forward + backward (the model's own mean loss), an AdamW step, **a second AdamW
  step** (another instance: its ratio to the first is the run's noise floor) and an SGD step;
* one step of each of ``--methods`` (default :class:`backends.torch.optim.methods.IEF` and
  ``SF``, the two with targets; ``--quick``: ``EF`` too) on each ``per_sample`` route of
  ``--routes`` (default "auto"; ``--quick``: every installed route);
  a route that holds every per-sample gradient ("hooks", "vmap", "loop") is skipped, with a
  note, where G would exceed ``--max-g-gb``;
* the iEF step (auto) with ``certify="never"`` and with ``certify="always"`` (the
  certificate's cost; a row the installed TorchProvider cannot run is a note with why);
* Opacus' per-sample step and its ghost-clipping step (:mod:`validation.bench.peers`), or why
  Opacus cannot do that work on the workload;
* on :data:`PRODUCT_WORKLOADS`, the parts of an iEF step and the Fisher products against
  curvlinops (:mod:`validation.bench.products`).

The optimisers run with lr = 1e-12, so every measured thing sees the same parameters; the
arithmetic of a step does not depend on lr. Peak memory of AdamW's and each iEF route's step is
measured as live tensor bytes in this process and as the peak RSS increase in a fresh process
per cell (:mod:`validation.bench.memory`); AdamW's ``.grad``, m and v are added to its peak.
``--device cuda`` runs everything on the GPU (CUDA's allocator gives the peaks; every timed
call is synchronised); without CUDA it says so and runs on the CPU.

Usage: ``python -m validation.bench.steps [--quick] [--full-shapes] [--device cpu|cuda]
[--workloads default|all|NAME,...] [--routes auto|all|ROUTE,...] [--methods iEF,SF|all]
[--threads 2] [--repeats 5] [--warmup 1] [--no-memory] [--max-g-gb 1]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from backends.torch.optim.methods import EF, IEF, PER_SAMPLE, SF
from validation.bench.memory import (
    FIXED_MMAP,
    _cuda_peak,
    _live_tensor_peak,
    _peak_rss_increase,
    run_child,
)
from validation.bench.paper_workloads import (
    PAPER_BUILDERS,
    PAPER_FULL_PARAMETER,
    PAPER_WORKLOADS,
)
from validation.bench.peers import opacus_peers
from validation.bench.products import products
from validation.bench.report import (
    ADAMW,
    ADAMW_AGAIN,
    PLAIN,
    SGD,
    Measured,
    _device,
    _load,
    _machine,
    print_checks_and_notes,
    print_medians,
    print_memory,
    print_ratios,
    print_summary,
    step_name,
)
from validation.bench.timing import median_times
from validation.bench.workloads import BUILDERS, FULL_PARAMETER, WORKLOADS, Workload

LR = 1e-12  # see the module docstring: steps cost the same, parameters stay put
DAMPING = 1e-6  # relative (x max_n ||grad l_n||^2) for the Gram methods
SF_DAMPING = 1e-3  # absolute, parameter space
TOTAL_STEPS = 10**9  # EF and SF decay lr over total_steps; never reached here
MIN_TIME = 0.02  # things faster than this are called repeatedly per measurement
METHODS = {"iEF": IEF, "EF": EF, "SF": SF}
ROUTES = tuple(PER_SAMPLE)  # the installed routes: auto, ghost, hooks, vmap (and loop)
DENSE_ROUTES = ("hooks", "vmap", "loop")  # they hold all N x P per-sample gradients
ALL_WORKLOADS = WORKLOADS + PAPER_WORKLOADS
ALL_FULL_PARAMETER = FULL_PARAMETER + PAPER_FULL_PARAMETER
#: the paper-shape workloads the 2-core CPU run affords, one per target kind and model family
DEFAULT_WORKLOADS = ("mlp_paper", "t5_small_lora", "t5_small_prompt", "t5_small_full",
                     "vit_s16_lora", "vit_s16_full")
#: the workloads whose products and iEF parts are timed (dense G stays small on them)
PRODUCT_WORKLOADS = ("t5", "vit", "mlp", "t5_small_lora", "vit_s16_lora")


def build(name: str, *, quick: bool, device: torch.device, full_shapes: bool = False
          ) -> Workload:
    """The workload ``name`` of :data:`ALL_WORKLOADS` (``full_shapes``: paper workloads only)."""
    if name in PAPER_BUILDERS:
        return PAPER_BUILDERS[name](quick, device, full_shapes=full_shapes)
    return BUILDERS[name](quick, device)


# ---- the measured things ----------------------------------------------------------------------
def _plain_step(w: Workload, optimizer: torch.optim.Optimizer | None) -> Callable[[], object]:
    def run() -> object:
        w.model.zero_grad(set_to_none=True)
        loss = w.plain_loss()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss

    return run


def _ngd_step(w: Workload, cls: type, route: str, **extra: Any) -> Callable[[], object]:
    options: dict[str, Any] = {"lr": LR, "per_sample": route, **extra}
    if cls is SF:
        options.update(damping=SF_DAMPING, total_steps=TOTAL_STEPS)
    else:
        options.update(damping=DAMPING, damping_mode="relative")
        if cls is EF:
            options["total_steps"] = TOTAL_STEPS
    optimizer = cls(w.model, w.loss, **options)
    batch = w.batch

    def run() -> object:
        with warnings.catch_warnings():  # the fallbacks are listed once, in the notes
            warnings.simplefilter("ignore", UserWarning)
            return optimizer.step(lambda: batch)

    return run


def steps(w: Workload, routes: tuple[str, ...] = ROUTES,
          methods: tuple[str, ...] = tuple(METHODS)) -> dict[str, Callable[[], object]]:
    """The training steps (the things whose peak memory can also be measured), in order."""
    out: dict[str, Callable[[], object]] = {
        PLAIN: _plain_step(w, None),
        ADAMW: _plain_step(w, torch.optim.AdamW(w.trainable, lr=LR)),
        ADAMW_AGAIN: _plain_step(w, torch.optim.AdamW(w.trainable, lr=LR)),
        SGD: _plain_step(w, torch.optim.SGD(w.trainable, lr=LR)),
    }
    for route in routes:
        for label in methods:
            out[step_name(label, route)] = _ngd_step(w, METHODS[label], route)
    return out


def certify_steps(w: Workload) -> dict[str, Callable[[], object]]:
    """The iEF step (auto) with ``certify="never"`` and ``"always"``: the certificate's cost."""
    return {step_name("iEF", "auto", certify): _ngd_step(w, IEF, "auto", certify=certify)
            for certify in ("never", "always")}


def route_notes(w: Workload) -> list[str]:
    """What one default iEF step reports: the parameters "auto" gives another route, and the
    certificate of the first step (``certify="first"``)."""
    optimizer = IEF(w.model, w.loss, lr=LR, damping=DAMPING, damping_mode="relative")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        optimizer.step(lambda: w.batch)
    diagnostics = optimizer.diagnostics
    notes = [f"fallback: {f}" for f in diagnostics["fallbacks"]]
    certificate = diagnostics["certificate"]
    if certificate is not None:
        notes.append(f"first step certified ({certificate['route']}): error "
                     f"{certificate['error']:.1e} <= bound {certificate['bound']:.1e}")
    return notes


def affordable(w: Workload, routes: tuple[str, ...], max_g_gb: float
               ) -> tuple[tuple[str, ...], list[str]]:
    """The routes of ``routes`` to run on ``w``: those holding G (N x P x 4 bytes) only where
    it fits ``max_g_gb``; a note for each skipped one."""
    g_bytes = 4 * w.num_samples * w.num_params
    if g_bytes <= max_g_gb * 2**30:
        return routes, []
    skipped = tuple(r for r in routes if r in DENSE_ROUTES)
    notes = [f"per_sample={r!r}: skipped, it holds G, {g_bytes / 2**30:.1f} GiB here "
             f"(> --max-g-gb {max_g_gb:g})" for r in skipped]
    return tuple(r for r in routes if r not in skipped), notes


def _timed_things(w: Workload, routes: tuple[str, ...], methods: tuple[str, ...]
                  ) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """Everything timed on ``w``, in the order printed, and the notes on what is missing."""
    fns = {**steps(w, routes, methods), **certify_steps(w)}
    notes = []
    for peer in opacus_peers(w, lr=LR).values():
        if peer.run is None:
            notes.append(f"{peer.name}: - ({peer.reason})")
        else:
            fns[peer.name] = peer.run
    return fns, notes


# ---- one workload -----------------------------------------------------------------------------
def _memory(w: Workload, args: argparse.Namespace, device: torch.device,
            routes: tuple[str, ...]) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Peaks of AdamW's and each iEF route's step: live tensors here and RSS in a fresh process
    per step (CPU), or CUDA's allocator; and the notes on failed measurements."""
    things = (ADAMW, *(step_name("iEF", r) for r in _memory_routes(args, routes)))
    fns = steps(w, routes, ("iEF",))
    if device.type == "cuda":
        return {"CUDA tensors": {t: _cuda_peak(fns[t]) for t in things}}, []
    tensors: dict[str, float | None] = {}
    for thing in things:
        fns[thing]()  # warm-up (AdamW allocates its state in its first step)
        tensors[thing] = _live_tensor_peak(fns[thing])
    del fns
    gc.collect()
    rss: dict[str, float | None] = {}
    notes = []
    for thing in things:
        got = run_child(["--memory-child", w.name, thing, "--threads", str(args.threads),
                         *(["--quick"] if args.quick else []),
                         *(["--full-shapes"] if args.full_shapes else [])], FIXED_MMAP)
        rss[thing] = got.get("increase")
        if "error" in got:
            notes.append(f"{thing}: RSS measurement failed: {got['error']}")
    return {"tensors": tensors, "RSS": rss}, notes


def _memory_routes(args: argparse.Namespace, routes: tuple[str, ...]) -> tuple[str, ...]:
    """The iEF routes whose peaks are measured: "auto" alone in a quick run (a fresh process
    per cell costs seconds of imports), else every timed one."""
    return tuple(r for r in routes if r == "auto" or not args.quick)


def measure(name: str, args: argparse.Namespace, device: torch.device,
            routes: tuple[str, ...]) -> Measured:
    """Build the workload ``name``, time everything on it, measure its peaks; then free it."""
    repeats = args.repeats or (2 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else 1
    w = build(name, quick=args.quick, device=device, full_shapes=args.full_shapes)
    r = Measured(name, w.description, w.num_params, sum(p.numel() for p in w.model.parameters()),
                 w.num_samples, sum(p.numel() * p.element_size() for p in w.trainable),
                 w.param_bytes, name in ALL_FULL_PARAMETER)
    routes, r.notes = affordable(w, routes, args.max_g_gb)
    r.notes += route_notes(w)
    fns, notes = _timed_things(w, routes, args.methods)
    r.notes += notes
    if name in PRODUCT_WORKLOADS:
        parts = products(w, DAMPING)
        fns.update(parts.things)
        r.gaps, r.notes = parts.gaps, r.notes + parts.notes
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    r.wall, r.cpu = median_times(fns, repeats, warmup, min_time=MIN_TIME, sync=sync)
    del fns
    gc.collect()
    if not args.no_memory:
        r.peaks, notes = _memory(w, args, device, routes)
        r.notes += notes
    return r


def _memory_child(args: argparse.Namespace) -> int:
    workload, thing = args.memory_child
    torch.set_num_threads(args.threads)
    w = build(workload, quick=args.quick, device=torch.device("cpu"),
              full_shapes=args.full_shapes)
    fn = steps(w, (_route_of(thing),), ("iEF",))[thing]
    increase, before, method = _peak_rss_increase(fn)
    print(json.dumps({"increase": increase, "before": before, "method": method}))
    return 0


def _route_of(thing: str) -> str:
    """"iEF step (ghost)" -> "ghost"; the plain steps -> "auto" (unused)."""
    return thing.rsplit("(", 1)[1].rstrip(")") if "(" in thing else "auto"


# ---- the command ------------------------------------------------------------------------------
def _choose(value: str | None, default: tuple[str, ...], every: tuple[str, ...], what: str,
            parser: argparse.ArgumentParser) -> tuple[str, ...]:
    """A comma-separated subset of ``every`` ("all": every one; None: ``default``)."""
    if value is None:
        return default
    chosen = every if value == "all" else tuple(value.split(","))
    unknown = sorted(set(chosen) - set(every))
    if unknown:
        parser.error(f"--{what}: unknown {unknown}; choose from {list(every)} or 'all'")
    return chosen


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="every workload at tiny widths, every route")
    add("--full-shapes", action="store_true",
        help="the paper workloads at their checkpoints' depths, 224 x 224 images (a GPU)")
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--workloads", default=None,
        help=f"'default' ({','.join(DEFAULT_WORKLOADS)}), 'all', or a comma-separated "
             f"subset of {','.join(ALL_WORKLOADS)}")
    add("--routes", default=None,
        help=f"'all' or a comma-separated subset of {','.join(ROUTES)} (default auto; "
             "--quick: all)")
    add("--methods", default=None,
        help="'all' or a comma-separated subset of iEF,EF,SF (default iEF,SF; --quick: all)")
    add("--threads", type=int, default=2)
    add("--repeats", type=int, default=None, help="default 5 (quick: 2)")
    add("--warmup", type=int, default=None, help="default 1")
    add("--no-memory", action="store_true", help="skip the memory measurements")
    add("--max-g-gb", type=float, default=1.0,
        help="skip the routes holding G (N x P floats) where it exceeds this many GiB")
    add("--memory-child", nargs=2, metavar=("WORKLOAD", "THING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workloads == "default":
        args.workloads = None
    args.names = _choose(args.workloads, ALL_WORKLOADS if args.quick else DEFAULT_WORKLOADS,
                         ALL_WORKLOADS, "workloads", parser)
    args.methods = _choose(args.methods, tuple(METHODS) if args.quick else ("iEF", "SF"),
                           tuple(METHODS), "methods", parser)
    args.routes = _choose(args.routes, ROUTES if args.quick else ("auto",), ROUTES, "routes",
                          parser)
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.memory_child:
        return _memory_child(args)
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    started = time.perf_counter()
    print(_machine(args.threads))
    print(f"# load average at start {_load()}")
    print(f"# float32, eval mode, lr={LR}, {device}; per-call medians of "
          f"{args.repeats or (2 if args.quick else 5)} alternating repeats after "
          f"{1 if args.warmup is None else args.warmup} warm-up round(s), things under "
          f"{1e3 * MIN_TIME:g} ms called repeatedly; {','.join(args.methods)} on the "
          f"routes {','.join(args.routes)}"
          + ("; --full-shapes" if args.full_shapes else "") + ("; --quick" if args.quick else ""))
    records = []
    for name in args.names:
        records.append(measure(name, args, device, args.routes))
        r = records[-1]
        print(f"# ({name}) {r.description}; P = {r.num_params} trainable of "
              f"{r.total_params}; done at {time.perf_counter() - started:.0f} s", flush=True)
        gc.collect()
    print_medians(records, cpu_time=device.type == "cpu")
    print_ratios(records, args.routes)
    print_checks_and_notes(records)
    memory_kind = None
    if not args.no_memory:
        things = (ADAMW, *(step_name("iEF", r) for r in _memory_routes(args, args.routes)))
        print_memory(records, things)
        memory_kind = "RSS" if device.type == "cpu" else "CUDA tensors"
    print(f"\n# load average at the end {_load()}; "
          f"{(time.perf_counter() - started) / 60:.1f} minutes in all")
    print_summary(records, "wall", memory_kind)
    if device.type == "cpu":
        print_summary(records, "cpu", memory_kind)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
