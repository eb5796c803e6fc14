"""Shared fixtures and builders of the experiment tests (runner, setups, checkpoints, data).

Data files are written here in the loaders' real formats: an SST-2 folder of GLUE's layout
(``glue_data/SST-2/{train,dev}.tsv``: a header, sentence TAB label) and CIFAR-100's python
distribution (``cifar-100-python/{train,test,meta}``: pickled dicts with byte keys). The tiny
models' overrides make a few full-batch steps of every setup cheap on a CPU.

A fixture ``x`` is defined as ``fixture_x`` (pytest's ``name=`` convention): a test module imports
``fixture_x`` (pytest finds it there) and its tests take ``x`` as an argument without shadowing
the imported name.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from validation.experiments.data.glue import GlueExample


def require_hf_stack() -> ModuleType:
    """Skip the calling test module unless torch, transformers and peft import; return torch.

    Call at module level, before importing ``validation.experiments`` modules that need them.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    return torch


# ---- data files in the loaders' formats -------------------------------------------------------
POSITIVE = ["a great film", "wonderful acting", "i loved it", "superb story", "fine fun"]
NEGATIVE = ["a dull film", "awful acting", "i hated it", "boring story", "bad mess"]


def _sst2_rows(n: int, rng: np.random.Generator) -> str:
    lines = ["sentence\tlabel"]
    for k in range(n):
        label = k % 2
        lines.append(f"{(POSITIVE if label else NEGATIVE)[rng.integers(5)]}\t{label}")
    return "\n".join(lines) + "\n"


def write_sst2(root: Path) -> Path:
    """root/SST-2/{train,dev}.tsv in GLUE's layout (a header, sentence TAB label): 40, 12 rows."""
    (root / "SST-2").mkdir()
    rng = np.random.default_rng(0)
    (root / "SST-2" / "train.tsv").write_text(_sst2_rows(40, rng))
    (root / "SST-2" / "dev.tsv").write_text(_sst2_rows(12, rng))
    return root


def write_cifar100(
    root: Path,
    tables: dict[str, dict[bytes, Any]],
    fine_names: list[str],
    coarse_names: list[str],
) -> Path:
    """root/cifar-100-python/{<split>..., meta}: pickled dicts with byte keys, as distributed.

    ``tables`` maps a split's file name ("train", "test") to its dict (``b"data"``: (N, 3072)
    uint8 rows, channel-major; ``b"fine_labels"``, ``b"coarse_labels"``: lists of N ints).
    """
    folder = root / "cifar-100-python"
    folder.mkdir()
    for name, table in tables.items():
        with (folder / name).open("wb") as fh:
            pickle.dump(table, fh, protocol=2)
    meta = {
        b"fine_label_names": [s.encode() for s in fine_names],
        b"coarse_label_names": [s.encode() for s in coarse_names],
    }
    with (folder / "meta").open("wb") as fh:
        pickle.dump(meta, fh, protocol=2)
    return root


@pytest.fixture(scope="module", name="dirs")
def fixture_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny runs' data sources: ``glue`` (SST-2 only) and ``cifar`` (random pixels, labels)."""
    glue = write_sst2(tmp_path_factory.mktemp("glue_data"))
    rng = np.random.default_rng(1)
    tables = {}
    for name, n in (("train", 40), ("test", 12)):
        fine = rng.integers(0, 100, n)
        tables[name] = {
            b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
        }
    fine_names = [f"fine{k}" for k in range(100)]
    coarse_names = [f"coarse{k}" for k in range(20)]
    cifar = write_cifar100(tmp_path_factory.mktemp("cifar"), tables, fine_names, coarse_names)
    return {"glue": glue, "cifar": cifar}


@pytest.fixture(scope="module", name="tokenizer")
def fixture_tokenizer() -> Any:
    """The offline tiny T5 tokenizer (GLUE label words and templates as whole-word pieces)."""
    pytest.importorskip("transformers")
    from validation.experiments.data.glue import tiny_t5_tokenizer

    return tiny_t5_tokenizer(["Hello"])


# ---- the data layer's stand-ins and views -----------------------------------------------------
def install_fake_datasets(
    monkeypatch: pytest.MonkeyPatch, load_dataset: Callable[..., Any]
) -> None:
    """Make ``import datasets`` give a module whose only function is ``load_dataset``.

    The stand-in is undone with ``monkeypatch``; ``load_dataset(path, name=None, *, split)``
    returns what the loaders iterate over (row dicts), or raises like the hub does offline.
    """
    module = ModuleType("datasets")
    module.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def glue_triples(examples: list[GlueExample]) -> list[tuple[str, int, str | None]]:
    """(formatted text, label index, label word) of each GLUE example, for comparisons."""
    return [(e.text, e.label, e.label_word) for e in examples]


# ---- tiny runs ------------------------------------------------------------------------------
def tiny_overrides(setup: str, dirs: dict[str, Path]) -> list[str]:
    """A few full-batch steps of a tiny model (the same rows every step: the loss must fall)."""
    common = ["train.batch_size=8", "train.eval_batch_size=16", "data.max_eval_samples=8"]
    if setup.startswith("t5"):
        return [*common, "model.name=tiny", "model.max_length=24",
                f"data.source={dirs['glue']}", "data.max_train_samples=8"]
    if setup == "vit-lora":
        return [*common, "model.name=tiny", f"data.source={dirs['cifar']}",
                "data.max_train_samples=8", "data.augment=false"]
    return [*common, "model.hidden_sizes=[16]", "data.max_train_samples=8"]


def train_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's logged training steps (metrics.jsonl records of kind 'train')."""
    from validation.experiments.train.runner import read_metrics

    return read_metrics(run_dir, "train")


#: what a resumed run may log differently from a whole one: the wall clock, and the rows'
#: certificate (the default ``certify="first"`` certifies the first step of each process, so a
#: resumed run certifies its first resumed step again; its wall time differs anyway)
UNREPEATABLE = ("time", "certificate")


def without_time(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records without :data:`UNREPEATABLE` fields (equal for a resumed and a whole run)."""
    return [{k: v for k, v in r.items() if k not in UNREPEATABLE} for r in records]


def certified_steps(records: list[dict[str, Any]]) -> list[int]:
    """The steps of the train records that carry a certificate."""
    return [r["step"] for r in records if r["kind"] == "train" and r.get("certificate")]
