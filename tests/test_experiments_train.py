"""The training runner of the experiments (validation/experiments/train.py, config.py, models.py).

Offline, tiny random models (T5 with the tiny tokenizer, ViT, MLP) on small data files written
here in the loaders' real formats (GLUE's SST-2 TSV files, the CIFAR-100 python pickles) and on
scikit-learn's digits. Expected values come from other routes: the logged accuracy and loss of a
model with a known constant prediction are computed here from scikit-learn's arrays, the per-sample
optimisers' logged loss is compared with Hugging Face's own token-mean loss, the trainable counts
of the paper's models with the paper's numbers, and a resumed run with an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ngdref

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config import (  # noqa: E402
    ConfigError,
    apply_overrides,
    default_config,
    load_config,
    parse_override,
)
from validation.experiments.train import (  # noqa: E402
    CheckpointError,
    ResumeWarning,
    build_setup,
    epoch_permutation,
    list_checkpoints,
    load_checkpoint,
    load_run_config,
    read_metrics,
    train,
)

# transformers / peft deprecation notices about their own internals
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"
)



pytestmark = pytest.mark.usefixtures("torch_one_thread")


POSITIVE = ["a great film", "wonderful acting", "i loved it", "superb story", "fine fun"]
NEGATIVE = ["a dull film", "awful acting", "i hated it", "boring story", "bad mess"]


# ---- data files in the loaders' formats -------------------------------------------------------
def _sst2_rows(n: int, rng: np.random.Generator) -> str:
    lines = ["sentence\tlabel"]
    for k in range(n):
        label = k % 2
        lines.append(f"{(POSITIVE if label else NEGATIVE)[rng.integers(5)]}\t{label}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """glue_data/SST-2/{train,dev}.tsv in GLUE's layout: a header, sentence TAB label."""
    root = tmp_path_factory.mktemp("glue_data")
    (root / "SST-2").mkdir()
    rng = np.random.default_rng(0)
    (root / "SST-2" / "train.tsv").write_text(_sst2_rows(40, rng))
    (root / "SST-2" / "dev.tsv").write_text(_sst2_rows(12, rng))
    return root


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar-100-python/{train,test,meta}: pickled dicts with byte keys, (N, 3072) uint8 rows."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 40), ("test", 12)):
        fine = rng.integers(0, 100, n)
        table = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(table, fh, protocol=2)
    meta = {
        b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
        b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)],
    }
    with (folder / "meta").open("wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return root


def tiny_overrides(setup: str, dirs: dict[str, Path]) -> list[str]:
    """A few full-batch steps of a tiny model (the same rows every step: the loss must fall)."""
    common = ["train.batch_size=8", "train.eval_batch_size=16", "data.max_eval_samples=8"]
    if setup.startswith("t5"):
        return [*common, "model.name=tiny", "model.max_length=24",
                f"data.source={dirs['glue']}", "data.max_train_samples=8"]
    if setup == "vit-lora":
        return [*common, "model.name=tiny", f"data.source={dirs['cifar']}",
                "data.max_train_samples=8", "data.augment=false"]
    return [*common, "model.hidden_sizes=[16]", "data.max_train_samples=8"]


@pytest.fixture(scope="module")
def dirs(glue_dir: Path, cifar_dir: Path) -> dict[str, Path]:
    return {"glue": glue_dir, "cifar": cifar_dir}


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir, "train")


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


# ---- every setup x optimiser ------------------------------------------------------------------
RUNS = [
    ("t5-lora", ["adamw", "sgd", "ief", "ef", "sf"]),
    ("t5-prompt", ["adafactor", "sgd", "ief", "ef", "sf"]),
    ("vit-lora", ["adamw", "sgd", "ief", "ef", "sf"]),
    ("mlp", ["adam", "sgd", "ief", "ef", "sf", "ngd"]),
]
# Paper settings that overshoot on a tiny random model and a single batch of 8 (not a claim
# about the paper's models): smaller steps so that "the loss falls" checks the mechanics.
STEP_OVERRIDES = {
    ("t5-prompt", "sgd"): ["optim.lr=10.0"],
    ("mlp", "ief"): ["optim.lr=1.0"],
    ("mlp", "ngd"): ["optim.damping=0.1"],
}


