"""The experiments' data layer: GLUE (TSV, hub), tokenisation, CIFAR-100, transforms, digits.

Expected values come from other routes: GLUE inputs are written out by hand from the paper's
Table 2 (not from the template strings of the code), TSV files are written here in the layouts of
GLUE's distribution, the CIFAR pickle is built in the python distribution's format with known
pixel values, resizing is compared with PIL, and digits with scikit-learn's own arrays.
"""

from __future__ import annotations

import os
import pickle
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from validation.experiments import data, images
from validation.experiments.data import (
    GLUE_TASKS,
    GlueExample,
    cifar_eval_transform,
    cifar_train_transform,
    encode_glue,
    get_glue_task,
    load_cifar100,
    load_digits,
    load_glue,
    load_tokenizer,
    tiny_t5_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# ------------------------------------------------------------------------------------------
# GLUE registry
# ------------------------------------------------------------------------------------------

# (label words in index order, epochs, eval_every), from SPEC §6 / §8, typed out again.
REGISTRY = {
    "cola": (("unacceptable", "acceptable"), 20, 100),
    "sst2": (("negative", "positive"), 20, 1000),
    "qqp": (("no", "yes"), 5, 1000),
    "mrpc": (("no", "yes"), 30, 50),
    "mnli": (("yes", "maybe", "no"), 5, 1000),
    "qnli": (("yes", "no"), 15, 1000),
    "rte": (("yes", "no"), 40, 30),
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registry_matches_spec(name: str) -> None:
    words, epochs, every = REGISTRY[name]
    task = GLUE_TASKS[name]
    assert task.label_words == words
    assert (task.epochs, task.eval_every) == (epochs, every)
    assert data.CIFAR100_EPOCHS == 5 and data.CIFAR100_EVAL_EVERY == 1000


@pytest.mark.parametrize("alias", ["SST-2", "sst2", "sst-2", "Sst_2"])
def test_task_aliases(alias: str) -> None:
    assert get_glue_task(alias) is GLUE_TASKS["sst2"]


def test_unknown_task_names_the_argument() -> None:
    with pytest.raises(ValueError, match="task must be one of"):
        get_glue_task("wnli")
    with pytest.raises(ValueError, match="task"):
        load_glue("stsb", "train", source="hub")


# ------------------------------------------------------------------------------------------
# GLUE's original TSV files, written in their distribution layouts
# ------------------------------------------------------------------------------------------

MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
    "label5\tgold_label"
)
MNLI_TEST_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2"
)


def _mnli_row(i: int, s1: str, s2: str, labels: list[str], gold: str | None) -> str:
    parse = "( ( x ) )"
    fields = [str(i), "31193", f"{i}n", "government", parse, parse, "(ROOT x)", "(ROOT x)", s1, s2]
    if gold is not None:
        fields += [*labels, gold]
    return "\t".join(fields)


