"""``python -m validation.spectrum`` at tiny scale: it runs, plots, and never overwrites a file."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("torch")  # validation.experiments' digits loader

from validation import spectrum

TINY = ["--quick", "--k", "3", "--batch", "12", "--epochs", "1"]


def test_spectrum_runs_and_plots(tmp_path, capsys):
    out = tmp_path / "spectrum.png"
    results = spectrum.main([*TINY, "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(r.checkpoint, r.method) for r in results] == [
        (c, m) for c in ("init", "epoch 1") for m in spectrum.METHODS
    ]
    for r in results:
        # eigsh returns k eigenvalues of a PSD operator, sorted here in descending order
        assert r.eigenvalues.shape == (3,) and np.all(np.diff(r.eigenvalues) <= 0)
        assert r.eigenvalues[-1] > 0 and 0.0 <= r.overlap <= 1.0 + 1e-12
        if r.method == "fisher":  # F's eigenvectors against themselves: orthonormal, 1
            assert abs(r.overlap - 1.0) <= 1e-10
    printed = capsys.readouterr().out
    assert "iEF" in printed and str(out) in printed


def test_spectrum_refuses_to_overwrite(tmp_path):
    out = tmp_path / "mine.png"
    out.write_bytes(b"user data")
    with pytest.raises(FileExistsError, match="--out"):
        spectrum.main([*TINY, "--out", str(out)])
    assert out.read_bytes() == b"user data"
    spectrum.main([*TINY, "--out", str(out), "--force"])
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_spectrum_rejects_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="--out"):
        spectrum.main([*TINY, "--out", str(tmp_path / "no" / "s.png")])
