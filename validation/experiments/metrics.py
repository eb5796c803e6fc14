r"""Metrics of the paper's experiments (:ref:`experiments-setups`) and T5 label-word predictions.

Predictions are label indices (``GlueTask.label_words`` order)
with -1 for "no label word": T5 predicts over its full vocabulary, and an output that is none of
the task's label words is wrong. The binary metrics score such a prediction as the class opposite
to the truth, which is what the released evaluator's confusion counts do: a wrong answer on a
positive row is a false negative, on a negative row a false positive. All metrics are fractions in
[0, 1] (the paper's tables show them x100).

Per task (:func:`glue_metrics`): CoLA: MCC; MRPC and QQP: F1 and accuracy; MNLI: accuracy on the
matched and on the mismatched set (two calls); SST-2, QNLI, RTE, CIFAR-100: accuracy. Accuracy is
always returned, because the best checkpoint maximises accuracy + second metric
(:func:`selection_score`; the second metric is accuracy itself for the accuracy-only tasks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from validation.experiments.data.glue import GlueTask, get_glue_task

__all__ = [
    "accuracy",
    "f1_score",
    "glue_metrics",
    "matthews_corrcoef",
    "predict_label_words",
    "selection_score",
]


def _as_labels(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(
        predictions.detach().cpu() if isinstance(predictions, torch.Tensor) else predictions
    )
    true = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    for name, arr in (("predictions", pred), ("labels", true)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional; got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integer label indices; got dtype {arr.dtype}")
    if pred.shape != true.shape:
        raise ValueError(
            f"predictions has {pred.shape[0]} entries but labels has {true.shape[0]}"
        )
    if true.size == 0:
        raise ValueError("labels is empty")
    if np.any(true < 0):
        raise ValueError("labels must be >= 0 (unlabelled rows, label -1, cannot be scored)")
    return pred.astype(np.int64), true.astype(np.int64)


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of rows whose prediction equals the label (a -1 prediction is wrong).

    Parameters
    ----------
    predictions, labels : array-like of int, shape (N,)

    Returns
    -------
    float in [0, 1]
    """
    pred, true = _as_labels(predictions, labels)
    return float(np.mean(pred == true))


def _binary_confusion(
    predictions: Any, labels: Any, positive: int
) -> tuple[int, int, int, int]:
    pred, true = _as_labels(predictions, labels)
    if positive not in (0, 1):
        raise ValueError(f"positive must be 0 or 1; got {positive}")
    if np.any(true > 1):
        raise ValueError("labels must be 0 or 1 for a binary metric")
    is_pos = true == positive
    correct = pred == true
    tp = int(np.sum(is_pos & correct))
    fn = int(np.sum(is_pos & ~correct))
    tn = int(np.sum(~is_pos & correct))
    fp = int(np.sum(~is_pos & ~correct))
    return tp, fp, tn, fn


def f1_score(predictions: Any, labels: Any, *, positive: int = 1) -> float:
    r"""Binary F1 of the class ``positive``.

    .. math:: F_1 = \frac{2\,TP}{2\,TP + FP + FN}

    A wrong prediction (including -1) on a positive row is FN, on a negative row FP.

    Parameters
    ----------
    predictions, labels : array-like of int, shape (N,)
        Labels in {0, 1}.
    positive : {0, 1}
        Label index of the positive class; for QQP and MRPC that of "yes", which is 1 in
        their ["no", "yes"] order (``GlueTask.positive_label``).

    Returns
    -------
    float in [0, 1]; 0.0 when there is no positive row and no positive prediction.
    """
    tp, fp, _, fn = _binary_confusion(predictions, labels, positive)
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Any, labels: Any, *, positive: int = 1) -> float:
    r"""Binary Matthews correlation coefficient.

    .. math:: \mathrm{MCC} = \frac{TP\,TN - FP\,FN}
              {\sqrt{(TP + FP)(TP + FN)(TN + FP)(TN + FN)}}

    with the same counting as :func:`f1_score` (MCC itself is symmetric in the two classes).

    Parameters
    ----------
    predictions, labels : array-like of int, shape (N,)
        Labels in {0, 1}.
    positive : {0, 1}
        For CoLA, "acceptable" = 1.

    Returns
    -------
    float in [-1, 1]; 0.0 when a factor of the denominator is zero (scikit-learn's convention).
    """
    tp, fp, tn, fn = _binary_confusion(predictions, labels, positive)
    denominator = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def glue_metrics(task: str | GlueTask, predictions: Any, labels: Any) -> dict[str, float]:
    """The metrics of one evaluation set of a GLUE task.

    Parameters
    ----------
    task : str or GlueTask
    predictions, labels : array-like of int, shape (N,)
        Label indices; predictions may be -1.

    Returns
    -------
    dict
        ``{"accuracy": ...}`` plus ``"mcc"`` for CoLA and ``"f1"`` for QQP and MRPC. For MNLI
        call it once on the matched and once on the mismatched set.
    """
    task = get_glue_task(task)
    result = {"accuracy": accuracy(predictions, labels)}
    if task.second_metric == "mcc":
        result["mcc"] = matthews_corrcoef(predictions, labels, positive=task.positive_label)
    elif task.second_metric == "f1":
        result["f1"] = f1_score(predictions, labels, positive=task.positive_label)
    return result


