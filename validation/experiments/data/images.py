"""Images of the paper's experiments: CIFAR-100 for ViT (App. H;
:ref:`experiments-setups`) and scikit-learn's
digits for CPU reproductions.

:func:`load_cifar100` reads the python pickle distribution (``cifar-100-python``) or the hub
copy; :func:`cifar_train_transform` and :func:`cifar_eval_transform` are torchvision's pipelines
re-implemented in torch (seeded by a ``torch.Generator``, so a resumed run draws the same
crops); :func:`load_digits` splits ``sklearn.datasets.load_digits``. The GLUE side is
:mod:`validation.experiments.data.glue`, which re-exports these names.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ngdref.checks import check_int

__all__ = [
    "DIGITS_NUM_TEST",
    "DIGITS_NUM_VALIDATION",
    "VIT_IMAGE_MEAN",
    "VIT_IMAGE_STD",
    "LabelledSplit",
    "cifar_eval_transform",
    "cifar_train_transform",
    "load_cifar100",
    "load_digits",
]


# ---------------------------------------------------------------------------------------------
# CIFAR-100
# ---------------------------------------------------------------------------------------------

#: Normalisation of google/vit-base-patch16-224's image processor (``preprocessor_config.json``:
#: ``image_mean = image_std = [0.5, 0.5, 0.5]``, transformers' IMAGENET_STANDARD_MEAN/STD), which
#: the released code passes to torchvision's Normalize. Not the (0.485, 0.456, 0.406) /
#: (0.229, 0.224, 0.225) "ImageNet default" statistics.
VIT_IMAGE_MEAN = (0.5, 0.5, 0.5)
VIT_IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class LabelledSplit:
    """Inputs and class labels of one split.

    Attributes
    ----------
    inputs : torch.Tensor
        CIFAR: uint8 images of shape (N, 3, 32, 32) (channels R, G, B). Digits: standardised
        float features of shape (N, 64) or (N, 1, 8, 8).
    labels : torch.Tensor
        int64, shape (N,).
    label_names : tuple of str
        Class names in label order.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _unpickle(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"data.source: {str(path)!r} does not exist")
    with path.open("rb") as fh:
        # The files were written by Python 2's cPickle: keys are byte strings.
        raw = pickle.load(fh, encoding="bytes")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_dir(source: str | os.PathLike[str]) -> Path:
    root = Path(source)
    if (root / "cifar-100-python").is_dir():
        return root / "cifar-100-python"
    if root.is_dir():
        return root
    raise FileNotFoundError(f"data.source: {str(root)!r} is not a directory")


