"""What the long commands say when stderr is a log file, and four messages that misled.

* ``train`` off a terminal: a line per checkpoint and epoch end, "finished", and on
  ``--resume`` "resumed from CHECKPOINT at step N";
* ``evaluate`` off a terminal: a start line, a line per checkpoint and a summary;
* the hub: without offline mode and without a network ``train t5-lora`` sat silent for over
  180 s; here the hub is a local socket that accepts and never answers, and the command must
  say what it asks for, then fail within its timeout with one line naming the way out;
* a checkpoint holding code is refused in words that do not explain how to load it unsafely;
* ``figures --evaluation metrics.jsonl`` is a JSON Lines file, not a damaged one.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from tests.experiments.cases import fixture_dirs, require_hf_stack, tiny_overrides  # noqa: F401
from tests.experiments.run_processes import cli

torch = require_hf_stack()

from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config.load import load_config  # noqa: E402
from validation.experiments.hub import HubUnreachableError, before_hub_access  # noqa: E402
from validation.experiments.train.runner import ResumeWarning, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

#: 16 rows, batch 8: 2 steps an epoch, 2 epochs, last.pt every 3 steps
RUN = ["--optimizer", "sgd", "--set", "model.hidden_sizes=[4]", "--set",
       "data.max_train_samples=16", "--set", "train.batch_size=8", "--epochs", "2",
       "--set", "train.checkpoint_every=3", "--device", "cpu"]


def test_train_and_its_resume_say_what_they_do_off_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "mlp", *RUN, "--out", str(out)]) == 0  # capsys: not a terminal
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(x.startswith("mlp/digits/sgd: step ") for x in lines), lines
    assert any("end of epoch 1: checkpoints epoch-1.pt, last.pt" in x for x in lines), lines
    assert any("step 3/4" in x and "checkpoint last.pt" in x for x in lines), lines
    assert "step 4/4" in lines[-1] and "finished" in lines[-1]
    assert main(["train", "mlp", *RUN, "--out", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from {str(out / 'checkpoints' / 'last.pt')!r} at step 4" in err


def test_evaluate_says_what_it_does_off_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "mlp", *RUN, "--out", str(out), "--progress", "off"]) == 0
    capsys.readouterr()
    argv = ["evaluate", str(out), "--batches", "1", "--batch-size", "8", "--micro-batch", "8",
            "--methods", "sgd,ef,ief"]
    assert main(argv) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (f"evaluate run: 3 checkpoint(s) to score, 1 batches each, into "
                      f"{str(out / 'evaluation.json')!r}")
    assert sum(line.startswith("evaluate epoch-") for line in err) == 3
    assert "3 checkpoint(s)" in err[-1] and "3 scored now, 0 from an earlier run" in err[-1]
    assert main(argv) == 0  # rerun: everything already there, and said so
    err = capsys.readouterr().err
    assert "already in" in err and "0 scored now, 3 from an earlier run" in err


@pytest.fixture
def silent_hub() -> str:
    """An endpoint that accepts connections and never answers (an unreachable hub)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_an_unreachable_hub_fails_fast_with_the_way_out(
    silent_hub: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    done = cli("train", "t5-lora", "--set", f"data.source={dirs['glue']}", "--max-steps", "1",
               "--out", str(out), HF_HUB_OFFLINE="", HF_ENDPOINT=silent_hub,
               NGDREF_HUB_TIMEOUT="2")  # a hang would end in subprocess.TimeoutExpired
    assert done.returncode == 2, done.stderr
    notice, error = done.stderr.strip().splitlines()
    assert notice.startswith("model.name='t5-base': asking the Hugging Face hub at "
                             f"{silent_hub} (up to 2 s")
    assert error.startswith(f"error: model.name='t5-base': the Hugging Face hub at {silent_hub} "
                            "did not answer within 2 s")
    assert "HF_HUB_OFFLINE=1" in error and "set model.name to a local path" in error
    assert not out.exists()


def test_offline_mode_asks_nothing_and_an_answer_is_remembered(
    silent_hub: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from validation.experiments import hub

    monkeypatch.setenv("HF_ENDPOINT", silent_hub)
    monkeypatch.setenv("NGDREF_HUB_TIMEOUT", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before_hub_access("model.name", "t5-base")  # offline: no notice, no request
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    before_hub_access("data.source", "hub (glue)", dataset=True)  # the data sets' switch
    with pytest.raises(HubUnreachableError, match="did not answer within 1 s"):
        before_hub_access("model.name", "t5-base")
    monkeypatch.setattr(hub, "_reached", {silent_hub})  # reached once in this process
    before_hub_access("model.name", "t5-base")
    monkeypatch.setenv("NGDREF_HUB_TIMEOUT", "soon")
    monkeypatch.setattr(hub, "_reached", set())
    with pytest.raises(ValueError, match="NGDREF_HUB_TIMEOUT must be a number"):
        before_hub_access("model.name", "t5-base")


class _Mkdir:  # unpickling it would call os.mkdir(marker)
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_holding_code_is_refused_without_advice_to_load_it(tmp_path: Path) -> None:
    config = load_config("mlp", ["optimizer=sgd", "model.hidden_sizes=[4]",
                                 "data.max_train_samples=16", "train.batch_size=8",
                                 "train.epochs=2", "train.checkpoint_every=3"])
    train(config, tmp_path / "run", progress=False, device="cpu", stop_after=3)
    marker = tmp_path / "code-was-run"
    torch.save({"format": 2, "payload": _Mkdir(marker)}, tmp_path / "run/checkpoints/last.pt")
    with pytest.warns(ResumeWarning) as caught:
        train(config, tmp_path / "run", resume=True, progress=False, device="cpu")
    message = str(caught[0].message)
    assert "was refused and not loaded" in message and "GLOBAL posix.mkdir" in message
    assert "weights_only" not in message and "trusted source" not in message
    assert not marker.exists()


def test_figures_names_a_json_lines_file_for_what_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"kind": "train", "step": k}) + "\n" for k in range(3)))
    assert main(["figures", "--evaluation", str(log), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err
    assert "holds one JSON record per line (JSON Lines" in err and "--runs RUN_DIR" in err
    assert "damaged" not in err
    assert main(["figures", "--evaluation", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "is a directory" in capsys.readouterr().err
