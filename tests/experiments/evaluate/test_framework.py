"""The evaluation framework (validation/experiments/evaluate/framework.py) on tiny runs of the
runner.

Runs are trained here by the runner itself: an MLP on scikit-learn's digits (2 epochs, Adam) and
a tiny random T5 + LoRA on an SST-2 file in GLUE's TSV format (1 epoch). Here: the file format,
micro-batching, resume, the T5 evaluator's per-sample loss from Hugging Face's logits at the
first label position, bad input and the command line. Every gamma against a dense
recomputation: ``test_experiments_evaluate_dense.py``; the sweep: ``test_experiments_sweep.py``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.experiments.cases import write_sst2
from tests.experiments.evaluate.cases import (  # noqa: F401  (fixtures)
    MICRO,
    MLP_SETTINGS,
    PYTESTMARK,
    B,
    M,
    copy_run,
    fixture_mlp_evaluation,
    fixture_mlp_run,
    torch,
)
from validation.experiments.__main__ import main
from validation.experiments.config.load import load_config
from validation.experiments.evaluate.framework import (
    EVALUATION_FILE,
    RATIOS,
    SWEEP_FILE,
    EvaluationError,
    evaluate_run,
    evaluation_problem,
    sweep_run,
)
from validation.experiments.evaluate.settings import DEFAULT_DAMPING
from validation.experiments.train.runner import build_setup, load_checkpoint, load_run_config, train

pytestmark = PYTESTMARK


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny T5 + LoRA, AdamW, 1 epoch on 8 SST-2 rows (GLUE's TSV layout)."""
    root = write_sst2(tmp_path_factory.mktemp("glue"))
    config = load_config(
        "t5-lora",
        ["optimizer=adamw", "model.name=tiny", "model.max_length=24", f"data.source={root}",
         "data.max_train_samples=8", "data.max_eval_samples=8", "train.batch_size=4",
         "train.eval_batch_size=8", "train.epochs=1", "peft.dropout=0.1"],
    )
    run = tmp_path_factory.mktemp("t5") / "run"
    train(config, run, progress=False, device="cpu")
    return run


# ---- the file format -------------------------------------------------------------------------
def _is_float(x: Any) -> bool:
    return isinstance(x, float)


def check_evaluation_format(result: dict[str, Any], path: Path, names: list[str]) -> None:
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(on_disk) == {"settings", "checkpoints"}
    assert [c["name"] for c in on_disk["checkpoints"]] == names
    batches = on_disk["settings"]["batches"]
    for entry in on_disk["checkpoints"]:
        assert set(entry) == {
            "name", "epoch", "step", "ratios", "imbalance", "rows_kept", "gamma"
        }
        assert entry["epoch"] == int(entry["name"].split("-")[1])
        assert isinstance(entry["step"], int)
        assert set(entry["ratios"]) == {
            "ef/sgd", "ief/sgd", "sf/ief", "sf/ef", "kfac/ief", "ekfac/ief", "iekfac/ief"
        }
        assert set(entry["imbalance"]) == {"max_min", "tail_10"}
        for summary in [*entry["ratios"].values(), *entry["imbalance"].values()]:
            assert set(summary) == {"mean", "std", "values"}
            assert len(summary["values"]) == batches
            assert all(_is_float(v) and math.isfinite(v) for v in summary["values"])
            assert summary["mean"] == pytest.approx(np.mean(summary["values"]), rel=1e-12)
            assert summary["std"] == pytest.approx(np.std(summary["values"]), rel=1e-9, abs=1e-15)
        for stat in entry["imbalance"].values():
            assert all(v >= 1.0 for v in stat["values"])
        assert all(v == int(v) for v in entry["rows_kept"]["values"])
        assert set(entry["gamma"]) == {"sgd", "ef", "ief", "sf", "kfac", "ekfac", "iekfac"}
        for summary in entry["gamma"].values():
            assert set(summary) == {"mean", "std"}
            assert _is_float(summary["mean"]) and summary["mean"] > 0


