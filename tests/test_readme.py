"""The README's ten-line example runs as printed, and what it prints is consistent with theory."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _ten_line_example() -> str:
    text = README.read_text()
    section = text[text.index("## Ten lines") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_ten_line_example_runs_and_ngd_has_the_smallest_gamma() -> None:
    """gamma is minimised by the (damped) natural gradient (Cauchy-Schwarz; :ref:`conv-gamma`), so
    NGD's ratio to SGD must be below every other method's, and below 1."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_ten_line_example(), str(README), "exec"), {})
    rows = (line.split() for line in out.getvalue().splitlines())
    ratios = {name: float(value) for name, value in rows}
    assert set(ratios) == {"ef", "ief", "sf", "ngd"}
    assert ratios["ngd"] < 1
    assert all(ratios["ngd"] < ratios[m] for m in ("ef", "ief", "sf"))
