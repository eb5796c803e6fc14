"""Every benchmark command runs end to end at its smallest size and prints its ratio table.

Smoke tests only: the timings are noise at this size and are never asserted (the brief: speed
is measured side by side by the benchmarks themselves). What can fail is the plumbing, which
did: ``python -m validation.bench.kfac`` raised TypeError after the workload builders gained a
``device`` argument, and nothing ran it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: (module, smallest arguments, what its output must contain, packages it needs)
BENCHMARKS = [
    ("validation.bench.timing", ["--max-p", "1000", "--dense-max-p", "1000", "--repeats", "1"],
     ["dense/gram"], ()),
    ("validation.bench.steps",
     ["--quick", "--repeats", "1", "--warmup", "0", "--no-memory", "--workloads", "mlp"],
     ["iEF step (auto) / AdamW step", "FVP vs GGN matvec"], ("torch", "curvlinops")),
    ("validation.bench.kfac", ["--quick", "--repeats", "1", "--workload", "mlp"],
     ["ieKFAC / AdamW", "gamma / gamma_SGD"], ("torch", "curvlinops")),
    ("validation.bench.distributed",
     ["--world-sizes", "1", "2", "--methods", "ief", "--batch", "8", "--repeats", "1",
      "--warmup", "0"],
     ["same at R=1"], ("torch",)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "expected", "needs"), BENCHMARKS,
                         ids=[b[0].rsplit(".", 1)[1] for b in BENCHMARKS])
def test_benchmark_runs(module: str, args: list[str], expected: list[str],
                        needs: tuple[str, ...]) -> None:
    for name in needs:
        pytest.importorskip(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, done.stdout[-3000:]
