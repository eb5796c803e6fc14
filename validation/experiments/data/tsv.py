"""GLUE's raw rows, from the Hugging Face hub or from GLUE's original TSV files.

The file layouts are described in :mod:`validation.experiments.data.glue`'s docstring.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from validation.experiments.data.tasks import GlueTask

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
    from validation.experiments.hub import before_hub_access

    before_hub_access("data.source", f"hub ({hub_id})", dataset=True)
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
