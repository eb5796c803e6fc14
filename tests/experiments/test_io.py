"""The experiments' one home for run files: atomic writes and the JSON Lines reader."""

from __future__ import annotations

import json
import math

import pytest

from validation.experiments import io


def test_atomic_write_json_round_trips_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    obj = {"a": [1, 2.5], "b": math.inf}
    io.atomic_write_json(path, obj)
    assert json.loads(path.read_text(encoding="utf-8")) == obj
    assert path.read_text(encoding="utf-8").endswith("\n")
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "config.json"
    io.atomic_write_text(path, "old\n")

    def broken(fh):
        fh.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        io.atomic_write(path, broken, mode="w")
    assert path.read_text(encoding="utf-8") == "old\n"


def test_read_jsonl_skips_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n  \n{"step": 2}\n', encoding="utf-8")
    assert io.read_jsonl(path) == [{"step": 1}, {"step": 2}]


@pytest.mark.parametrize(
    ("bad_line", "detail_is_none", "words"),
    [('{"step": 2', False, "not a JSON record"), ("[1, 2]", True, "expected a JSON object")],
)
def test_read_jsonl_names_file_and_line_of_damage(tmp_path, bad_line, detail_is_none, words):
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n\n{bad_line}\n', encoding="utf-8")
    with pytest.raises(io.JsonlError, match=f"{path}:3: {words}") as info:
        io.read_jsonl(path)
    assert isinstance(info.value, ValueError)
    assert info.value.lineno == 3 and info.value.path == path
    assert (info.value.detail is None) == detail_is_none


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        io.read_jsonl(tmp_path / "absent.jsonl")


def test_checkpoint_writer_writes_on_the_writing_rank_only(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from validation.experiments.train import checkpoints

    path = tmp_path / "x.json"
    monkeypatch.setattr(checkpoints.dist_launch, "is_writer", lambda: False)
    checkpoints.atomic_write(path, lambda fh: fh.write("x"), mode="w")
    assert not path.exists()
    monkeypatch.setattr(checkpoints.dist_launch, "is_writer", lambda: True)
    checkpoints.atomic_write(path, lambda fh: fh.write("x"), mode="w")
    assert path.read_text(encoding="utf-8") == "x"
