"""``python -m validation`` (validation/__main__.py) on a fast subset: it passes, reports, can fail.

The suite is run in-process through ``validation.__main__.main`` on three
problems (an array-API linear model, the array-API sequence MLP and the torch
MLP), and in subprocesses with torch or the oracle libraries made unimportable.
A deliberately corrupted provider (every per-sample VJP scaled by 1 + 1e-6) and
a corrupted ngdref side of the oracles must make the run exit 1; corrupted
updates are in ``tests/validation/test_mutations.py``. The expected sets of
runs, independent checks and oracles are written out here, never taken from
what the run reports or from what imports.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ngdref
from backends.arrays.adapters import unavailable
from validation.__main__ import main
from validation.crosscheck import QUANTITIES, REFERENCE, runs
from validation.independent.checks import toy_closed_forms
from validation.independent.references import sampled_logit_grads, sf_uniforms
from validation.oracles.curvlinops import MC_SIGMAS, fisher_mc_tolerance

REPO = Path(__file__).resolve().parents[2]
SUBSET = ["mlp-sequence-ce", "linear-softmax-ce", "torch-mlp"]  # in problems() order
TORCH = not unavailable("torch")
#: every oracle that must run on an nn.Linear/nn.Tanh stack with softmax CE (.ci/setup installs
#: curvlinops and BackPACK; a missing one is a failure, so it is expected here regardless)
ORACLES = {
    "curvlinops.GGNLinearOperator",
    "curvlinops.EFLinearOperator",
    "curvlinops.FisherMCLinearOperator",
    "backpack.BatchGrad",
    "backpack.ggn_vector_product",
    "backpack.SqrtGGNExact",
}
#: every independent check of a problem with a Woodbury NGD (not a toy)
INDEPENDENT = {
    "per_sample_grads", "s", "sgd", "ef", "ief", "ief-param", "sf", "gn", "ngd", "ngd-cg",
    *(f"gamma_ratio {m}" for m in ("ef", "ief", "sf", "gn", "ngd")),
    "ef limit", "ief limit", "ef (mean)", "ief (mean)", "sf (mean)",
}


def unexpected_failures(report: dict[str, Any], code: int | None = None) -> list[str]:
    """The report's failures (and the exit code agrees with them)."""
    if code is not None:
        assert code == (1 if report["failed"] else 0)
    return list(report["failed"])


def _run(tmp_path: Path, problems: list[str], *extra: str) -> tuple[int, dict[str, Any]]:
    report = tmp_path / "report.json"
    argv = [arg for name in problems for arg in ("--problem", name)]
    code = main([*argv, *extra, "--report", str(report)])
    return code, json.loads(report.read_text())


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["problem"]: p for p in report["problems"]}


def _rows(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["run"]: r for r in entry["rows"]}


def _oracles(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["oracle"]: c for c in entry["oracles"]}


def _independent(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["quantity"]: c for c in entry["independent"]}


@pytest.fixture(scope="module")
def subset_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict[str, Any]]:
    return _run(tmp_path_factory.mktemp("validation"), SUBSET)


def test_subset_passes(subset_report: tuple[int, dict[str, Any]]) -> None:
    code, report = subset_report
    assert [p["problem"] for p in report["problems"]] == SUBSET
    assert unexpected_failures(report) == []
    assert report["failures"] == len(report["failed"])
    assert code == 0


def test_array_api_problem_has_every_run_including_torch_autograd(
    subset_report: tuple[int, dict[str, Any]],
) -> None:
    entry = _by_name(subset_report[1])["linear-softmax-ce"]
    rows = _rows(entry)
    # the reference is checked by the independent references, not against itself
    assert list(rows) == [r.label for r in runs() if r != REFERENCE]
    for label in ("torch-autograd[vmap]", "torch-autograd[hooks]", "torch-autograd[flat]"):
        row = rows[label]
        if not TORCH:
            assert row["skipped"]
            continue
        assert row["ok"] and not row["skipped"] and not row["error"]
        assert set(row["differences"]) == {*QUANTITIES, "gamma_ratio"}
        assert row["tolerance"] == 1e-9
        assert max(row["differences"].values()) <= row["tolerance"]


