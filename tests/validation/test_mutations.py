"""Mutation tests: ``python -m validation`` must fail, naming the quantity, when an update is wrong.

Each mutation corrupts one update inside :mod:`ngdref.directions` (which every
run of the suite, the reference included, goes through), so every backend still
agrees with every other: only the independent dense references can see it. The
suite runs in-process on two small problems without the oracles (they check
products and per-sample gradients, which no mutation here touches).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.validation.test_validation import unexpected_failures
from validation.__main__ import main

DIRECTIONS = importlib.import_module("ngdref.directions")  # the module, not the function
PROBLEMS = ["linear-softmax-ce", "mlp-squared-error"]  # softmax CE and Gaussian draws


def _scaled(name: str, factor: float) -> Callable[[Any], Any]:
    original = getattr(DIRECTIONS, name)
    return lambda *args, **kwargs: original(*args, **kwargs) * factor


def _swapped_ief_damping() -> Callable[..., Any]:
    original = DIRECTIONS.ief_update
    swap = {"sample": "parameter", "parameter": "sample"}

    def ief_update(*args: Any, damping_space: str = "sample", **kwargs: Any) -> Any:
        return original(*args, damping_space=swap[damping_space], **kwargs)

    return ief_update


def _sf_fixed_key() -> Callable[..., Any]:
    """SF draws with one fixed key whatever it is given (a key reused every step)."""
    original = DIRECTIONS.sampled_grads
    return lambda provider, loss, targets, key, **kw: original(provider, loss, targets, 0, **kw)


def _sf_stale_rows() -> Callable[..., Any]:
    """SF's "sampled" rows are the gradients at the observed labels, not at drawn ones."""
    quantities = DIRECTIONS.batch_quantities

    def sampled_grads(provider: Any, loss: Any, targets: Any, key: Any, **kwargs: Any) -> Any:
        reduction = kwargs.get("reduction", "sum")
        return quantities(provider, loss, targets, reduction=reduction).per_sample_grads

    return sampled_grads


#: (mutation id, name in ngdref.directions, replacement factory, quantities that must fail)
MUTATIONS: list[tuple[str, str, Callable[[], Any], set[str]]] = [
    ("sgd x1.05", "sgd_update", lambda: _scaled("sgd_update", 1.05), {"sgd"}),
    ("ef x1.05", "ef_update", lambda: _scaled("ef_update", 1.05), {"ef", "ef limit"}),
    ("ef sign", "ef_update", lambda: _scaled("ef_update", -1.0), {"ef", "ef (mean)"}),
    ("ief x1.05", "ief_update", lambda: _scaled("ief_update", 1.05),
     {"ief", "ief-param", "ief limit"}),
    ("ief sign", "ief_update", lambda: _scaled("ief_update", -1.0), {"ief", "ief (mean)"}),
    ("ief damping sample<->parameter", "ief_update", _swapped_ief_damping, {"ief", "ief-param"}),
    ("sf x1.05", "sf_update", lambda: _scaled("sf_update", 1.05), {"sf"}),
    ("sf fixed key", "sampled_grads", _sf_fixed_key, {"sf"}),
    ("sf stale rows", "sampled_grads", _sf_stale_rows, {"sf"}),
    ("gn x1.05", "gn_update", lambda: _scaled("gn_update", 1.05), {"gn"}),
    ("ngd sign", "ngd_update", lambda: _scaled("ngd_update", -1.0), {"ngd"}),
    ("ngd-cg x1.05", "ngd_update_cg", lambda: _scaled("ngd_update_cg", 1.05), {"ngd-cg"}),
]


def _run(tmp_path: Path, problem: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / "report.json"
    code = main(["--problem", problem, "--no-oracles", "--report", str(report)])
    return code, json.loads(report.read_text())


@pytest.mark.parametrize("problem", PROBLEMS)
def test_unmutated_suite_passes(tmp_path: Path, problem: str) -> None:
    """The control: without a mutation the same runs pass (up to the pending CORE change)."""
    code, report = _run(tmp_path, problem)
    assert unexpected_failures(report, code) == []


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize(
    ("name", "factory", "expected"),
    [m[1:] for m in MUTATIONS],
    ids=[m[0] for m in MUTATIONS],
)
def test_mutated_update_fails_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
    problem: str, name: str, factory: Callable[[], Any], expected: set[str],
) -> None:
    monkeypatch.setattr(DIRECTIONS, name, factory())
    code, report = _run(tmp_path, problem)
    assert code == 1
    (entry,) = report["problems"]
    failing = {c["quantity"] for c in entry["independent"] if not c["ok"]}
    assert expected <= failing, failing
    stdout = capsys.readouterr().out
    for quantity in expected:
        assert f"FAIL {problem}: independent {quantity} " in stdout
    # the corrupted code is shared by every backend, so they still agree with the reference
    assert all(row["ok"] for row in entry["rows"])
