"""Figures and the CPU reproduction (validation/experiments/figures/, reproduce/).

Expected values come from other routes: the toy fields are checked against the closed forms of
backends.arrays.analytic (derived by hand, :ref:`conv-toys`), not against ngdref.updates; the claim
statements against synthetic evaluation / sweep / summary data whose answer is known by
construction; the figure functions against small synthetic files in the runner's and the
evaluator's formats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from backends.arrays.analytic import (
    least_squares_toy_closed_form,
    logistic_toy_closed_form,
)
from validation.experiments.figures import plots as figures
from validation.experiments.reproduce import driver as reproduce
from validation.experiments.reproduce import plan as reproduce_plan
from validation.experiments.reproduce import report as reproduce_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RATIOS = ("ef/sgd", "ief/sgd", "sf/ief", "sf/ef")


def _assert_figures(paths: list[Path], prefix: Path) -> None:
    assert [p.name for p in paths] == [prefix.name + ".png", prefix.name + ".pdf"]
    png, pdf = paths
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000


# ---- synthetic inputs in the runner's and the evaluator's formats ----------------------------
def _write_run(path: Path, optimizer: str, seed: int, *, diverge_at: int | None = None) -> Path:
    """A run directory: config.json and metrics.jsonl with 3 epochs of 4 steps."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"optimizer": optimizer, "seed": seed}))
    lines = []
    step = 0
    for epoch in range(3):
        for k in range(4):
            step += 1
            if diverge_at is not None and step == diverge_at:
                lines.append({"kind": "diverged", "step": step, "message": "loss is nan"})
                break
            loss = 2.0 * math.exp(-0.3 * step) * (1 + 0.1 * seed)
            lines.append({"kind": "train", "step": step, "epoch": epoch + (k + 1) / 4,
                          "loss": loss, "lr": 0.1, "time": 0.01 * step})
        else:
            lines.append({"kind": "validation", "step": step, "epoch": epoch + 1.0,
                          "accuracy": 0.5 + 0.1 * epoch, "loss": 1.0, "score": 0.5, "best": True})
            continue
        break
    with (path / "metrics.jsonl").open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in lines)
    return path


def _summary(mean: float, std: float = 0.1, n: int = 4) -> dict[str, Any]:
    return {"mean": mean, "std": std, "values": [mean] * n}


def _evaluation(ratio_means: list[dict[str, float]]) -> dict[str, Any]:
    """evaluation.json with one checkpoint per entry of ``ratio_means``."""
    checkpoints = []
    for k, means in enumerate(ratio_means):
        checkpoints.append({
            "name": f"epoch-{k}", "epoch": k, "step": 17 * k,
            "ratios": {name: _summary(means[name]) for name in RATIOS},
            "imbalance": {"max_min": _summary(3.0 + k), "tail_10": _summary(2.0 - 0.5 * k)},
            "gamma": {m: {"mean": 1.0, "std": 0.1} for m in ("sgd", "ef", "ief", "sf")},
        })
    return {"settings": {"batches": 4, "batch_size": 160}, "checkpoints": checkpoints}


def _sweep(ief_curves: list[list[float]], dampings: list[float]) -> dict[str, Any]:
    checkpoints = []
    for k, ief in enumerate(ief_curves):
        d = len(dampings)
        ratios = {name: {"mean": [1.2] * d, "std": [0.1] * d} for name in RATIOS}
        ratios["ief/sgd"] = {"mean": list(ief), "std": [0.05] * d}
        checkpoints.append({"name": f"epoch-{k}", "epoch": k, "dampings": dampings,
                            "ratios": ratios})
    return {"settings": {"batches": 2}, "checkpoints": checkpoints}


GOOD = {"ef/sgd": 1.5, "ief/sgd": 0.5, "sf/ief": 1.4, "sf/ef": 0.6}  # iEF < SF < EF, EF > SGD
BAD = {"ef/sgd": 0.8, "ief/sgd": 0.7, "sf/ief": 0.9, "sf/ef": 0.8}  # SF < iEF, EF < SGD


# ---- figures ------------------------------------------------------------------------------------
def test_training_curves_from_metrics(tmp_path: Path) -> None:
    runs = [
        _write_run(tmp_path / "sgd0", "sgd", 0),
        _write_run(tmp_path / "sgd1", "sgd", 1),
        _write_run(tmp_path / "ef0", "ef", 0, diverge_at=7),
    ]
    groups = figures.group_runs(runs)
    assert {k: len(v) for k, v in groups.items()} == {"sgd": 2, "ef": 1}
    prefix = tmp_path / "out" / "curves"
    _assert_figures(figures.plot_training_curves(runs, prefix), prefix)


