"""Refusals at the start of a run: checked before anything is created, and never blocking.

Every argument that can be checked is checked before the run directory exists: each bad value
below makes ``train`` exit with one line naming the key (no traceback) and leaves no
directory behind. A start refused later (a rank count the batches do not fit, a tokenizer
larger than the model's vocabulary: known only once the data and model are built) leaves
nothing either, and a directory holding only a ``config.json`` of a start that never wrote
its first checkpoint is started afresh (with a notice) instead of blocking the retry.
Divergence: a loss grown past ``train.divergence_factor`` times the first step's stops the run
as a non-finite one does, and is recorded with its step (also across a resume).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experiments.cases import fixture_dirs, require_hf_stack, tiny_overrides  # noqa: F401

torch = require_hf_stack()

from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config.load import ConfigError, load_config  # noqa: E402
from validation.experiments.models import builders as models  # noqa: E402
from validation.experiments.train.runner import read_metrics, train  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = ["--set", "model.hidden_sizes=[4]", "--set", "data.max_train_samples=16",
        "--set", "train.batch_size=8", "--max-steps", "2"]
#: (id, extra arguments, what the one error line must name)
BAD = [
    ("negative-seed", ["--seed", "-1"], "config key 'seed' must be an int in [0, 2**63)"),
    ("negative-split-seed", ["--set", "data.split_seed=-2"], "'data.split_seed'"),
    ("device-tpu", ["--device", "tpu"], "device (--device) 'tpu' is not a torch device"),
    ("unused-source", ["--set", "data.source=/nonexistent"],
     "'data.source' is '/nonexistent' but task 'digits' reads no source"),
    ("lr-overflows-float32", ["--set", "model.dtype=float32", "--set", "optim.lr=1e300"],
     "'optimizers.adam.lr' must be a finite number >= 0 that model.dtype float32 can hold"),
    ("lr-infinite", ["--set", "optim.lr=Infinity"], "'optimizers.adam.lr' must be a finite"),
    ("divergence-factor", ["--set", "train.divergence_factor=0.5"],
     "'train.divergence_factor' must be null or a number > 1"),
]
if not torch.cuda.is_available():
    BAD.append(("device-cuda", ["--device", "cuda"], "device (--device) 'cuda': this machine"))


@pytest.mark.parametrize(("extra", "named"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_argument_is_one_line_before_anything_exists(
    extra: list[str], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", "mlp", *TINY, *extra, "--out", str(out), "--progress", "off"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and named in line, line
    assert not out.exists()


def test_more_ranks_than_a_batch_holds_is_refused_before_anything_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backends.torch.distributed import launch as dist_launch

    monkeypatch.setattr(dist_launch, "world_and_rank", lambda: (2, 0))
    for overrides, named in (
        (["train.batch_size=1"], "'train.batch_size' is 1 but 2 ranks share each batch"),
        (["data.max_train_samples=17"], "ends with a batch of 1, fewer than the 2 ranks"),
    ):
        config = load_config("mlp", ["optimizer=ief", "model.hidden_sizes=[4]",
                                     "data.max_train_samples=16", "train.batch_size=8",
                                     *overrides])
        with pytest.raises(ConfigError, match=named):
            train(config, tmp_path / "run", progress=False, device="cpu")
        assert not (tmp_path / "run").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_anything_exists(
    dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels (token ids) past the model's vocabulary once reached IndexError in the first
    step, after the run's files were written."""
    real = models._tiny_t5
    monkeypatch.setattr(models, "_tiny_t5", lambda tiny, vocab: real(tiny, vocab // 2))
    config = load_config("t5-lora", [*tiny_overrides("t5-lora", dirs), "optimizer=ief",
                                     "train.max_steps=1"])
    with pytest.raises(ConfigError, match=r"tokenizer has \d+ tokens but model.name='tiny' has "
                       r"a vocabulary of \d+: token ids \(labels included\)"):
        train(config, tmp_path / "run", progress=False, device="cpu")
    assert not (tmp_path / "run").exists()


def test_a_start_that_never_wrote_its_first_checkpoint_does_not_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config("mlp", ["optimizer=sgd", "model.hidden_sizes=[4]",
                                 "train.max_steps=2"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"setup": "mlp", "seed": 7}))
    result = train(config, run, progress=False, device="cpu")
    assert result.finished and result.step == 2
    assert "never wrote its first checkpoint" in capsys.readouterr().err
    assert json.loads((run / "config.json").read_text()) == config


def test_growth_past_the_divergence_factor_stops_and_is_recorded(tmp_path: Path) -> None:
    """lr = 1e30 gave finite losses of 5e82 and "diverged": false."""
    overrides = ["optimizer=ief", "optim.lr=1e30", "model.hidden_sizes=[8]",
                 "train.max_steps=8", "train.checkpoint_every=1"]
    config = load_config("mlp", overrides)
    result = train(config, tmp_path / "run", progress=False, device="cpu")
    assert result.diverged and result.diverged_step == result.step < 8
    (record,) = read_metrics(tmp_path / "run", "diverged")
    assert record["step"] == result.step
    assert "train.divergence_factor=1000" in record["message"]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["diverged"] is True and results["diverged_step"] == result.step
    # the same across a kill after the first step: the yardstick travels in the checkpoint
    killed = train(config, tmp_path / "killed", progress=False, device="cpu", stop_after=1)
    assert not killed.diverged
    resumed = train(config, tmp_path / "killed", resume=True, progress=False, device="cpu")
    assert (resumed.diverged, resumed.diverged_step) == (True, result.step)
    assert read_metrics(tmp_path / "killed", "diverged")[0]["message"] == record["message"]
    # without a factor only a non-finite loss counts
    off = train(load_config("mlp", [*overrides, "train.divergence_factor=null"]),
                tmp_path / "off", progress=False, device="cpu")
    losses = [r["loss"] for r in read_metrics(tmp_path / "off", "train")]
    assert max(losses) > 1000 * losses[0] and off.step > result.step


def test_two_real_ranks_refuse_together_before_anything_exists(tmp_path: Path) -> None:
    """Two gloo ranks (the torchrun path): a batch of 1 is refused on both before any file,
    and a run directory locked by a third process is refused on both, rank 0 naming it."""
    from backends.torch.distributed.launch import launch_local
    from tests.experiments.run_processes import finish, hold

    (tmp_path / "locked").mkdir()
    holder = hold(tmp_path / "locked")
    try:
        launch_local(2, "tests.experiments.rank_start", tmp_path, timeout=300)
    finally:
        finish(holder)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in got:
        assert rank["batch"].startswith("ConfigError: config key 'train.batch_size' is 1 but "
                                        "2 ranks share each batch")
        assert rank["locked"].startswith("RunLockedError: ")
    assert f"pid {holder.pid}" in got[0]["locked"]
    assert not (tmp_path / "batch").exists()
    assert sorted(p.name for p in (tmp_path / "locked").iterdir()) == []
