"""CIFAR-100 in the experiments' data layer: the python pickle distribution, hub rows, transforms.

Expected values come from other routes: the CIFAR pickle is built in the python distribution's
format with known pixel values, and resizing is compared with PIL.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from tests.experiments.cases import install_fake_datasets, write_cifar100
from validation.experiments.data import images
from validation.experiments.data.glue import (
    cifar_eval_transform,
    cifar_train_transform,
    load_cifar100,
)

# ------------------------------------------------------------------------------------------
# CIFAR-100: the python pickle distribution
# ------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 40, 7
FINE_NAMES = [f"fine{k}" for k in range(100)]
COARSE_NAMES = [f"coarse{k}" for k in range(20)]


def _cifar_rows(n: int, offset: int) -> np.ndarray:
    """Row r: red plane = r + offset, green = a ramp over the 1024 pixels, blue = 255 - red."""
    rows = np.empty((n, 3072), dtype=np.uint8)
    for r in range(n):
        rows[r, :1024] = r + offset
        rows[r, 1024:2048] = np.arange(1024) % 256
        rows[r, 2048:] = 255 - (r + offset)
    return rows


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """The python distribution's folder, with file names and batch labels as CIFAR has them."""
    tables = {
        name: {
            b"filenames": [f"img_{k}.png".encode() for k in range(n)],
            b"batch_label": f"{name} batch 1 of 1".encode(),
            b"fine_labels": [(k * 7) % 100 for k in range(n)],
            b"coarse_labels": [(k * 3) % 20 for k in range(n)],
            b"data": _cifar_rows(n, offset),
        }
        for name, n, offset in (("train", N_TRAIN, 0), ("test", N_TEST, 100))
    }
    return write_cifar100(tmp_path, tables, FINE_NAMES, COARSE_NAMES)


def test_cifar_pickle_test_split(cifar_dir: Path) -> None:
    test = load_cifar100("test", source=cifar_dir)
    assert test.inputs.shape == (N_TEST, 3, 32, 32) and test.inputs.dtype == torch.uint8
    assert test.label_names == tuple(FINE_NAMES)
    assert test.labels.tolist() == [(k * 7) % 100 for k in range(N_TEST)]
    # Channel-major rows: pixel (i, j) of channel c is data[c * 1024 + 32 i + j].
    assert (test.inputs[3, 0] == 103).all() and (test.inputs[3, 2] == 255 - 103).all()
    assert test.inputs[0, 1, 2, 5] == (2 * 32 + 5) % 256
    coarse = load_cifar100("test", source=cifar_dir / "cifar-100-python", label_set="coarse")
    assert coarse.labels.tolist() == [(k * 3) % 20 for k in range(N_TEST)]
    assert coarse.label_names == tuple(COARSE_NAMES)


def test_cifar_train_validation_split(cifar_dir: Path) -> None:
    train = load_cifar100("train", source=cifar_dir, seed=3)
    val = load_cifar100("validation", source=cifar_dir, seed=3)
    assert (len(train), len(val)) == (36, 4)  # 90 / 10
    rows = sorted(train.inputs[:, 0, 0, 0].tolist() + val.inputs[:, 0, 0, 0].tolist())
    assert rows == list(range(N_TRAIN))
    markers = train.inputs[:, 0, 0, 0]
    assert (markers[1:] > markers[:-1]).all()  # file order kept
    assert torch.equal(train.labels, (markers.long() * 7) % 100)
    other = load_cifar100("validation", source=cifar_dir, seed=4)
    assert not torch.equal(other.inputs, val.inputs)
    assert torch.equal(load_cifar100("validation", source=cifar_dir, seed=3).inputs, val.inputs)


def test_cifar_errors_name_the_argument(cifar_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_cifar100("dev", source=cifar_dir)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="label_set"):
        load_cifar100("test", source=cifar_dir, label_set="medium")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="source"):
        load_cifar100("test", source=tmp_path / "missing")
    (cifar_dir / "cifar-100-python" / "meta").unlink()
    with pytest.raises(FileNotFoundError, match=r"source.*meta"):
        load_cifar100("test", source=cifar_dir)


