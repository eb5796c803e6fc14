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


def test_torch_twin_has_the_same_logits():
    """eKFAC / ieKFAC come from a torch copy of the NumPy MLP: same theta layout, same function.

    Both evaluate 3 layers of float64 products of length <= 64 on O(1) values: 1e-12 absolute
    on logits of size O(1) is ~ 10^4 u, far above their rounding, far below a wrong layout."""
    import torch

    from backends import MLPProvider, mlp_init

    sizes = (64, 32, 32, 10)
    params = mlp_init(sizes, 3, xp=np)
    x = np.random.default_rng(0).standard_normal((5, 64))
    with torch.no_grad():
        got = spectrum.torch_mlp(params, sizes)(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - MLPProvider(params, x, sizes).logits())) <= 1e-12