def test_evaluation_json_format(mlp_run: Path, mlp_evaluation: dict[str, Any]) -> None:
    check_evaluation_format(
        mlp_evaluation, mlp_run / EVALUATION_FILE, ["epoch-0", "epoch-1", "epoch-2"]
    )
    settings = mlp_evaluation["settings"]
    assert settings == {
        "protocol": "ngdref", "batches": B, "batch_size": M, "micro_batch": MICRO, "seed": 0,
        "damping": DEFAULT_DAMPING, "dedup_threshold": 0.95,
        "methods": ["sgd", "ef", "ief", "sf", "kfac", "ekfac", "iekfac"],
        "checkpoints": ["epoch-0", "epoch-1", "epoch-2"],
        "reduction": "mean", "num_samples": 1, "dtype": "float64", "sf_duplicates": None,
        "damping_scale": "absolute", "dedup_zero_rows": "drop", "device": "cpu",
    }
    assert DEFAULT_DAMPING == {
        "ef": 1e-7, "ief": 1e-12, "sf": 1e-7, "kfac": 1e-7, "ekfac": 1e-7, "iekfac": 1e-12,
    }
    steps = [c["step"] for c in mlp_evaluation["checkpoints"]]
    assert steps == [0, 3, 6]  # 48 rows / 16 per step



def test_micro_batch_changes_nothing(mlp_run: Path, tmp_path: Path) -> None:
    """Micro-batches bound memory only: one pass of 12 or passes of 5 + 5 + 2 agree, the
    eKFAC and ieKFAC curvatures merged over the micro-batches included (KFAC's labels are
    drawn per micro-batch, so it is left out). Their damped K-FAC solves have condition
    numbers up to ~1e6 here (lambda = 1e-3, 0.144 in the sum convention): 1e-8 relative."""
    run = copy_run(mlp_run, tmp_path / "run")
    settings = {**MLP_SETTINGS, "micro_batch": M, "checkpoints": "last", "batches": 2,
                "methods": ("sgd", "ef", "ief", "sf", "ekfac", "iekfac"),
                "damping": {"ekfac": 1e-3, "iekfac": 1e-3}}
    whole = evaluate_run(run, **settings)["checkpoints"][0]
    chunked = evaluate_run(run, **{**settings, "micro_batch": 5}, overwrite=True)
    assert set(whole["ratios"]) == set(RATIOS) - {"kfac/ief"}
    for name in whole["ratios"]:
        assert chunked["checkpoints"][0]["ratios"][name]["values"] == pytest.approx(
            whole["ratios"][name]["values"], rel=1e-8 if "kfac" in name else 1e-10
        )


# ---- resume ----------------------------------------------------------------------------------
def test_resume_recomputes_only_missing_checkpoints(
    mlp_run: Path, mlp_evaluation: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(mlp_run, tmp_path / "run", keep_results=True)
    path = run / EVALUATION_FILE
    stored = json.loads(path.read_text())
    stored["checkpoints"] = stored["checkpoints"][:-1]  # as if killed before the last one
    path.write_text(json.dumps(stored))
    resumed = evaluate_run(run, **{**MLP_SETTINGS, "progress": True})
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("evaluate epoch")]
    assert len(lines) == 3
    assert "skipped" in lines[0] and "skipped" in lines[1]
    assert lines[2].startswith("evaluate epoch-2 (epoch 2, step 6): ef/sgd ")
    assert "3/3" in err  # the tqdm bar counted the 3 batches still to do
    assert json.loads(path.read_text()) == json.loads(json.dumps(mlp_evaluation))
    assert resumed["checkpoints"][-1] == mlp_evaluation["checkpoints"][-1]
    # a rerun with other settings refuses to mix them, naming what differs
    with pytest.raises(EvaluationError, match=r"batch_size: 12 -> 10"):
        evaluate_run(run, **{**MLP_SETTINGS, "batch_size": 10})


