"""Every benchmark command runs every one of its workloads end to end at its smallest size.

Smoke tests only: the timings are noise at this size and are never asserted (benchmarks print
side-by-side ratios; speed is not a test's business). What can fail is the plumbing, which
did: ``python -m validation.bench.kfac`` raised TypeError after the workload builders gained a
``device`` argument, and KeyError on T5 with all parameters trainable (its tied embedding),
while this file ran the mlp workload alone. Each case names the markers its output prints
per workload, and all of them must appear. The peak-memory part of the step bench starts a
fresh process per workload and step (seconds of imports each), so it runs on the smallest
workload; its code is the same for every workload.

Beside them, the pieces of the report whose mistakes would mislabel a measurement: the timing
loop's synchronisation, the targets each workload is held to, AdamW's state in its peak, and
the routes skipped where G would not fit.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


#: (id, module, smallest arguments, per-workload marker ("{w}" is the workload) and the
#: "module:attribute" listing the workloads, what the output must contain, packages it needs)
BENCHMARKS = [
    ("bench", "validation.bench.timing",
     ["--max-p", "1000", "--dense-max-p", "1000", "--repeats", "1"], None,
     ["dense/gram"], ()),
    ("bench_torch", "validation.bench.steps",
     ["--quick", "--repeats", "1", "--warmup", "0", "--no-memory"],
     ("# ({w}) ", "validation.bench.steps:ALL_WORKLOADS"),
     ["iEF step (auto) / AdamW step", "iEF step (vmap) / AdamW step", "FVP vs GGN matvec",
      "Opacus per-sample step / AdamW step", "## Targets, wall clock",
      "## Step / AdamW step, process CPU time"], ("torch", "curvlinops", "opacus")),
    ("bench_torch_memory", "validation.bench.steps",
     ["--quick", "--repeats", "1", "--warmup", "0", "--workloads", "mlp"], None,
     ["peak memory of one step", "RSS: iEF step (auto) / AdamW", "## Targets, wall clock; "
      "memory: RSS"], ("torch", "curvlinops")),
    ("bench_kfac", "validation.bench.kfac", ["--quick", "--repeats", "1"],
     ("## {w}: ", "validation.bench.workloads:WORKLOADS"),
     ["ieKFAC / AdamW", "gamma / gamma_SGD"], ("torch", "curvlinops")),
    ("bench_distributed", "validation.bench.distributed",
     ["--world-sizes", "1", "2", "--batch", "8", "--repeats", "1", "--warmup", "0"], None,
     ["same at R=1", " ief ", " ef ", " sf ", " adamw "], ("torch",)),
]


def _markers(marker: tuple[str, str] | None) -> list[str]:
    if marker is None:
        return []
    text, where = marker
    module, attribute = where.split(":")
    return [text.format(w=w) for w in getattr(importlib.import_module(module), attribute)]


@pytest.mark.slow
@pytest.mark.parametrize(("module", "args", "marker", "expected", "needs"),
                         [b[1:] for b in BENCHMARKS], ids=[b[0] for b in BENCHMARKS])
def test_benchmark_runs(module: str, args: list[str], marker: tuple[str, str] | None,
                        expected: list[str], needs: tuple[str, ...]) -> None:
    for name in needs:
        pytest.importorskip(name)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in [*expected, *_markers(marker)]:
        assert text in done.stdout, (text, done.stdout[-3000:])


# ---- the pieces of the report ---------------------------------------------------------------
def test_timing_loop_synchronises_around_every_measurement():
    from validation.bench.timing import median_times

    events: list[str] = []
    fns = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    median_times(fns, repeats=3, warmup=2, sync=lambda: events.append("sync"))
    # every call (2 warm-up rounds + 3 repeats, 2 things, one call each) between two syncs
    assert events == ["sync", "a", "sync", "sync", "b", "sync"] * 5


def _record(name: str, full: bool, times: dict[str, float], peaks: dict | None = None):
    from validation.bench.report import Measured

    return Measured(name, "", num_params=10, total_params=10, num_samples=2,
                    trainable_bytes=40, param_bytes=40, full_parameter=full,
                    wall=times, peaks=peaks or {})


#: (workload, all-parameter, iEF / AdamW, its verdict): the target is 2 on all-parameter
#: transformers only, 1.2 on LoRA, prompt tuning and (all-parameter) MLPs
TARGETS = [
    ("t5_small_full", True, 1.9, "met"),
    ("vit_full", True, 2.1, "missed"),
    ("mlp_paper", True, 1.9, "missed"),
    ("t5_small_lora", False, 1.9, "missed"),
    ("t5_small_prompt", False, 1.1, "met"),
]


@pytest.mark.parametrize(("name", "full", "ratio", "verdict"), TARGETS,
                         ids=[t[0] for t in TARGETS])
def test_each_workload_is_held_to_its_target(name, full, ratio, verdict):
    from validation.bench import report

    r = _record(name, full, {report.ADAMW: 1.0, report.IEF_AUTO: ratio})
    assert report._target_cells(r, "wall", None)[0] == f"{ratio:.2f} {verdict}"


def test_targets_against_peers_sf_certificate_and_memory():
    from validation.bench import report

    times = {report.ADAMW: 1.0, report.ADAMW_AGAIN: 1.1, report.IEF_AUTO: 2.0,
             report.PER_SAMPLE_STEP: 2.5, report.SF_AUTO: 3.2, report.NEVER: 1.9,
             report.ALWAYS: 2.3}
    # AdamW's own peak 80 bytes + its .grad, m and v (3 x 40 trainable bytes) = 200
    peaks = {"RSS": {report.ADAMW: 80.0, report.IEF_AUTO: 150.0}}
    cells = report._target_cells(_record("vit_full", True, times, peaks), "wall", "RSS")
    assert cells == [
        "2.00 met",  # 2.0 / 1.0 <= 2 (all-parameter transformer)
        "0.80 met",  # 2.0 / 2.5 <= 1
        "-",  # no ghost-clipping time: the peer refused
        "1.60 missed",  # 3.2 / 2.0 > 1.5
        "0.75 met",  # 150 / 200 <= 1
        "1.05 met",  # 2.0 / 1.9 <= 1 + |1.1 - 1|
        "1.21 met",  # 2.3 / 1.9 <= 1.3
    ]
    lora = report._target_cells(_record("vit_lora", False, times, peaks), "wall", "RSS")
    assert lora[4] == "0.75"  # the memory target applies to all-parameter models only


def test_routes_holding_g_are_skipped_where_it_does_not_fit():
    pytest.importorskip("torch")
    from validation.bench import steps

    w = steps.build("mlp", quick=True, device=__import__("torch").device("cpu"))
    g_gib = 4 * w.num_samples * w.num_params / 2**30
    routes = ("auto", "ghost", "hooks", "vmap")
    assert steps.affordable(w, routes, max_g_gb=2 * g_gib) == (routes, [])
    kept, notes = steps.affordable(w, routes, max_g_gb=g_gib / 2)
    assert kept == ("auto", "ghost")
    assert [n.split(":")[0] for n in notes] == ["per_sample='hooks'", "per_sample='vmap'"]


def test_cuda_without_cuda_says_so_and_runs_on_the_cpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device cuda runs on it")
    from validation.bench import steps

    assert steps.main(["--quick", "--device", "cuda", "--workloads", "mlp", "--routes", "auto",
                       "--repeats", "1", "--warmup", "0", "--no-memory", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "CUDA is not available here" in out
    assert "lr=1e-12, cpu;" in out


def test_bad_choices_name_the_option(capsys):
    pytest.importorskip("torch")
    from validation.bench import steps

    for option, value in (("--workloads", "t5_large_lora"), ("--routes", "dense")):
        with pytest.raises(SystemExit):
            steps.main([option, value])
        assert f"{option}: unknown ['{value}']" in capsys.readouterr().err
