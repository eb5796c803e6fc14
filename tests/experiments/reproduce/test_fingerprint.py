"""The reference fingerprints (validation/experiments/reproduce/fingerprint.py).

Two sides of the tolerance, each against the committed fingerprints (so these tests fail if
those were written by other code than the slice computes now):

* a change of convention trips it: each perturbation below reroutes one ngdref function
  through a wrapper that changes one convention the code relies on, and some value of the
  affected part of the slice must move past RTOL. The wrappers change the damping argument
  only: reading lambda in the sum convention multiplies it by N^2 (N the batch); SF's sampled
  rows scaled by sqrt(R) instead of R make F_SF 1/R times larger, and since
  (F_SF / R + lambda I)^-1 g = R (F_SF + R lambda I)^-1 g, with a normalised step (training)
  or a scale-free gamma (evaluation) that is exactly SF at damping R lambda;
* rounding does not: the slice computed with OMP/OpenBLAS/MKL threads 1 and 2 (separate
  processes, since BLAS reads them at load time), and with relative noise of float32's unit
  roundoff in every per-sample logit gradient (what another BLAS kernel's summation order does
  to one product), stays within it.

The binding between a fingerprint and its tables is tested on temporary reference
directories with the slice replaced by fixed numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

import ngdref  # noqa: E402
from validation.experiments.reproduce import fingerprint  # noqa: E402
from validation.experiments.reproduce.plan import ReproduceError  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
#: the batch sizes of the reference plans (N of the training step, R = 1/N) and the authors'
#: evaluation micro-batch (R = 1/40)
BATCH = {"digits": 64, "digits-lora": 32}
AUTHORS_MICRO_BATCH = 40


def _committed(setup: str) -> dict[str, Any]:
    return json.loads((fingerprint.REFERENCE / setup / fingerprint.FILE).read_text())


def _lrs(setup: str) -> dict[str, float]:
    summary = json.loads((fingerprint.REFERENCE / setup / "summary.json").read_text())
    return fingerprint.selected_lrs(summary)


def _against_committed(setup: str, values: Mapping[str, float]) -> list[str]:
    """compare() of ``values`` with the committed fingerprint's values of the same keys."""
    stored = _committed(setup)["values"]
    assert set(values) <= set(stored), sorted(set(values) - set(stored))
    return fingerprint.compare(values, {k: stored[k] for k in values})


# ---- the committed fingerprints -------------------------------------------------------------
@pytest.mark.parametrize("setup", sorted(fingerprint.SETUPS))
def test_committed_fingerprint_belongs_to_the_committed_tables(setup: str) -> None:
    folder = fingerprint.REFERENCE / setup
    stored = _committed(setup)
    summary = json.loads((folder / "summary.json").read_text())
    digest = hashlib.sha256((folder / "summary.json").read_bytes()).hexdigest()
    assert stored["reference"]["summary_sha256"] == digest
    assert stored["reference"]["commit"] == summary["code"]["commit"]
    assert stored["tolerance"]["rtol"] == fingerprint.RTOL
    assert stored["tolerance"]["atol"] == fingerprint.ATOL
    # every optimiser trained, the evaluation and the sweep at both checkpoints
    groups = {"/".join(k.split("/")[:2]) for k in stored["values"]}
    optimizers = fingerprint.SETUPS[setup].experiment.optimizers
    assert groups == {f"train/{o}" for o in optimizers} | {
        f"{part}/epoch-{e}" for part in ("evaluate", "sweep") for e in (0, 2)
    }