def test_gamma_and_sweep_figures(tmp_path: Path) -> None:
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps(_evaluation([GOOD, BAD, GOOD])))
    prefix = tmp_path / "gamma"
    _assert_figures(figures.plot_gamma_ratios(evaluation, prefix), prefix)
    sweep = tmp_path / "sweep.json"
    lam = [0.0, 1e-9, 1e-4, 1.0]  # lambda = 0 cannot go on a log axis: left out, no error
    sweep.write_text(json.dumps(_sweep([[0.5, 0.5, 0.6, float("nan")], [0.4] * 4], lam)))
    prefix = tmp_path / "sweep"
    _assert_figures(figures.plot_damping_sweep(sweep, prefix), prefix)


def test_toy_figures(tmp_path: Path) -> None:
    for plot, name in ((figures.plot_least_squares_toy, "ls"), (figures.plot_logistic_toy, "lg")):
        prefix = tmp_path / name
        _assert_figures(plot(prefix, num_steps=20), prefix)


# ---- the toy fields against their closed forms (conventions page, The toy problems in closed form)
THETA0 = [-1.3, 0.4, 1.5]
THETA1 = [-0.7, 0.9]


@pytest.mark.parametrize(
    ("updates", "closed_form"),
    [
        (figures.least_squares_toy_updates, least_squares_toy_closed_form),
        (figures.logistic_toy_updates, logistic_toy_closed_form),
    ],
    ids=["least_squares", "logistic"],
)
def test_toy_field_matches_closed_form(updates: Any, closed_form: Any) -> None:
    grid = figures.field(updates, THETA0, THETA1)
    for i, t1 in enumerate(THETA1):
        for j, t0 in enumerate(THETA0):
            expected = closed_form((t0, t1))
            for method in ("ngd", "ief", "ef"):
                np.testing.assert_allclose(
                    grid[method][i, j], getattr(expected, method), rtol=1e-10, atol=1e-12,
                    err_msg=f"{method} at theta=({t0}, {t1})",
                )
            np.testing.assert_allclose(grid["sgd"][i, j], expected.grad, rtol=1e-12)


def test_least_squares_spec_point() -> None:
    """:ref:`conv-toys` at theta = (1.5, -0.7): NGD = iEF = theta, EF = (0.6667, 0.5833)."""
    d = figures.least_squares_toy_updates((1.5, -0.7))
    np.testing.assert_allclose(d["ngd"], [1.5, -0.7], rtol=1e-12)
    np.testing.assert_allclose(d["ief"], [1.5, -0.7], rtol=1e-12)
    np.testing.assert_allclose(d["ef"], [2 / 3, 7 / 12], rtol=1e-12)


def test_field_is_nan_where_ef_is_undefined() -> None:
    """r_1 = theta_0 = 0: the per-sample gradient matrix is singular, EF does not exist."""
    grid = figures.field(figures.least_squares_toy_updates, [0.0, 1.0], [0.5])
    assert np.all(np.isnan(grid["ef"][0, 0])) and np.all(np.isfinite(grid["ef"][0, 1]))


def test_ngd_trajectory_is_straight_to_the_optimum() -> None:
    """NGD = theta on the least-squares toy: every step points at the optimum (0, 0)."""
    path = figures.toy_trajectory(
        figures.least_squares_toy_updates, "ngd", (1.5, -0.7), step_length=0.1, num_steps=100,
        optimum=(0.0, 0.0),
    )
    np.testing.assert_allclose(path[-1], [0.0, 0.0])
    cross = path[:, 0] * -0.7 - path[:, 1] * 1.5  # collinear with the start and the origin
    np.testing.assert_allclose(cross, 0.0, atol=1e-12)
    assert len(path) == 18  # the start, 16 steps bring |theta| = 1.655 within 0.1, the optimum


# ---- claims -------------------------------------------------------------------------------------
def test_gamma_order_held_for_most_checkpoints() -> None:
    found = {c.name: c for c in reproduce_report.claims({}, _evaluation([GOOD, BAD, GOOD]), None)}
    order = found["gamma order"]
    assert order.held is True
    assert "held for most checkpoints (2 of 3)" in order.statement
    worse = found["EF worse than SGD"]
    assert worse.held is True and "(2 of 3)" in worse.statement
    assert found["iEF damping"].held is None