@pytest.mark.parametrize("name", SUBSET)
def test_every_update_of_the_reference_has_an_independent_check(
    subset_report: tuple[int, dict[str, Any]], name: str
) -> None:
    if name == "torch-mlp" and not TORCH:
        pytest.skip("torch is not installed")
    checks = _independent(_by_name(subset_report[1])[name])
    assert set(checks) == INDEPENDENT
    for check in checks.values():
        assert not check["skipped"] and not check["error"], check
        assert math.isfinite(check["tolerance"]) and check["tolerance"] < 1e-2, check
        assert check["ok"], check


def test_toy_problems_are_checked_against_spec_closed_forms(tmp_path: Path) -> None:
    code, report = _run(tmp_path, ["least-squares-toy", "logistic-toy"], "--no-oracles")
    assert unexpected_failures(report, code) == []
    for entry in report["problems"]:
        checks = _independent(entry)
        toy = {"fisher (toy)", *(f"{m} (toy, lambda = 0)" for m in ("ef", "ief", "gn", "ngd"))}
        assert toy <= set(checks)
        assert all(checks[q]["ok"] for q in toy)


def test_toy_closed_forms_are_the_spec_numbers() -> None:
    """:ref:`conv-toys` at theta = (1.5, -0.7): NGD = iEF = theta, EF = (2/3, 7/12),
    G EF = (1, 1)."""
    forms = toy_closed_forms("least-squares-toy", (1.5, -0.7))
    np.testing.assert_allclose(forms["fisher"], [[2.0, 1.0], [1.0, 1.0]], rtol=0, atol=1e-15)
    for method in ("ngd", "ief", "gn"):
        np.testing.assert_allclose(forms[method], [1.5, -0.7], rtol=0, atol=1e-15)
    np.testing.assert_allclose(forms["ef"], [2 / 3, 7 / 12], rtol=0, atol=1e-15)
    residuals = np.array([1.5, 0.8])  # r_1 = theta_0, r_2 = theta_0 + theta_1
    g = residuals[:, None] * np.array([[1.0, 0.0], [1.0, 1.0]])
    np.testing.assert_allclose(g @ forms["ef"], [1.0, 1.0], rtol=0, atol=1e-15)
    logistic = toy_closed_forms("logistic-toy", (1.5, -0.7))
    assert np.linalg.norm(logistic["ngd"] - logistic["ief"]) > 0.1  # they differ here


@pytest.mark.skipif(not TORCH, reason="torch is not installed")
def test_torch_problem_rows_and_every_update(subset_report: tuple[int, dict[str, Any]]) -> None:
    entry = _by_name(subset_report[1])["torch-mlp"]
    assert entry["family"] == "torch"
    assert entry["reference"] == "torch-autograd[vmap]"
    rows = _rows(entry)
    assert list(rows) == ["torch-autograd[hooks]", "fd[torch]"]
    for row in rows.values():
        assert row["ok"]
        assert set(row["differences"]) == {*QUANTITIES, "gamma_ratio"}
    # central differences are not exact: a zero here would mean fd compared with itself
    assert 0 < max(rows["fd[torch]"]["differences"].values()) <= rows["fd[torch]"]["tolerance"]
    assert set(entry["reference_gamma_ratio"]) == {"ef", "ief", "sf", "gn", "ngd"}


@pytest.mark.skipif(not TORCH, reason="torch is not installed")
@pytest.mark.parametrize("name", ["linear-softmax-ce", "torch-mlp"])
def test_oracles_run_and_agree(subset_report: tuple[int, dict[str, Any]], name: str) -> None:
    checks = _oracles(_by_name(subset_report[1])[name])
    assert set(checks) == ORACLES
    for check in checks.values():
        assert check["ok"] and not check["skipped"] and not check["error"], check
        assert check["difference"] <= check["tolerance"]