@pytest.mark.parametrize(
    ("setup", "optimizer"), [(s, o) for s, opts in RUNS for o in opts]
)
def test_every_setup_and_optimizer_trains(
    setup: str, optimizer: str, dirs: dict[str, Path], tmp_path: Path
) -> None:
    steps = 4
    config = load_config(
        setup,
        [*tiny_overrides(setup, dirs), f"optimizer={optimizer}", f"train.max_steps={steps}",
         "train.epochs=10", "train.eval_every=100",
         *STEP_OVERRIDES.get((setup, optimizer), [])],
    )
    result = train(config, tmp_path / "run", progress=False, device="cpu")
    assert result.finished and not result.diverged and result.step == steps
    records = train_records(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses)
    assert min(losses[1:]) < losses[0], losses
    assert all(r["lr"] > 0 for r in records)
    if optimizer in ("ief", "ef", "sf", "ngd"):
        assert all(r["grad_norm_imbalance"] >= 1.0 for r in records)
    if optimizer in ("ief", "ef"):
        assert all(r["kept"] <= 8 for r in records)
    if optimizer in ("ef", "sf"):  # normalised steps decaying linearly from lr to 0
        lr = config["optimizers"][optimizer]["lr"]
        assert [r["lr"] for r in records] == pytest.approx(
            [lr * (steps - t) / steps for t in range(steps)]
        )
    validation = read_metrics(tmp_path / "run", "validation")
    assert len(validation) == 1 and validation[0]["step"] == steps  # the final validation
    assert 0.0 <= validation[0]["accuracy"] <= 1.0
    assert read_metrics(tmp_path / "run", "test")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["best_validation"]["step"] == steps


# ---- logged metrics against hand-computed values ------------------------------------------------
def test_logged_metrics_of_a_constant_predictor_match_hand_computation(tmp_path: Path) -> None:
    """An MLP whose output is the constant bias b (zero weights) predicts argmax b for every
    image: validation accuracy = share of that class, loss = mean of logsumexp(b) - b_y, all
    from scikit-learn's digits directly; the first batch is the seeded permutation's first 16."""
    from sklearn.datasets import load_digits

    config = load_config(
        "mlp",
        ["optimizer=sgd", "optim.lr=0.0", "train.max_steps=1", "train.batch_size=16",
         "model.hidden_sizes=[4]", "model.dtype=float64", "seed=3"],
    )
    setup = build_setup(config, "cpu")
    bias = torch.tensor([0.0, 0.5, 0.0, 2.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        for p in setup.model.parameters():
            p.zero_()
        setup.model.net[-1].bias.copy_(bias)
    train(config, tmp_path / "run", setup=setup, progress=False)

    # splits: test = first 360 of default_rng(0).permutation(1797), validation = next 360
    target = load_digits().target
    order = np.random.default_rng(0).permutation(len(target))
    val_y, train_y = target[order[360:720]], target[order[720:]]
    log_z = math.log(float(np.exp(bias.numpy()).sum()))

    def mean_loss(labels: np.ndarray) -> float:
        return float(np.mean(log_z - bias.numpy()[labels]))

    first_batch = train_y[np.random.default_rng([3, 0]).permutation(len(train_y))[:16]]
    (record,) = train_records(tmp_path / "run")
    assert record["loss"] == pytest.approx(mean_loss(first_batch), rel=1e-12)
    assert record["epoch"] == pytest.approx(16 / len(train_y))
    (val,) = read_metrics(tmp_path / "run", "validation")
    assert val["accuracy"] == pytest.approx(float(np.mean(val_y == 3)), rel=1e-12)
    assert val["loss"] == pytest.approx(mean_loss(val_y), rel=1e-12)
    assert val["score"] == val["accuracy"] and val["best"] is True
    (test,) = read_metrics(tmp_path / "run", "test")
    test_y = target[order[:360]]
    assert test["accuracy"] == pytest.approx(float(np.mean(test_y == 3)), rel=1e-12)


@pytest.mark.parametrize("setup_name", ["t5-lora", "t5-prompt"])
def test_per_sample_loss_is_hugging_face_token_mean(
    setup_name: str, dirs: dict[str, Path]
) -> None:
    """reduction 'hf' makes IEF's logged loss HF's T5 loss (token mean over label + EOS); for
    prompt tuning the expected loss is peft's own CAUSAL_LM route (labels only, peft builds
    the 20 x -100 prefix), the per-sample route gets the runner's explicit decoder inputs."""
    config = load_config(
        setup_name, [*tiny_overrides(setup_name, dirs), "optimizer=ief", "train.max_steps=1"]
    )
    setup = build_setup(config, "cpu")
    rows = epoch_permutation(0, 0, len(setup.train))[:8]
    batch = setup.train.make(rows)
    with torch.no_grad():
        hf_inputs = {k: v for k, v in batch.inputs.items() if k != "decoder_input_ids"}
        expected = float(setup.model(**hf_inputs).loss)
    tokens = int((batch.targets != -100).sum())
    assert tokens == 2 * batch.size  # one-token label words + EOS
    assert setup.reduction(batch) == pytest.approx(1.0 / tokens)
    from validation.experiments.train import build_optimizer

    optimizer = build_optimizer(setup, total_steps=1)
    optimizer.param_groups[0]["reduction"] = setup.reduction(batch)
    assert optimizer.step(lambda: batch.inputs) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "ief"])