def test_cifar_hub_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    image_module = pytest.importorskip("PIL.Image")
    pictures = [np.full((32, 32, 3), v, dtype=np.uint8) for v in (10, 20)]
    pictures[1][0, 0] = (1, 2, 3)

    class Table(list):  # what datasets' Dataset offers: row dicts and .features
        features: ClassVar[dict[str, Any]] = {
            "fine_label": types.SimpleNamespace(names=FINE_NAMES),
            "coarse_label": types.SimpleNamespace(names=COARSE_NAMES),
        }

    def load_dataset(path: str, name: str | None = None, *, split: str) -> Any:
        assert (path, split) == ("uoft-cs/cifar100", "test")
        return Table(
            {"img": image_module.fromarray(p), "fine_label": 5 + k, "coarse_label": k}
            for k, p in enumerate(pictures)
        )

    install_fake_datasets(monkeypatch, load_dataset)
    got = load_cifar100("test")
    assert got.inputs.shape == (2, 3, 32, 32)
    assert got.inputs[1, :, 0, 0].tolist() == [1, 2, 3] and got.inputs[0, 2, 5, 5] == 10
    assert got.labels.tolist() == [5, 6]
    assert load_cifar100("test", label_set="coarse").label_names == tuple(COARSE_NAMES)


# ------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------


def _random_images(n: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


def test_eval_transform_normalises_with_the_vit_statistics() -> None:
    images = torch.stack([torch.full((3, 32, 32), v, dtype=torch.uint8) for v in (0, 51, 255)])
    out = cifar_eval_transform(images, image_size=16)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    for k, v in enumerate((0, 51, 255)):
        torch.testing.assert_close(out[k], torch.full((3, 16, 16), (v / 255 - 0.5) / 0.5))
    same = cifar_eval_transform(images, image_size=32, mean=(0.1, 0.2, 0.3), std=(1, 2, 4))
    want = (images.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).double())
    want = want / torch.tensor([1.0, 2.0, 4.0]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(same, want.float())


@pytest.mark.parametrize("size", [64, 224, 16])
def test_eval_resize_matches_pil_bilinear(size: int) -> None:
    image_module = pytest.importorskip("PIL.Image")
    images = _random_images(2)
    out = cifar_eval_transform(images, image_size=size, mean=(0, 0, 0), std=(1, 1, 1))
    for n in range(2):
        pil = image_module.fromarray(images[n].permute(1, 2, 0).numpy())
        ref = np.asarray(pil.resize((size, size), image_module.BILINEAR), dtype=np.float64)
        got = out[n].permute(1, 2, 0).double().numpy() * 255
        # PIL rounds to uint8 with fixed-point weights: one grey level (+ float32 rounding).
        assert np.max(np.abs(got - ref)) <= 1.001


def test_eval_transform_resizes_the_shorter_side_then_centre_crops() -> None:
    image = torch.zeros((1, 3, 8, 16), dtype=torch.uint8)
    image[..., 4:12] = 255  # the central 8 columns
    out = cifar_eval_transform(image, image_size=8, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, torch.ones((1, 3, 8, 8)))


def test_train_transform_shape_and_seeded_determinism() -> None:
    images = _random_images(5)
    a = cifar_train_transform(images, generator=torch.Generator().manual_seed(1), image_size=24)
    b = cifar_train_transform(images, generator=torch.Generator().manual_seed(1), image_size=24)
    c = cifar_train_transform(images, generator=torch.Generator().manual_seed(2), image_size=24)
    assert a.shape == (5, 3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_horizontal_flip_is_seeded_and_exact() -> None:
    images = _random_images(16)
    full = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "image_size": 32}
    plain = cifar_eval_transform(images, image_size=32)
    never = cifar_train_transform(images, generator=torch.Generator(), flip_probability=0.0, **full)
    always = cifar_train_transform(images, generator=torch.Generator(), flip_probability=1.0,
                                   **full)
    torch.testing.assert_close(never, plain)
    torch.testing.assert_close(always, plain.flip(-1))
    flips = []
    for _ in range(2):
        out = cifar_train_transform(images, generator=torch.Generator().manual_seed(7), **full)
        flipped = [torch.equal(out[n], plain[n].flip(-1)) for n in range(16)]
        kept = [torch.equal(out[n], plain[n]) for n in range(16)]
        assert all(f != k for f, k in zip(flipped, kept, strict=True))
        flips.append(flipped)
    assert flips[0] == flips[1] and 0 < sum(flips[0]) < 16


def test_random_resized_crop_boxes_follow_torchvision() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = images._random_resized_crop_box(32, 32, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top <= 32 - h and 0 <= left <= 32 - w
        # Areas between 8% and 100% and aspect ratios in [3/4, 4/3], up to integer rounding.
        assert 0.08 * 1024 * 0.8 <= h * w <= 1024
        assert 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    # Impossible requests fall back to the central crop of allowed aspect.
    assert images._random_resized_crop_box(10, 40, (2.0, 2.0), (1.0, 1.0), g) == (0, 15, 10, 10)


def test_transform_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="images"):
        cifar_eval_transform(torch.zeros((3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="image_size"):
        cifar_eval_transform(_random_images(1), image_size=0)
    with pytest.raises(ValueError, match="flip_probability"):
        cifar_train_transform(_random_images(1), generator=torch.Generator(), flip_probability=2)