# ---- a change of convention trips it --------------------------------------------------------
def _damping_times(name: str, factor: float) -> Callable[[pytest.MonkeyPatch], None]:
    """Reroute ``ngdref.NAME`` (called as ``ngdref.NAME`` by the optimisers and the evaluation)
    with its damping multiplied by ``factor``."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        original = getattr(ngdref, name)

        def wrapped(*args: Any, damping: float, **kwargs: Any) -> Any:
            return original(*args, damping=damping * factor, **kwargs)

        monkeypatch.setattr(ngdref, name, wrapped)

    return patch


# (what changes, setup, optimisers trained, evaluation, patch, the groups that must move)
PERTURBATIONS = [
    ("iEF and EF damping read in the sum convention (lambda N^2)", "digits", ("ief", "ef"),
     False, _damping_times("gram_update", BATCH["digits"] ** 2), ("train/ief", "train/ef")),
    ("SF damping read in the sum convention (lambda N^2)", "digits", ("sf",),
     False, _damping_times("sf_update", BATCH["digits"] ** 2), ("train/sf",)),
    ("SF's sampled rows scaled by sqrt(R), not R (training)", "digits-lora", ("sf",),
     False, _damping_times("sf_update", 1 / BATCH["digits-lora"]), ("train/sf",)),
    ("SF's sampled rows scaled by sqrt(R), not R (evaluation)", "digits", (),
     True, _damping_times("sf_update", 1 / AUTHORS_MICRO_BATCH), ("sweep/epoch-0",)),
    ("EF's damping read in the sum convention (evaluation)", "digits-lora", (),
     True, _damping_times("ef_update", AUTHORS_MICRO_BATCH ** 2),
     ("sweep/epoch-0", "sweep/epoch-2")),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("setup", "optimizers", "evaluation", "patch", "moved"),
    [pytest.param(*case[1:], id=case[0]) for case in PERTURBATIONS],
)
def test_a_change_of_convention_trips_the_fingerprint(
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    optimizers: tuple[str, ...],
    evaluation: bool,
    patch: Callable[[pytest.MonkeyPatch], None],
    moved: tuple[str, ...],
) -> None:
    patch(monkeypatch)
    values = fingerprint.compute(setup, _lrs(setup), optimizers=optimizers, evaluation=evaluation)
    lines = _against_committed(setup, values)
    for group in moved:
        assert any(line.startswith(group + "/") for line in lines), (group, lines)


# ---- rounding does not ----------------------------------------------------------------------
_SLICE = (
    "import json, sys\n"
    "from validation.experiments.reproduce import fingerprint as f\n"
    "setup, lrs = sys.argv[1], json.loads(sys.argv[2])\n"
    "values = f.compute(setup, lrs, optimizers=('ief', 'sf'), evaluation=True)\n"
    "print(json.dumps(values))\n"
)


@pytest.mark.slow
def test_one_or_two_blas_threads_stay_within_the_tolerance() -> None:
    """iEF (a Gram solve at damping 1e-7, the most rounding-sensitive optimiser of the slice),
    SF and the evaluation; OMP, OpenBLAS and MKL threads 1 and 2, each in its own process."""
    results = []
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "MKL_NUM_THREADS": threads}
        done = subprocess.run(
            [sys.executable, "-c", _SLICE, "digits", json.dumps(_lrs("digits"))],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    for values in results:
        assert _against_committed("digits", values) == []
    assert fingerprint.compare(results[0], results[1]) == []


def test_unit_roundoff_noise_in_the_logit_gradients_stays_within_the_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every per-sample logit gradient e_n gets relative noise of u (2^-24 in float32), seeded:
    a rounding-sized change at the start of every per-sample quantity of every step."""
    loss = ngdref.SoftmaxCrossEntropy
    original_grad, original_both = loss.grad, loss.value_and_grad
    generator = torch.Generator().manual_seed(0)

    def noise(e: Any) -> Any:
        noise = torch.rand(e.shape, generator=generator, dtype=e.dtype) * 2 - 1
        return e * (1 + torch.finfo(e.dtype).eps / 2 * noise)

    def noisy_grad(self: Any, logits: Any, targets: Any) -> Any:
        return noise(original_grad(self, logits, targets))

    def noisy_both(self: Any, logits: Any, targets: Any) -> Any:
        value, e = original_both(self, logits, targets)
        return value, noise(e)

    # both ways in: the optimisers take e_n with the loss (value_and_grad), others by grad
    monkeypatch.setattr(loss, "grad", noisy_grad)
    monkeypatch.setattr(loss, "value_and_grad", noisy_both)
    values = fingerprint.compute("digits", _lrs("digits"), optimizers=("ief",), evaluation=False)
    assert _against_committed("digits", values) == []
    # and the noise did reach the numbers (else this test shows nothing)
    stored = _committed("digits")["values"]
    assert any(values[k] != stored[k] for k in values if k.startswith("train/ief/"))


# ---- compare ----------------------------------------------------------------------------------
COMPARE_CASES = [
    # (now, stored, the keys compare must name)
    ({"a": 1.0 + 0.9e-3}, {"a": 1.0}, []),
    ({"a": 1.0 + 1.1e-3}, {"a": 1.0}, ["a"]),
    ({"a": -2.0}, {"a": 2.0}, ["a"]),
    ({"a": 0.0}, {"a": 0.0}, []),
    ({"a": 1e-9}, {"a": 0.0}, ["a"]),
    ({"a": float("nan")}, {"a": 1.0}, ["a"]),
    ({"a": 1.0}, {"a": float("inf")}, ["a"]),
    ({"a": float("inf")}, {"a": float("inf")}, []),
    ({"a": float("nan")}, {"a": float("nan")}, []),
    ({"a": 1.0, "b": 2.0}, {"a": 1.0}, ["b"]),
    ({"a": 1.0}, {"a": 1.0, "c": 3.0}, ["c"]),
]


