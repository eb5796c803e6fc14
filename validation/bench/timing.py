"""Benchmark: Gram-form iEF update vs the dense P x P solve, N = 32, P from 10^2 to 10^6.

Both are timed in this one process, alternating, after a warm-up; the
medians and their ratio are printed. The dense route forms
F_iEF + lambda I_P and solves it (parameter-space damping, so both compute
the same vector); it runs only while the P x P matrix fits the memory budget.
Nothing is asserted: these are measurements.

Usage: ``python -m validation.bench.timing [--max-p 1000000] [--dense-max-p 4096] [--repeats 5]``
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

import ngdref


def median_times(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int, *, min_time: float = 0.0,
    sync: Callable[[], object] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Per-call medians of wall-clock and of process CPU time (all threads), in seconds.

    After ``warmup`` rounds (at least one), ``repeats`` rounds call every thing in turn, so
    that the machine's drift hits all alike. A thing faster than ``min_time`` (measured in the
    last warm-up round) is called several times in a row per measurement, as ``timeit`` does,
    so that millisecond cells are not timer and scheduler noise. ``sync`` (e.g.
    ``torch.cuda.synchronize``) is called before the clock starts and before it stops, so
    that an asynchronous device's work is timed when it has finished.
    """
    wait = sync or (lambda: None)
    calls = dict.fromkeys(fns, 1)
    rounds = max(warmup, 1)
    for round_ in range(rounds):
        for name, fn in fns.items():
            wait()
            start = time.perf_counter()
            fn()
            wait()
            if round_ == rounds - 1:
                calls[name] = max(1, math.ceil(min_time / max(time.perf_counter() - start, 1e-6)))
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wait()
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(calls[name]):
                fn()
            wait()
            wall[name].append((time.perf_counter() - start) / calls[name])
            cpu[name].append((time.process_time() - start_cpu) / calls[name])
        gc.collect()
    return (
        {name: statistics.median(ts) for name, ts in wall.items()},
        {name: statistics.median(ts) for name, ts in cpu.items()},
    )


def gram_vs_dense(n: int, sizes: list[int], dense_max_p: int, repeats: int) -> list[dict]:
    """Time the two routes for every P in ``sizes``; returns one row per P."""
    rng = np.random.default_rng(0)
    damping = 1e-3
    rows = []
    for p in sizes:
        g_rows = rng.standard_normal((n, p))
        s = rng.uniform(0.1, 1.0, n)
        grad = g_rows.sum(axis=0)
        fns: dict[str, Callable[[], object]] = {
            "gram": lambda g_rows=g_rows, s=s: ngdref.ief_update(
                g_rows, s, damping=damping, damping_space="parameter"
            )
        }
        if p <= dense_max_p:
            eye = np.eye(p)

            def dense(g_rows=g_rows, s=s, grad=grad, eye=eye):
                return np.linalg.solve(ngdref.ief_matrix(g_rows, s) + damping * eye, grad)

            fns["dense"] = dense
            gap = np.linalg.norm(fns["gram"]() - dense()) / np.linalg.norm(dense())
        else:
            gap = float("nan")
        t, _ = median_times(fns, repeats, 1)
        rows.append({"P": p, "gram_s": t["gram"], "dense_s": t.get("dense"), "rel_gap": gap})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-p", type=int, default=1_000_000)
    parser.add_argument("--dense-max-p", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [p for p in (100, 1_000, 4_096, 10_000, 100_000, 1_000_000) if p <= args.max_p]
    print(
        f"# N = {args.n}, numpy {np.__version__}, {platform.machine()}, "
        f"{os.cpu_count()} cores; medians of {args.repeats} alternating repeats"
    )
    print(
        f"{'P':>9} {'gram [ms]':>11} {'dense [ms]':>11} {'dense/gram':>11} "
        f" {'gram ms per 1e5 P':>18}"
        f" {'|d_gram - d_dense|/|d|':>23}"
    )
    for row in gram_vs_dense(args.n, sizes, args.dense_max_p, args.repeats):
        dense = row["dense_s"]
        ratio = f"{dense / row['gram_s']:11.1f}" if dense else f"{'-':>11}"
        dense_ms = f"{1e3 * dense:11.2f}" if dense else f"{'(too big)':>11}"
        gap = f"{row['rel_gap']:23.1e}" if dense else f"{'-':>23}"
        per = 1e3 * row["gram_s"] / row["P"] * 1e5
        print(f"{row['P']:>9} {1e3 * row['gram_s']:11.2f} {dense_ms} {ratio} {per:18.2f} {gap}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
