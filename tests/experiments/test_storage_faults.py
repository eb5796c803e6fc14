"""Storage faults while a run or an evaluation writes its files (validation/experiments/io.py).

The fault is injected at each write of a tiny digits run: ``open`` of ``io.py`` returns a file
whose ``write`` puts half the bytes down and then fails with ENOSPC, EDQUOT or EROFS (or
``os.replace`` fails), for one chosen file and occurrence. Expected, from the files
themselves: one ``StorageError`` line naming the file, the cause and ``--out``; no temporary
file left; every file written before the fault byte for byte as it was (a snapshot taken at the
moment of the fault); and, after "freeing space", a plain retry (a fault before the first
checkpoint left nothing behind) or ``--resume`` that ends bitwise equal to an uninterrupted run.
"""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from tests.experiments.cases import require_hf_stack, without_time

torch = require_hf_stack()

from validation.experiments import io  # noqa: E402
from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config.load import load_config  # noqa: E402
from validation.experiments.evaluate.framework import evaluate_run  # noqa: E402
from validation.experiments.io import StorageError  # noqa: E402
from validation.experiments.train.runner import read_metrics, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: 16 rows, batch 8: 2 steps an epoch, 3 epochs; last.pt after every step, best.pt at epoch 1
OVERRIDES = ["optimizer=adam", "optim.lr=0.01", "model.hidden_sizes=[4]",
             "data.max_train_samples=16", "train.batch_size=8", "train.epochs=3",
             "train.checkpoint_every=1"]


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes, but the lock (held while the run writes) and
    the temporary file being written (checked to be gone separately)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.name.endswith(".lock") and ".tmp-" not in p.name}


class _Fault:
    """Fail the ``nth`` write (1-based) of the file named ``name`` with ``code`` at ``layer``
    ("write": half the bytes, then the error; "replace": the rename), after a snapshot."""

    def __init__(self, root: Path, name: str, nth: int, code: int, layer: str) -> None:
        self.root, self.name, self.nth, self.code, self.layer = root, name, nth, code, layer
        self.seen, self.before = 0, None

    def _hit(self, target: str) -> bool:
        base = Path(target).name
        if base != self.name and not base.startswith(f".{self.name}.tmp-"):
            return False
        self.seen += 1
        if self.seen != self.nth:
            return False
        self.before = _snapshot(self.root)
        return True

    def error(self, target: str) -> OSError:
        return OSError(self.code, os.strerror(self.code), target)

    def open(self, file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = builtins.open(file, mode, *args, **kwargs)
        if self.layer != "write" or "r" in mode or not self._hit(str(file)):
            return fh
        fault, real_write = self, fh.write

        def write(data: Any) -> int:
            real_write(data[: len(data) // 2])
            fh.flush()
            raise fault.error(str(file))

        fh.write = write
        return fh

    def replace(self, src: Any, dst: Any) -> None:
        if self.layer == "replace" and self._hit(str(dst)):
            raise self.error(str(dst))
        _REAL_REPLACE(src, dst)


_REAL_REPLACE = io.os.replace
# (file, which write of it, errno, layer): every file the runner writes, at the start and later
CASES = [
    ("config.json", 1, errno.ENOSPC, "write"),
    ("metrics.jsonl", 1, errno.EROFS, "replace"),  # the empty log of a fresh start
    ("epoch-0.pt", 1, errno.EDQUOT, "write"),
    ("metrics.jsonl", 4, errno.ENOSPC, "write"),  # an append in epoch 1
    ("last.pt", 2, errno.EDQUOT, "write"),
    ("best.pt", 1, errno.ENOSPC, "replace"),
    ("epoch-2.pt", 1, errno.EROFS, "write"),
    ("results.json", 1, errno.ENOSPC, "write"),
]
IDS = [f"{name}#{nth}-{errno.errorcode[code]}-{layer}" for name, nth, code, layer in CASES]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Any:
    run = tmp_path_factory.mktemp("whole") / "run"
    return train(load_config("mlp", OVERRIDES), run, progress=False, device="cpu")


@pytest.mark.parametrize(("name", "nth", "code", "layer"), CASES, ids=IDS)
def test_a_storage_fault_is_one_line_and_loses_nothing(
    name: str, nth: int, code: int, layer: str, whole: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    fault = _Fault(run, name, nth, code, layer)
    config = load_config("mlp", OVERRIDES)
    with monkeypatch.context() as patch:
        patch.setattr(io, "open", fault.open, raising=False)
        patch.setattr(io.os, "replace", fault.replace)
        with pytest.raises(StorageError) as raised:
            train(config, run, progress=False, device="cpu")
    message = str(raised.value)
    assert "\n" not in message and name in message and "--out" in message
    assert errno.errorcode[code] in message
    assert not [p for p in run.rglob("*") if ".tmp-" in p.name] if run.exists() else True
    first_checkpoint = name in ("config.json", "epoch-0.pt") or (
        name == "metrics.jsonl" and nth == 1
    )
    if first_checkpoint:  # a fresh start that failed leaves nothing: a plain retry works
        assert not run.exists()
        again = train(config, run, progress=False, device="cpu")
    else:
        assert _snapshot(run) == fault.before  # nothing saved before was touched
        again = train(config, run, resume=True, progress=False, device="cpu")
    assert again.finished and again.step == whole.step
    for key, value in whole.params.items():
        assert torch.equal(again.params[key], value), key
    assert without_time(read_metrics(run)) == without_time(read_metrics(whole.run_dir))


def test_an_evaluation_file_fault_keeps_the_previous_file(
    whole: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(whole.run_dir, run)
    settings = {"batches": 1, "batch_size": 8, "micro_batch": 8, "progress": False,
                "methods": ("sgd", "ef")}
    evaluate_run(run, checkpoints="first", **settings)
    before = (run / "evaluation.json").read_bytes()
    fault = _Fault(run, "evaluation.json", 1, errno.ENOSPC, "write")
    with monkeypatch.context() as patch:
        patch.setattr(io, "open", fault.open, raising=False)
        with pytest.raises(StorageError, match=r"evaluation\.json.*ENOSPC.*make room"):
            evaluate_run(run, checkpoints="first,last", **settings)
    assert (run / "evaluation.json").read_bytes() == before
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]


def test_the_command_line_prints_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fault = _Fault(tmp_path / "run", "last.pt", 1, errno.ENOSPC, "write")
    monkeypatch.setattr(io, "open", fault.open, raising=False)
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    code = main(["train", "mlp", *sets, "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--progress", "off"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot write") and "last.pt" in line and "--out" in line


def test_a_read_only_run_directory_is_one_line_for_evaluate(
    whole: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The first write of evaluate is its lock file: EROFS there is the same one line."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(whole.run_dir, run)
    real_open = os.open

    def read_only(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only)
    code = main(["evaluate", str(run), "--batches", "1", "--batch-size", "8",
                 "--micro-batch", "8", "--methods", "sgd,ef", "--progress", "off"])
    monkeypatch.undo()
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot write") and "EROFS" in line and str(run) in line
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in whole.run_dir.iterdir())
