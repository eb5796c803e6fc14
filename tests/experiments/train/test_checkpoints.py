"""Checkpoints and resume of the experiments' runner: listing, loading, damaged files.

A killed and resumed run must equal an uninterrupted one bitwise (parameters, log, results); a
damaged, foreign or mismatching checkpoint or log is refused with a message naming the file, and
a refused resume changes nothing on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.experiments.cases import (
    certified_steps,
    fixture_dirs,  # noqa: F401  (a fixture: pytest finds it here)
    require_hf_stack,
    tiny_overrides,
    train_records,
    without_time,
)

torch = require_hf_stack()

from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config.load import (  # noqa: E402
    ConfigError,
    apply_overrides,
    load_config,
)
from validation.experiments.train.runner import (  # noqa: E402
    CheckpointError,
    ResumeWarning,
    build_setup,
    list_checkpoints,
    load_checkpoint,
    load_run_config,
    read_metrics,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- resume ---------------------------------------------------------------------------------
RESUME_CASES = {
    # SF's label draws, the step schedule of Adam, AdamW/Adafactor state, CIFAR augmentation
    "mlp-sf": ("mlp", ["optimizer=sf", "data.max_train_samples=24"]),
    "mlp-adam-step": ("mlp", ["optimizer=adam", "optim.milestones=[1]", "optim.lr=0.01",
                              "data.max_train_samples=24"]),
    "t5-prompt-adafactor": ("t5-prompt", ["optimizer=adafactor", "data.max_train_samples=16"]),
    "vit-lora-ief": ("vit-lora", ["optimizer=ief", "data.max_train_samples=16",
                                  "data.augment=true"]),
}


@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_killed_and_resumed_run_equals_uninterrupted_run(
    name: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    setup, extra = RESUME_CASES[name]
    # 2-3 batches per epoch, 3 epochs; checkpoints every 2 steps, validation every 3
    config = load_config(
        setup,
        [*tiny_overrides(setup, dirs), *extra, "train.epochs=3", "train.eval_every=3",
         "train.checkpoint_every=2"],
    )
    whole = train(config, tmp_path / "whole", progress=False, device="cpu")
    total = whole.step
    assert total >= 6
    killed = train(config, tmp_path / "resumed", progress=False, device="cpu", stop_after=5)
    assert not killed.finished and killed.step == 5
    # the kill leaves log lines of step 5 that the checkpoint (step 4) does not cover
    assert max(r["step"] for r in train_records(tmp_path / "resumed")) == 5
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False, device="cpu")
    assert resumed.finished and resumed.step == total
    for key, value in whole.params.items():
        assert torch.equal(resumed.params[key], value), key
    assert without_time(read_metrics(tmp_path / "resumed")) == without_time(
        read_metrics(tmp_path / "whole")
    )
    # certify="first": the first step of each process (the resumed one restarts at step 5)
    if extra[0] in ("optimizer=sf", "optimizer=ief"):
        assert certified_steps(read_metrics(tmp_path / "whole")) == [1]
        assert certified_steps(read_metrics(tmp_path / "resumed")) == [1, 5]
    a = json.loads((tmp_path / "whole" / "results.json").read_text())
    b = json.loads((tmp_path / "resumed" / "results.json").read_text())
    assert a == b
    for info in list_checkpoints(tmp_path / "whole", kind="epoch"):
        other = load_checkpoint(tmp_path / "resumed", info.name)
        mine = load_checkpoint(tmp_path / "whole", info.name)
        assert (other.step, other.epoch) == (mine.step, mine.epoch)
        assert all(torch.equal(other.params[k], v) for k, v in mine.params.items())


def test_checkpoints_listing_and_loading(tmp_path: Path) -> None:
    config = load_config(
        "mlp", ["optimizer=ief", "optim.lr=1.0", "model.hidden_sizes=[8]",
                "data.max_train_samples=16", "train.batch_size=8", "train.epochs=2"],
    )
    setup = build_setup(config, "cpu")
    initial = setup.params()
    result = train(config, tmp_path, setup=setup, progress=False)
    infos = list_checkpoints(tmp_path)
    assert [i.name for i in infos] == ["epoch-0", "epoch-1", "epoch-2", "best", "last"]
    assert [(i.step, i.epoch) for i in infos[:3]] == [(0, 0), (2, 1), (4, 2)]
    params, step, epoch = load_checkpoint(tmp_path, 0)
    assert (step, epoch) == (0, 0)
    assert all(torch.equal(params[k], v) for k, v in initial.items())
    last = load_checkpoint(tmp_path, "last")
    assert all(torch.equal(last.params[k], v) for k, v in result.params.items())
    assert load_checkpoint(tmp_path, "epoch-2").step == 4
    # a fresh setup from the run's own config takes the checkpoint
    fresh = build_setup(load_run_config(tmp_path), "cpu")
    fresh.load_params(load_checkpoint(tmp_path, "best").params)
    best = load_checkpoint(tmp_path, "best")
    assert best.step == result.best["step"]
    with pytest.raises(FileNotFoundError, match="which: no checkpoint 'epoch-7'"):
        load_checkpoint(tmp_path, 7)


def test_resume_refuses_a_changed_config_and_a_fresh_start_an_old_directory(
    tmp_path: Path,
) -> None:
    overrides = ["optimizer=sgd", "model.hidden_sizes=[4]", "train.max_steps=2"]
    config = load_config("mlp", overrides)
    train(config, tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(config, tmp_path, progress=False)
    changed = load_config("mlp", [*overrides, "optimizers.sgd.lr=0.5"])
    with pytest.raises(ConfigError, match=r"optimizers\.sgd\.lr"):
        train(changed, tmp_path, resume=True, progress=False)


# ---- resume: bad input ---------------------------------------------------------------------
# 16 rows, batch 8: 2 steps per epoch, 3 epochs; last.pt after every step, epoch-k.pt at step 2k
RESUME_FAULT = ["optimizer=adam", "optim.lr=0.01", "optim.milestones=[1]", "model.hidden_sizes=[4]",
                "data.max_train_samples=16", "train.batch_size=8", "train.epochs=3",
                "train.checkpoint_every=1"]


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file under ``run_dir`` and its bytes (to assert that nothing was changed)."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def fault_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted run and one killed after step 5 (last.pt: step 5; epoch-2.pt: step 4)."""
    root = tmp_path_factory.mktemp("fault")
    config = load_config("mlp", RESUME_FAULT)
    whole = train(config, root / "whole", progress=False, device="cpu")
    killed = train(config, root / "killed", progress=False, device="cpu", stop_after=5)
    assert (whole.step, killed.step) == (6, 5)
    return {"config": config, "whole": whole, "killed": snapshot(root / "killed")}