def _write(path: Path, lines: list[str], *, bom: bool = False, crlf: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    end = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + end.join(lines) + end
    path.write_bytes(text.encode("utf-8"))


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    """A miniature glue_data/ in GLUE's original formats (dev rows are the ones tested)."""
    root = tmp_path / "glue_data"
    # CoLA: no header; source, label, original annotation, sentence.
    cola = [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.",
        "gj04\t1\t\tThe \"quoted\" word stays.",
    ]
    _write(root / "CoLA" / "train.tsv", cola * 4)
    _write(root / "CoLA" / "dev.tsv", cola[:2])
    _write(root / "CoLA" / "test.tsv", ["index\tsentence", "0\tBill whistled past the house."])
    # SST-2: header "sentence label".
    sst = ["sentence\tlabel", "hide new secretions from the parental units \t0", "a gem \t1"]
    _write(root / "SST-2" / "train.tsv", sst)
    _write(root / "SST-2" / "dev.tsv", sst)
    _write(root / "SST-2" / "test.tsv", ["index\tsentence", "0\tuneasy mishmash of styles"])
    # MRPC: byte-order mark and CRLF, as the MSR files have.
    mrpc_header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    mrpc = [
        mrpc_header,
        '1\t702876\t702977\tAmrozi accused his brother .\tReferring to him as "the witness" .',
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .",
    ]
    _write(root / "MRPC" / "train.tsv", mrpc, bom=True, crlf=True)
    _write(root / "MRPC" / "dev.tsv", mrpc, bom=True, crlf=True)
    _write(
        root / "MRPC" / "test.tsv",
        ["index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1\t2\tPCCW 's chief .\tCommon Stock ."],
    )
    # QQP.
    qqp = [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of math?\t0",
        "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control it?\t1",
    ]
    _write(root / "QQP" / "train.tsv", qqp)
    _write(root / "QQP" / "dev.tsv", qqp)
    _write(root / "QQP" / "test.tsv", ["id\tquestion1\tquestion2", "0\tWhy?\tWhy not?"])
    # MNLI: many columns; a "-" gold label and a vertical tab inside a sentence.
    _write(
        root / "MNLI" / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            _mnli_row(0, "Conceptually cream skimming.", "Product and geography.", ["neutral"],
                      "neutral"),
            _mnli_row(1, "you know during the season", "You lose the things.", ["entailment"],
                      "entailment"),
        ],
    )
    five = ["contradiction"] * 5
    _write(
        root / "MNLI" / "dev_matched.tsv",
        [
            MNLI_DEV_HEADER,
            _mnli_row(0, "The new rights are nice enough", "Everyone really likes", five,
                      "contradiction"),
            _mnli_row(1, "Split\x0bnot here", "Nor\u2028here", ["neutral"] * 5, "neutral"),
            _mnli_row(2, "No majority", "at all", ["neutral", "entailment"] * 2 + ["x"], "-"),
        ],
    )
    _write(
        root / "MNLI" / "dev_mismatched.tsv",
        [MNLI_DEV_HEADER, _mnli_row(0, "Your gift is appreciated.", "Hundreds of", five[:0] +
                                    ["entailment"] * 5, "entailment")],
    )
    _write(root / "MNLI" / "test_matched.tsv",
           [MNLI_TEST_HEADER, _mnli_row(0, "P m", "H m", [], None)])
    _write(root / "MNLI" / "test_mismatched.tsv",
           [MNLI_TEST_HEADER, _mnli_row(0, "P mm", "H mm", [], None)])
    # QNLI and RTE: entailment / not_entailment.
    qnli = [
        "index\tquestion\tsentence\tlabel",
        "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\t"
        "not_entailment",
        "1\tWhich missile batteries often have individual launchers?\tThe M270 MLRS.\tentailment",
    ]
    _write(root / "QNLI" / "train.tsv", qnli)
    _write(root / "QNLI" / "dev.tsv", qnli)
    _write(root / "QNLI" / "test.tsv", ["index\tquestion\tsentence", "0\tWhat?\tThat."])
    rte = [
        "index\tsentence1\tsentence2\tlabel",
        "0\tDana Reeve died of lung cancer.\tChristopher Reeve had an accident.\tnot_entailment",
        "1\tYet, we now are discovering.\tBacteria is winning the war.\tentailment",
    ]
    _write(root / "RTE" / "train.tsv", rte)
    _write(root / "RTE" / "dev.tsv", rte)
    _write(root / "RTE" / "test.tsv", ["index\tsentence1\tsentence2", "0\tA.\tB."])
    return root


