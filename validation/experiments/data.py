r"""Data of the paper's experiments (Wu et al. 2024, App. H; SPEC §6 and §8).

Three families, each with a loader that returns host data and a documented split:

- **GLUE** (CoLA, SST-2, QQP, MRPC, MNLI, QNLI, RTE) for T5: :data:`GLUE_TASKS` holds the paper's
  instruction templates (Table 2, verbatim), label words in the released code's label-index order,
  epochs and validation frequency (Table 3) and metric names. :func:`load_glue` reads the
  Hugging Face hub copy or a local copy of GLUE's original TSV files and returns
  :class:`GlueExample` rows; :func:`encode_glue` turns them into T5 tensors.
- **CIFAR-100** for ViT: :func:`load_cifar100` reads the python pickle distribution
  (``cifar-100-python``) or the hub copy; :func:`cifar_train_transform` and
  :func:`cifar_eval_transform` are torchvision's pipelines re-implemented in torch.
- **digits** (scikit-learn's ``load_digits``, shipped offline) for CPU reproductions:
  :func:`load_digits`.

The images and digits live in :mod:`validation.experiments.images` (imported here, so that
``data.load_cifar100`` etc. keep working); this module holds GLUE.

GLUE splits
-----------
GLUE's test labels are private: the paper validates on GLUE's dev set and sends the best
checkpoint to the GLUE server for its test numbers (App. H.2). That cannot be done offline, so
``protocol="holdout"`` (the default) holds out part of GLUE's train set as validation and tests on
GLUE's dev set; ``protocol="paper"`` gives the paper's splits:

- ``"train"``: holdout: GLUE train minus the held-out rows; paper: GLUE train.
- ``"validation"``: holdout: the held-out rows of GLUE train; paper: GLUE dev (MNLI: dev_matched
  then dev_mismatched, as the released code evaluates).
- ``"test"``: holdout: GLUE dev (MNLI: matched then mismatched); paper: GLUE test, unlabelled
  (``label == -1``, ``label_word is None``).
- MNLI only: ``"test_matched"`` / ``"test_mismatched"`` (holdout: dev_matched / dev_mismatched;
  paper: test_matched / test_mismatched) and, under "paper", ``"validation_matched"`` /
  ``"validation_mismatched"``.

The held-out rows are ``min(1000, n_train // 10)`` rows of GLUE train unless ``validation_size``
says otherwise (RTE 249, MRPC 366, CoLA 855, the others 1000), drawn by
``numpy.random.default_rng(seed).permutation``; both parts keep GLUE's row order.

GLUE's original TSV files
-------------------------
``source`` is the directory that holds the task folders of GLUE's distribution (as written by
``download_glue_data.py``), e.g. ``glue_data/`` with ``CoLA/``, ``SST-2/``, ... (the task folder
itself is accepted too). Files are UTF-8 (a byte-order mark is dropped), fields are separated by
tabs with no quoting (sentences contain quote characters), rows end in ``\n``:

- CoLA: train.tsv, dev.tsv have NO header, columns: source code, label (0/1), the original
  author's annotation ("*" or empty), sentence. test.tsv: ``index  sentence``.
- SST-2: ``sentence  label`` (0/1). test.tsv: ``index  sentence``.
- MRPC: ``Quality  #1 ID  #2 ID  #1 String  #2 String`` (label: Quality, 0/1).
  test.tsv: ``index  #1 ID  #2 ID  #1 String  #2 String``.
- QQP: ``id  qid1  qid2  question1  question2  is_duplicate`` (0/1).
  test.tsv: ``id  question1  question2``.
- MNLI: train.tsv, dev_matched.tsv, dev_mismatched.tsv with ``index  promptID  pairID  genre
  sentence1_binary_parse  sentence2_binary_parse  sentence1_parse  sentence2_parse  sentence1
  sentence2  label1 [label2 .. label5]  gold_label`` (entailment / neutral / contradiction);
  test_matched.tsv, test_mismatched.tsv: the same up to sentence2.
- QNLI: ``index  question  sentence  label`` (entailment / not_entailment).
  test.tsv: ``index  question  sentence``.
- RTE: ``index  sentence1  sentence2  label`` (entailment / not_entailment).
  test.tsv: ``index  sentence1  sentence2``.

Columns are found by header name, so extra columns and their order do not matter. Label strings map
to the label-index order of the released code (SPEC §8), which is also the hub's label ids: 0/1 ->
(unacceptable, acceptable), (negative, positive), (no, yes); entailment -> yes, neutral -> maybe,
contradiction / not_entailment -> no. MNLI rows whose gold_label is "-" (no annotator majority;
GLUE's copy has none) are skipped.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ngdref.checks import check_int
from validation.experiments.images import (
    DIGITS_NUM_TEST,
    DIGITS_NUM_VALIDATION,
    VIT_IMAGE_MEAN,
    VIT_IMAGE_STD,
    LabelledSplit,
    cifar_eval_transform,
    cifar_train_transform,
    load_cifar100,
    load_digits,
)

__all__ = [
    "CIFAR100_EPOCHS",
    "CIFAR100_EVAL_EVERY",
    "DIGITS_NUM_TEST",
    "DIGITS_NUM_VALIDATION",
    "GLUE_TASKS",
    "VIT_IMAGE_MEAN",
    "VIT_IMAGE_STD",
    "GlueExample",
    "GlueTask",
    "LabelledSplit",
    "cifar_eval_transform",
    "cifar_train_transform",
    "encode_glue",
    "get_glue_task",
    "glue_label_indices",
    "load_cifar100",
    "load_digits",
    "load_glue",
    "load_tokenizer",
    "tiny_t5_tokenizer",
]

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
        The words T5 predicts, in label-index order (SPEC §8).
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
        Text initialisation of the 20 prompt-tuning tokens (SPEC §8).
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
        """Label index of :attr:`positive_word`."""
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
        Label index into :attr:`GlueTask.label_words`; -1 for GLUE's unlabelled test rows.
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


# ---------------------------------------------------------------------------------------------
# GLUE: raw rows from the hub or from GLUE's TSV files
# ---------------------------------------------------------------------------------------------

# A "part" is one file of GLUE's distribution (train, dev, test, MNLI's dev_matched, ...);
# splits are built from parts.
_HUB_SPLIT = {
    "train": "train",
    "dev": "validation",
    "dev_matched": "validation_matched",
    "dev_mismatched": "validation_mismatched",
    "test": "test",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}

_BINARY = {"0": 0, "1": 1}
_ENTAILMENT = {"entailment": 0, "not_entailment": 1}
_MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
_COLA_COLUMNS = ("source", "label", "original_label", "sentence")
_MRPC_TEXT = ("#1 String", "#2 String")
_QQP_TEXT = ("question1", "question2")


@dataclass(frozen=True)
class _TsvLayout:
    text_columns: tuple[str, ...]  # labelled files (train, dev)
    label_column: str
    label_map: dict[str, int]
    test_text_columns: tuple[str, ...]
    headerless: tuple[str, ...] | None = None  # column names of header-less labelled files


_TSV_LAYOUTS = {
    "cola": _TsvLayout(("sentence",), "label", _BINARY, ("sentence",), _COLA_COLUMNS),
    "sst2": _TsvLayout(("sentence",), "label", _BINARY, ("sentence",)),
    "mrpc": _TsvLayout(_MRPC_TEXT, "Quality", _BINARY, _MRPC_TEXT),
    "qqp": _TsvLayout(_QQP_TEXT, "is_duplicate", _BINARY, _QQP_TEXT),
    "mnli": _TsvLayout(("sentence1", "sentence2"), "gold_label", _MNLI, ("sentence1", "sentence2")),
    "qnli": _TsvLayout(("question", "sentence"), "label", _ENTAILMENT, ("question", "sentence")),
    "rte": _TsvLayout(("sentence1", "sentence2"), "label", _ENTAILMENT, ("sentence1", "sentence2")),
}

_Row = tuple[tuple[str, ...], int, int]  # (sentences, label index or -1, row number)


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    # Binary iteration splits on b"\n" only: MNLI and QQP text contains \r, \x0b and U+2028,
    # which text-mode iteration or str.splitlines() would treat as line ends.
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if line:
                yield lineno, line.split("\t")


def _read_tsv(task: GlueTask, path: Path, part: str) -> list[_Row]:
    layout = _TSV_LAYOUTS[task.name]
    labelled = not part.startswith("test")
    lines = _tsv_lines(path)
    if labelled and layout.headerless is not None:
        header = list(layout.headerless)
    else:
        try:
            _, header = next(lines)
        except StopIteration:
            raise ValueError(f"data.source: {path} is empty") from None
    text_columns = layout.text_columns if labelled else layout.test_text_columns
    wanted = (*text_columns, layout.label_column) if labelled else text_columns
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ValueError(
            f"data.source: {path} has no column(s) {missing} (header {header}); is it GLUE's "
            f"{task.display_name} {part} file?"
        )
    positions = [header.index(c) for c in wanted]
    width = max(positions) + 1
    rows: list[_Row] = []
    for lineno, fields in lines:
        if len(fields) < width:
            raise ValueError(
                f"data.source: {path}, line {lineno} has {len(fields)} tab-separated fields, "
                f"expected at least {width}"
            )
        values = [fields[p] for p in positions]
        if labelled:
            raw_label = values.pop()
            if task.name == "mnli" and raw_label == "-":
                continue
            if raw_label not in layout.label_map:
                raise ValueError(
                    f"data.source: {path}, line {lineno} has label {raw_label!r}, expected one of "
                    f"{sorted(layout.label_map)}"
                )
            label = layout.label_map[raw_label]
        else:
            label = -1
        rows.append((tuple(values), label, len(rows)))
    if not rows:
        raise ValueError(
            f"data.source: {path} has a header but no data rows; is it a complete copy of GLUE's "
            f"{task.display_name} {part} file?"
        )
    return rows


def _tsv_task_dir(task: GlueTask, source: str | os.PathLike[str]) -> Path:
    root = Path(source)
    if (root / task.display_name).is_dir():
        return root / task.display_name
    if root.is_dir() and root.name.lower() == task.display_name.lower():
        return root
    raise FileNotFoundError(
        f"data.source: no folder {task.display_name}/ in {str(root)!r} (expected GLUE's original "
        f"distribution, e.g. glue_data/ holding CoLA/, SST-2/, ...)"
    )


def _hub_rows(task: GlueTask, part: str, hub_id: str) -> list[_Row]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "source='hub' needs the `datasets` package: pip install datasets "
            "(or ngdref[experiments])"
        ) from exc
    try:
        table = datasets.load_dataset(hub_id, task.name, split=_HUB_SPLIT[part])
    except Exception as exc:  # offline, not cached, renamed: datasets raises many types
        first = (str(exc).strip().splitlines() or [""])[0]
        raise OSError(
            f"data.source='hub': cannot load {hub_id!r} ({task.name}, {part}): "
            f"{type(exc).__name__}: {first}. Offline (HF_DATASETS_OFFLINE=1) the hub serves only "
            "its local cache: set data.source to the glue_data/ directory of GLUE's original TSV "
            "files (--set data.source=/path/to/glue_data), or allow the network once"
        ) from exc
    rows: list[_Row] = []
    for n, record in enumerate(table):
        label = int(record["label"])
        if not -1 <= label < task.num_labels:
            raise ValueError(f"data.source: hub row {n} of {task.name}/{part} has label {label}")
        texts = tuple(str(record[c]) for c in task.hub_columns)
        rows.append((texts, label, n))
    return rows


def _read_part(
    task: GlueTask, part: str, source: str | os.PathLike[str], hub_id: str
) -> list[_Row]:
    if isinstance(source, str) and source == "hub":
        return _hub_rows(task, part, hub_id)
    path = _tsv_task_dir(task, source) / f"{part}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"data.source: {str(path)!r} does not exist")
    return _read_tsv(task, path, part)


# ---------------------------------------------------------------------------------------------
# GLUE: splits
# ---------------------------------------------------------------------------------------------


def _holdout_indices(n: int, validation_size: int | None, seed: int) -> np.ndarray:
    size = min(1000, n // 10) if validation_size is None else validation_size
    if not 0 < size < n:
        raise ValueError(f"validation_size must be in [1, {n - 1}] for {n} train rows; got {size}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def _split_parts(task: GlueTask, split: str, protocol: str) -> tuple[list[str], bool]:
    """The parts a split is made of, and whether it is a held-out slice of train."""
    mnli = task.name == "mnli"
    if split == "train":
        return ["train"], protocol == "holdout"
    if protocol == "holdout":
        if split == "validation":
            return ["train"], True
        if split == "test":
            return (["dev_matched", "dev_mismatched"] if mnli else ["dev"]), False
        if mnli and split in ("test_matched", "test_mismatched"):
            return ["dev_" + split.removeprefix("test_")], False
    else:
        for stem, part in (("validation", "dev"), ("test", "test")):
            if split == stem:
                return ([f"{part}_matched", f"{part}_mismatched"] if mnli else [part]), False
            if mnli and split in (f"{stem}_matched", f"{stem}_mismatched"):
                return [part + split.removeprefix(stem)], False
    names = ["train", "validation", "test"]
    if mnli:
        names += ["test_matched", "test_mismatched"]
        if protocol == "paper":
            names += ["validation_matched", "validation_mismatched"]
    raise ValueError(
        f"split must be one of {names} for {task.display_name} with protocol={protocol!r}; "
        f"got {split!r}"
    )


def load_glue(
    task: str | GlueTask,
    split: str,
    source: str | os.PathLike[str] = "hub",
    *,
    protocol: Literal["holdout", "paper"] = "holdout",
    validation_size: int | None = None,
    seed: int = 0,
    hub_id: str = "nyu-mll/glue",
) -> list[GlueExample]:
    """Load one split of a GLUE task, formatted with the paper's template.

    Parameters
    ----------
    task : str or GlueTask
        "CoLA", "SST-2", "QQP", "MRPC", "MNLI", "QNLI" or "RTE" (see :func:`get_glue_task`).
    split : str
        "train", "validation" or "test"; for MNLI also the "_matched" / "_mismatched" variants
        listed in the module docstring.
    source : "hub" or path
        "hub": ``datasets.load_dataset(hub_id, task.name, split=...)`` (needs the network or a
        populated cache). A path: the directory holding GLUE's original TSV task folders.
    protocol : {"holdout", "paper"}
        Which rows make each split (module docstring). "holdout" tests on GLUE dev;
        "paper" validates on GLUE dev and its test split is GLUE's unlabelled test set.
    validation_size : int, optional
        Held-out train rows under "holdout"; default ``min(1000, n_train // 10)``.
    seed : int
        Seed of the held-out draw.
    hub_id : str
        Hub repository of GLUE ("nyu-mll/glue", the current home of the former "glue").

    Returns
    -------
    list of GlueExample
        In GLUE's row order.

    Raises
    ------
    ValueError
        Unknown ``task``, ``split`` or ``protocol``, a malformed file.
    FileNotFoundError
        A missing task folder or file under ``source``.
    """
    task = get_glue_task(task)
    if protocol not in ("holdout", "paper"):
        raise ValueError(f"protocol must be 'holdout' or 'paper'; got {protocol!r}")
    if not isinstance(split, str):
        raise TypeError(f"split must be a str, got {type(split).__name__}")
    parts, holdout = _split_parts(task, split, protocol)
    rows = [row for part in parts for row in _read_part(task, part, source, hub_id)]
    if holdout:
        held_out = _holdout_indices(len(rows), validation_size, seed)
        if split == "validation":
            rows = [rows[i] for i in held_out]
        else:
            keep = np.ones(len(rows), dtype=bool)
            keep[held_out] = False
            rows = [row for row, k in zip(rows, keep, strict=True) if k]
    return [
        GlueExample(
            text=task.format(*texts),
            label=label,
            label_word=task.label_words[label] if label >= 0 else None,
            idx=idx,
        )
        for texts, label, idx in rows
    ]


# ---------------------------------------------------------------------------------------------
# GLUE: tokenisation
# ---------------------------------------------------------------------------------------------


def _glue_words() -> list[str]:
    words: list[str] = []
    for task in GLUE_TASKS.values():
        words += task.label_words
        words += task.template.replace("{S1}", " ").replace("{S2}", " ").split()
        words += task.prompt_init.split()
    return words


def tiny_t5_tokenizer(words: Iterable[str] = (), *, extra_ids: int = 0) -> Any:
    """A small offline T5 tokenizer (a Unigram model over whole words and single characters).

    Its vocabulary, in T5's layout: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, ``▁``, then one
    ``▁word`` piece for every whitespace-separated word of ``words``, of the GLUE label words,
    templates and prompt initialisations (so each label word is one token, like in t5-base), then
    every printable ASCII character and every character of ``words`` both bare and ``▁``-prefixed.
    Any text therefore tokenizes: unknown words fall back to characters, characters outside the
    vocabulary to ``<unk>``. There is no normaliser (t5-base applies NFKC).

    Parameters
    ----------
    words : iterable of str
        Extra words to give one piece each.
    extra_ids : int
        Number of ``<extra_id_k>`` sentinel tokens (t5-base has 100).

    Returns
    -------
    transformers.T5Tokenizer

    Notes
    -----
    Built from ``T5Tokenizer(vocab=[(piece, score), ...])``: transformers 5 ignores
    ``vocab_file=``, and an offline ``from_pretrained`` of an uncached hub name silently returns a
    placeholder vocabulary (see :func:`load_tokenizer`).
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(
            "tiny_t5_tokenizer needs transformers >= 5 (T5Tokenizer(vocab=[(piece, score)])); "
            f"found {transformers.__version__}"
        )
    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    user_words = [w for text in words for w in str(text).split()]
    for word in [*_glue_words(), *user_words]:
        pieces.setdefault("▁" + word, -1.0)
    chars = [c for c in string.printable if not c.isspace()]
    chars += sorted({c for w in user_words for c in w} - set(chars))
    for c in chars:
        pieces.setdefault(c, -5.0)
        pieces.setdefault("▁" + c, -5.5)
    return transformers.T5Tokenizer(vocab=list(pieces.items()), extra_ids=extra_ids)


def load_tokenizer(name_or_path: str | os.PathLike[str] = "t5-base") -> Any:
    """``T5Tokenizer.from_pretrained(name_or_path)``, refusing a placeholder vocabulary.

    Parameters
    ----------
    name_or_path : str or path
        A hub name ("t5-base", needs the network or the cache) or a local directory written by
        ``save_pretrained`` (e.g. of :func:`tiny_t5_tokenizer`).

    Raises
    ------
    OSError
        If the tokenizer cannot be loaded, or if it maps a GLUE label word to ``<unk>``:
        transformers 5, offline and without a cached copy, returns a 104-token placeholder for a
        hub name instead of raising.
    """
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(str(name_or_path))
    label_words = sorted({w for t in GLUE_TASKS.values() for w in t.label_words})
    unknown = [
        w for w in label_words if tokenizer.unk_token_id in tokenizer(w)["input_ids"]
    ]
    if unknown:
        raise OSError(
            f"name_or_path: the tokenizer loaded from {str(name_or_path)!r} maps label words "
            f"{unknown} to <unk> (vocabulary of {len(tokenizer)} tokens): not a T5 vocabulary; "
            "offline, a hub name that is not in the cache gives such a placeholder"
        )
    return tokenizer


def _ensure_eos(ids: list[int], eos: int) -> list[int]:
    return ids if ids and ids[-1] == eos else [*ids, eos]


def encode_glue(
    examples: Sequence[GlueExample],
    tokenizer: Any,
    max_length: int = 100,
    *,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, torch.Tensor]:
    """Tokenise GLUE examples for T5: inputs padded/truncated, targets = label word + EOS.

    Parameters
    ----------
    examples : sequence of GlueExample
    tokenizer : transformers tokenizer
        With ``pad_token_id`` and ``eos_token_id`` (a T5 tokenizer).
    max_length : int
        Input length T_in (the paper: 100). Longer inputs are truncated by the tokenizer, which
        keeps the final EOS (the released code cuts the first 100 tokens instead).
    padding_side : {"right", "left"}
        Where input padding goes (the released code pads on the left; the training configs'
        ``model.padding_side`` default to it). For T5 with LoRA both sides give the same
        encoder outputs up to rounding: the relative position bias depends on key minus query
        position only and padded keys are masked. For prompt tuning they differ: the prompt is
        prepended before the padding, so with left padding the distance between the prompt
        and the text, hence their relative position bias, depends on the padding length.

    Returns
    -------
    dict of torch.Tensor (int64)
        ``input_ids`` and ``attention_mask`` of shape (N, max_length); ``labels`` of shape
        (N, T_label): the label word's tokens followed by EOS, padded with -100 to the longest
        target of the batch (T_label). ``labels`` is absent when every example is unlabelled.

    Raises
    ------
    ValueError
        Empty ``examples``, ``max_length < 2``, a bad ``padding_side``, or a mix of labelled and
        unlabelled examples.
    """
    if len(examples) == 0:
        raise ValueError("examples is empty")
    check_int(max_length, "max_length", minimum=2)
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left'; got {padding_side!r}")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ValueError("tokenizer must define pad_token_id and eos_token_id")
    encoded = tokenizer(
        [e.text for e in examples], truncation=True, max_length=max_length
    )["input_ids"]
    input_ids = torch.full((len(examples), max_length), pad, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), max_length), dtype=torch.int64)
    for n, ids in enumerate(encoded):
        ids = list(ids)[:max_length]
        start = 0 if padding_side == "right" else max_length - len(ids)
        where = slice(start, start + len(ids))
        input_ids[n, where] = torch.tensor(ids, dtype=torch.int64)
        attention_mask[n, where] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}

    unlabelled = [e.label_word is None for e in examples]
    if all(unlabelled):
        return batch
    if any(unlabelled):
        raise ValueError("examples mixes labelled and unlabelled (label_word None) rows")
    targets = tokenizer([e.label_word for e in examples])["input_ids"]
    targets = [_ensure_eos(list(t), eos) for t in targets]
    labels = torch.full((len(examples), max(map(len, targets))), -100, dtype=torch.int64)
    for n, ids in enumerate(targets):
        labels[n, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
    batch["labels"] = labels
    return batch
