"""Data splits and batches of the training runner: GLUE (tokenised per batch), CIFAR images,
feature vectors.

A :class:`Split` has a length, class labels, and ``make(indices)`` building a :class:`Batch` on
the model's device: the model's keyword inputs including ``"labels"`` (what the
:mod:`backends.torch.optim.methods` closures and :class:`backends.TorchProvider` take) and the class
indices for the metrics. :func:`validation.experiments.models.setup.build_setup` builds them from a
configuration.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from validation.experiments.data import glue as data_mod

__all__ = ["IGNORE_INDEX", "Batch", "GlueSplit", "ImageSplit", "Split", "TensorSplit"]

#: the label value that no loss counts (Hugging Face's convention)
IGNORE_INDEX = -100


# =============================================================================================
# Data: batches and splits
# =============================================================================================
@dataclass
class Batch:
    """One batch on the model's device.

    Attributes
    ----------
    inputs : dict of str to torch.Tensor
        The model's keyword inputs including ``"labels"``, the loss targets (T5: label word + EOS
        token ids, -100 padded, shape (N, T); classifiers: class indices (N,)). This is what
        the :mod:`backends.torch.optim.methods` closures and :class:`backends.TorchProvider` take.
    class_labels : torch.Tensor, int64, shape (N,)
        Class indices for the metrics (T5: the label word's index in the task's label words).
    """

    inputs: dict[str, torch.Tensor]
    class_labels: torch.Tensor

    @property
    def size(self) -> int:
        """N."""
        return int(self.class_labels.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        """``inputs["labels"]``."""
        return self.inputs["labels"]

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The inputs without ``labels`` (a plain forward pass)."""
        return {k: v for k, v in self.inputs.items() if k != "labels"}


class Split:
    """A data split: a length, class labels, and ``make(indices)`` building a :class:`Batch`.

    Subclasses hold host data and build batches on ``device`` in ``dtype``: they implement
    ``_batch(idx, generator)``, ``idx`` the rows as an int64 tensor.
    """

    name: str = ""
    labels: torch.Tensor  # (len,) int64 class indices

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def make(
        self, indices: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
    ) -> Batch:
        """The batch of rows ``indices``; ``generator`` drives train-time augmentation (if any).

        Without a generator, or for a split without augmentation, the batch is deterministic.
        """
        return self._batch(torch.as_tensor(np.asarray(indices), dtype=torch.long), generator)

    def _batch(self, idx: torch.Tensor, generator: torch.Generator | None) -> Batch:
        raise NotImplementedError

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        """Deterministic batches of the first ``limit`` rows (all by default), in order."""
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.make(np.arange(start, min(start + batch_size, n)))


class GlueSplit(Split):
    """GLUE examples, tokenised per batch (label word + EOS).

    Tokenised by :func:`~validation.experiments.data.glue.encode_glue`.

    ``padding_side`` ("left", the released code's, or "right") is where input padding goes.
    ``decoder_prefix`` > 0 (prompt tuning with peft's CAUSAL_LM) adds ``decoder_input_ids`` for
    labels prefixed with that many -100 (``_prefixed_decoder_inputs``), what peft feeds the
    decoder; explicit, so that per-sample gradients (which take the labels out) see them too.
    """

    def __init__(
        self,
        name: str,
        examples: Sequence[data_mod.GlueExample],
        tokenizer: Any,
        max_length: int,
        device: torch.device,
        padding_side: str = "left",
        decoder_prefix: int = 0,
    ) -> None:
        self.name = name
        self.decoder_prefix = decoder_prefix
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self.padding_side = padding_side
        self.labels = data_mod.glue_label_indices(self.examples)

    def _batch(self, idx: torch.Tensor, generator: torch.Generator | None) -> Batch:
        rows = [self.examples[int(i)] for i in idx]
        encoded = data_mod.encode_glue(
            rows, self.tokenizer, self.max_length, padding_side=self.padding_side
        )
        if self.decoder_prefix and "labels" in encoded:
            encoded["decoder_input_ids"] = _prefixed_decoder_inputs(
                encoded["labels"], self.decoder_prefix, int(self.tokenizer.pad_token_id)
            )
        inputs = {k: v.to(self.device) for k, v in encoded.items()}
        return Batch(inputs, self.labels[idx])


def _prefixed_decoder_inputs(labels: torch.Tensor, prefix: int, pad: int) -> torch.Tensor:
    """T5's decoder inputs for ``[-100] * prefix + labels``: shifted right, -100 -> pad.

    T5's ``decoder_start_token_id`` is its pad token (0), so the result is ``prefix + 1`` pad
    tokens followed by ``labels[:, :-1]`` with -100 replaced by pad, shape (N, prefix + T).
    """
    n = labels.shape[0]
    shifted = torch.cat(
        [torch.full((n, prefix + 1), pad, dtype=labels.dtype), labels[:, :-1]], dim=1
    )
    return shifted.masked_fill(shifted == IGNORE_INDEX, pad)


class ImageSplit(Split):
    """uint8 CIFAR images, transformed per batch (train: random resized crop + flip)."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        image_size: int,
        *,
        augment: bool,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.images = images
        self.labels = labels
        self.image_size = image_size
        self.augment = augment
        self.device = device
        self.dtype = dtype

    def _batch(self, idx: torch.Tensor, generator: torch.Generator | None) -> Batch:
        images = self.images[idx]
        if self.augment and generator is not None:
            pixels = data_mod.cifar_train_transform(
                images, generator=generator, image_size=self.image_size
            )
        else:
            pixels = data_mod.cifar_eval_transform(images, image_size=self.image_size)
        labels = self.labels[idx]
        inputs = {
            "pixel_values": pixels.to(self.device, self.dtype),
            "labels": labels.to(self.device),
        }
        return Batch(inputs, labels)


class TensorSplit(Split):
    """Feature vectors (digits, CIFAR-10 pixels) and class labels; the model input is ``x``."""

    def __init__(
        self, name: str, x: torch.Tensor, labels: torch.Tensor, device: torch.device
    ) -> None:
        self.name = name
        self.x = x.to(device)
        self.labels = labels
        self.device = device

    def _batch(self, idx: torch.Tensor, generator: torch.Generator | None) -> Batch:
        labels = self.labels[idx]
        return Batch({"x": self.x[idx.to(self.device)], "labels": labels.to(self.device)}, labels)