# The dev rows of glue_dir formatted by hand from Table 2: (text, label index, label word).
EXPECTED_DEV = {
    "cola": [
        ("Classify if the following sentence's grammar is acceptable or unacceptable: Our friends "
         "won't buy this analysis, let alone the next one we propose.", 1, "acceptable"),
        ("Classify if the following sentence's grammar is acceptable or unacceptable: One more "
         "pseudo generalization and I'm giving up.", 0, "unacceptable"),
    ],
    "sst2": [
        ("Classify if the following sentence's sentiment is positive or negative: hide new "
         "secretions from the parental units ", 0, "negative"),
        ("Classify if the following sentence's sentiment is positive or negative: a gem ", 1,
         "positive"),
    ],
    "mrpc": [
        ("Classify if the following S1 and S2 are semantically equivalent, answer yes or no: "
         'S1: Amrozi accused his brother . S2: Referring to him as "the witness" .', 1, "yes"),
        ("Classify if the following S1 and S2 are semantically equivalent, answer yes or no: "
         "S1: Yucaipa owned Dominick 's . S2: Yucaipa bought Dominick 's .", 0, "no"),
    ],
    "qqp": [
        ("Classify if the following Q1 and Q2 are semantically equivalent, answer yes or no: "
         "Q1: How is the life of a math student? Q2: Which level of math?", 0, "no"),
        ("Classify if the following Q1 and Q2 are semantically equivalent, answer yes or no: "
         "Q1: How do I control my horny emotions? Q2: How do you control it?", 1, "yes"),
    ],
    "mnli": [
        ("Predict whether the premise entails the hypothesis, contradicts the hypothesis, or "
         "neither, answer yes, no or maybe: premise: The new rights are nice enough hypothesis: "
         "Everyone really likes", 2, "no"),
        ("Predict whether the premise entails the hypothesis, contradicts the hypothesis, or "
         "neither, answer yes, no or maybe: premise: Split\x0bnot here hypothesis: Nor\u2028here",
         1, "maybe"),
        ("Predict whether the premise entails the hypothesis, contradicts the hypothesis, or "
         "neither, answer yes, no or maybe: premise: Your gift is appreciated. hypothesis: "
         "Hundreds of", 0, "yes"),
    ],
    "qnli": [
        ("Determine whether the context sentence S contains the answer to the question Q, answer "
         "yes or no: Q: When did the third Digimon series begin? S: Unlike the two seasons before "
         "it.", 1, "no"),
        ("Determine whether the context sentence S contains the answer to the question Q, answer "
         "yes or no: Q: Which missile batteries often have individual launchers? S: The M270 "
         "MLRS.", 0, "yes"),
    ],
    "rte": [
        ("Classify if S1 entailment S2 or not, answer yes or no: S1: Dana Reeve died of lung "
         "cancer. S2: Christopher Reeve had an accident.", 1, "no"),
        ("Classify if S1 entailment S2 or not, answer yes or no: S1: Yet, we now are discovering. "
         "S2: Bacteria is winning the war.", 0, "yes"),
    ],
}


def _triples(examples: list[GlueExample]) -> list[tuple[str, int, str | None]]:
    return [(e.text, e.label, e.label_word) for e in examples]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEV))
def test_tsv_dev_is_the_holdout_test_split(glue_dir: Path, name: str) -> None:
    assert _triples(load_glue(name, "test", source=glue_dir)) == EXPECTED_DEV[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEV))
def test_tsv_dev_is_the_paper_validation_split(glue_dir: Path, name: str) -> None:
    got = load_glue(name, "validation", source=str(glue_dir), protocol="paper")
    assert _triples(got) == EXPECTED_DEV[name]


def test_task_folder_itself_is_accepted(glue_dir: Path) -> None:
    got = load_glue("RTE", "test", source=glue_dir / "RTE")
    assert _triples(got) == EXPECTED_DEV["rte"]


def test_mnli_matched_and_mismatched(glue_dir: Path) -> None:
    dev = EXPECTED_DEV["mnli"]
    assert _triples(load_glue("mnli", "test_matched", source=glue_dir)) == dev[:2]
    assert _triples(load_glue("mnli", "test_mismatched", source=glue_dir)) == dev[2:]
    paper = load_glue("mnli", "validation_mismatched", source=glue_dir, protocol="paper")
    assert _triples(paper) == dev[2:]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEV))
