r"""Data of the paper's experiments (Wu et al. 2024, App. H;
:ref:`experiments-setups`).

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

The images and digits live in :mod:`validation.experiments.data.images` (imported here, so that
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
to the label-index order of the released code (:ref:`experiments-setups`), which is also the hub's
label ids: 0/1 -> (unacceptable, acceptable), (negative, positive), (no, yes); entailment -> yes,
neutral -> maybe, contradiction / not_entailment -> no. MNLI rows whose gold_label is "-" (no
annotator majority; GLUE's copy has none) are skipped.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from ngdref.checks import check_int
from validation.experiments.data.images import (
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
from validation.experiments.data.tasks import (
    CIFAR100_EPOCHS,
    CIFAR100_EVAL_EVERY,
    GLUE_TASKS,
    GlueExample,
    GlueTask,
    get_glue_task,
    glue_label_indices,
)
from validation.experiments.data.tsv import _read_part

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