def killed_copy(fault_runs: dict[str, Any], where: Path) -> Path:
    for name, data in fault_runs["killed"].items():
        (where / name).parent.mkdir(parents=True, exist_ok=True)
        (where / name).write_bytes(data)
    return where


class _Mkdir:  # unpickling it would call os.mkdir(marker): what weights_only must refuse
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _damage(kind: str, path: Path, marker: Path) -> None:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "foreign":  # someone else's torch file: a state_dict without our keys
        torch.save({"weight": torch.zeros(3)}, path)
    elif kind == "code":
        torch.save({"format": 2, "payload": _Mkdir(marker)}, path)
    elif kind == "missing":
        path.unlink()


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "foreign", "code", "missing"])
def test_resume_falls_back_from_a_damaged_last_checkpoint(
    kind: str, fault_runs: dict[str, Any], tmp_path: Path
) -> None:
    """last.pt (step 5) damaged: the run continues from epoch-2.pt (step 4), says so, keeps the
    damaged bytes as last.pt.damaged, and ends bitwise equal to the uninterrupted run."""
    run = killed_copy(fault_runs, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    marker = tmp_path / "code-was-run"
    _damage(kind, last, marker)
    damaged = last.read_bytes() if last.exists() else None
    with pytest.warns(ResumeWarning, match=r"last\.pt.*resumed from 'epoch-2\.pt' \(step 4\)"):
        resumed = train(fault_runs["config"], run, resume=True, progress=False, device="cpu")
    assert not marker.exists()  # the pickled call was refused, not executed
    whole = fault_runs["whole"]
    assert resumed.finished and resumed.step == whole.step
    for key, value in whole.params.items():
        assert torch.equal(resumed.params[key], value), key
    assert without_time(read_metrics(run)) == without_time(read_metrics(whole.run_dir))
    if damaged is not None:
        assert (run / "checkpoints" / "last.pt.damaged").read_bytes() == damaged


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign", "code"])
def test_reading_a_damaged_or_foreign_checkpoint_names_the_file(
    kind: str, fault_runs: dict[str, Any], tmp_path: Path
) -> None:
    run = killed_copy(fault_runs, tmp_path / "run")
    path = run / "checkpoints" / "epoch-1.pt"
    marker = tmp_path / "code-was-run"
    _damage(kind, path, marker)
    with pytest.raises(CheckpointError, match=r"checkpoint '.*epoch-1\.pt'"):
        load_checkpoint(run, "epoch-1")
    assert not marker.exists()
    with pytest.warns(UserWarning, match=r"epoch-1\.pt"):
        infos = {i.name: i.kind for i in list_checkpoints(run)}
    assert infos["epoch-1"] == "unreadable" and infos["epoch-2"] == "epoch"


def test_resume_with_no_intact_checkpoint_fails_and_changes_nothing(
    fault_runs: dict[str, Any], tmp_path: Path
) -> None:
    run = killed_copy(fault_runs, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.pt"):
        if path.name != "best.pt":  # best.pt has no resume state: it cannot stand in either
            _damage("truncated", path, tmp_path / "unused")
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint.*last\.pt.*epoch-2\.pt"):
        train(fault_runs["config"], run, resume=True, progress=False, device="cpu")
    assert snapshot(run) == before


def test_resume_never_starts_from_zero(fault_runs: dict[str, Any], tmp_path: Path) -> None:
    config = fault_runs["config"]
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"run_dir '.*nowhere' does not exist.*or-start"):
        train(config, missing, resume=True, progress=False)
    assert not missing.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"run_dir '.*empty' holds no run"):
        train(config, tmp_path / "empty", resume=True, progress=False)
    # a run whose checkpoints are all gone: an error, metrics.jsonl and config.json kept
    run = killed_copy(fault_runs, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.pt"):
        path.unlink()
    before = snapshot(run)
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint"):
        train(config, run, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint"):
        train(config, run, resume_or_start=True, progress=False)
    assert snapshot(run) == before
    # resume_or_start on a missing directory starts the run
    started = train(config, missing, resume_or_start=True, progress=False, device="cpu")
    assert started.finished and started.step == fault_runs["whole"].step


def test_resume_refuses_a_checkpoint_of_another_configuration_or_model(
    fault_runs: dict[str, Any], tmp_path: Path
) -> None:
    run = killed_copy(fault_runs, tmp_path / "run")
    last = run / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    # another run's checkpoint (other learning rate) copied over this run's
    other = {**state, "config": apply_overrides(state["config"], ["optimizers.adam.lr=0.5"])}
    torch.save(other, last)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"'.*last\.pt' was written with a configuration "
                       r"that differs in \['optimizers\.adam\.lr'\]"):
        train(fault_runs["config"], run, resume=True, progress=False)
    assert snapshot(run) == before
    # same configuration, parameters of another shape
    params = {k: torch.zeros(*v.shape, 2) for k, v in state["params"].items()}
    torch.save({**state, "params": params}, last)
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=r"'.*last\.pt' does not fit the model.*shape"):
        train(fault_runs["config"], run, resume=True, progress=False)
    assert snapshot(run) == before


