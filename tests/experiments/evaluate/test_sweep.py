"""The damping sweep (``sweep_run``, validation/experiments/evaluate/framework.py) on a tiny
digits-MLP run of the runner: its file, its equality with ``evaluate_run`` at each damping of the
grid (the factorised solves against evaluate's library calls at the same damping), the Gram matrices
formed once per batch, and resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.experiments.evaluate.cases import (  # noqa: F401  (fixtures)
    MICRO,
    PYTESTMARK,
    M,
    copy_run,
    fixture_mlp_run,
)
from validation.experiments.evaluate.framework import (
    METHODS,
    RATIOS,
    SWEEP_FILE,
    evaluate_run,
    sweep_run,
)

pytestmark = PYTESTMARK


def test_sweep_format_and_equality_with_evaluate(mlp_run: Path, tmp_path: Path) -> None:
    """At each lambda of the grid the sweep (Gram matrices formed once per batch, reused for
    every lambda) gives evaluate's numbers with damping = lambda for EF, iEF and SF: same
    batches, same SF draws, same library solves; they agree to rounding (1e-9 leaves room
    for other BLAS builds)."""
    run = copy_run(mlp_run, tmp_path / "run")
    grid = [1e-12, 1e-6, 1e-3]
    settings = {"batches": 2, "batch_size": M, "micro_batch": MICRO, "progress": False}
    sweep = sweep_run(run, dampings=grid, **settings)
    assert json.loads((run / SWEEP_FILE).read_text()) == json.loads(json.dumps(sweep))
    assert set(sweep) == {"settings", "checkpoints"}
    assert sweep["settings"]["dampings"] == grid
    assert sweep["settings"]["checkpoints"] == ["epoch-0", "epoch-1", "epoch-2"]
    for entry in sweep["checkpoints"]:
        assert set(entry) == {"name", "epoch", "dampings", "ratios"}
        assert entry["dampings"] == grid
        assert set(entry["ratios"]) == set(RATIOS)
        for summary in entry["ratios"].values():
            assert set(summary) == {"mean", "std"}
            assert len(summary["mean"]) == len(summary["std"]) == len(grid)
    for k, lam in enumerate(grid):
        evaluation = evaluate_run(
            run, damping=lam, checkpoints="first,middle,last", overwrite=True,
            methods=METHODS, **settings,
        )
        for swept, evaluated in zip(sweep["checkpoints"], evaluation["checkpoints"], strict=True):
            assert swept["name"] == evaluated["name"]
            for name, summary in evaluated["ratios"].items():
                assert swept["ratios"][name]["mean"][k] == pytest.approx(
                    summary["mean"], rel=1e-9
                ), (swept["name"], lam, name)
                assert swept["ratios"][name]["std"][k] == pytest.approx(
                    summary["std"], rel=1e-6, abs=1e-12
                ), (swept["name"], lam, name)


def test_sweep_forms_each_gram_matrix_once_per_batch(
    mlp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep over D dampings forms two Gram matrices per batch (the true rows' and the
    sampled rows'), whatever D: the damping grid reuses them (issue 7)."""
    import ngdref.rows

    calls = []
    products = ngdref.rows._products64

    def counted(a: Any, b: Any) -> Any:
        calls.append(tuple(a.shape))
        return products(a, b)

    monkeypatch.setattr(ngdref.rows, "_products64", counted)
    run = copy_run(mlp_run, tmp_path / "run")
    for grid in ([1e-6], [1e-9, 1e-6, 1e-3, 1.0]):
        calls.clear()
        sweep_run(run, dampings=grid, batches=2, batch_size=M, checkpoints="last",
                  progress=False, overwrite=True)
        assert len(calls) == 2 * 2, (grid, calls)


def test_sweep_middle_checkpoint_and_resume(
    mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(mlp_run, tmp_path / "run")
    settings = {"batches": 1, "batch_size": M, "dampings": [1e-6, 1e6], "progress": False}
    first = sweep_run(run, checkpoints="middle", **settings)
    assert [c["name"] for c in first["checkpoints"]] == ["epoch-1"]
    both = sweep_run(run, checkpoints="first,middle", **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "sweep epoch-1: already in" in err and "sweep epoch-0 (epoch 0, step 0): " in err
    assert "1/1" in err  # the tqdm bar over the one batch left to do
    assert [c["name"] for c in both["checkpoints"]] == ["epoch-0", "epoch-1"]
    assert both["checkpoints"][1] == first["checkpoints"][0]
    # a damping far above the Gram matrices' scale (~1 here) makes EF and SF multiples of g,
    # but iEF (damped in sample space) a multiple of G^T s, which is not g
    ratios = {name: r["mean"][1] for name, r in both["checkpoints"][0]["ratios"].items()}
    assert ratios["ef/sgd"] == pytest.approx(1, abs=1e-5)
    assert ratios["sf/ef"] == pytest.approx(1, abs=1e-5)
    assert abs(ratios["ief/sgd"] - 1) > 1e-3

