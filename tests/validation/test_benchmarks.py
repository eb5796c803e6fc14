"""Every benchmark command runs every one of its workloads end to end at its smallest size.

Smoke tests only: the timings are noise at this size and are never asserted (the brief: speed
is measured side by side by the benchmarks themselves). What can fail is the plumbing, which
did: ``python -m validation.bench.kfac`` raised TypeError after the workload builders gained a
``device`` argument, and KeyError on T5 with all parameters trainable (its tied embedding),
while this file ran the mlp workload alone. Each case names the markers its output prints
per workload, and all of them must appear. The peak-memory part of ``bench_torch`` starts a
fresh process per workload and step (about 25 s a workload), so it runs on the smallest
workload; its code is the same for every workload.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _torch_workloads() -> tuple[str, ...]:
    pytest.importorskip("torch")
    from validation.bench.workloads import WORKLOADS

    return WORKLOADS


#: (id, module, smallest arguments, per-workload marker ("{w}" is the workload) or None,
#: what the output must contain, packages it needs)
BENCHMARKS = [
    ("bench", "validation.bench.timing",
     ["--max-p", "1000", "--dense-max-p", "1000", "--repeats", "1"], None,
     ["dense/gram"], ()),
    ("bench_torch", "validation.bench.steps",
     ["--quick", "--repeats", "1", "--warmup", "0", "--no-memory"], "# ({w}) ",
     ["iEF step (auto) / AdamW step", "FVP vs GGN matvec"], ("torch", "curvlinops")),
    ("bench_torch_memory", "validation.bench.steps",
     ["--quick", "--repeats", "1", "--warmup", "0", "--workloads", "mlp"], None,
     ["peak memory of one step", "RSS: iEF step (auto) / AdamW"], ("torch", "curvlinops")),
    ("bench_kfac", "validation.bench.kfac", ["--quick", "--repeats", "1"], "## {w}: ",
     ["ieKFAC / AdamW", "gamma / gamma_SGD"], ("torch", "curvlinops")),
    ("bench_distributed", "validation.bench.distributed",
     ["--world-sizes", "1", "2", "--batch", "8", "--repeats", "1", "--warmup", "0"], None,
     ["same at R=1", " ief ", " ef ", " sf ", " adamw "], ("torch",)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "marker", "expected", "needs"),
                         [b[1:] for b in BENCHMARKS], ids=[b[0] for b in BENCHMARKS])
def test_benchmark_runs(module: str, args: list[str], marker: str | None,
                        expected: list[str], needs: tuple[str, ...]) -> None:
    for name in needs:
        pytest.importorskip(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    markers = [] if marker is None else [marker.format(w=w) for w in _torch_workloads()]
    for text in [*expected, *markers]:
        assert text in done.stdout, (text, done.stdout[-3000:])