def _cifar_pickle(
    split_file: str, label_set: str, source: str | os.PathLike[str]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    folder = _cifar_dir(source)
    data = _unpickle(folder / split_file)
    meta = _unpickle(folder / "meta")
    key = f"{label_set}_labels"
    for path, table, wanted in (
        (folder / split_file, data, ("data", key)),
        (folder / "meta", meta, (f"{label_set}_label_names",)),
    ):
        missing = [k for k in wanted if k not in table]
        if missing:
            raise ValueError(f"data.source: {path} has no key(s) {missing}")
    pixels = np.asarray(data["data"], dtype=np.uint8)
    if pixels.ndim != 2 or pixels.shape[1] != 3 * 32 * 32:
        raise ValueError(f"data.source: {folder / split_file} data has shape {pixels.shape}, "
                         "expected (N, 3072)")
    images = pixels.reshape(-1, 3, 32, 32)  # channel-major rows: 1024 R, then G, then B
    labels = np.asarray(data[key], dtype=np.int64)
    names = tuple(
        n.decode("utf-8") if isinstance(n, bytes) else str(n)
        for n in meta[f"{label_set}_label_names"]
    )
    return images, labels, names


def _cifar_hub(
    split: str, label_set: str, hub_id: str
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "source='hub' needs the `datasets` package: pip install datasets"
        ) from exc
    from validation.experiments.hub import before_hub_access

    before_hub_access("data.source", f"hub ({hub_id})", dataset=True)
    table = datasets.load_dataset(hub_id, split=split)
    column = f"{label_set}_label"
    images, labels = [], []
    for record in table:
        img = record["img"]
        if hasattr(img, "convert"):  # a PIL image
            img = img.convert("RGB")
        array = np.asarray(img, dtype=np.uint8)
        images.append(array.transpose(2, 0, 1))
        labels.append(int(record[column]))
    names = tuple(table.features[column].names)
    return np.stack(images), np.asarray(labels, dtype=np.int64), names


def load_cifar100(
    split: Literal["train", "validation", "test"],
    source: str | os.PathLike[str] = "hub",
    *,
    label_set: Literal["fine", "coarse"] = "fine",
    validation_fraction: float = 0.1,
    seed: int = 0,
    hub_id: str = "uoft-cs/cifar100",
) -> LabelledSplit:
    """Load CIFAR-100 with the released code's 90/10 train/validation split.

    Parameters
    ----------
    split : {"train", "validation", "test"}
        "train" and "validation" partition CIFAR's 50,000 training images (45,000 / 5,000 by
        default); "test" is CIFAR's 10,000 test images.
    source : "hub" or path
        A path: the ``cifar-100-python`` directory of the python distribution (or its parent),
        with pickles ``train``, ``test`` and ``meta`` (keys b"data" (N, 3072) uint8 rows of
        1024 red, 1024 green, 1024 blue values, b"fine_labels", b"coarse_labels";
        b"fine_label_names", b"coarse_label_names"). "hub": ``datasets.load_dataset(hub_id)``
        with columns "img", "fine_label", "coarse_label".
    label_set : {"fine", "coarse"}
        "fine": the 100 classes (the paper). "coarse": the 20 superclasses the released code
        trains on.
    validation_fraction : float
        Share of the training images held out, rounded to a whole number of images.
    seed : int
        Seed of the held-out draw (``numpy.random.default_rng(seed).permutation``); both parts
        keep the file order.

    Returns
    -------
    LabelledSplit
        uint8 images (N, 3, 32, 32), int64 labels (N,), class names.
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test'; got {split!r}")
    if label_set not in ("fine", "coarse"):
        raise ValueError(f"label_set must be 'fine' or 'coarse'; got {label_set!r}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1); got {validation_fraction}")
    source_split = "test" if split == "test" else "train"
    if isinstance(source, str) and source == "hub":
        images, labels, names = _cifar_hub(source_split, label_set, hub_id)
    else:
        images, labels, names = _cifar_pickle(source_split, label_set, source)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"data.source: {images.shape[0]} images but {labels.shape[0]} labels")
    if split != "test":
        n = labels.shape[0]
        n_val = round(validation_fraction * n)
        if not 0 < n_val < n:
            raise ValueError(f"validation_fraction {validation_fraction} leaves an empty split "
                             f"of {n} images")
        held_out = np.zeros(n, dtype=bool)
        held_out[np.random.default_rng(seed).permutation(n)[:n_val]] = True
        rows = held_out if split == "validation" else ~held_out
        images, labels = images[rows], labels[rows]
    return LabelledSplit(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), names
    )


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor of shape (N, 3, H, W); got {shape}")
    if images.dtype == torch.uint8:
        return images.to(torch.float32) / 255.0
    if images.is_floating_point():
        return images.to(torch.float32)
    raise ValueError(f"images must be uint8 (0..255) or float (0..1); got {images.dtype}")


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def _resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    # Bilinear with antialiasing: torchvision's tensor Resize (and PIL's) low-pass filter
    # when shrinking; enlarging a 32x32 image is plain bilinear.
    return torch.nn.functional.interpolate(
        x, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _randint(generator: torch.Generator, high: int) -> int:
    return int(torch.randint(0, high, (), generator=generator))


def _random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, crop height, crop width)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return _randint(generator, height - h + 1), _randint(generator, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def cifar_train_transform(
    images: torch.Tensor,
    *,
    generator: torch.Generator,
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_probability: float = 0.5,
    mean: Sequence[float] = VIT_IMAGE_MEAN,
    std: Sequence[float] = VIT_IMAGE_STD,
) -> torch.Tensor:
    """RandomResizedCrop(image_size) + RandomHorizontalFlip + Normalize, per image, in torch.

    The crop box follows torchvision's algorithm (10 draws of area share in ``scale`` and
    log-uniform aspect ratio in ``ratio``, then a central fallback); the crop is resized
    bilinearly with antialiasing. All randomness comes from ``generator``.

    Parameters
    ----------
    images : torch.Tensor, shape (N, 3, H, W)
        uint8 in 0..255 or float in [0, 1].
    generator : torch.Generator
    image_size : int
        Output side S (224 for ViT-B/16; tests use small sizes).
    mean, std : sequence of 3 floats
        Per-channel normalisation (default: the ViT processor's 0.5 / 0.5, see
        :data:`VIT_IMAGE_MEAN`).

    Returns
    -------
    torch.Tensor, float32, shape (N, 3, S, S)
        ``(pixel / 255 - mean) / std``.
    """
    x = _check_images(images)
    check_int(image_size, "image_size")
    if not 0.0 <= flip_probability <= 1.0:
        raise ValueError(f"flip_probability must be in [0, 1]; got {flip_probability}")
    height, width = x.shape[-2:]
    out = []
    for image in x:
        top, left, h, w = _random_resized_crop_box(height, width, scale, ratio, generator)
        crop = _resize(image[None, :, top : top + h, left : left + w], image_size, image_size)
        if _uniform(generator, 0.0, 1.0) < flip_probability:
            crop = crop.flip(-1)
        out.append(crop)
    return _normalise(torch.cat(out), mean, std)


def cifar_eval_transform(
    images: torch.Tensor,
    *,
    image_size: int = 224,
    mean: Sequence[float] = VIT_IMAGE_MEAN,
    std: Sequence[float] = VIT_IMAGE_STD,
) -> torch.Tensor:
    """Resize(image_size) (shorter side) + CenterCrop(image_size) + Normalize, in torch.

    Parameters
    ----------
    images : torch.Tensor, shape (N, 3, H, W)
        uint8 in 0..255 or float in [0, 1].
    image_size : int
    mean, std : sequence of 3 floats

    Returns
    -------
    torch.Tensor, float32, shape (N, 3, S, S)
    """
    x = _check_images(images)
    check_int(image_size, "image_size")
    height, width = x.shape[-2:]
    if height <= width:
        new_h, new_w = image_size, int(image_size * width / height)
    else:
        new_h, new_w = int(image_size * height / width), image_size
    x = _resize(x, new_h, new_w)
    top = round((new_h - image_size) / 2)
    left = round((new_w - image_size) / 2)
    x = x[..., top : top + image_size, left : left + image_size]
    return _normalise(x, mean, std)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------

#: Sizes of the digits splits: 1,797 images = 1,077 train + 360 validation + 360 test.
DIGITS_NUM_VALIDATION = 360
DIGITS_NUM_TEST = 360


def load_digits(
    split: Literal["train", "validation", "test"],
    *,
    seed: int = 0,
    num_validation: int = DIGITS_NUM_VALIDATION,
    num_test: int = DIGITS_NUM_TEST,
    flatten: bool = True,
    dtype: torch.dtype = torch.float32,
) -> LabelledSplit:
    """scikit-learn's 8x8 digits (1,797 images, 10 classes), standardised, in a seeded split.

    A permutation from ``numpy.random.default_rng(seed)`` assigns the first ``num_test`` images
    to test, the next ``num_validation`` to validation and the rest (1,077 by default) to train.
    Each of the 64 features is standardised with the mean and standard deviation of the train
    split (population std; features constant on train, such as always-blank corner pixels, are
    only centred), so no statistic leaks from validation or test.

    Parameters
    ----------
    split : {"train", "validation", "test"}
    seed : int
    num_validation, num_test : int
    flatten : bool
        True: inputs of shape (N, 64); False: (N, 1, 8, 8).
    dtype : torch.dtype
        Floating dtype of the inputs.

    Returns
    -------
    LabelledSplit
        Standardised inputs, int64 labels, names "0".."9".
    """
    from sklearn.datasets import load_digits as sklearn_load_digits

    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test'; got {split!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    bunch = sklearn_load_digits()
    features = np.asarray(bunch.data, dtype=np.float64)
    targets = np.asarray(bunch.target, dtype=np.int64)
    n = features.shape[0]
    if num_validation < 1 or num_test < 1 or num_validation + num_test >= n:
        raise ValueError(
            f"num_validation and num_test must be >= 1 and leave train rows of {n}; "
            f"got {num_validation} and {num_test}"
        )
    order = np.random.default_rng(seed).permutation(n)
    parts = {
        "test": order[:num_test],
        "validation": order[num_test : num_test + num_validation],
        "train": order[num_test + num_validation :],
    }
    train = features[parts["train"]]
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std[std == 0.0] = 1.0
    rows = parts[split]
    x = (features[rows] - mean) / std
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return LabelledSplit(
        torch.from_numpy(x).to(dtype),
        torch.from_numpy(targets[rows]),
        tuple(str(k) for k in range(10)),
    )