@pytest.mark.skipif(not TORCH, reason="torch is not installed")
def test_sequence_problem_compares_the_per_token_ef(
    subset_report: tuple[int, dict[str, Any]],
) -> None:
    checks = _oracles(_by_name(subset_report[1])["mlp-sequence-ce"])
    ef = checks["curvlinops.EFLinearOperator"]
    assert ef["quantity"].startswith("per-token EF")
    assert ef["ok"] and ef["difference"] <= ef["tolerance"]
    assert "per-sequence EF differs" in ef["note"]
    mc = checks["curvlinops.FisherMCLinearOperator"]
    assert mc["ok"] and "ignored tokens kept" in mc["quantity"]
    assert "masked sequence Fisher differs" in mc["note"]


@pytest.mark.parametrize(
    "loss",
    [ngdref.SoftmaxCrossEntropy(), ngdref.SigmoidBinaryCrossEntropy(), ngdref.SquaredError(),
     ngdref.SequenceSoftmaxCrossEntropy(vocab_size=3)],
    ids=lambda loss: type(loss).__name__,
)
def test_dense_reference_draws_what_the_documented_sampler_draws(loss: Any) -> None:
    """Two implementations of the documented sampling (:ref:`conv-sampling-keys`) from the same
    uniforms (inverse CDF, Bernoulli, Box-Muller) give the same logit gradients: what lets the SF
    check use its own draws."""
    rng = np.random.default_rng(3)
    n, c = 7, 6
    z = 2 * rng.standard_normal((n, c))
    targets = {
        "SoftmaxCrossEntropy": rng.integers(0, c, n),
        "SigmoidBinaryCrossEntropy": rng.integers(0, 2, (n, c)).astype(float),
        "SquaredError": rng.standard_normal((n, c)),
        "SequenceSoftmaxCrossEntropy": np.where(rng.random((n, 2)) < 0.3, -100,
                                                rng.integers(0, 3, (n, 2))),
    }[type(loss).__name__]
    u = sf_uniforms(loss, n, c, k=4)
    drawn = loss.sample(z, u, num_samples=4, targets=targets)
    expected = np.stack([loss.grad(z, drawn[k]) for k in range(4)])
    # both compute p - onehot (or sigma - y, or -radius cos) from the same z: a few eps
    np.testing.assert_allclose(sampled_logit_grads(loss, z, targets, u), expected,
                               rtol=0, atol=1e-14 * max(1.0, float(np.abs(expected).max())))


def test_mc_tolerance_comes_from_the_spread_of_the_estimates() -> None:
    """Gaussian noise of known size: 5 standard errors of the mean, and a bias does not widen it."""
    rng = np.random.default_rng(0)
    runs_, p, k, sigma = 16, 200, 3, 0.1
    fisher = rng.standard_normal((p, k))
    products = fisher + sigma * rng.standard_normal((runs_, p, k))
    # E||X_r - F V||^2 = sigma^2 P K, so the mean's standard error is sigma sqrt(P K / R)
    expected = MC_SIGMAS * sigma * math.sqrt(p * k / runs_) / np.linalg.norm(fisher)
    tolerance = fisher_mc_tolerance(products, fisher)
    # 15 x 600 = 9000 squared deviations: the spread is accurate to about 1.5%
    assert tolerance == pytest.approx(expected, rel=0.1)
    assert fisher_mc_tolerance(products + 1.0, fisher) == pytest.approx(tolerance, rel=1e-12)