def test_steps_run_in_eval_mode(optimizer: str, dirs: dict[str, Path], tmp_path: Path) -> None:
    """With T5's dropout 0.1 and LoRA's 0.1 active the first logged loss would be random; the
    runner takes every step in eval mode, so it is the eval-mode loss of the first batch."""
    config = load_config(
        "t5-lora", [*tiny_overrides("t5-lora", dirs), f"optimizer={optimizer}",
                    "train.max_steps=1"]
    )
    setup = build_setup(config, "cpu")
    batch = setup.train.make(epoch_permutation(0, 0, len(setup.train))[:8])
    with torch.no_grad():
        expected = float(setup.model(**batch.inputs).loss)
    setup.model.train()
    train(config, tmp_path, setup=setup, progress=False)
    (record,) = train_records(tmp_path)
    assert record["loss"] == pytest.approx(expected, rel=1e-5)


def test_glue_validation_metrics_from_the_teacher_forced_argmax(dirs: dict[str, Path]) -> None:
    """SST-2 validation accuracy and loss of chosen logits, computed here by hand. A forward
    hook replaces the model's logits by ones whose argmax is, row by row: (true word, EOS)
    right; (other word, EOS) wrong; (true word, other token) wrong, the released evaluator
    decodes the whole sequence; (true word, EOS) right. Loss: token mean of -log softmax."""
    config = load_config("t5-lora", tiny_overrides("t5-lora", dirs))
    setup = build_setup(config, "cpu")
    batch = setup.validation.make(np.arange(len(setup.validation)))
    labels = batch.class_labels.tolist()
    assert len(labels) == 4 and batch.targets.shape == (4, 2)
    word_ids = [setup.tokenizer(w, add_special_tokens=False)["input_ids"]
                for w in ("negative", "positive")]
    assert all(len(ids) == 1 for ids in word_ids)
    eos, other = setup.tokenizer.eos_token_id, 5
    first = [word_ids[labels[0]][0], word_ids[1 - labels[1]][0], word_ids[labels[2]][0],
             word_ids[labels[3]][0]]
    second = [eos, eos, other, eos]
    logits = torch.randn(4, 2, setup.loss.vocab_size, generator=torch.Generator().manual_seed(0))
    for n in range(4):
        logits[n, 0, first[n]] = logits[n, 1, second[n]] = 10.0

    def replace(module: Any, args: Any, output: Any) -> Any:
        output.logits = logits.clone()
        return output

    setup.model.register_forward_hook(replace)
    got = setup.evaluate(setup.validation)
    assert got["accuracy"] == pytest.approx(2 / 4, abs=1e-12)
    log_p = torch.log_softmax(logits.double(), dim=-1)
    loss = -float(sum(log_p[n, t, batch.targets[n, t]] for n in range(4) for t in range(2))) / 8
    assert got["loss"] == pytest.approx(loss, rel=1e-6)  # float32 log-softmax of |z| <= 10
    assert labels == [e.label for e in setup.validation.examples]


@pytest.mark.parametrize("optimizer", ["sgd", "ief"])
def test_divergence_stops_the_run(optimizer: str, tmp_path: Path) -> None:
    overrides = [f"optimizer={optimizer}", "optim.lr=1e200", "model.hidden_sizes=[4]",
                 "model.dtype=float64", "train.max_steps=5", "train.batch_size=16"]
    result = train(load_config("mlp", overrides), tmp_path / "stop", progress=False)
    assert result.diverged and result.finished and result.step < 5
    (record,) = read_metrics(tmp_path / "stop", "diverged")
    assert record["step"] == result.step
    # the only validation saw non-finite outputs: no best checkpoint, nothing tested
    assert result.best["step"] is None and result.test == {}
    assert not read_metrics(tmp_path / "stop", "test")
    assert json.loads((tmp_path / "stop" / "results.json").read_text())["diverged"] is True
    with pytest.raises((FloatingPointError, ValueError)):
        train(load_config("mlp", [*overrides, "train.on_divergence=raise"]), tmp_path / "raise",
              progress=False)