def test_gamma_order_all_or_not() -> None:
    found = {c.name: c for c in reproduce_report.claims({}, _evaluation([GOOD, GOOD]), None)}
    assert "held for all checkpoints (2 of 2)" in found["gamma order"].statement
    found = {c.name: c for c in reproduce_report.claims({}, _evaluation([BAD, GOOD, BAD]), None)}
    assert found["gamma order"].held is False
    assert "did not hold (1 of 3 checkpoints)" in found["gamma order"].statement
    assert found["EF worse than SGD"].held is False


def test_gamma_order_needs_both_inequalities() -> None:
    """iEF < SF but EF < SF: not iEF < SF < EF; a NaN ratio counts as not held."""
    half = {**GOOD, "sf/ef": 1.1}
    nan = {**GOOD, "sf/ief": float("nan")}
    flags = reproduce_report.gamma_order_flags(_evaluation([GOOD, half, nan]))
    assert flags == [True, False, False]


def test_imbalance_claim() -> None:
    """Both statistics are judged separately: max/min 3, 4, 5 grows, the 10% tails 2, 1.5, 1
    shrink; a file of the older format (one max/min summary) still gives its claim."""
    evaluation = _evaluation([GOOD, GOOD, GOOD])
    found = {c.name: c for c in reproduce_report.claims({}, evaluation, None)}
    assert found["imbalance grows (max_min)"].held is True
    tails = found["imbalance grows (tail_10)"]
    assert tails.held is False
    assert "(2 at the first checkpoint, 1 at the last)" in tails.statement
    for c in evaluation["checkpoints"]:
        c["imbalance"] = c["imbalance"]["max_min"]
    found = {c.name: c for c in reproduce_report.claims({}, evaluation, None)}
    assert found["imbalance grows (max_min)"].held is True
    assert "imbalance grows (tail_10)" not in found


