"""GLUE from the hub: a stand-in for the ``datasets`` module, and the real one on local files.

Expected values are written out by hand from the paper's Table 2 templates, applied to the
stand-in's rows (nyu-mll/glue's fields and label indices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.experiments.cases import glue_triples, install_fake_datasets
from validation.experiments.data.glue import load_glue


def test_hub_failure_names_data_source_and_the_offline_choice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
        raise ConnectionError(f"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)")

    install_fake_datasets(monkeypatch, load_dataset)
    with pytest.raises(OSError, match=r"data\.source='hub': cannot load 'nyu-mll/glue' \(rte, "
                       r"train\).*OfflineModeIsEnabled.*set data\.source to the glue_data/"):
        load_glue("rte", "train", source="hub")


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

    install_fake_datasets(monkeypatch, load_dataset)
    return calls


def test_hub_rows_are_formatted(fake_datasets: list[tuple[Any, ...]]) -> None:
    got = load_glue("MRPC", "test", source="hub")
    assert fake_datasets == [("nyu-mll/glue", "mrpc", "validation")]
    assert glue_triples(got) == [
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
    assert glue_triples(test) == [
        ("Classify if S1 entailment S2 or not, answer yes or no: S1: V1 . S2: V2 .", 1, "no")
    ]
    train = load_glue("rte", "train", source="hub", hub_id=str(repo), protocol="paper")
    assert [e.label_word for e in train] == ["yes", "no", "yes"]
