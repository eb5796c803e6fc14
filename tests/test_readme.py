"""The README runs as printed: its two commands are the ones CI runs, its code blocks run and
print what theory says, and every file it points to exists."""

from __future__ import annotations

import contextlib
import io
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def _run(block: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), {})
    return out.getvalue()


def test_the_two_commands_open_the_readme_and_ci_runs_them() -> None:
    """The first block is set-up + validation and set-up + tests, and .ci/run runs both."""
    first = _blocks("bash")[0].splitlines()
    commands = [line.split("#")[0].strip() for line in first]
    assert commands == [
        "bash .ci/setup && .venv/bin/python -m validation",
        "bash .ci/setup && .venv/bin/python -m pytest -q",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/setup" in ci
    assert re.search(r"^\.venv/bin/python -m validation\b", ci, re.M)
    assert re.search(r"^\.venv/bin/python -m pytest -q\b", ci, re.M)


def test_ten_line_example_runs_and_ngd_has_the_smallest_gamma() -> None:
    """gamma is minimised by the (damped) natural gradient (Cauchy-Schwarz; :ref:`conv-gamma`), so
    NGD's ratio to SGD must be below every other method's, and below 1."""
    section = README.read_text().split("## Ten lines", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    rows = (line.split() for line in _run(block).splitlines())
    ratios = {name: float(value) for name, value in rows}
    assert set(ratios) == {"ef", "ief", "sf", "ngd"}
    assert ratios["ngd"] < 1
    assert all(ratios["ngd"] < ratios[m] for m in ("ef", "ief", "sf"))


def test_torch_example_runs_and_its_steps_lower_the_loss() -> None:
    """The optimiser block: five exact iEF steps on a batch whose labels a linear map decides.
    Each printed loss is the one before its step. The iEF direction d = G^T (G G^T + lambda I)^-1 s
    has g^T d = 1^T G G^T (G G^T + lambda I)^-1 s -> sum_n s_n > 0 as lambda -> 0: a descent
    direction, so these steps lower the loss, and a step of the wrong sign would raise it."""
    pytest.importorskip("torch")
    block = [b for b in _blocks("python") if "from backends import IEF" in b]
    assert len(block) == 1
    rows = [line.split() for line in _run(block[0]).splitlines()]
    assert [int(r[0]) for r in rows] == list(range(5))
    losses = [float(r[1]) for r in rows]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_every_file_the_readme_names_exists() -> None:
    """No pointer to a document a reader cannot open: every repository path in backquotes or in
    a link target exists (but what the documentation build writes, under docs/_build/)."""
    text = README.read_text()
    named = set(re.findall(r"`((?:docs|validation|tests|backends|ngdref)/[^`\s]*)`", text))
    named = {p for p in named if not p.startswith("docs/_build/")}
    named |= {m for m in re.findall(r"\]\(([^)]+)\)", text) if "://" not in m}
    assert named, "the README should point to its documentation"
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, missing