def test_mnli_is_tested_on_matched_and_mismatched(tmp_path: Path) -> None:
    """GLUE's MNLI files (holdout protocol: dev_matched / dev_mismatched are the test sets)."""
    folder = tmp_path / "glue" / "MNLI"
    folder.mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tgold_label"
    golds = ["entailment", "neutral", "contradiction"]
    for name, n in (("train", 30), ("dev_matched", 6), ("dev_mismatched", 5)):
        rows = [f"{k}\tthe cat sat\tthe cat {k}\t{golds[k % 3]}" for k in range(n)]
        (folder / f"{name}.tsv").write_text("\n".join([header, *rows]) + "\n")
    config = load_config(
        "t5-lora", ["task=mnli", "model.name=tiny", "model.max_length=32", "train.max_steps=2",
                    "train.batch_size=8", f"data.source={tmp_path / 'glue'}"],
    )
    assert (config["train"]["epochs"], config["train"]["eval_every"]) == (5, 1000)
    result = train(config, tmp_path / "run", progress=False)
    assert set(result.test) == {
        "test_matched_accuracy", "test_matched_loss",
        "test_mismatched_accuracy", "test_mismatched_loss",
    }
    # 6 and 5 rows: accuracies are multiples of 1/6 and 1/5
    assert (result.test["test_matched_accuracy"] * 6) == pytest.approx(
        round(result.test["test_matched_accuracy"] * 6)
    )
    assert (result.test["test_mismatched_accuracy"] * 5) == pytest.approx(
        round(result.test["test_mismatched_accuracy"] * 5)
    )


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


# ---- model and data sources: errors that name the key -------------------------------------
@pytest.mark.parametrize("setup", ["t5-lora", "t5-prompt", "vit-lora"])
@pytest.mark.parametrize("name", ["/nonexistent/path", "./no/such/dir", "~/no-such-model-dir"])
def test_model_name_that_is_a_missing_directory(setup: str, name: str) -> None:
    config = load_config(setup, [f"model.name={name}"])
    with pytest.raises(FileNotFoundError, match=rf"model\.name='{re.escape(name)}': no such "
                       "directory"):
        build_setup(config, "cpu")


def test_offline_tokenizer_failure_names_model_name_and_the_choices() -> None:
    """Offline, an uncached hub name gives a placeholder vocabulary (transformers 5) or an
    error; either way the message names the key and what to do instead."""
    config = load_config("t5-lora", ["task=rte", "model.name=ngdref-test/no-such-t5"])
    with pytest.raises(OSError, match=r"model\.name='ngdref-test/no-such-t5'.*"
                       r"local directory.*'tiny'"):
        build_setup(config, "cpu")
    config = load_config("t5-lora", ["model.tokenizer=ngdref-test/no-such-t5"])
    with pytest.raises(OSError, match=r"model\.tokenizer='ngdref-test/no-such-t5'"):
        build_setup(config, "cpu")


@pytest.mark.parametrize("setup", ["t5-lora", "t5-prompt", "vit-lora", "mlp", "mlp-cifar10"])
def test_the_override_example_of_messages_and_help_is_a_key_of_every_setup(setup: str) -> None:
    from validation.experiments.__main__ import build_parser
    from validation.experiments.config import OVERRIDE_EXAMPLE

    with pytest.raises(ConfigError, match=re.escape(OVERRIDE_EXAMPLE)):
        parse_override("train.batch_size")
    _, value = parse_override(OVERRIDE_EXAMPLE)
    assert load_config(setup, [OVERRIDE_EXAMPLE])["train"]["batch_size"] == value
    assert OVERRIDE_EXAMPLE in build_parser()._subparsers._group_actions[0].choices[
        "train"].format_help().replace("\n", " ").replace("  ", " ")


def test_mlp_config_is_the_readme_digits_setup() -> None:
    """README's digits set-up is the reproduction's plan: MLP 64-128-128-10 on digits, batch 64,
    20 epochs, x0.1 step after a quarter of them (the plan sets its own dtype)."""
    from validation.experiments.reproduce import FULL

    config = load_config("mlp")
    assert (config["task"], config["model"]["input_dim"], config["model"]["num_classes"]) == (
        "digits", 64, 10)
    assert config["model"]["hidden_sizes"] == list(FULL.hidden_sizes) == [128, 128]
    assert (config["train"]["batch_size"], config["train"]["epochs"]) == (64, FULL.epochs)
    for name in ("adam", "sgd"):
        opt = config["optimizers"][name]
        assert (opt["schedule"], opt["milestones"], opt["gamma"]) == (
            "step", [FULL.step_epoch], 0.1)