def test_tsv_paper_test_split_is_unlabelled(glue_dir: Path, name: str) -> None:
    split = "test_matched" if name == "mnli" else "test"
    got = load_glue(name, split, source=glue_dir, protocol="paper")
    assert len(got) == 1
    assert got[0].label == -1 and got[0].label_word is None and got[0].idx == 0
    template_head = EXPECTED_DEV[name][0][0][:40]
    assert got[0].text.startswith(template_head)


def test_tsv_train_labels(glue_dir: Path) -> None:
    train = load_glue("mnli", "train", source=glue_dir, protocol="paper")
    assert [(e.label, e.label_word) for e in train] == [(1, "maybe"), (0, "yes")]
    assert train[0].text.endswith("premise: Conceptually cream skimming. hypothesis: Product "
                                  "and geography.")


def test_holdout_partitions_train(glue_dir: Path) -> None:
    full = load_glue("cola", "train", source=glue_dir, protocol="paper")
    assert len(full) == 12
    train = load_glue("cola", "train", source=glue_dir, validation_size=3, seed=5)
    val = load_glue("cola", "validation", source=glue_dir, validation_size=3, seed=5)
    assert len(val) == 3 and len(train) == 9
    assert sorted(e.idx for e in train + val) == list(range(12))
    assert [e.idx for e in train] == sorted(e.idx for e in train)  # GLUE order kept
    again = load_glue("cola", "validation", source=glue_dir, validation_size=3, seed=5)
    assert again == val
    # The default size is min(1000, n // 10): one row of 12.
    assert len(load_glue("cola", "validation", source=glue_dir)) == 1
    with pytest.raises(ValueError, match="validation_size"):
        load_glue("cola", "validation", source=glue_dir, validation_size=12)


def test_tsv_errors_name_the_argument(glue_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="source"):
        load_glue("cola", "train", source=tmp_path / "nowhere")
    (glue_dir / "SST-2" / "train.tsv").unlink()
    with pytest.raises(FileNotFoundError, match=r"source.*train.tsv"):
        load_glue("sst2", "train", source=glue_dir)
    with pytest.raises(ValueError, match="split must be one of"):
        load_glue("sst2", "dev", source=glue_dir)
    with pytest.raises(ValueError, match="split"):
        load_glue("sst2", "test_matched", source=glue_dir)
    with pytest.raises(ValueError, match="split"):
        load_glue("mnli", "validation_matched", source=glue_dir)  # paper protocol only
    with pytest.raises(ValueError, match="protocol"):
        load_glue("sst2", "test", source=glue_dir, protocol="glue")  # type: ignore[arg-type]
    _write(glue_dir / "RTE" / "dev.tsv", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(ValueError, match=r"source.*label 'maybe'"):
        load_glue("rte", "test", source=glue_dir)
    _write(glue_dir / "RTE" / "dev.tsv", ["index\tpremise\thypothesis\tlabel", "0\ta\tb\t0"])
    with pytest.raises(ValueError, match=r"source.*no column"):
        load_glue("rte", "test", source=glue_dir)
    _write(glue_dir / "QNLI" / "dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tonly two"])
    with pytest.raises(ValueError, match=r"source.*line 2"):
        load_glue("qnli", "test", source=glue_dir)


@pytest.mark.parametrize("header_only", [True, False])
def test_tsv_without_data_rows_is_an_error_naming_the_file(
    glue_dir: Path, header_only: bool
) -> None:
    """A header-only (or empty) train file must not become an empty split with a confusing
    error later (the held-out draw used to fail with 'validation_size must be in [1, -1]')."""
    _write(glue_dir / "RTE" / "train.tsv",
           ["index\tsentence1\tsentence2\tlabel"] if header_only else [])
    match = r"data\.source: .*RTE.train\.tsv " + ("has a header but no data rows" if header_only
                                                  else "is empty")
    with pytest.raises(ValueError, match=match):
        load_glue("rte", "train", source=glue_dir)


