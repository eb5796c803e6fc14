"""The training loop of the experiments' runner (validation/experiments/train/runner.py).

Offline, tiny random models (T5 with the tiny tokenizer, ViT, MLP) on small data files written in
the loaders' real formats (tests/experiments/cases.py) and on scikit-learn's digits. Expected values
come from other routes: the logged accuracy and loss of a model with a known constant prediction
are computed here from scikit-learn's arrays, the per-sample optimisers' logged loss is compared
with Hugging Face's own token-mean loss, the released schedule with Hugging Face's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.experiments.cases import (
    fixture_dirs,  # noqa: F401  (a fixture: pytest finds it here)
    require_hf_stack,
    tiny_overrides,
    train_records,
)

torch = require_hf_stack()

from validation.experiments.config.load import load_config  # noqa: E402
from validation.experiments.train.runner import (  # noqa: E402
    build_setup,
    epoch_permutation,
    read_metrics,
    train,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


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
    from validation.experiments.train.runner import build_optimizer

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


# ---- the released learning-rate schedule ---------------------------------------------------------
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