@pytest.mark.parametrize("setup", ["t5-lora", "t5-prompt", "vit-lora", "mlp", "mlp-cifar10"])
def test_training_configs_filter_duplicates_at_0_99(setup: str) -> None:
    """The team convention: 0.99 in the optimisers and training configs (0.95 in evaluation)."""
    optimizers = default_config(setup)["optimizers"]
    assert {n: optimizers[n]["dedup_threshold"] for n in ("ief", "ef")} == {"ief": 0.99,
                                                                           "ef": 0.99}


# ---- the paper's models: trainable parameter counts (meta device, no weights) -----------------
def test_paper_model_trainable_counts_and_module_names() -> None:
    """884,736 (T5 LoRA), 15,360 (prompt) and 313,344 (ViT LoRA incl. q/v biases), App. H."""
    from validation.experiments import models

    t5 = {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "d_kv": 64,
          "init_seed": 0}
    vit = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
           "num_attention_heads": 12, "intermediate_size": 3072, "num_labels": 1000,
           "init_seed": 0}

    class Vocab:  # t5-base's embedding size; the prompt text init is not exercised on meta
        def __len__(self) -> int:
            return 32128

    counts = {}
    with torch.device("meta"):
        for setup in ("t5-lora", "t5-prompt", "vit-lora"):
            cfg = default_config(setup)
            model_cfg = dict(cfg["model"], name="tiny", tiny=vit if setup == "vit-lora" else t5)
            if setup == "vit-lora":
                model = models.build_vit(model_cfg, cfg["peft"], seed=0)
            else:
                peft_cfg = dict(cfg["peft"], init="random") if setup == "t5-prompt" else cfg["peft"]
                model = models.build_t5(model_cfg, peft_cfg, Vocab(), seed=0)
            counts[setup] = models.count_trainable(model)
    assert counts == {"t5-lora": 884_736, "t5-prompt": 15_360, "vit-lora": 313_344}


def test_prompt_text_init_copies_the_init_text_embeddings(dirs: dict[str, Path]) -> None:
    config = load_config("t5-prompt", tiny_overrides("t5-prompt", dirs))
    assert config["peft"]["init_text"] == "Sentiment Classification Task: "
    setup = build_setup(config, "cpu")
    ids = setup.tokenizer("Sentiment Classification Task: ")["input_ids"]
    assert ids[-1] == setup.tokenizer.eos_token_id
    expected_ids = (ids * 20)[:20]
    table = setup.model.get_input_embeddings().weight
    prompt = setup.model.prompt_encoder["default"].embedding.weight
    assert prompt.shape == (20, 16)
    assert torch.equal(prompt.detach(), table[expected_ids].detach())


def test_vit_head_is_frozen_and_fine_labels_index_the_1000_way_head(
    dirs: dict[str, Path],
) -> None:
    config = load_config("vit-lora", tiny_overrides("vit-lora", dirs))
    assert config["data"]["label_set"] == "fine"
    setup = build_setup(config, "cpu")
    names = [n for n, _ in setup.trainable]
    assert not any("classifier" in n for n in names)
    assert any(n.endswith("q_proj.base_layer.bias") for n in names)
    batch = setup.train.make(np.arange(4))
    assert setup.model(**batch.model_inputs()).logits.shape == (4, 1000)
    coarse = build_setup(
        load_config("vit-lora", [*tiny_overrides("vit-lora", dirs), "data.label_set=coarse"]),
        "cpu",
    )
    assert int(coarse.train.labels.max()) < 20 <= int(setup.train.labels.max())