def test_hub_failure_names_data_source_and_the_offline_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
        raise ConnectionError(f"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)")

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    with pytest.raises(OSError, match=r"data\.source='hub': cannot load 'nyu-mll/glue' \(rte, "
                       r"train\).*OfflineModeIsEnabled.*set data\.source to the glue_data/"):
        load_glue("rte", "train", source="hub")


# ------------------------------------------------------------------------------------------
# GLUE from the hub (a stand-in for the `datasets` module, and the real one on local files)
# ------------------------------------------------------------------------------------------

HUB_ROWS = {
    ("mrpc", "validation"): [
        {"sentence1": "He said .", "sentence2": "He stated .", "label": 1, "idx": 0},
        {"sentence1": "A .", "sentence2": "B .", "label": 0, "idx": 1},
    ],
    ("mnli", "validation_matched"): [
        {"premise": "P1", "hypothesis": "H1", "label": 2, "idx": 0},
    ],
    ("mnli", "validation_mismatched"): [
        {"premise": "P2", "hypothesis": "H2", "label": 1, "idx": 0},
    ],
    ("sst2", "test"): [{"sentence": "unseen", "label": -1, "idx": 0}],
}


@pytest.fixture
def fake_datasets(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
        calls.append((path, name, split))
        return list(HUB_ROWS[(name, split)])

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_rows_are_formatted(fake_datasets: list[tuple[Any, ...]]) -> None:
    got = load_glue("MRPC", "test", source="hub")
    assert fake_datasets == [("nyu-mll/glue", "mrpc", "validation")]
    assert _triples(got) == [
        ("Classify if the following S1 and S2 are semantically equivalent, answer yes or no: "
         "S1: He said . S2: He stated .", 1, "yes"),
        ("Classify if the following S1 and S2 are semantically equivalent, answer yes or no: "
         "S1: A . S2: B .", 0, "no"),
    ]
    mnli = load_glue("mnli", "validation", protocol="paper", hub_id="my/glue")
    assert fake_datasets[-2:] == [
        ("my/glue", "mnli", "validation_matched"),
        ("my/glue", "mnli", "validation_mismatched"),
    ]
    assert [(e.label, e.label_word) for e in mnli] == [(2, "no"), (1, "maybe")]
    assert mnli[1].text.endswith("answer yes, no or maybe: premise: P2 hypothesis: H2")
    test = load_glue("sst2", "test", protocol="paper")
    assert (test[0].label, test[0].label_word) == (-1, None)


def test_real_datasets_on_a_local_copy_of_the_hub_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nyu-mll/glue's layout (a README with per-task configs over data files), read locally."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    repo = tmp_path / "glue"
    (repo / "rte").mkdir(parents=True)
    rows = {
        "train": [("T1 .", "T2 .", 0), ("T3 .", "T4 .", 1), ("T5 .", "T6 .", 0)],
        "validation": [("V1 .", "V2 .", 1)],
    }
    for split, items in rows.items():
        lines = [
            f'{{"sentence1": "{a}", "sentence2": "{b}", "label": {y}, "idx": {i}}}'
            for i, (a, b, y) in enumerate(items)
        ]
        (repo / "rte" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: rte\n  data_files:\n"
        "  - split: train\n    path: rte/train.jsonl\n"
        "  - split: validation\n    path: rte/validation.jsonl\n---\n"
    )
    test = load_glue("rte", "test", source="hub", hub_id=str(repo))
    assert _triples(test) == [
        ("Classify if S1 entailment S2 or not, answer yes or no: S1: V1 . S2: V2 .", 1, "no")
    ]
    train = load_glue("rte", "train", source="hub", hub_id=str(repo), protocol="paper")
    assert [e.label_word for e in train] == ["yes", "no", "yes"]


# ------------------------------------------------------------------------------------------
# Tokenisation
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    pytest.importorskip("transformers")
    return tiny_t5_tokenizer(["Hello"])


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


def test_glue_files_encode_end_to_end(glue_dir: Path, tokenizer: Any) -> None:
    examples = load_glue("mnli", "test", source=glue_dir)
    batch = encode_glue(examples, tokenizer)
    words = [tokenizer.decode(row[row != -100], skip_special_tokens=True)
             for row in batch["labels"]]
    assert words == ["no", "maybe", "yes"]
    assert (batch["labels"][:, 1] == tokenizer.eos_token_id).all()


# ------------------------------------------------------------------------------------------
# CIFAR-100: the python pickle distribution
# ------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 40, 7
FINE_NAMES = [f"fine{k}" for k in range(100)]
COARSE_NAMES = [f"coarse{k}" for k in range(20)]


def _cifar_rows(n: int, offset: int) -> np.ndarray:
    """Row r: red plane = r + offset, green = a ramp over the 1024 pixels, blue = 255 - red."""
    rows = np.empty((n, 3072), dtype=np.uint8)
    for r in range(n):
        rows[r, :1024] = r + offset
        rows[r, 1024:2048] = np.arange(1024) % 256
        rows[r, 2048:] = 255 - (r + offset)
    return rows


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n, offset in (("train", N_TRAIN, 0), ("test", N_TEST, 100)):
        table = {
            b"filenames": [f"img_{k}.png".encode() for k in range(n)],
            b"batch_label": f"{name} batch 1 of 1".encode(),
            b"fine_labels": [(k * 7) % 100 for k in range(n)],
            b"coarse_labels": [(k * 3) % 20 for k in range(n)],
            b"data": _cifar_rows(n, offset),
        }
        with (folder / name).open("wb") as fh:
            pickle.dump(table, fh, protocol=2)
    meta = {
        b"fine_label_names": [s.encode() for s in FINE_NAMES],
        b"coarse_label_names": [s.encode() for s in COARSE_NAMES],
    }
    with (folder / "meta").open("wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return tmp_path


def test_cifar_pickle_test_split(cifar_dir: Path) -> None:
    test = load_cifar100("test", source=cifar_dir)
    assert test.inputs.shape == (N_TEST, 3, 32, 32) and test.inputs.dtype == torch.uint8
    assert test.label_names == tuple(FINE_NAMES)
    assert test.labels.tolist() == [(k * 7) % 100 for k in range(N_TEST)]
    # Channel-major rows: pixel (i, j) of channel c is data[c * 1024 + 32 i + j].
    assert (test.inputs[3, 0] == 103).all() and (test.inputs[3, 2] == 255 - 103).all()
    assert test.inputs[0, 1, 2, 5] == (2 * 32 + 5) % 256
    coarse = load_cifar100("test", source=cifar_dir / "cifar-100-python", label_set="coarse")
    assert coarse.labels.tolist() == [(k * 3) % 20 for k in range(N_TEST)]
    assert coarse.label_names == tuple(COARSE_NAMES)


def test_cifar_train_validation_split(cifar_dir: Path) -> None:
    train = load_cifar100("train", source=cifar_dir, seed=3)
    val = load_cifar100("validation", source=cifar_dir, seed=3)
    assert (len(train), len(val)) == (36, 4)  # 90 / 10
    rows = sorted(train.inputs[:, 0, 0, 0].tolist() + val.inputs[:, 0, 0, 0].tolist())
    assert rows == list(range(N_TRAIN))
    markers = train.inputs[:, 0, 0, 0]
    assert (markers[1:] > markers[:-1]).all()  # file order kept
    assert torch.equal(train.labels, (markers.long() * 7) % 100)
    other = load_cifar100("validation", source=cifar_dir, seed=4)
    assert not torch.equal(other.inputs, val.inputs)
    assert torch.equal(load_cifar100("validation", source=cifar_dir, seed=3).inputs, val.inputs)


def test_cifar_errors_name_the_argument(cifar_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_cifar100("dev", source=cifar_dir)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_set"):
        load_cifar100("test", source=cifar_dir, label_set="medium")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="source"):
        load_cifar100("test", source=tmp_path / "missing")
    (cifar_dir / "cifar-100-python" / "meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"source.*meta"):
        load_cifar100("test", source=cifar_dir)


def test_cifar_hub_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    image_module = pytest.importorskip("PIL.Image")
    pictures = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (10, 20)]
    pictures[1][0, 0] = (1, 2, 3)

    class Table(list):  # what datasets' Dataset offers: row dicts and .features
        features: ClassVar[dict[str, Any]] = {
            "fine_label": types.SimpleNamespace(names=FINE_NAMES),
            "coarse_label": types.SimpleNamespace(names=COARSE_NAMES),
        }

    def load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
        assert (path, split) == ("uoft-cs/cifar100", "test")
        return Table(
            {"img": image_module.fromarray(p), "fine_label": 5 + k, "coarse_label": k}
            for k, p in enumerate(pictures)
        )

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)
    got = load_cifar100("test")
    assert got.inputs.shape == (2, 3, 32, 32)
    assert got.inputs[1, :, 0, 0].tolist() == [1, 2, 3] and got.inputs[0, 2, 5, 5] == 10
    assert got.labels.tolist() == [5, 6]
    assert load_cifar100("test", label_set="coarse").label_names == tuple(COARSE_NAMES)


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------


def _random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_eval_transform_normalises_with_the_vit_statistics() -> None:
    images = torch.stack([torch.full((3, 32, 32), v, dtype=torch.uint8) for v in (0, 51, 255)])
    out = cifar_eval_transform(images, image_size=16)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    for k, v in enumerate((0, 51, 255)):
        torch.testing.assert_close(out[k], torch.full((3, 16, 16), (v / 255 - 0.5) / 0.5))
    same = cifar_eval_transform(images, image_size=32, mean=(0.1, 0.2, 0.3), std=(1, 2, 4))
    want = (images.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).double())
    want = want / torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(same, want.float())


