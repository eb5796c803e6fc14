"""``torchrun -m validation.experiments train`` semantics: R = 2 ranks train like one process.

Two gloo workers (spawned once, see tests/backends/torch/distributed/test_data_parallel.py) run the
digits MLP with iEF and SF on batches of 7 (shards of 4 and 3; the epoch's last batch of 3 as 2 and
1), are killed after 3 steps and resumed; the expected log, validation metrics and parameters are
those of an uninterrupted single-process run in this process. Rank 0 alone writes: the log has
exactly the reference's lines.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from backends.torch.distributed.launch import local_group  # noqa: E402
from tests.backends.torch.distributed.test_data_parallel import spawn  # noqa: E402
from validation.experiments.config.load import load_config  # noqa: E402
from validation.experiments.evaluate.framework import evaluate_run  # noqa: E402
from validation.experiments.train.runner import read_metrics, train  # noqa: E402

OVERRIDES = [
    "model.hidden_sizes=[16]", "model.dtype=float64", "train.batch_size=7",
    "train.eval_batch_size=16", "data.max_train_samples=24", "data.max_eval_samples=8",
    "train.epochs=2", "train.eval_every=3", "train.checkpoint_every=2",
]
OPTIMIZERS = ("ief", "sf")
STOP = 3
#: the exact methods only: ieKFAC's default evaluation damping (1e-12) leaves its Kronecker
#: factors so ill-conditioned that the ranks' differently ordered sums (~1e-16) came out 1e-9 to
#: 5e-8 apart in its gamma, beyond RTOL; the K-FAC evaluation is pinned to a dense recomputation
#: in tests/experiments/evaluate/test_kfac.py, and sharing checkpoints out does not depend on the
#: method.
EVALUATION = {
    "batches": 2, "batch_size": 8, "micro_batch": 4, "progress": False,
    "methods": ("sgd", "ef", "ief", "sf"),
}
#: float64 throughout; the two runs differ in the order of sums only (test_data_parallel)
RTOL = 1e-10
#: keys only a distributed step reports, and the solve's own rounding (~1e-16, not comparable)
DISTRIBUTED_KEYS = {"time", "world_size", "num_samples", "bytes_sent", "solve_residual",
                    "certificate"}


def config(optimizer: str) -> dict[str, Any]:
    return load_config("mlp", [*OVERRIDES, f"optimizer={optimizer}"])


def worker(rank: int, world: int, folder: Path) -> None:

    with local_group(rank, world, folder):
        out = {}
        for name in OPTIMIZERS:
            run = folder / name
            train(config(name), run, progress=False, device="cpu", stop_after=STOP)
            out[name] = train(config(name), run, resume=True, progress=False, device="cpu").params
        evaluate_run(folder / "ief", **EVALUATION)  # the run's 3 checkpoints shared by 2 ranks
        torch.save(out, folder / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("torchrun")
    return folder, spawn(2, folder, module="tests.experiments.train.test_distributed")


#: ||G u - s|| / mean(s) is a difference of nearly equal terms: its absolute error is about
#: condition(K) eps (condition < 1e4 here), so it gets that absolute tolerance
CANCELLING_ATOL = {"residual": 1e4 * 2.2e-16}


def close(a: Any, b: Any, key: str) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        atol = CANCELLING_ATOL.get(key, 0.0)
        return a == b or (math.isfinite(b) and abs(a - b) <= RTOL * abs(b) + atol)
    return a == b


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_ranks_train_resume_and_log_like_one_process(
    runs: tuple[Path, list[dict[str, Any]]], name: str, tmp_path: Path
) -> None:
    folder, params = runs
    whole = train(config(name), tmp_path / "whole", progress=False, device="cpu")
    want = read_metrics(tmp_path / "whole")
    got = read_metrics(folder / name)
    assert [r["kind"] for r in got] == [r["kind"] for r in want]  # one writer, no repeats
    for mine, theirs in zip(got, want, strict=True):
        assert set(mine) - DISTRIBUTED_KEYS == set(theirs) - DISTRIBUTED_KEYS
        for key in set(theirs) - DISTRIBUTED_KEYS:
            assert close(mine[key], theirs[key], key), (mine["kind"], mine.get("step"), key)
    for key, value in whole.params.items():
        assert torch.equal(params[0][name][key], params[1][name][key]), key
        diff = torch.linalg.vector_norm(params[0][name][key] - value)
        assert diff <= 1e3 * RTOL * torch.linalg.vector_norm(value), key  # after 8 steps


def same(a: Any, b: Any) -> bool:
    """Equal structure, floats to RTOL (thread counts may reorder sums), the rest exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= RTOL * abs(b)
    return a == b


def test_checkpoints_evaluated_on_two_ranks_give_one_report(
    runs: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    folder, _ = runs
    shared = json.loads((folder / "ief" / "evaluation.json").read_text())
    alone = shutil.copytree(folder / "ief", tmp_path / "alone")
    want = evaluate_run(alone, **EVALUATION, overwrite=True)
    assert [c["name"] for c in shared["checkpoints"]] == ["epoch-0", "epoch-1", "epoch-2"]
    assert same(shared, want)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