# ---- fidelity to the authors' code: prompt tuning, padding, SF's sampled positions -------------
def test_causal_prompt_tuning_is_pefts_own_label_prefixing(dirs: dict[str, Path]) -> None:
    """peft's CAUSAL_LM on T5 feeds the decoder labels prefixed with 20 x -100. The runner's
    batches carry those decoder inputs explicitly (per-sample gradients take the labels out);
    the expected loss comes from peft's own route (no decoder_input_ids given), and the logits
    left after cutting the 20 prompt positions reproduce it by a hand-written token-mean CE."""
    config = load_config("t5-prompt", tiny_overrides("t5-prompt", dirs))
    assert (config["peft"]["task_type"], config["model"]["padding_side"]) == ("causal_lm", "left")
    setup = build_setup(config, "cpu")
    batch = setup.train.make(np.arange(8))
    assert batch.inputs["decoder_input_ids"].shape == (8, 20 + batch.targets.shape[1])
    assert (batch.inputs["attention_mask"][:, 0] == 0).any()  # left padding
    with torch.no_grad():
        ours = setup.model(**batch.inputs)
        pefts = setup.model(**{k: v for k, v in batch.inputs.items() if k != "decoder_input_ids"})
    assert torch.equal(ours.loss, pefts.loss)
    assert ours.logits.shape == (*batch.targets.shape, setup.loss.vocab_size)
    kept = batch.targets != -100
    log_p = torch.log_softmax(ours.logits.double(), dim=-1)
    hand = -log_p[kept, batch.targets[kept]].mean()
    # float32 logits through log-softmax: |error| <~ a few eps32 * |log p| ~ 1e-6 relative
    assert float(ours.loss) == pytest.approx(float(hand), rel=1e-5)


@pytest.mark.parametrize(("setup", "differ"), [("t5-lora", False), ("t5-prompt", True)])
def test_left_and_right_padding_agree_for_lora_only(
    setup: str, differ: bool, dirs: dict[str, Path]
) -> None:
    """LoRA: T5's relative position bias depends on key minus query only and padded keys are
    masked, so the padding side changes the logits only by rounding (float32, norm-wise
    <= 1e-5). Prompt tuning: the prompt precedes the padding, so its distance to the text and
    hence the logits change (SEQ_2_SEQ_LM here, to isolate the padding from the task type)."""
    extra = ["peft.task_type=seq2seq_lm"] if setup == "t5-prompt" else []
    logits = {}
    for side in ("left", "right"):
        config = load_config(
            setup, [*tiny_overrides(setup, dirs), *extra, f"model.padding_side={side}"]
        )
        built = build_setup(config, "cpu")
        batch = built.train.make(np.arange(8))
        with torch.no_grad():
            logits[side] = built.model(**batch.inputs).logits.double()
    gap = float(torch.linalg.norm(logits["left"] - logits["right"]) /
                torch.linalg.norm(logits["right"]))
    # differ: well above the 1e-5 rounding bound (3e-3 on this tiny model)
    assert (gap > 1e-4) if differ else (gap <= 1e-5), gap


def test_sf_draws_only_the_label_word_by_default(dirs: dict[str, Path]) -> None:
    from validation.experiments.train import LabelWordSampledCE, build_optimizer

    config = load_config("t5-lora", [*tiny_overrides("t5-lora", dirs), "optimizer=sf"])
    assert config["optimizers"]["sf"]["sample_positions"] == "label_word"
    setup = build_setup(config, "cpu")
    assert isinstance(build_optimizer(setup, 4)._loss, LabelWordSampledCE)
    every = build_setup(load_config("t5-lora", [*tiny_overrides("t5-lora", dirs),
                                                "optimizer=sf", "optim.sample_positions=all"]))
    assert type(build_optimizer(every, 4)._loss) is ngdref.SequenceSoftmaxCrossEntropy

    batch = setup.train.make(np.arange(8))
    targets = torch.cat([batch.targets, torch.full((8, 1), -100)], dim=1)  # an ignored column
    vocab = setup.loss.vocab_size
    # logits that put all mass on token 5 at the label position and on token 7 elsewhere
    logits = torch.full((8, targets.shape[1], vocab), -50.0, dtype=torch.float64)
    logits[:, 0, 5] = 50.0
    logits[:, 1:, 7] = 50.0
    drawn = LabelWordSampledCE(vocab).sample(
        logits.reshape(8, -1), 3, num_samples=4, targets=targets
    )
    assert drawn.shape == (4, *targets.shape)
    assert (drawn[:, :, 0] == 5).all()  # sampled from the model at the label word
    assert torch.equal(drawn[:, :, 1:], targets[None, :, 1:].expand(4, -1, -1))  # EOS, -100 kept
    plain = ngdref.SequenceSoftmaxCrossEntropy(vocab).sample(
        logits.reshape(8, -1), 3, num_samples=4, targets=targets
    )
    assert (plain[:, :, 1] == 7).all()  # the all-positions variant redraws EOS too
    with pytest.raises(ValueError, match="targets"):
        LabelWordSampledCE(vocab).sample(logits.reshape(8, -1), 3)