@pytest.mark.parametrize("size", [64, 224, 16])
def test_eval_resize_matches_pil_bilinear(size: int) -> None:
    image_module = pytest.importorskip("PIL.Image")
    images = _random_images(2)
    out = cifar_eval_transform(images, image_size=size, mean=(0, 0, 0), std=(1, 1, 1))
    for n in range(2):
        pil = image_module.fromarray(images[n].permute(1, 2, 0).numpy())
        ref = np.asarray(pil.resize((size, size), image_module.BILINEAR), dtype=np.float64)
        got = out[n].permute(1, 2, 0).double().numpy() * 255
        # PIL rounds to uint8 with fixed-point weights: one grey level (+ float32 rounding).
        assert np.max(np.abs(got - ref)) <= 1.001


def test_eval_transform_resizes_the_shorter_side_then_centre_crops() -> None:
    image = torch.zeros((1, 3, 8, 16), dtype=torch.uint8)
    image[..., 4:12] = 255  # the central 8 columns
    out = cifar_eval_transform(image, image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, torch.ones((1, 3, 8, 8)))


def test_train_transform_shape_and_seeded_determinism() -> None:
    images = _random_images(5)
    a = cifar_train_transform(images, generator=torch.Generator().manual_seed(1), image_size=24)
    b = cifar_train_transform(images, generator=torch.Generator().manual_seed(1), image_size=24)
    c = cifar_train_transform(images, generator=torch.Generator().manual_seed(2), image_size=24)
    assert a.shape == (5, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_horizontal_flip_is_seeded_and_exact() -> None:
    images = _random_images(16)
    full = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "image_size": 32}
    plain = cifar_eval_transform(images, image_size=32)
    never = cifar_train_transform(images, generator=torch.Generator(), flip_probability=0.0, **full)
    always = cifar_train_transform(images, generator=torch.Generator(), flip_probability=1.0,
                                   **full)
    torch.testing.assert_close(never, plain)
    torch.testing.assert_close(always, plain.flip(-1))
    flips = []
    for _ in range(2):
        out = cifar_train_transform(images, generator=torch.Generator().manual_seed(7), **full)
        flipped = [torch.equal(out[n], plain[n].flip(-1)) for n in range(16)]
        kept = [torch.equal(out[n], plain[n]) for n in range(16)]
        assert all(f != k for f, k in zip(flipped, kept, strict=True))
        flips.append(flipped)
    assert flips[0] == flips[1] and 0 < sum(flips[0]) < 16


