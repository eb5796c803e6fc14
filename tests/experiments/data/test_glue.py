"""GLUE in the experiments' data layer: the task registry and GLUE's original TSV files.

Expected values come from other routes: GLUE inputs are written out by hand from the paper's
Table 2 (not from the template strings of the code), and the TSV files are written here in the
layouts of GLUE's distribution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.experiments.cases import (
    fixture_tokenizer,  # noqa: F401  (a fixture)
    glue_triples,
)
from validation.experiments.data import glue as data
from validation.experiments.data.glue import (
    GLUE_TASKS,
    encode_glue,
    get_glue_task,
    load_glue,
)

# ------------------------------------------------------------------------------------------
# GLUE registry
# ------------------------------------------------------------------------------------------

# (label words in index order, epochs, eval_every), from the paper's App. H and the released code
# (the experiments guide, The paper's set-ups), typed out again.
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


# A miniature glue_data/ in GLUE's original formats, file -> lines (dev rows are the ones tested).
# CoLA: no header; source, label, original annotation, sentence.
COLA = [
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
    "gj04\t0\t*\tOne more pseudo generalization and I'm giving up.",
    "gj04\t1\t\tThe \"quoted\" word stays.",
]
# SST-2: header "sentence label".
SST2 = ["sentence\tlabel", "hide new secretions from the parental units \t0", "a gem \t1"]
MRPC = [
    "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
    '1\t702876\t702977\tAmrozi accused his brother .\tReferring to him as "the witness" .',
    "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's .",
]
QQP = [
    "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
    "133273\t213221\t213222\tHow is the life of a math student?\tWhich level of math?\t0",
    "402555\t536040\t536041\tHow do I control my horny emotions?\tHow do you control it?\t1",
]
# QNLI and RTE: entailment / not_entailment.
QNLI = [
    "index\tquestion\tsentence\tlabel",
    "0\tWhen did the third Digimon series begin?\tUnlike the two seasons before it.\t"
    "not_entailment",
    "1\tWhich missile batteries often have individual launchers?\tThe M270 MLRS.\tentailment",
]
RTE = [
    "index\tsentence1\tsentence2\tlabel",
    "0\tDana Reeve died of lung cancer.\tChristopher Reeve had an accident.\tnot_entailment",
    "1\tYet, we now are discovering.\tBacteria is winning the war.\tentailment",
]
GLUE_FILES: dict[str, list[str]] = {
    "CoLA/train.tsv": COLA * 4,
    "CoLA/dev.tsv": COLA[:2],
    "CoLA/test.tsv": ["index\tsentence", "0\tBill whistled past the house."],
    "SST-2/train.tsv": SST2,
    "SST-2/dev.tsv": SST2,
    "SST-2/test.tsv": ["index\tsentence", "0\tuneasy mishmash of styles"],
    "MRPC/train.tsv": MRPC,
    "MRPC/dev.tsv": MRPC,
    "MRPC/test.tsv": [
        "index\t#1 ID\t#2 ID\t#1 String\t#2 String", "0\t1\t2\tPCCW 's chief .\tCommon Stock ."
    ],
    "QQP/train.tsv": QQP,
    "QQP/dev.tsv": QQP,
    "QQP/test.tsv": ["id\tquestion1\tquestion2", "0\tWhy?\tWhy not?"],
    # MNLI: many columns; a "-" gold label and a vertical tab inside a sentence.
    "MNLI/train.tsv": [
        MNLI_TRAIN_HEADER,
        _mnli_row(0, "Conceptually cream skimming.", "Product and geography.", ["neutral"],
                  "neutral"),
        _mnli_row(1, "you know during the season", "You lose the things.", ["entailment"],
                  "entailment"),
    ],
    "MNLI/dev_matched.tsv": [
        MNLI_DEV_HEADER,
        _mnli_row(0, "The new rights are nice enough", "Everyone really likes",
                  ["contradiction"] * 5, "contradiction"),
        _mnli_row(1, "Split\x0bnot here", "Nor\u2028here", ["neutral"] * 5, "neutral"),
        _mnli_row(2, "No majority", "at all", ["neutral", "entailment"] * 2 + ["x"], "-"),
    ],
    "MNLI/dev_mismatched.tsv": [
        MNLI_DEV_HEADER,
        _mnli_row(0, "Your gift is appreciated.", "Hundreds of", ["entailment"] * 5, "entailment"),
    ],
    "MNLI/test_matched.tsv": [MNLI_TEST_HEADER, _mnli_row(0, "P m", "H m", [], None)],
    "MNLI/test_mismatched.tsv": [MNLI_TEST_HEADER, _mnli_row(0, "P mm", "H mm", [], None)],
    "QNLI/train.tsv": QNLI,
    "QNLI/dev.tsv": QNLI,
    "QNLI/test.tsv": ["index\tquestion\tsentence", "0\tWhat?\tThat."],
    "RTE/train.tsv": RTE,
    "RTE/dev.tsv": RTE,
    "RTE/test.tsv": ["index\tsentence1\tsentence2", "0\tA.\tB."],
}
# MRPC's train and dev files: byte-order mark and CRLF, as the MSR files have.
MSR_ENCODED = {"MRPC/train.tsv", "MRPC/dev.tsv"}


def _write(path: Path, lines: list[str], *, bom: bool = False, crlf: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    end = "\r\n" if crlf else "\n"
    text = ("\ufeff" if bom else "") + end.join(lines) + end
    path.write_bytes(text.encode("utf-8"))


@pytest.fixture
def glue_dir(tmp_path: Path) -> Path:
    """The miniature glue_data/ of ``GLUE_FILES``, written under ``tmp_path``."""
    root = tmp_path / "glue_data"
    for name, lines in GLUE_FILES.items():
        _write(root / name, lines, bom=name in MSR_ENCODED, crlf=name in MSR_ENCODED)
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


@pytest.mark.parametrize("name", sorted(EXPECTED_DEV))
def test_tsv_dev_is_the_holdout_test_split(glue_dir: Path, name: str) -> None:
    assert glue_triples(load_glue(name, "test", source=glue_dir)) == EXPECTED_DEV[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEV))
def test_tsv_dev_is_the_paper_validation_split(glue_dir: Path, name: str) -> None:
    got = load_glue(name, "validation", source=str(glue_dir), protocol="paper")
    assert glue_triples(got) == EXPECTED_DEV[name]


def test_task_folder_itself_is_accepted(glue_dir: Path) -> None:
    got = load_glue("RTE", "test", source=glue_dir / "RTE")
    assert glue_triples(got) == EXPECTED_DEV["rte"]


def test_mnli_matched_and_mismatched(glue_dir: Path) -> None:
    dev = EXPECTED_DEV["mnli"]
    assert glue_triples(load_glue("mnli", "test_matched", source=glue_dir)) == dev[:2]
    assert glue_triples(load_glue("mnli", "test_mismatched", source=glue_dir)) == dev[2:]
    paper = load_glue("mnli", "validation_mismatched", source=glue_dir, protocol="paper")
    assert glue_triples(paper) == dev[2:]


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


def test_glue_files_encode_end_to_end(glue_dir: Path, tokenizer: Any) -> None:
    examples = load_glue("mnli", "test", source=glue_dir)
    batch = encode_glue(examples, tokenizer)
    words = [tokenizer.decode(row[row != -100], skip_special_tokens=True)
             for row in batch["labels"]]
    assert words == ["no", "maybe", "yes"]
    assert (batch["labels"][:, 1] == tokenizer.eos_token_id).all()