@pytest.mark.parametrize("positions", ["label_word", "all"])
def test_sf_rows_are_gradients_of_the_loss_on_the_drawn_labels(
    positions: str, dirs: dict[str, Path]
) -> None:
    """The authors' SF row of sample n: the gradient of the CE of sample n with labels[:, 0]
    replaced by a draw and the observed EOS kept, on the logits of the observed forward pass
    (decoder fed the observed labels, shifted right). Computed here per sample by autograd
    through the model's own loss; ngdref's rows (of any reduction factor: the convention is
    CORE's) must be parallel to it: cos = 1 within float64 rounding of two gradient routes
    (1e-10). With 'all' the EOS is redrawn too."""
    from backends import TorchProvider
    from validation.experiments.train import LabelWordSampledCE

    config = load_config("t5-lora", [*tiny_overrides("t5-lora", dirs), "model.dtype=float64"])
    setup = build_setup(config, "cpu")
    batch = setup.train.make(np.arange(6))
    vocab = setup.loss.vocab_size
    loss = LabelWordSampledCE(vocab) if positions == "label_word" else setup.loss
    provider = TorchProvider(setup.model, batch.inputs)
    key = 11
    rows = ngdref.sampled_grads(provider, loss, batch.targets, key, reduction="sum")
    drawn = loss.sample(provider.logits(), key, targets=batch.targets)[0]
    # 'all' redraws EOS too: over a ~200-token vocabulary all 6 draws equal EOS by chance ~never
    kept = bool((drawn[:, 1:] == batch.targets[:, 1:]).all())
    assert kept == (positions == "label_word")
    params = [p for _, p in setup.trainable]
    for n in range(6):
        one = {k: v[n : n + 1] for k, v in batch.inputs.items()}
        observed = one["labels"]
        shifted = torch.cat([torch.zeros_like(observed[:, :1]), observed[:, :-1]], dim=1)
        one["decoder_input_ids"] = shifted.masked_fill(shifted == -100, 0)  # T5: pad = start = 0
        one["labels"] = drawn[n : n + 1]
        grads = torch.autograd.grad(setup.model(**one).loss, params)
        expected = torch.cat([g.reshape(-1) for g in grads])
        got = torch.as_tensor(rows[n])
        cos = float(got @ expected / (torch.linalg.norm(got) * torch.linalg.norm(expected)))
        assert cos == pytest.approx(1.0, abs=1e-10), (n, cos)


def test_released_code_values_are_a_named_option() -> None:
    paper = load_config("t5-prompt", ["optimizer=ief"])
    released = load_config("t5-prompt", ["optimizer=ief", "follow=released"])
    assert (paper["optimizers"]["ief"]["schedule"], paper["optimizers"]["ief"]["damping"]) == (
        "constant", 1e-12)
    assert (released["optimizers"]["ief"]["schedule"],
            released["optimizers"]["ief"]["damping"]) == ("linear", 1e-7)
    vit = load_config("vit-lora", ["follow=released", "optimizers.ief.damping=1e-9"])
    assert (vit["optimizers"]["ief"]["lr"], vit["data"]["label_set"]) == (50.0, "coarse")
    assert vit["optimizers"]["ief"]["damping"] == 1e-9  # a later --set wins over the preset
    assert load_config("vit-lora")["optimizers"]["ief"]["lr"] == 100.0
    with pytest.raises(ConfigError, match=r"'follow' must be one of \('paper', 'released'\)"):
        load_config("vit-lora", ["follow=authors"])