@pytest.mark.parametrize(("now", "stored", "named"), COMPARE_CASES)
def test_compare_names_exactly_the_values_that_moved(
    now: dict[str, float], stored: dict[str, float], named: list[str]
) -> None:
    lines = fingerprint.compare(now, stored, rtol=1e-3)
    assert [line.split(":")[0] for line in lines] == named


# ---- binding to the tables ------------------------------------------------------------------
VALUES = {"train/sf/step1/loss": 2.0, "evaluate/epoch-0/sf/ief": 1.5}


def _reference(tmp_path: Path, commit: str = "a" * 40) -> Path:
    folder = tmp_path / "digits"
    folder.mkdir(exist_ok=True)
    summary = {"summary": {"sf": {"lr": 1.0}}, "code": {"commit": commit, "date": "d"}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def _compute_returns(monkeypatch: pytest.MonkeyPatch, values: Mapping[str, float]) -> None:
    monkeypatch.setattr(fingerprint, "compute", lambda setup, lrs: dict(values))


def test_write_then_check_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _reference(tmp_path)
    _compute_returns(monkeypatch, VALUES)
    path = fingerprint.write_fingerprint("digits", folder)
    written = json.loads(path.read_text())
    assert written["values"] == VALUES
    assert written["reference"]["commit"] == "a" * 40
    assert fingerprint.check_fingerprint("digits", folder).problems == []


def test_a_rounding_change_within_the_tolerance_passes_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _reference(tmp_path)
    _compute_returns(monkeypatch, VALUES)
    fingerprint.write_fingerprint("digits", folder)
    assert fingerprint.check_fingerprint("digits", folder).note == "2 of 2 values bitwise equal"
    _compute_returns(monkeypatch, {**VALUES, "train/sf/step1/loss": 2.0 * (1 + 3e-7)})
    verdict = fingerprint.check_fingerprint("digits", folder)
    assert verdict.problems == []
    assert verdict.note == "1 of 2 values bitwise equal, the others within 3e-07 relative"


def test_check_names_the_values_that_moved_and_how_to_regenerate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _reference(tmp_path)
    _compute_returns(monkeypatch, VALUES)
    fingerprint.write_fingerprint("digits", folder)
    _compute_returns(monkeypatch, {**VALUES, "train/sf/step1/loss": 2.1})
    problems = fingerprint.check_fingerprint("digits", folder).problems
    assert any(p.startswith("train/sf/step1/loss: fingerprint 2, now 2.1") for p in problems)
    assert not any(p.startswith("evaluate/") for p in problems)
    assert "CHANGELOG" in problems[-1] and "--fingerprint --write" in problems[-1]


def test_tables_regenerated_without_their_fingerprint_fail_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _reference(tmp_path)
    _compute_returns(monkeypatch, VALUES)
    fingerprint.write_fingerprint("digits", folder)
    _reference(tmp_path, commit="b" * 40)  # the tables regenerated at another commit
    (problem,) = fingerprint.check_fingerprint("digits", folder).problems
    assert "regenerated without their fingerprint" in problem and "b" * 40 in problem


def test_write_refuses_moved_numbers_for_tables_that_were_not_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _reference(tmp_path)
    _compute_returns(monkeypatch, VALUES)
    path = fingerprint.write_fingerprint("digits", folder)
    before = path.read_bytes()
    _compute_returns(monkeypatch, {**VALUES, "evaluate/epoch-0/sf/ief": 1.6})
    with pytest.raises(ReproduceError, match=r"evaluate/epoch-0/sf/ief: fingerprint 1.5, now 1.6"):
        fingerprint.write_fingerprint("digits", folder)
    assert path.read_bytes() == before


def test_write_accepts_moved_numbers_for_regenerated_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _reference(tmp_path)
    _compute_returns(monkeypatch, VALUES)
    fingerprint.write_fingerprint("digits", folder)
    _reference(tmp_path, commit="b" * 40)
    moved = {**VALUES, "evaluate/epoch-0/sf/ief": 1.6}
    _compute_returns(monkeypatch, moved)
    written = json.loads(fingerprint.write_fingerprint("digits", folder).read_text())
    assert written["values"] == moved and written["reference"]["commit"] == "b" * 40
    assert fingerprint.check_fingerprint("digits", folder).problems == []


def test_a_missing_fingerprint_or_unknown_setup_is_named(tmp_path: Path) -> None:
    folder = _reference(tmp_path)
    with pytest.raises(ReproduceError, match=r"fingerprint\.json' does not exist"):
        fingerprint.check_fingerprint("digits", folder)
    with pytest.raises(ReproduceError, match="setup: expected one of"):
        fingerprint.slice_plan("cifar", {})