@pytest.mark.skipif(not TORCH, reason="torch is not installed")
def test_corrupted_vjp_fails_the_crosscheck(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every TorchProvider VJP off by a relative 1e-6: far below what a test by eye sees."""
    from backends.torch.provider import TorchProvider

    vjp = TorchProvider.vjp

    def corrupted(self: TorchProvider, cotangents: Any) -> Any:
        return vjp(self, cotangents) * (1 + 1e-6)

    monkeypatch.setattr(TorchProvider, "vjp", corrupted)
    code, report = _run(tmp_path, ["linear-softmax-ce", "torch-mlp"])
    assert code == 1
    problems = _by_name(report)
    rows = _rows(problems["linear-softmax-ce"])
    for label in ("torch-autograd[vmap]", "torch-autograd[hooks]", "torch-autograd[flat]"):
        assert not rows[label]["ok"]
        assert rows[label]["differences"]["per_sample_grads"] == pytest.approx(1e-6, rel=1e-3)
    assert rows["fd[numpy]"]["ok"]
    # the torch-only problem's reference is corrupted too: fd, the dense J^T e and BackPACK see it
    torch_rows = _rows(problems["torch-mlp"])
    assert not torch_rows["fd[torch]"]["ok"]
    assert not _independent(problems["torch-mlp"])["per_sample_grads"]["ok"]
    assert not _oracles(problems["torch-mlp"])["backpack.BatchGrad"]["ok"]
    assert any("torch-mlp: independent per_sample_grads" in f for f in report["failed"])


@pytest.mark.skipif(not TORCH, reason="torch is not installed")
def test_corrupted_fisher_product_fails_the_oracles(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from validation.oracles import peers as oracles

    products = oracles.ngdref_fisher_products
    monkeypatch.setattr(
        oracles, "ngdref_fisher_products", lambda *a: products(*a) * (1 + 1e-6)
    )
    code, report = _run(tmp_path, ["linear-softmax-ce"])
    assert code == 1
    checks = _oracles(report["problems"][0])
    assert not checks["curvlinops.GGNLinearOperator"]["ok"]
    assert checks["curvlinops.EFLinearOperator"]["ok"]  # EF does not use fisher_vp
    assert all(r["ok"] for r in report["problems"][0]["rows"])


_BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
from validation.__main__ import main
sys.exit(main({argv!r}))
"""


def _run_blocked(
    tmp_path: Path, blocked: set[str], problems: list[str], *extra: str
) -> tuple[int, dict, str]:
    report = tmp_path / "report.json"
    argv = [arg for name in problems for arg in ("--problem", name)]
    argv += [*extra, "--report", str(report)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK.format(blocked=sorted(blocked), argv=argv)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(report.read_text()), result.stdout


def test_without_torch_the_numpy_core_still_runs(tmp_path: Path) -> None:
    code, report, _ = _run_blocked(
        tmp_path, {"torch"}, ["linear-softmax-ce", "t5-lora"], "--no-oracles"
    )
    assert unexpected_failures(report, code) == []
    linear, t5 = report["problems"]
    rows = _rows(linear)
    assert rows["fd[numpy]"]["ok"] and not rows["fd[numpy]"]["skipped"]
    assert rows["fd[array_api_strict]"]["ok"] and not rows["fd[array_api_strict]"]["skipped"]
    for label in ("exact[torch]", "torch-autograd[vmap]", "torch-autograd[flat]"):
        assert rows[label]["skipped"]
    assert set(_independent(linear)) == INDEPENDENT  # the dense references need no torch
    assert all(c["skipped"] == "--no-oracles" for c in linear["oracles"])
    assert "torch" in t5["skipped"]


def test_without_torch_the_oracles_are_missing_and_that_fails(tmp_path: Path) -> None:
    code, report, stdout = _run_blocked(tmp_path, {"torch"}, ["least-squares-toy"])
    assert code == 1
    (check,) = report["problems"][0]["oracles"]
    assert check["error"] and "--no-oracles" in check["error"] and not check["ok"]
    assert "FAIL least-squares-toy: oracle all oracles" in stdout


@pytest.mark.skipif(not TORCH, reason="torch is not installed")
def test_missing_oracle_libraries_fail_unless_opted_out(tmp_path: Path) -> None:
    blocked = {"curvlinops", "backpack"}
    code, report, stdout = _run_blocked(tmp_path, blocked, ["least-squares-toy"])
    assert code == 1
    checks = _oracles(report["problems"][0])
    assert set(checks) == blocked
    for library, check in checks.items():
        assert not check["ok"] and "not importable" in check["error"]
        assert f"FAIL least-squares-toy: oracle {library} all" in stdout
    code, report, _ = _run_blocked(tmp_path, blocked, ["least-squares-toy"], "--no-oracles")
    assert unexpected_failures(report, code) == []
    checks = _oracles(report["problems"][0])
    assert all(c["skipped"] == "--no-oracles" and c["ok"] for c in checks.values())