def selection_score(task: str | GlueTask, metrics: Mapping[str, float]) -> float:
    """Best-checkpoint score of the released code: accuracy + the task's second metric.

    The second metric is MCC for CoLA, F1 for QQP and MRPC and accuracy again for the others (so
    their score is 2 x accuracy and ranks checkpoints by accuracy).

    Parameters
    ----------
    task : str or GlueTask
    metrics : mapping
        Output of :func:`glue_metrics`.

    Raises
    ------
    KeyError
        If ``metrics`` lacks "accuracy" or the second metric.
    """
    task = get_glue_task(task)
    for key in ("accuracy", task.second_metric):
        if key not in metrics:
            raise KeyError(f"metrics has no {key!r} (task {task.display_name})")
    return float(metrics["accuracy"]) + float(metrics[task.second_metric])


def _normalise_word(text: str) -> str:
    return text.strip().lower()


def predict_label_words(
    logits: torch.Tensor, tokenizer: Any, label_words: Sequence[str]
) -> torch.Tensor:
    """Greedy label-word predictions from T5's teacher-forced logits.

    The argmax is taken over the full vocabulary, decoded (special tokens skipped, surrounding
    space removed, lower-cased as the released evaluator does) and compared with the label words.

    - ``logits`` of shape (N, V), the first decoder position: the decoded argmax token is compared
      with the decoded first token of each label word (the whole word when it is one token, as
      all GLUE label words are in t5-base).
    - ``logits`` of shape (N, T, V), all label positions: the argmax sequence up to its first EOS
      is decoded and compared with the whole label words (the released code's route).

    Parameters
    ----------
    logits : torch.Tensor, shape (N, V) or (N, T, V)
    tokenizer : transformers tokenizer
    label_words : sequence of str
        In label-index order (``GlueTask.label_words``).

    Returns
    -------
    torch.Tensor, int64, shape (N,)
        Index of the predicted label word, or -1 when the output is no label word.

    Raises
    ------
    ValueError
        If ``logits`` has another rank, ``label_words`` is empty or, for (N, V) logits, two
        label words share their first token (or one's first token decodes to nothing).
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim not in (2, 3):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape (N, V) or (N, T, V); got {shape}")
    if len(label_words) == 0:
        raise ValueError("label_words is empty")
    argmax = logits.argmax(dim=-1).cpu()
    if logits.ndim == 2:
        first_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in label_words]
        targets = [_normalise_word(tokenizer.decode([i])) for i in first_ids]
        if "" in targets or len(set(targets)) != len(targets):
            raise ValueError(
                f"label_words {list(label_words)} have first tokens {targets} that are empty or "
                "shared; pass the logits of all label positions, shape (N, T, V)"
            )
        sequences = [[int(i)] for i in argmax]
    else:
        targets = [_normalise_word(w) for w in label_words]
        eos = tokenizer.eos_token_id
        sequences = []
        for row in argmax.tolist():
            sequences.append(row[: row.index(eos)] if eos in row else row)
    decoded = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    lookup = {word: k for k, word in enumerate(targets)}
    return torch.tensor([lookup.get(_normalise_word(d), -1) for d in decoded], dtype=torch.int64)
