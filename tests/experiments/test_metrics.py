"""Metrics of the experiments and T5 label-word predictions.

Expected values come from scikit-learn's metrics (with a "no label word" prediction rewritten as
the class opposite to the truth, the stated convention) and from confusion counts done by hand.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from validation.experiments.data.glue import GLUE_TASKS, tiny_t5_tokenizer
from validation.experiments.metrics import (
    accuracy,
    f1_score,
    glue_metrics,
    matthews_corrcoef,
    predict_label_words,
    selection_score,
)

skm = pytest.importorskip("sklearn.metrics")

# labels, predictions (-1 = no label word): TP 1, FN 2 (rows 1, 4), TN 1, FP 1 (row 3).
HAND_LABELS = [1, 1, 0, 0, 1]
HAND_PREDICTIONS = [1, 0, 0, 1, -1]


def test_hand_computed_binary_case() -> None:
    assert accuracy(HAND_PREDICTIONS, HAND_LABELS) == pytest.approx(2 / 5)
    assert f1_score(HAND_PREDICTIONS, HAND_LABELS) == pytest.approx(2 / (2 + 1 + 2))
    # (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (1 - 2) / sqrt(2 * 3 * 2 * 3)
    assert matthews_corrcoef(HAND_PREDICTIONS, HAND_LABELS) == pytest.approx(-1 / 6)
    # Positive class 0: TP 1, FN 1, FP 2 (rows 1 and 4), TN 1.
    assert f1_score(HAND_PREDICTIONS, HAND_LABELS, positive=0) == pytest.approx(2 / 5)


def _opposite_when_invalid(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return np.where(pred < 0, 1 - true, pred)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("positive", [0, 1])
def test_binary_metrics_match_sklearn(seed: int, positive: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    true = rng.integers(0, 2, size=n)
    pred = rng.integers(-1, 2, size=n)
    scored = _opposite_when_invalid(pred, true)
    assert accuracy(pred, true) == pytest.approx(skm.accuracy_score(true, pred))
    assert f1_score(pred, true, positive=positive) == pytest.approx(
        skm.f1_score(true, scored, pos_label=positive, zero_division=0)
    )
    assert matthews_corrcoef(torch.from_numpy(pred), torch.from_numpy(true)) == pytest.approx(
        skm.matthews_corrcoef(true, scored)
    )


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")
def test_degenerate_cases_follow_sklearn() -> None:
    true = np.zeros(6, dtype=int)
    pred = np.zeros(6, dtype=int)
    assert f1_score(pred, true) == skm.f1_score(true, pred, zero_division=0) == 0.0
    assert matthews_corrcoef(pred, true) == skm.matthews_corrcoef(true, pred) == 0.0
    assert matthews_corrcoef([1, 0], [1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1], [1, 0]) == pytest.approx(-1.0)


def test_multiclass_accuracy_with_invalid_predictions() -> None:
    true = [0, 1, 2, 2, 1, 0]
    pred = [0, 2, 2, -1, 1, 1]
    assert accuracy(pred, true) == pytest.approx(skm.accuracy_score(true, pred)) == 0.5


def test_glue_metric_sets() -> None:
    cola = glue_metrics("CoLA", HAND_PREDICTIONS, HAND_LABELS)
    assert cola == pytest.approx({"accuracy": 0.4, "mcc": -1 / 6})
    mrpc = glue_metrics("mrpc", HAND_PREDICTIONS, HAND_LABELS)
    assert mrpc == pytest.approx({"accuracy": 0.4, "f1": 0.4})
    assert set(glue_metrics("qqp", [1], [1])) == {"accuracy", "f1"}
    for name in ("sst2", "mnli", "qnli", "rte"):
        assert set(glue_metrics(name, [0], [0])) == {"accuracy"}
    # QQP/MRPC's positive class is "yes": index 1 of ["no", "yes"].
    assert GLUE_TASKS["qqp"].positive_label == 1 and GLUE_TASKS["cola"].positive_label == 1


def test_selection_score_is_accuracy_plus_second_metric() -> None:
    assert selection_score("cola", {"accuracy": 0.8, "mcc": 0.5}) == pytest.approx(1.3)
    assert selection_score("MRPC", {"accuracy": 0.8, "f1": 0.85}) == pytest.approx(1.65)
    assert selection_score("rte", {"accuracy": 0.7}) == pytest.approx(1.4)
    with pytest.raises(KeyError, match="metrics"):
        selection_score("qqp", {"accuracy": 0.7})


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ValueError, match="predictions has 2 entries but labels has 3"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        accuracy([0], [-1])
    with pytest.raises(ValueError, match="labels is empty"):
        accuracy([], [])
    with pytest.raises(ValueError, match="predictions must be one-dimensional"):
        accuracy([[0]], [0])
    with pytest.raises(ValueError, match="predictions must hold integer"):
        accuracy([0.5], [0])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        f1_score([0, 2], [0, 2])
    with pytest.raises(ValueError, match="positive"):
        matthews_corrcoef([0], [0], positive=2)
    with pytest.raises(ValueError, match="task"):
        glue_metrics("stsb", [0], [0])


# ------------------------------------------------------------------------------------------
# Label-word predictions from teacher-forced logits
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    pytest.importorskip("transformers")
    return tiny_t5_tokenizer(["Yes", "zoo"])


def _one_hot_logits(tokenizer: Any, rows: list[list[str]]) -> torch.Tensor:
    """(N, T, V) logits whose argmax at each position is the given piece."""
    vocab = len(tokenizer)
    logits = torch.randn(len(rows), len(rows[0]), vocab, generator=torch.Generator().manual_seed(0))
    for n, pieces in enumerate(rows):
        for t, piece in enumerate(pieces):
            logits[n, t, tokenizer.convert_tokens_to_ids(piece)] = 100.0
    return logits


def test_first_position_predictions(tokenizer: Any) -> None:
    words = GLUE_TASKS["mnli"].label_words  # yes, maybe, no
    rows = [["▁yes"], ["▁no"], ["▁maybe"], ["▁Yes"], ["▁positive"], ["</s>"], ["<pad>"]]
    logits = _one_hot_logits(tokenizer, rows)[:, 0]
    got = predict_label_words(logits, tokenizer, words)
    # "Yes" counts as "yes" (the released evaluator lower-cases); other words and specials: -1.
    assert got.tolist() == [0, 2, 1, 0, -1, -1, -1]
    assert got.dtype == torch.int64


def test_all_position_predictions_stop_at_eos(tokenizer: Any) -> None:
    # "zebra" is five pieces in this vocabulary.
    rows = [
        ["▁z", "e", "b", "r", "a", "</s>"],
        ["▁yes", "</s>", "▁no", "▁no", "▁no", "▁no"],
        ["▁z", "e", "b", "r", "a", "▁no"],
        ["▁yes", "▁no", "</s>", "</s>", "</s>", "</s>"],
    ]
    logits = _one_hot_logits(tokenizer, rows)
    got = predict_label_words(logits, tokenizer, ["zebra", "yes"])
    assert got.tolist() == [0, 1, -1, -1]


def test_first_position_needs_distinct_first_tokens(tokenizer: Any) -> None:
    logits = torch.zeros(1, len(tokenizer))
    # "zebra" and "zulu" both start with the piece "▁z" here.
    with pytest.raises(ValueError, match="label_words"):
        predict_label_words(logits, tokenizer, ["zebra", "zulu"])
    with pytest.raises(ValueError, match="label_words is empty"):
        predict_label_words(logits, tokenizer, [])
    with pytest.raises(ValueError, match="logits"):
        predict_label_words(torch.zeros(len(tokenizer)), tokenizer, ["yes"])


def test_predictions_feed_the_metrics(tokenizer: Any) -> None:
    task = GLUE_TASKS["mrpc"]
    logits = _one_hot_logits(tokenizer, [["▁yes"], ["▁no"], ["▁maybe"], ["▁yes"]])[:, 0]
    pred = predict_label_words(logits, tokenizer, task.label_words)
    assert pred.tolist() == [1, 0, -1, 1]
    metrics = glue_metrics(task, pred, torch.tensor([1, 1, 0, 0]))
    # TP 1, FN 1, FP 2 (row 2 wrong on a "no" row, row 3): F1 = 2 / 5; accuracy 1 / 4.
    assert metrics == pytest.approx({"accuracy": 0.25, "f1": 0.4})
