"""GLUE's task registry: the paper's templates, label words, epochs and metrics per task.

Re-exported by :mod:`validation.experiments.data.glue`, whose docstring describes the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# ---------------------------------------------------------------------------------------------
# GLUE: the task registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task as the paper runs it.

    Attributes
    ----------
    name : str
        Lower-case key, also the hub configuration name ("cola", "sst2", ...).
    display_name : str
        GLUE's spelling, also the folder name of the TSV distribution ("CoLA", "SST-2", ...).
    template : str
        The input format of App. H, Table 2, with ``{S1}`` and (pair tasks) ``{S2}``.
    label_words : tuple of str
        The words T5 predicts, in label-index order (:ref:`experiments-setups`).
    epochs : int
        Training epochs (App. H, Table 3).
    eval_every : int
        Optimiser steps between validation evaluations (App. H, Table 3).
    metrics : tuple of str
        The test metrics the paper reports for the task (names of :mod:`.metrics`).
    second_metric : str
        The metric added to accuracy in the best-checkpoint score ("mcc", "f1" or "accuracy").
    positive_word : str
        The label word counted as the positive class by F1 and MCC (the released evaluator's
        choice: "acceptable" for CoLA, "yes" for QQP and MRPC; unused elsewhere).
    prompt_init : str
        Text initialisation of the 20 prompt-tuning tokens (:ref:`experiments-setups`).
    hub_columns : tuple of str
        Text columns of the hub copy, in the order S1, S2.
    """

    name: str
    display_name: str
    template: str
    label_words: tuple[str, ...]
    epochs: int
    eval_every: int
    metrics: tuple[str, ...]
    second_metric: str
    positive_word: str
    prompt_init: str
    hub_columns: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_words)

    @property
    def num_sentences(self) -> int:
        """1 for CoLA and SST-2, 2 for the pair tasks."""
        return len(self.hub_columns)

    @property
    def positive_label(self) -> int:
        """Label index of ``positive_word``."""
        return self.label_words.index(self.positive_word)

    def format(self, s1: str, s2: str | None = None) -> str:
        """The model input: the template with the sentence(s) filled in.

        Parameters
        ----------
        s1 : str
        s2 : str, optional
            Required by pair tasks, refused by single-sentence ones.
        """
        if (s2 is None) != (self.num_sentences == 1):
            want = "one sentence" if self.num_sentences == 1 else "two sentences"
            raise ValueError(f"s2: task {self.display_name} takes {want}")
        return self.template.format(S1=s1, S2=s2)


#: The seven tasks, keyed by :attr:`GlueTask.name`.
GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola",
            "CoLA",
            "Classify if the following sentence's grammar is acceptable or unacceptable: {S1}",
            ("unacceptable", "acceptable"),
            20,
            100,
            ("mcc",),
            "mcc",
            "acceptable",
            "Grammar Checking Task: ",
            ("sentence",),
        ),
        GlueTask(
            "sst2",
            "SST-2",
            "Classify if the following sentence's sentiment is positive or negative: {S1}",
            ("negative", "positive"),
            20,
            1000,
            ("accuracy",),
            "accuracy",
            "positive",
            "Sentiment Classification Task: ",
            ("sentence",),
        ),
        GlueTask(
            "qqp",
            "QQP",
            "Classify if the following Q1 and Q2 are semantically equivalent, answer yes or no: "
            "Q1: {S1} Q2: {S2}",
            ("no", "yes"),
            5,
            1000,
            ("f1", "accuracy"),
            "f1",
            "yes",
            "Semantically Equivalent Checking Task: ",
            ("question1", "question2"),
        ),
        GlueTask(
            "mrpc",
            "MRPC",
            "Classify if the following S1 and S2 are semantically equivalent, answer yes or no: "
            "S1: {S1} S2: {S2}",
            ("no", "yes"),
            30,
            50,
            ("f1", "accuracy"),
            "f1",
            "yes",
            "Semantically Equivalent Checking Task: ",
            ("sentence1", "sentence2"),
        ),
        GlueTask(
            "mnli",
            "MNLI",
            "Predict whether the premise entails the hypothesis, contradicts the hypothesis, "
            "or neither, answer yes, no or maybe: premise: {S1} hypothesis: {S2}",
            ("yes", "maybe", "no"),
            5,
            1000,
            ("accuracy_matched", "accuracy_mismatched"),
            "accuracy",
            "yes",
            "Textual Entailment Prediction Task: ",
            ("premise", "hypothesis"),
        ),
        GlueTask(
            "qnli",
            "QNLI",
            "Determine whether the context sentence S contains the answer to the question Q, "
            "answer yes or no: Q: {S1} S: {S2}",
            ("yes", "no"),
            15,
            1000,
            ("accuracy",),
            "accuracy",
            "yes",
            "Textual Entailment Prediction Task: ",
            ("question", "sentence"),
        ),
        GlueTask(
            "rte",
            "RTE",
            "Classify if S1 entailment S2 or not, answer yes or no: S1: {S1} S2: {S2}",
            ("yes", "no"),
            40,
            30,
            ("accuracy",),
            "accuracy",
            "yes",
            "Textual Entailment Recognition Task: ",
            ("sentence1", "sentence2"),
        ),
    ]
}

#: CIFAR-100 schedule (App. H, Table 3): epochs and steps between validations.
CIFAR100_EPOCHS = 5
CIFAR100_EVAL_EVERY = 1000


def get_glue_task(task: str | GlueTask) -> GlueTask:
    """Look a task up by name ("SST-2", "sst2", "sst-2", "CoLA", ...; case and "-"/"_" ignored).

    Raises
    ------
    ValueError
        If ``task`` names none of the seven tasks.
    """
    if isinstance(task, GlueTask):
        return task
    if not isinstance(task, str):
        raise TypeError(f"task must be a str or GlueTask, got {type(task).__name__}")
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        known = ", ".join(t.display_name for t in GLUE_TASKS.values())
        raise ValueError(f"task must be one of {known}; got {task!r}")
    return GLUE_TASKS[key]


@dataclass(frozen=True)
class GlueExample:
    """One formatted GLUE row.

    Attributes
    ----------
    text : str
        The model input: the task's template with the sentence(s) filled in.
    label : int
        Label index into ``GlueTask.label_words``; -1 for GLUE's unlabelled test rows.
    label_word : str or None
        ``label_words[label]``; None when unlabelled.
    idx : int
        Row number (0-based) in the source file or hub split, which is GLUE's test-set index.
    """

    text: str
    label: int
    label_word: str | None
    idx: int


def glue_label_indices(examples: Sequence[GlueExample]) -> torch.Tensor:
    """The label indices of ``examples`` as an int64 tensor of shape (N,)."""
    return torch.tensor([e.label for e in examples], dtype=torch.int64)
