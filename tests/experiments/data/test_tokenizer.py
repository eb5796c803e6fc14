"""The experiments' tokenisation: the tiny offline T5 tokenizer and GLUE's encoding.

Expected token ids are written out here piece by piece from the tokenizer's documented layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.experiments.cases import fixture_tokenizer  # noqa: F401  (a fixture)
from validation.experiments.data.glue import (
    GLUE_TASKS,
    GlueExample,
    encode_glue,
    load_tokenizer,
)


def test_tiny_tokenizer_layout_and_label_words(tokenizer: Any) -> None:
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    for task in GLUE_TASKS.values():
        for word in task.label_words:
            ids = tokenizer(word)["input_ids"]
            assert tokenizer.convert_ids_to_tokens(ids) == ["▁" + word, "</s>"]


@pytest.mark.parametrize(
    "text", ["Hello, world! 3+4=7 (ok)?", "Q1: How's it? Q2: #1 String ~`|", "yes no maybe"]
)
def test_tiny_tokenizer_round_trip(tokenizer: Any, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_tokenizer_unknown_character(tokenizer: Any) -> None:
    ids = tokenizer("naïve")["input_ids"]
    assert tokenizer.unk_token_id in ids and ids[-1] == tokenizer.eos_token_id


def test_load_tokenizer_from_a_local_directory(tokenizer: Any, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = "Classify if S1 entailment S2 or not, answer yes or no: S1: a S2: b"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_load_tokenizer_refuses_a_placeholder_vocabulary(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # What transformers 5 returns, offline, for an uncached hub name: the minimal default.
    transformers.T5Tokenizer().save_pretrained(tmp_path / "placeholder")
    with pytest.raises(OSError, match="name_or_path"):
        load_tokenizer(tmp_path / "placeholder")


def _example(text: str, word: str | None) -> GlueExample:
    return GlueExample(text=text, label=0 if word else -1, label_word=word, idx=0)


def test_encode_glue_shapes_padding_and_eos(tokenizer: Any) -> None:
    # "zebra" is no piece of the vocabulary: five character pieces, so targets differ in length.
    examples = [_example("yes or no: a b", "yes"), _example("c", "zebra")]
    batch = encode_glue(examples, tokenizer, max_length=12)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 12) and batch["attention_mask"].shape == (2, 12)
    assert all(v.dtype == torch.int64 for v in batch.values())
    ids = tokenizer.convert_tokens_to_ids
    expected_labels = [
        [ids("▁yes"), 1, -100, -100, -100, -100],
        [ids("▁z"), ids("e"), ids("b"), ids("r"), ids("a"), 1],
    ]
    assert batch["labels"].tolist() == expected_labels
    first = [*ids(["▁yes", "▁or", "▁no:", "▁a", "▁b"]), 1]
    assert batch["input_ids"][0].tolist() == first + [0] * 6
    assert batch["attention_mask"][0].tolist() == [1] * 6 + [0] * 6
    assert batch["input_ids"][1].tolist() == [ids("▁c"), 1] + [0] * 10


def test_encode_glue_truncates_to_max_length_and_keeps_eos(tokenizer: Any) -> None:
    batch = encode_glue([_example("a " * 300, "no")], tokenizer)
    assert batch["input_ids"].shape == (1, 100)
    assert batch["attention_mask"].sum() == 100
    assert batch["input_ids"][0, -1] == tokenizer.eos_token_id
    assert batch["labels"].tolist() == [[tokenizer.convert_tokens_to_ids("▁no"), 1]]


def test_encode_glue_left_padding(tokenizer: Any) -> None:
    right = encode_glue([_example("a b", "no")], tokenizer, max_length=6)
    left = encode_glue([_example("a b", "no")], tokenizer, max_length=6, padding_side="left")
    assert left["input_ids"].tolist() == [[0, 0, 0, *right["input_ids"][0, :3].tolist()]]
    assert left["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1]]


def test_encode_glue_unlabelled_and_errors(tokenizer: Any) -> None:
    batch = encode_glue([_example("a", None)], tokenizer, max_length=4)
    assert set(batch) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="examples"):
        encode_glue([_example("a", None), _example("b", "yes")], tokenizer)
    with pytest.raises(ValueError, match="examples"):
        encode_glue([], tokenizer)
    with pytest.raises(ValueError, match="max_length"):
        encode_glue([_example("a", "yes")], tokenizer, max_length=1)
    with pytest.raises(ValueError, match="padding_side"):
        encode_glue([_example("a", "yes")], tokenizer, padding_side="middle")  # type: ignore