def test_random_resized_crop_boxes_follow_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = images._random_resized_crop_box(32, 32, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top <= 32 - h and 0 <= left <= 32 - w
        # Areas between 8% and 100% and aspect ratios in [3/4, 4/3], up to integer rounding.
        assert 0.08 * 1024 * 0.8 <= h * w <= 1024
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    # Impossible requests fall back to the central crop of allowed aspect.
    assert images._random_resized_crop_box(10, 40, (2.0, 2.0), (1.0, 1.0), g) == (0, 15, 10, 10)


def test_transform_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="images"):
        cifar_eval_transform(torch.zeros((3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size"):
        cifar_eval_transform(_random_images(1), image_size=0)
    with pytest.raises(ValueError, match="flip_probability"):
        cifar_train_transform(_random_images(1), generator=torch.Generator(), flip_probability=2)


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------


def test_digits_splits() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits()
    splits = {s: load_digits(s, seed=0) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1077, 360, 360]
    labels = np.concatenate([splits[s].labels.numpy() for s in splits])
    np.testing.assert_array_equal(np.sort(labels), np.sort(raw.target))
    train = splits["train"].inputs.double().numpy()
    assert splits["train"].inputs.dtype == torch.float32 and train.shape == (1077, 64)
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-6)
    std = train.std(axis=0)
    constant = std < 1e-6
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-5)
    assert 0 < constant.sum() < 10  # some border pixels are always blank


def test_digits_splits_share_one_affine_map_of_sklearn_pixels() -> None:
    """Per feature, the three splits together are s * x + m of scikit-learn's column.

    Sorting makes the pairing independent of the split's permutation; s and m come from a
    least-squares fit, and s must be the train std (1 for a pixel constant on train).
    """
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits().data
    splits = [load_digits(s, seed=11, dtype=torch.float64) for s in ("train", "validation", "test")]
    assert not torch.equal(splits[2].inputs, load_digits("test", seed=12).inputs.double())
    x = torch.cat([s.inputs for s in splits]).numpy()
    n_train = len(splits[0])
    for f in range(64):
        if np.ptp(raw[:, f]) == 0:
            continue
        xs, rs = np.sort(x[:, f]), np.sort(raw[:, f])
        design = np.stack([xs, np.ones_like(xs)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(design, rs, rcond=None)
        np.testing.assert_allclose(scale * xs + shift, rs, atol=1e-9)
        train_raw = scale * x[:n_train, f] + shift
        expected_scale = train_raw.std() if np.ptp(train_raw) > 1e-9 else 1.0
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-9)


def test_digits_image_shape_and_errors() -> None:
    images = load_digits("validation", flatten=False)
    assert images.inputs.shape == (360, 1, 8, 8)
    assert images.label_names == tuple("0123456789")
    with pytest.raises(ValueError, match="split"):
        load_digits("dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_validation"):
        load_digits("train", num_validation=1000, num_test=900)
    with pytest.raises(ValueError, match="dtype"):
        load_digits("train", dtype=torch.int64)
