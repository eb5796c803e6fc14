"""The user-guide page docs/guide/jax.md runs as written: its Python blocks, in order, in a fresh
interpreter (the page turns on 64-bit types in a block and trains; nothing here may leak into
other tests). The page's own asserts check its claims (the loss falls, the dtypes, the names)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("equinox")

REPO = Path(__file__).resolve().parents[3]
PAGE = REPO / "docs" / "guide" / "jax.md"


def test_the_guide_page_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5, "the page lost its examples"
    result = subprocess.run([sys.executable, "-c", "\n".join(blocks)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
