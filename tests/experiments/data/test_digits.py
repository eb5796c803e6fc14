"""scikit-learn's digits in the experiments' data layer: splits and standardisation.

Expected values come from scikit-learn's own arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from validation.experiments.data.glue import load_digits


def test_digits_splits() -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits()
    splits = {s: load_digits(s, seed=0) for s in ("train", "validation", "test")}
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [1077, 360, 360]
    labels = np.concatenate([splits[s].labels.numpy() for s in splits])
    np.testing.assert_array_equal(np.sort(labels), np.sort(raw.target))
    train = splits["train"].inputs.double().numpy()
    assert splits["train"].inputs.dtype == torch.float32 and train.shape == (1077, 64)
    np.testing.assert_allclose(train.mean(axis=0), 0.0, atol=1e-6)
    std = train.std(axis=0)
    constant = std < 1e-6
    np.testing.assert_allclose(std[~constant], 1.0, rtol=1e-5)
    assert 0 < constant.sum() < 10  # some border pixels are always blank


def test_digits_splits_share_one_affine_map_of_sklearn_pixels() -> None:
    """Per feature, the three splits together are s * x + m of scikit-learn's column.

    Sorting makes the pairing independent of the split's permutation; s and m come from a
    least-squares fit, and s must be the train std (1 for a pixel constant on train).
    """
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    raw = sklearn_datasets.load_digits().data
    splits = [load_digits(s, seed=11, dtype=torch.float64) for s in ("train", "validation", "test")]
    assert not torch.equal(splits[2].inputs, load_digits("test", seed=12).inputs.double())
    x = torch.cat([s.inputs for s in splits]).numpy()
    n_train = len(splits[0])
    for f in range(64):
        if np.ptp(raw[:, f]) == 0:
            continue
        xs, rs = np.sort(x[:, f]), np.sort(raw[:, f])
        design = np.stack([xs, np.ones_like(xs)], axis=1)
        (scale, shift), *_ = np.linalg.lstsq(design, rs, rcond=None)
        np.testing.assert_allclose(scale * xs + shift, rs, atol=1e-9)
        train_raw = scale * x[:n_train, f] + shift
        expected_scale = train_raw.std() if np.ptp(train_raw) > 1e-9 else 1.0
        np.testing.assert_allclose(scale, expected_scale, rtol=1e-9)


def test_digits_image_shape_and_errors() -> None:
    images = load_digits("validation", flatten=False)
    assert images.inputs.shape == (360, 1, 8, 8)
    assert images.label_names == tuple("0123456789")
    with pytest.raises(ValueError, match="split"):
        load_digits("dev")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_validation"):
        load_digits("train", num_validation=1000, num_test=900)
    with pytest.raises(ValueError, match="dtype"):
        load_digits("train", dtype=torch.int64)