def test_damaged_metrics_and_truncated_evaluation_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``figures --runs`` on a metrics.jsonl with a cut-off line, and ``--evaluation`` on a
    truncated evaluation.json: exit 2 with the file and line, no traceback, nothing written."""
    from validation.experiments.__main__ import main

    run = _write_run(tmp_path / "sgd0", "sgd", 0)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[4] = lines[4][: len(lines[4]) // 2]  # a line cut off mid-record
    metrics.write_text("\n".join(lines) + "\n")
    out = tmp_path / "figs"
    assert main(["figures", "--runs", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{metrics}:5: not a JSON record" in err and "Traceback" not in err
    evaluation = tmp_path / "evaluation.json"
    text = json.dumps(_evaluation([GOOD, BAD]), indent=2)
    evaluation.write_text(text[: len(text) // 2])
    assert main(["figures", "--evaluation", str(evaluation), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    line = len(text[: len(text) // 2].splitlines())
    assert f"{evaluation}:{line}: not valid JSON" in err and "truncated" in err
    not_ours = tmp_path / "sweep.json"
    not_ours.write_text("[1, 2]")
    assert main(["figures", "--sweep", str(not_ours), "--out", str(out)]) == 2
    assert "missing ['settings', 'checkpoints']" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_ief_damping_robustness() -> None:
    lam = [1e-12, 1e-9, 1e-6, 1e-3, 1.0]
    robust = [0.50, 0.50, 0.48, 0.45, 0.9]  # within 1.25x of the best (0.45) below 1e-8
    fragile = [0.90, 0.85, 0.6, 0.3, 0.9]  # needs lambda = 1e-3
    worse_than_sgd = [1.2, 1.2, 1.2, 1.1, 1.0]
    assert reproduce_report.ief_robust_flags(_sweep([robust, fragile, worse_than_sgd], lam)) == [
        True, False, False,
    ]
    sweep = _sweep([robust, robust, fragile], lam)
    found = {c.name: c for c in reproduce_report.claims({}, None, sweep)}
    assert found["iEF damping"].held is True
    assert "held for most sweep checkpoints (2 of 3)" in found["iEF damping"].statement


def _summary_of(acc: dict[str, float], loss: dict[str, float]) -> dict[str, dict[str, float]]:
    return {m: {"test_accuracy": acc[m], "final_training_loss": loss[m]} for m in acc}


def test_ranking_claims() -> None:
    paper_acc = {"ief": 0.9, "adam": 0.8, "sf": 0.7, "sgd": 0.6, "ef": 0.1}
    swapped_loss = {"ief": 0.01, "adam": 0.02, "sf": 0.04, "sgd": 0.03, "ef": math.inf}
    found = reproduce_report.claims(_summary_of(paper_acc, swapped_loss), None, None)
    loss_claim, acc_claim = found[0], found[1]
    assert acc_claim.held is True and "held. Observed iEF > Adam > SF > SGD > EF" in (
        acc_claim.statement
    )
    assert loss_claim.held is False
    assert "Observed iEF > Adam > SGD > SF > EF" in loss_claim.statement  # inf (diverged) last
    assert "9 of 10 pairs" in loss_claim.statement
    assert "iEF best: yes" in loss_claim.statement and "EF worst: yes" in loss_claim.statement


def test_rank_puts_non_finite_last() -> None:
    values = {"a": 0.5, "b": math.nan, "c": 0.9, "d": math.inf}
    assert reproduce_report.rank(values, higher_is_better=True) == ["c", "a", "b", "d"]
    assert reproduce_report.rank(values, higher_is_better=False) == ["a", "c", "b", "d"]


def test_select_lr() -> None:
    def run(acc: float, diverged: bool = False) -> dict[str, Any]:
        return {"validation_accuracy": acc, "diverged": diverged}

    assert reproduce_report.select_lr({0.1: run(0.8), 1.0: run(0.9), 10.0: run(0.95, True)}) == 1.0
    assert reproduce_report.select_lr({0.1: run(0.9), 1.0: run(0.9)}) == 0.1  # ties: the smaller
    assert reproduce_report.select_lr({0.1: run(0.5, True), 1.0: run(0.6, True)}) == 1.0
    assert reproduce_report.select_lr({0.1: run(math.nan, True), 1.0: run(math.nan, True)}) == 0.1


def test_final_training_loss() -> None:
    records = [
        {"kind": "train", "step": 1, "epoch": 0.5, "loss": 9.0},
        {"kind": "train", "step": 2, "epoch": 1.0, "loss": 9.0},
        {"kind": "validation", "step": 2, "epoch": 1.0, "loss": 7.0},
        {"kind": "train", "step": 3, "epoch": 1.5, "loss": 2.0},
        {"kind": "train", "step": 4, "epoch": 2.0, "loss": 1.0},
    ]
    assert reproduce_report.final_training_loss(records, 2) == 1.5
    diverged = [*records, {"kind": "diverged", "step": 5}]
    assert reproduce_report.final_training_loss(diverged, 2) == math.inf


# ---- the reproduction, end to end ---------------------------------------------------------------
def test_reproduce_fails_clearly_without_the_evaluator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "validation.experiments.evaluate.framework", None)
    with pytest.raises(reproduce_plan.ReproduceError, match=r"evaluate/framework\.py"):
        reproduce.reproduce(tmp_path / "out", reproduce_plan.QUICK)
    assert not (tmp_path / "out").exists()  # nothing was trained


def test_reproduce_quick_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip(
        "validation.experiments.evaluate.framework",
        reason="validation/experiments/evaluate/framework.py (the evaluation framework) is "
        "not there yet",
    )
    from validation.experiments.__main__ import main

    out = tmp_path / "quick"
    assert main(["reproduce", "--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    plan = reproduce_plan.QUICK
    assert set(results["summary"]) == set(reproduce_plan.OPTIMIZERS)
    for opt, row in results["summary"].items():
        assert row["lr"] in plan.lr_grid[opt] and row["runs"] == len(plan.seeds)
        for seed in plan.seeds:
            assert (reproduce_plan.run_dir(out, opt, row["lr"], seed) / "results.json").is_file()
    assert [c["name"] for c in results["evaluation"]["checkpoints"]] == plan.eval_checkpoints()
    assert len(results["sweep"]["checkpoints"]) == 3
    assert len(results["claims"]) == 8  # the K-FAC family's among them
    assert any(c["name"] == "K-FAC family" and c["held"] is not None for c in results["claims"])
    assert "| checkpoint | epoch | KFAC/iEF | eKFAC/iEF | ieKFAC/iEF |" in (
        out / "results.md").read_text()
    for name in ("toy_least_squares", "toy_logistic", "training_curves", "gamma_ratios",
                 "damping_sweep", "kfac_ratios"):
        _assert_figures([out / f"{name}.png", out / f"{name}.pdf"], out / name)
    text = (out / "results.md").read_text()
    assert "## The paper's claims" in text and "Ranking by test accuracy" in text
    # the same directory with another plan is refused before anything runs
    with pytest.raises(reproduce_plan.ReproduceError, match="epochs"):
        reproduce.reproduce(out, dataclasses.replace(plan, epochs=plan.epochs + 1))


# ---- the LoRA reproduction (validation/experiments/reproduce/lora_digits.py) -----------------
def test_lora_digits_data_and_model(tmp_path: Path) -> None:
    """Pretraining sees digits 0-4 only, fine-tuning 5-9 only; the fine-tuned model trains the
    LoRA adapters and nothing else, starts as the pretrained network (B = 0), and a base file
    that is not the one the configuration names is refused."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from validation.experiments.reproduce import lora_digits as ld

    for split in ("train", "validation", "test"):
        _, y_pre = ld.digits_subset(split, ld.PRETRAIN_CLASSES)
        _, y_fine = ld.digits_subset(split, ld.FINETUNE_CLASSES)
        assert set(y_pre.tolist()) == set(ld.PRETRAIN_CLASSES)
        assert set(y_fine.tolist()) == set(ld.FINETUNE_CLASSES)
    plan = ld.QUICK_LORA
    ld.pretrain(tmp_path, plan)
    config = ld.run_config(plan, "ief", 100.0, 1, tmp_path)
    assert config["optimizers"]["ief"]["lr"] == 100.0 and config["setup"] == "digits-lora"
    setup = ld.build_lora_setup(config, tmp_path / "run")
    names = [n for n, _ in setup.trainable]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * (len(plan.hidden_sizes) + 1)  # A and B on every linear layer
    assert setup.num_trainable == plan.lora_rank * sum(
        a + b for a, b in zip((64, *plan.hidden_sizes), (*plan.hidden_sizes, 10), strict=True)
    )
    base = ld._base_model(plan.hidden_sizes)
    base.load_state_dict(torch.load(tmp_path / ld.BASE_FILE, weights_only=True))
    x = setup.train.x[:5]
    torch.testing.assert_close(setup.model(x), base(x), rtol=0, atol=0)
    assert set(setup.train.labels.tolist()) <= set(ld.FINETUNE_CLASSES)
    assert len(setup.train) == plan.max_train_samples
    (tmp_path / "run" / ld.BASE_FILE).write_bytes(b"not the base")
    with pytest.raises(reproduce_plan.ReproduceError, match="SHA-256 differs"):
        ld.build_lora_setup(config, tmp_path / "run")
    assert ld.setup_of_run_dir(tmp_path / "nowhere") is None