# ---- T5: the first label token ---------------------------------------------------------------
def test_t5_evaluator_keeps_only_the_first_label_token(t5_run: Path) -> None:
    setup = build_setup(load_run_config(t5_run), "cpu")
    params, _, _ = load_checkpoint(t5_run, "epoch-1")
    setup.load_params(params)
    batch = setup.train.make(np.arange(6))
    labels = batch.targets
    assert labels.shape[1] >= 2  # label word + EOS: training sees more than the first token
    # dropout (T5's and LoRA's 0.1) switched on: the evaluator must still run in eval mode
    setup.model.train()
    problem = evaluation_problem(setup, batch, micro_batch=4)
    assert problem.factor == pytest.approx(1 / 6)
    torch.testing.assert_close(problem.targets, labels[:, 0])
    values = problem.loss.value(problem.provider.logits(), problem.targets)
    e = problem.loss.grad(problem.provider.logits(), problem.targets)
    grads = problem.provider.vjp(e)
    with torch.no_grad():
        noisy = setup.model(**batch.inputs).logits[:, 0]  # dropout active
        setup.model.eval()
        hf_logits = setup.model(**batch.inputs).logits  # (N, T, V), teacher forced
    assert not torch.allclose(noisy, hf_logits[:, 0])
    expected = torch.nn.functional.cross_entropy(hf_logits[:, 0], labels[:, 0], reduction="none")
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
    full = torch.nn.functional.cross_entropy(
        hf_logits.transpose(1, 2), labels, reduction="none", ignore_index=-100
    ).sum(dim=1)
    assert not torch.allclose(values, full)  # the EOS term is really left out
    # per-sample gradients: single-sample backward passes of that first-token CE
    trainable = [p for _, p in setup.trainable]
    for n in range(2):
        one = {k: v[n:n + 1] for k, v in batch.inputs.items()}
        loss = torch.nn.functional.cross_entropy(
            setup.model(**one).logits[:, 0], labels[n:n + 1, 0], reduction="sum"
        )
        expected_row = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable)])
        torch.testing.assert_close(grads[n], expected_row, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("protocol", "batch_size"), [("ngdref", 6), ("authors", 8)]  # authors: 2 micro-batches
)
def test_t5_evaluation_file(t5_run: Path, tmp_path: Path, protocol: str, batch_size: int) -> None:
    run = copy_run(t5_run, tmp_path / "run")
    result = evaluate_run(
        run, protocol=protocol, batches=2, batch_size=batch_size, micro_batch=4, progress=False
    )
    check_evaluation_format(result, run / EVALUATION_FILE, ["epoch-0", "epoch-1"])


