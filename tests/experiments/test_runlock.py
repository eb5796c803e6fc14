"""One writer per run directory and per evaluation file (validation/experiments/runlock.py).

Every test starts real processes (tests/experiments/run_processes.py): a lock holder in its
own interpreter, and the command line. What is checked: a second writer is refused at once
with the directory and the holder (pid, host, start time) named and writes nothing; the lock
goes away when its holder exits normally, raises or is killed (a killed holder's lock file is
taken over at once and reported); two ``train`` commands into one ``--out`` leave exactly one
run, equal to the same run made alone.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.experiments.cases import require_hf_stack, without_time
from tests.experiments.run_processes import cli, finish, hold, start_cli

torch = require_hf_stack()

from validation.experiments.config.load import load_config  # noqa: E402
from validation.experiments.runlock import RunLock, RunLockedError, lock_path  # noqa: E402
from validation.experiments.train.runner import read_metrics, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: a digits MLP run of 4 steps (16 rows, batch 8, 2 epochs)
RUN = ["--optimizer", "sgd", "--set", "model.hidden_sizes=[4]", "--set",
       "data.max_train_samples=16", "--set", "train.batch_size=8", "--epochs", "2",
       "--device", "cpu"]
RUN_CONFIG = ["optimizer=sgd", "model.hidden_sizes=[4]", "data.max_train_samples=16",
              "train.batch_size=8", "train.epochs=2"]


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    holder = hold(tmp_path)
    try:
        with pytest.raises(RunLockedError) as refused:
            RunLock(tmp_path, "second").acquire()
        message = str(refused.value)
        assert str(tmp_path) in message and f"pid {holder.pid}" in message
        assert socket.gethostname() in message and "started 20" in message
        assert "holder" in message  # its command
    finally:
        assert finish(holder) == 0
    with RunLock(tmp_path, "after") as lock:  # released on a normal exit: no stale record
        assert lock.held and lock.stale is None
    assert not lock_path(tmp_path).exists()


def test_a_killed_holder_never_blocks_and_is_reported(tmp_path: Path) -> None:
    holder = hold(tmp_path, then="kill")
    assert finish(holder) == -9  # SIGKILL: no release, the lock file stays behind
    assert lock_path(tmp_path).exists()
    with RunLock(tmp_path, "after") as lock:
        assert lock.stale is not None and lock.stale["pid"] == holder.pid
        assert f"pid {holder.pid}" in str(lock.describe_stale())
        assert "without releasing" in str(lock.describe_stale())


def test_a_holder_that_raises_releases(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), RunLock(tmp_path / "evaluation.json", "raiser"):
        1 / 0  # noqa: B018
    assert not lock_path(tmp_path / "evaluation.json").exists()
    RunLock(tmp_path / "evaluation.json").acquire().release()


def test_train_is_refused_while_another_process_writes_the_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = hold(out)
    try:
        done = cli("train", "mlp", *RUN, "--out", str(out))
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()  # one line, no traceback
        assert "being written by another process" in line and f"pid {holder.pid}" in line
        assert str(out) in line
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's only
    finally:
        finish(holder)
    done = cli("train", "mlp", *RUN, "--out", str(out))
    assert done.returncode == 0, done.stderr


def test_two_train_commands_into_one_out_leave_one_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = [start_cli("train", "mlp", *RUN, "--out", str(out)) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert ("being written by another process" in refused
            or "already holds a run" in refused), refused
    alone = train(load_config("mlp", RUN_CONFIG), tmp_path / "alone", progress=False,
                  device="cpu")
    assert alone.finished
    assert without_time(read_metrics(out)) == without_time(read_metrics(tmp_path / "alone"))


def test_evaluate_is_refused_while_another_process_writes_its_file(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(load_config("mlp", RUN_CONFIG), run, progress=False, device="cpu")
    holder = hold(run / "evaluation.json")
    try:
        done = cli("evaluate", str(run), "--batches", "1", "--batch-size", "8",
                   "--micro-batch", "8", "--methods", "sgd,ef", "--checkpoints", "last")
        assert done.returncode == 2, done.stderr
        assert "evaluation.json" in done.stderr and f"pid {holder.pid}" in done.stderr
        assert not (run / "evaluation.json").exists()
    finally:
        finish(holder)
    done = cli("evaluate", str(run), "--batches", "1", "--batch-size", "8",
               "--micro-batch", "8", "--methods", "sgd,ef", "--checkpoints", "last")
    assert done.returncode == 0, done.stderr
    assert (run / "evaluation.json").is_file()


def test_the_lock_of_a_directory_is_inside_it_whatever_its_name(tmp_path: Path) -> None:
    dotted = tmp_path / "lr1e-3.seed0"  # a run directory whose name has a suffix
    dotted.mkdir()
    assert lock_path(dotted) == dotted / ".lock"
    assert lock_path(dotted / "evaluation.json") == dotted / ".evaluation.json.lock"
    with RunLock(dotted, "train"):
        assert (dotted / ".lock").is_file()