def test_reproduce_lora_quick_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``reproduce --setup digits-lora --quick``: every stage at tiny scale, with a progress bar;
    the evaluation is the AdamW run's, under the authors' protocol, in float64."""
    pytest.importorskip("peft")
    from validation.experiments.__main__ import main
    from validation.experiments.reproduce import lora_digits as ld

    out = tmp_path / "lora"
    assert main(["reproduce", "--setup", "digits-lora", "--quick", "--out", str(out),
                 "--progress", "on"]) == 0
    assert "reproduce: 100%" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    plan = ld.QUICK_LORA
    assert results["experiment"] == "digits-lora"
    assert set(results["summary"]) == set(ld.LORA_OPTIMIZERS)
    for opt, row in results["summary"].items():
        assert row["runs"] == len(plan.seeds)
        for seed in plan.seeds:
            run = reproduce_plan.run_dir(out, opt, row["lr"], seed)
            assert (run / "results.json").is_file() and (run / ld.BASE_FILE).is_file()
    assert "/adamw/" in results["evaluation_run"]
    settings = results["evaluation"]["settings"]
    assert settings["protocol"] == "authors" and settings["dtype"] == "float64"
    assert [c["name"] for c in results["evaluation"]["checkpoints"]] == plan.eval_checkpoints()
    assert len(results["claims"]) == 8
    assert set(results["evaluation"]["checkpoints"][0]["ratios"]) >= {"iekfac/ief", "kfac/ief"}
    text = (out / "results.md").read_text()
    assert "AdamW > iEF > SGD > SF > EF" in text and "digits 0-4" in text
    for name in ("training_curves", "gamma_ratios", "damping_sweep"):
        _assert_figures([out / f"{name}.png", out / f"{name}.pdf"], out / name)
    assert not (out / "toy_logistic.png").exists()
    summary = (out / "summary.json").read_text()
    assert '"values"' not in summary and "seeds" not in json.loads(summary)
    assert json.loads(summary)["claims"] == results["claims"]