@pytest.mark.parametrize("fault", ["short", "garbled"])
def test_resume_refuses_a_log_that_does_not_match_and_changes_nothing(
    fault: str, fault_runs: dict[str, Any], tmp_path: Path
) -> None:
    run = killed_copy(fault_runs, tmp_path / "run")
    log = run / "metrics.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    if fault == "short":
        log.write_text("".join(lines[:2]))
        match = r"metrics\.jsonl' has 2 complete lines but 'last\.pt' was written after"
    else:
        lines[1] = lines[1][:10] + "\n"
        log.write_text("".join(lines))
        match = r"metrics\.jsonl', line 2 is not valid JSON"
    before = snapshot(run)
    with pytest.raises(CheckpointError, match=match):
        train(fault_runs["config"], run, resume=True, progress=False)
    assert snapshot(run) == before
    if fault == "garbled":
        with pytest.raises(CheckpointError, match=r"metrics\.jsonl', line 2 is not valid JSON"):
            read_metrics(run)


def test_cli_resume_errors_name_the_directory(
    fault_runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def argv(out: Path, flag: str) -> list[str]:
        sets = [a for o in RESUME_FAULT for a in ("--set", o)]
        return ["train", "mlp", *sets, "--out", str(out), "--progress", "off", "--device",
                "cpu", flag]

    missing = tmp_path / "nowhere"
    assert main(argv(missing, "--resume")) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--resume-or-start" in err
    run = killed_copy(fault_runs, tmp_path / "run")
    for path in (run / "checkpoints").glob("*.pt"):
        _damage("garbage", path, tmp_path / "unused")
    assert main(argv(run, "--resume")) == 2
    assert "last.pt" in capsys.readouterr().err
    assert main(argv(missing, "--resume-or-start")) == 0


# ---- the command line: train, resume, list -------------------------------------------------------
def test_cli_train_and_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["train", "mlp", "--optimizer", "sgd", "--max-steps", "3", "--out", str(out),
            "--set", "model.hidden_sizes=[4]", "--progress", "off", "--device", "cpu"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["test"]["accuracy"] >= 0
    assert main(argv) == 2  # the directory holds a run
    assert "--resume" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    capsys.readouterr()
    assert main(["checkpoints", str(out)]) == 0
    assert "epoch-0" in capsys.readouterr().out
