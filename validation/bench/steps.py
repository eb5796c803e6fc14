"""Benchmark: the torch optimisers and Fisher products against plain training steps and curvlinops.

Six workloads, float32, one batch each (:mod:`validation.bench.workloads`): a small T5
with LoRA on q and v (per-sequence loss over label word + EOS), a small ViT with LoRA on q_proj
and v_proj, and, with ALL parameters trainable, a small MLP, an MLP of 3.2 million parameters,
the same T5 and the same ViT. On each, in this one process, alternating within every repeat
after a warm-up, the median time of

* a plain forward + backward (the model's own mean loss), an AdamW step and an SGD step
  (forward + backward + ``optimizer.step()``);
* one step of :class:`backends.torch.optim.methods.IEF`, ``EF`` and ``SF`` on every ``per_sample``
  route ("auto": ghost or materialised per layer by the cost model, "ghost", "hooks": materialised
  per layer, "vmap": dense G);
* on the LoRA workloads and the small MLP, the parts of an iEF step: building the
  :class:`backends.TorchProvider`, G by hooks and by vmap, and the Gram solve;
* one Fisher-vector product (:func:`ngdref.fisher_vp`: jvp + vjp_sum) and one
  :func:`ngdref.gamma` (with :func:`ngdref.fisher_quadratic_form`, one jvp, and through
  ``fisher_vp``), against curvlinops' ``GGNLinearOperator`` and ``EFLinearOperator``
  matvecs on the same model, batch and vector (the printed relative gaps show that they compute
  the same products).

The optimisers run with lr = 1e-12, so every measured thing sees the same parameters; the
arithmetic of a step does not depend on lr. The models are in eval mode (dropout off), as the
paper's steps are. Peak memory of a step is measured three ways: live tensor bytes from
torch's profiler in this process (``_live_tensor_peak``), and the peak RSS increase in a
fresh process per cell (``_peak_rss_increase``), with glibc's default allocator settings
and with a fixed mmap threshold; each iEF step's peak over the AdamW step's (whose .grad, m
and v exist before the measured step, so they are added to its increase). Nothing is
asserted: these are measurements, and the targets are printed next to them with "met" or
"missed":

* an iEF step <= 1.2 x an AdamW step (time), on every workload and route "auto";
* peak memory of an iEF step <= 1.0 x an AdamW step's (its .grad, m and v included), on the
  full-parameter workloads;
* an SF step <= 1.5 x an iEF step (time).

``--device cuda`` runs the timings on the GPU (peak memory from ``torch.cuda``'s allocator);
without CUDA it says so and runs on the CPU.

Usage: ``python -m validation.bench.steps [--quick] [--repeats 7] [--threads 2] [--no-memory]
[--device cpu|cuda] [--workloads t5,mlp_big,...]``
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

import ngdref
from backends.torch.optim.methods import EF, IEF, PER_SAMPLE, SF
from backends.torch.provider import TorchProvider
from validation.bench.memory import (
    _cuda_peak,
    _live_tensor_peak,
    _peak_rss_increase,
)
from validation.bench.report import _device, _load, _machine, _ms, _ratio, _table, _verdict
from validation.bench.workloads import BUILDERS, FULL_PARAMETER, WORKLOADS, Workload

LR = 1e-12  # see the module docstring: steps cost the same, parameters stay put
DAMPING = 1e-6  # relative (x max_n ||grad l_n||^2) for the Gram methods
SF_DAMPING = 1e-3  # absolute, parameter space
TOTAL_STEPS = 10**9  # EF and SF decay lr over total_steps; never reached here
IEF_TARGET = 1.2  # iEF step / AdamW step (time)
MEMORY_TARGET = 1.0  # peak of an iEF step / peak of an AdamW step, full-parameter workloads
SF_TARGET = 1.5  # SF step / iEF step (time)
FVP_TARGET = 1.0  # ngdref FVP / curvlinops GGN matvec
ROUTES = tuple(PER_SAMPLE)  # auto, ghost, hooks, vmap
PRODUCT_WORKLOADS = ("t5", "vit", "mlp")  # the parts of a step and the curvlinops checks


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


def _ngd_step(w: Workload, cls: type, route: str) -> Callable[[], object]:
    options: dict[str, Any] = {"lr": LR, "per_sample": route}
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


def steps(w: Workload, routes: tuple[str, ...] = ROUTES) -> dict[str, Callable[[], object]]:
    """The training steps (the things whose peak memory can also be measured)."""
    out: dict[str, Callable[[], object]] = {
        "forward+backward": _plain_step(w, None),
        "AdamW step": _plain_step(w, torch.optim.AdamW(w.trainable, lr=LR)),
        "SGD step": _plain_step(w, torch.optim.SGD(w.trainable, lr=LR)),
    }
    for route in routes:
        for label, cls in (("iEF", IEF), ("EF", EF), ("SF", SF)):
            out[f"{label} step ({route})"] = _ngd_step(w, cls, route)
    return out


def fallbacks(w: Workload) -> list[str]:
    """The parameters whose per-sample gradients the "auto" route takes by vmap."""
    optimizer = IEF(w.model, w.loss, lr=LR, damping=DAMPING, damping_mode="relative")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        optimizer.step(lambda: w.batch)
    return list(optimizer.diagnostics["fallbacks"])


@dataclass
class Products:
    """The matvecs and the iEF parts, built once, with their cross-checks."""

    things: dict[str, Callable[[], object]]
    gaps: dict[str, float | None]
    notes: list[str]


def products(w: Workload) -> Products:
    provider = TorchProvider(w.model, w.provider_inputs, per_sample_method="hooks")
    vmap_provider = TorchProvider(w.model, w.provider_inputs, per_sample_method="vmap")
    q = ngdref.batch_quantities(provider, w.loss, w.targets)
    e = q.logit_grads
    fvp = ngdref.fisher_vp(provider, w.loss, w.targets)
    form = ngdref.fisher_quadratic_form(provider, w.loss, w.targets)
    update, _ = ngdref.gram_update(
        q.per_sample_grads, q.logit_grad_sq_norms, damping=DAMPING, damping_mode="relative"
    )
    vector = torch.randn(w.num_params, generator=torch.Generator().manual_seed(6)).to(
        w.trainable[0].device
    )
    things: dict[str, Callable[[], object]] = {
        "  TorchProvider() (logits fwd)": lambda: TorchProvider(
            w.model, w.provider_inputs, per_sample_method="hooks"
        ),
        "  G by hooks (provider.vjp)": lambda: provider.vjp(e),
        "  G by vmap (provider.vjp)": lambda: vmap_provider.vjp(e),
        "  Gram solve (gram_update)": lambda: ngdref.gram_update(
            q.per_sample_grads, q.logit_grad_sq_norms, damping=DAMPING, damping_mode="relative"
        ),
        "FVP (fisher_vp: jvp+vjp_sum)": lambda: fvp(vector),
        "gamma (fisher_quadratic_form)": lambda: ngdref.gamma(update, q.grad, quadratic_form=form),
        "gamma (through fisher_vp)": lambda: ngdref.gamma(update, q.grad, fisher_vp=fvp),
    }
    gaps: dict[str, float | None] = {}
    notes: list[str] = []
    if w.curvlinops_args is None:
        notes.append("curvlinops: not available for this model")
        return Products(things, gaps, notes)
    try:
        from curvlinops import EFLinearOperator, GGNLinearOperator
    except ImportError as err:  # pragma: no cover - curvlinops is an optional oracle
        notes.append(f"curvlinops: skipped, cannot import it ({err})")
        return Products(things, gaps, notes)
    model_func, loss_func, x, y, batch_size_fn = w.curvlinops_args
    options = {"check_deterministic": False, "batch_size_fn": batch_size_fn}
    reference = {
        "GGN": fvp(vector),
        "EF": q.per_sample_grads.T @ (q.per_sample_grads @ vector),
    }
    for label, cls in (("GGN", GGNLinearOperator), ("EF", EFLinearOperator)):
        name = f"curvlinops {label} matvec"
        try:
            operator = cls(model_func, loss_func, w.trainable, [(x, y)], **options)
            result = operator @ vector
        except Exception as err:  # a cell curvlinops cannot handle is reported, not fatal
            notes.append(f"{name}: skipped, {type(err).__name__}: {err}")
            continue
        things[name] = lambda operator=operator: operator @ vector
        gap = float((result - reference[label]).norm() / reference[label].norm())
        gaps[label] = gap
    if w.curvlinops_note:
        notes.append(w.curvlinops_note)
    return Products(things, gaps, notes)


def _median_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, min_time: float = 0.02
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-call medians of wall-clock and of process CPU time (all threads), in seconds.

    A thing faster than ``min_time`` is called several times in a row per measurement (as
    ``timeit`` does), so that millisecond cells are not timer and scheduler noise.
    """
    calls = dict.fromkeys(fns, 1)
    for round_ in range(max(warmup, 1)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_ == max(warmup, 1) - 1:
                calls[name] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # alternate so drift hits all alike
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(calls[name]):
                fn()
            wall[name].append((time.perf_counter() - start) / calls[name])
            cpu[name].append((time.process_time() - start_cpu) / calls[name])
        gc.collect()
    return (
        {name: statistics.median(ts) for name, ts in wall.items()},
        {name: statistics.median(ts) for name, ts in cpu.items()},
    )


def _memory_child(workload: str, thing: str, quick: bool, threads: int) -> int:
    torch.set_num_threads(threads)
    w = BUILDERS[workload](quick, torch.device("cpu"))
    fn = steps(w, (_route_of(thing),))[thing]
    increase, before, method = _peak_rss_increase(fn)
    print(json.dumps({"increase": increase, "before": before, "method": method}))
    return 0


def _route_of(thing: str) -> str:
    """"iEF step (ghost)" -> "ghost"; the plain steps -> "auto" (unused)."""
    return thing.rsplit("(", 1)[1].rstrip(")") if "(" in thing else "auto"


def _state_bytes(w: Workload, thing: str) -> int:
    """What an AdamW step holds across steps, so not in its increase: .grad, m and v.

    Its ``zero_grad(set_to_none=True)`` frees the previous gradients before the backward pass
    allocates new ones, so the gradients, like m and v, are live at its peak but not above
    its start. An exact step keeps nothing between steps (it sets no ``.grad``).
    """
    if thing != "AdamW step":
        return 0
    return 3 * sum(p.numel() * p.element_size() for p in w.trainable)


#: glibc's fixed mmap threshold: every block above 128 KiB is its own mapping, returned to the
#: OS when freed (the default threshold grows with freed blocks up to 32 MiB, after which such
#: blocks come from the heap, whose holes RSS keeps)
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _measure_memory(
    workload: str, thing: str, quick: bool, threads: int, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run :func:`_memory_child` in a fresh interpreter (its own RSS, nothing left over)."""
    command = [
        sys.executable, "-m", "validation.bench.steps", "--memory-child", workload, thing,
        "--threads", str(threads), *(["--quick"] if quick else []),
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, **(env or {})}
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio_rows(
    columns: dict[str, dict[str, float]], names: list[str], routes: tuple[str, ...]
) -> list[tuple[str, list[str], str]]:
    def row(label: str, top: str, bottom: str, target: float | None) -> tuple:
        values = [_ratio(columns[k].get(top), columns[k].get(bottom)) for k in names]
        cells = ["-" if v is None else f"{v:.2f}" for v in values]
        tail = ""
        if target is not None:
            tail = f"  <= {target:g}: " + ", ".join(_verdict(v, target) for v in values)
        return (label, cells, tail)

    out = []
    for route in routes:
        out.append(row(f"iEF step ({route}) / AdamW step", f"iEF step ({route})", "AdamW step",
                       IEF_TARGET))
    for route in routes:
        out.append(row(f"EF step ({route}) / AdamW step", f"EF step ({route})", "AdamW step",
                       None))
    for route in routes:
        out.append(row(f"SF step ({route}) / iEF step ({route})", f"SF step ({route})",
                       f"iEF step ({route})", SF_TARGET))
    out += [
        row("iEF step (auto) / fwd+bwd", "iEF step (auto)", "forward+backward", None),
        row("FVP / curvlinops GGN matvec", "FVP (fisher_vp: jvp+vjp_sum)",
            "curvlinops GGN matvec", FVP_TARGET),
        row("G by vmap / by hooks", "  G by vmap (provider.vjp)", "  G by hooks (provider.vjp)",
            None),
        row("gamma (quadratic form) / FVP", "gamma (fisher_quadratic_form)",
            "FVP (fisher_vp: jvp+vjp_sum)", None),
        row("curvlinops EF / GGN matvec", "curvlinops EF matvec", "curvlinops GGN matvec", None),
    ]
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--memory-child", nargs=2, metavar=("WORKLOAD", "THING"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.workloads.split(",")) - set(WORKLOADS))
    if unknown:
        parser.error(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    return args


def _timings(
    args: argparse.Namespace, names: list[str], device: torch.device
) -> tuple[dict[str, Workload], dict[str, Any], dict[str, list[str]]]:
    repeats = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    print(f"# float32, eval mode, lr={LR}, {device}; per-call medians of {repeats} alternating "
          f"repeats after {warmup} warm-up round(s), things under 20 ms called repeatedly")
    workloads: dict[str, Workload] = {}
    results: dict[str, Any] = {"wall": {}, "cpu": {}, "gaps": {}}
    notes: dict[str, list[str]] = {}
    for name in names:
        w = BUILDERS[name](args.quick, device)
        workloads[name] = w
        fns = steps(w)
        notes[name] = [f"vmap fallback: {f}" for f in fallbacks(w)]
        if name in PRODUCT_WORKLOADS:
            prod = products(w)
            fns.update(prod.things)
            notes[name] += prod.notes
            results["gaps"][name] = prod.gaps
        results["wall"][name], results["cpu"][name] = _median_times(fns, repeats, warmup)
    return workloads, results, notes


def _memory(
    args: argparse.Namespace, workloads: dict[str, Workload], device: torch.device, width: int
) -> None:
    names = list(workloads)
    things = ("AdamW step", *(f"iEF step ({r})" for r in (("auto",) if args.quick else ROUTES)))
    peaks: dict[str, dict[str, float | None]] = {k: {} for k in names}
    for k, w in workloads.items():
        fns = steps(w)
        for thing in things:
            if device.type == "cuda":
                peaks[k][thing] = _cuda_peak(fns[thing])
            else:
                fns[thing]()  # warm-up (AdamW allocates its state in its first step)
                peaks[k][thing] = _live_tensor_peak(fns[thing])
    kinds: dict[str, dict[str, dict[str, float | None]]] = {
        "tensors" if device.type == "cpu" else "CUDA tensors": peaks
    }
    if device.type == "cpu":
        rss = {k: {t: _measure_memory(k, t, args.quick, args.threads, FIXED_MMAP)
                   for t in things} for k in names}
        kinds["RSS"] = {k: {t: rss[k][t].get("increase") for t in things} for k in names}
        for k in names:
            for t in things:
                if "error" in rss[k][t]:
                    print(f"  ({k}) {t}: RSS measurement failed: {rss[k][t]['error']}")

    def mb(x: float | None) -> str:
        return "-" if x is None else f"{x / 2**20:.2f}"

    rows = []
    for kind, table in kinds.items():
        for t in things:
            state = {k: _state_bytes(workloads[k], t) for k in names}
            cells = [mb(None if table[k][t] is None else table[k][t] + state[k]) for k in names]
            rows.append((f"  {kind}: {t}" + (" + grad, m, v" if t == "AdamW step" else ""),
                         cells, ""))
        for t in things[1:]:
            values = []
            for k in names:
                top, bottom = table[k][t], table[k]["AdamW step"]
                adam = None if bottom is None else bottom + _state_bytes(workloads[k], "AdamW step")
                values.append(_ratio(top, adam) if k in FULL_PARAMETER else None)
            cells = ["-" if v is None else f"{v:.2f}" for v in values]
            verdicts = ", ".join(_verdict(v, MEMORY_TARGET) for v in values if v is not None)
            rows.append((f"  {kind}: {t} / AdamW", cells, f"  <= 1 (full-parameter): {verdicts}"))
    rows.append(("  model parameters (all)", [mb(workloads[k].param_bytes) for k in names], ""))
    rows.append(("  G = N*P*4 bytes",
                 [mb(4 * workloads[k].num_samples * workloads[k].num_params) for k in names], ""))
    _table("peak memory of one step above its start [MB]", rows, names, width)
    print("  AdamW's .grad, m and v (3 x trainable bytes) live across steps: added to its peak.\n"
          "  tensors: torch.profiler(profile_memory=True) in this process, after a warm-up\n"
          "  step. RSS: a fresh process per cell, MALLOC_MMAP_THRESHOLD_=131072 (RSS follows\n"
          "  the live memory); VmHWM above VmRSS just before the step, after a warm-up step.")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.memory_child:
        return _memory_child(*args.memory_child, args.quick, args.threads)
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    names = args.workloads.split(",")
    print(_machine(args.threads))
    print(f"# load average at start {_load()}")
    workloads, results, notes = _timings(args, names, device)
    print()
    for key, w in workloads.items():
        print(f"# ({key}) {w.description}; P = {w.num_params} trainable of "
              f"{sum(p.numel() for p in w.model.parameters())}")
    wall, cpu = results["wall"], results["cpu"]
    rows = list(dict.fromkeys(row for col in wall.values() for row in col))
    width = 46  # the longest label of the tables below
    print(f"\n{'median [ms]: wall, process CPU':<{width}}"
          + "".join(f"{k + ' wall':>14}{'cpu':>8}" for k in names))
    for row in rows:
        print(f"{row:<{width}}" + "".join(
            f"{_ms(wall[k].get(row)):>14}{_ms(cpu[k].get(row))[2:]:>8}" for k in names))
    _table("ratio (wall)", _ratio_rows(wall, names, ROUTES), names, width)
    print(f"\n{'check: |ngdref - curvlinops| / |curvlinops|':<{width}}")
    for label, what in (("GGN", "FVP vs GGN matvec"), ("EF", "G^T G v vs EF matvec")):
        values = [results["gaps"].get(k, {}).get(label) for k in names]
        cells = "".join(f"{'-':>10}" if v is None else f"{v:10.1e}" for v in values)
        print(f"{'  ' + what:<{width}}{cells}")
    for key in names:
        for note in notes[key]:
            print(f"  ({key}) {note}")
    print(f"\n# load average after the timings {_load()}")
    if not args.no_memory:
        _memory(args, workloads, device, width)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