# ---- bad input -------------------------------------------------------------------------------
def test_run_dir_without_checkpoints(mlp_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(mlp_run / "config.json", empty / "config.json")
    with pytest.raises(EvaluationError, match=r"run_dir: .* has no epoch checkpoints"):
        evaluate_run(empty, progress=False)
    with pytest.raises(EvaluationError, match=r"run_dir: .* has no epoch checkpoints"):
        sweep_run(empty, progress=False)
    with pytest.raises(FileNotFoundError, match=r"run_dir: .*config\.json"):
        evaluate_run(tmp_path / "nowhere", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoints": "epoch-9"}, r"checkpoints: unknown checkpoint 'epoch-9'"),
        ({"checkpoints": ["first", "latest"]}, r"checkpoints: unknown checkpoint 'latest'"),
        ({"checkpoints": ""}, r"checkpoints is empty"),
        ({"batch_size": 49}, r"batch_size=49 is larger than the training split \(48"),
        ({"batches": 0}, r"batches must be an int >= 1"),
        ({"micro_batch": 2.5}, r"micro_batch must be an int"),
        ({"seed": -1}, r"seed must be an int >= 0"),
        ({"damping": -1e-3}, r"damping must be a finite number >= 0"),
        ({"damping": {"ngd": 1.0}}, r"damping: unknown method\(s\) \['ngd'\]"),
        ({"damping": {"sf": float("nan")}}, r"damping\['sf'\] must be a finite number"),
        ({"dedup_threshold": 1.5}, r"dedup_threshold must be None or in \(0, 1\]"),
        ({"methods": ["sgd", "ngd"]}, r"methods must be a non-empty subset"),
        ({"reduction": "token"}, r"reduction: reduction must be 'sum', 'mean'"),
        ({"protocol": "paper"}, r"protocol must be one of \('ngdref', 'authors'\)"),
        ({"dtype": "float16"}, r"dtype must be one of"),
        ({"protocol": "authors", "reduction": "mean"}, r"reduction: the authors' protocol"),
        ({"protocol": "authors"}, r"batch_size=12 must be a multiple of micro_batch=5"),
        ({"protocol": "authors", "micro_batch": 4, "damping": {"ef": 1e-3}},
         r"damping: the authors' protocol uses one lambda"),
        ({"protocol": "authors", "micro_batch": 4, "sf_duplicates": "sum"},
         r"sf_duplicates must be one of"),
    ],
)
def test_bad_arguments_are_named(mlp_run: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        evaluate_run(mlp_run, **{**MLP_SETTINGS, **kwargs})


@pytest.mark.parametrize(
    ("dampings", "match"),
    [([], r"dampings is empty"), ([1e-3, -1.0], r"dampings\[1\] must be a finite number >= 0"),
     ("1e-3", r"dampings must be a sequence")],
)
def test_bad_sweep_grid_is_named(mlp_run: Path, dampings: Any, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        sweep_run(mlp_run, dampings=dampings, progress=False)


def test_singular_sf_names_the_batch(mlp_run: Path, tmp_path: Path) -> None:
    """SF with damping 0 has no inverse when P > M: the error says where, and keeps its type."""
    import ngdref

    run = copy_run(mlp_run, tmp_path / "run")
    with pytest.raises(ngdref.SingularMatrixError, match=r"checkpoint epoch-0, batch 0: "):
        evaluate_run(run, **MLP_SETTINGS, damping={"sf": 0.0})


# ---- command line ----------------------------------------------------------------------------
def test_command_line(mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(mlp_run, tmp_path / "run")
    common = ["--batches", "1", "--batch-size", "8", "--micro-batch", "3", "--progress", "off"]
    assert main(["evaluate", str(run), *common, "--checkpoints", "first,last",
                 "--damping", "1e-5", "--damping", "ief=1e-10", "--dedup-threshold", "none"]) == 0
    result = json.loads((run / EVALUATION_FILE).read_text())
    assert result["settings"]["damping"] == {
        "ef": 1e-5, "ief": 1e-10, "sf": 1e-5, "kfac": 1e-5, "ekfac": 1e-5, "iekfac": 1e-5,
    }
    assert result["settings"]["dedup_threshold"] is None
    assert [c["name"] for c in result["checkpoints"]] == ["epoch-0", "epoch-2"]
    assert main(["sweep", str(run), *common, "--dampings", "1e-8,1e-4"]) == 0
    sweep = json.loads((run / SWEEP_FILE).read_text())
    assert sweep["settings"]["dampings"] == [1e-8, 1e-4]
    capsys.readouterr()
    assert main(["evaluate", str(run), *common, "--checkpoints", "epoch-7"]) == 2
    assert "checkpoints: unknown checkpoint 'epoch-7'" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nowhere")]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_readme_evaluate_examples_point_at_runs_it_creates() -> None:
    """Every ``evaluate`` / ``sweep`` run directory in the experiments guide's commands
    (docs/guide/experiments.md) is the ``--out`` of a ``train`` line before it (a newcomer can
    run the blocks top to bottom)."""
    guide = Path(__file__).resolve().parents[3] / "docs" / "guide" / "experiments.md"
    readme = guide.read_text(encoding="utf-8")
    commands = [
        line.split("#")[0].split()
        for line in readme.splitlines()
        if line.startswith("python -m validation.experiments ")
    ]
    created: set[str] = set()
    checked = 0
    for words in commands:
        command = words[3]
        if command == "train" and "--out" in words:
            created.add(words[words.index("--out") + 1])
        elif command in ("evaluate", "sweep"):
            assert words[4] in created, f"guide: {' '.join(words)} uses a run never created"
            checked += 1
    assert checked >= 2


def test_cli_defaults_are_the_documented_ones() -> None:
    """``evaluate`` and ``sweep`` default to DEFAULT_BATCHES / DEFAULT_SWEEP_BATCHES (not the
    paper's 100, which took minutes per digits checkpoint), protocol ngdref, float64, and a
    progress bar when stderr is a terminal."""
    from validation.experiments.__main__ import build_parser
    from validation.experiments.evaluate import framework as ev

    parser = build_parser()
    args = parser.parse_args(["evaluate", "RUN"])
    assert (args.batches, args.protocol, args.dtype, args.progress) == (
        ev.DEFAULT_BATCHES, "ngdref", "float64", "auto"
    )
    assert ev.DEFAULT_BATCHES < 100
    args = parser.parse_args(["sweep", "RUN"])
    assert args.batches == ev.DEFAULT_SWEEP_BATCHES