def test_linear_schedule_is_hugging_faces_linear_decay_to_zero(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The released t5-prompt iEF run: get_linear_schedule_with_warmup(0 warmup, T steps)."""
    from transformers import get_linear_schedule_with_warmup

    steps = 4
    config = load_config("t5-prompt", [*tiny_overrides("t5-prompt", dirs), "optimizer=ief",
                                       "follow=released", "optim.lr=1.0",
                                       f"train.max_steps={steps}"])
    train(config, tmp_path, progress=False, device="cpu")
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    schedule = get_linear_schedule_with_warmup(reference, 0, steps)
    expected = []
    for _ in range(steps):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert [r["lr"] for r in train_records(tmp_path)] == pytest.approx(expected, rel=1e-12)


def test_cli_config_labels_paper_and_released_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "vit-lora", "--optimizer", "ief"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "[paper] released code: 50.0" in lines["optimizers.ief.lr"]
    assert "[paper+released]" in lines["peft.r"]
    assert "[ngdref]" in lines["optimizers.ngd.lr"]
    assert main(["config", "vit-lora", "--optimizer", "ief", "--set", "follow=released",
                 "--set", "optim.damping=1e-9"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "= 50.0" in lines["optimizers.ief.lr"] and "[released]" in lines["optimizers.ief.lr"]
    assert "[set] changed from 1e-12" in lines["optimizers.ief.damping"]
    assert '"coarse"' in lines["data.label_set"] and "[released]" in lines["data.label_set"]
    # the scaled digits MLP is this project's set-up; the full-scale one is the paper's
    for setup, label in (("mlp", "[ngdref]"), ("mlp-cifar10", "[paper]")):
        assert main(["config", setup]) == 0
        lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
        assert label in lines["train.epochs"] and label in lines["model.hidden_sizes"]
        assert label in lines["optimizers.adam.milestones"]


# ---- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.batch_size=16", ("train.batch_size", 16)),
        ("optimizers.ief.damping=1e-12", ("optimizers.ief.damping", 1e-12)),
        ("data.source=/data/glue_data", ("data.source", "/data/glue_data")),
        ("data.augment=false", ("data.augment", False)),
        ("data.validation_size=null", ("data.validation_size", None)),
        ("optim.milestones=[15, 30]", ("optim.milestones", [15, 30])),
        ("task=a=b", ("task", "a=b")),
    ],
)
def test_parse_override(text: str, expected: tuple[str, Any]) -> None:
    assert parse_override(text) == expected


def test_overrides_and_task_defaults() -> None:
    config = load_config("t5-lora", ["task=RTE", "optimizer=ief", "optim.lr=50", "seed=2"])
    assert (config["task"], config["seed"]) == ("rte", 2)
    assert (config["train"]["epochs"], config["train"]["eval_every"]) == (40, 30)
    assert config["optimizers"]["ief"]["lr"] == 50.0
    assert isinstance(config["optimizers"]["ief"]["lr"], float)
    assert load_config("vit-lora")["train"]["epochs"] == 5
    assert load_config("t5-prompt")["optimizers"]["adafactor"] == {
        "lr": 0.3, "weight_decay": 1e-05, "scale_parameter": False, "relative_step": False,
        "warmup_init": False, "schedule": "constant", "milestones": [], "gamma": 0.1,
    }


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.batchsize=3", r"unknown config key 'train\.batchsize'; did you mean 'batch_size'"),
        ("trian.batch_size=3", r"unknown config key 'trian'"),
        ("optimizers.ief.lrr=1", r"unknown config key 'optimizers\.ief\.lrr'"),
        ("train.batch_size=abc", r"config key 'train\.batch_size' must be a number"),
        ("train.batch_size=2.5", r"config key 'train\.batch_size' must be an integer"),
        ("train.epochs=many", r"config key 'train\.epochs' must be an int >= 1 or one of"),
        ("data.augment=1", r"config key 'data\.augment' must be a bool"),
        ("optimizer=lbfgs", r"config key 'optimizer' must be one of"),
        ("task=sst2", r"config key 'task' must be one of \('cifar100',\)"),
        ("data.label_set=medium",
         r"config key 'data\.label_set' must be one of \('fine', 'coarse'\)"),
        ("train.batch_size", r"must have the form key=value"),
    ],
)
def test_bad_config_keys_and_values_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("vit-lora", [override])


def test_config_file_is_checked_against_its_setup(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"setup": "mlp", "train": {"batch_sise": 8}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.batch_sise'"):
        load_config(path)
    path.write_text(json.dumps({"setup": "mlp", "_note": "x", "train": {"batch_size": 8}}))
    assert load_config(path)["train"]["batch_size"] == 8
    with pytest.raises(ConfigError, match="setup must be one of"):
        default_config("resnet")
    assert apply_overrides(default_config("mlp"), [])["optimizer"] == "adam"


def test_cli_config_command_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "mlp", "--optimizer", "ief", "--set", "optim.lr=0.5",
                 "--epochs", "3", "--seed", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizers"]["ief"]["lr"] == 0.5
    assert (printed["train"]["epochs"], printed["seed"], printed["optimizer"]) == (3, 4, "ief")
    assert main(["config", "mlp", "--set", "train.bach_size=3"]) == 2
    assert "train.bach_size" in capsys.readouterr().err


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
