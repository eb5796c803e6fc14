r"""The training runner of the paper's experiments (Wu et al. 2024, Sec. 7 and App. H).

One run trains one setup (``t5-lora``, ``t5-prompt``, ``vit-lora``, ``mlp``) on one task with one
optimiser and seed, validates every ``train.eval_every`` steps, keeps the best-validation
parameters and tests them at the end::

    from validation.experiments.config import load_config
    from validation.experiments.train import train

    config = load_config("t5-lora", ["task=rte", "optimizer=ief", "data.source=glue_data"])
    result = train(config, "runs/rte-ief")

Optimisers
----------
``adam``, ``adamw``, ``sgd`` (torch) and ``adafactor`` (transformers) minimise the Hugging Face
mean loss (T5: the token mean of the cross-entropy over label word + EOS; classifiers: the batch
mean) by ordinary backpropagation. ``ief``, ``ef``, ``sf`` and ``ngd`` are the
:mod:`backends.optim` optimisers on the per-sample loss of :attr:`Setup.loss`
(:class:`ngdref.SequenceSoftmaxCrossEntropy` over the T5 vocabulary,
:class:`ngdref.SoftmaxCrossEntropy` otherwise) with ``reduction="hf"``: R = 1 / (label tokens
of the batch) for T5 and 1/N for the classifiers, so that their loss and gradient, and hence
the paper's (mean-convention) learning rates and damping, are those of the baselines' loss.
Every step runs with the model in eval mode (dropout off), as the paper's code does.

Step sizes: ``schedule`` "constant", "linear" (to 0 at the last step) or "step" (times ``gamma``
at each epoch in ``milestones``), applied to ``lr``; EF and SF decay linearly to 0 by themselves
(and normalise their update), so their sections have no schedule.

Run directory
-------------
::

    config.json             the resolved configuration
    metrics.jsonl           one JSON object per line (see below)
    results.json            best validation and test metrics, written at the end
    checkpoints/epoch-0.pt  the initial model; epoch-k.pt at the end of epoch k (parameters)
    checkpoints/best.pt     the best-validation parameters so far
    checkpoints/last.pt     the full resumable state (every train.checkpoint_every steps, at
                            each epoch end and at the end)

Every file is written atomically (a temporary file, then ``os.replace``). ``metrics.jsonl``
lines have ``kind`` "train" (``step`` = steps taken, ``epoch`` = fractional epochs,
``loss`` = the batch's mean loss before the update, ``lr``, and for the per-sample optimisers
their diagnostics: ``update_norm``, ``grad_norm_imbalance``, ``residual``, ``kept``,
``damping``), "validation" (the task's metrics, ``loss``, ``score`` = the selection score,
``best``), "test" (the best checkpoint's test metrics) or "diverged"; every line has ``time``,
the wall seconds of the run so far (the only field that differs between identical runs).

Data parallel (torchrun)
------------------------
``torchrun --nproc_per_node=R -m validation.experiments train ...`` joins a process group
(gloo on CPU, NCCL on GPUs, :func:`backends.dist_launch.init_from_env`); every rank builds the
same global batch, the per-sample optimisers (iEF, EF, SF, NGD) take its exact step with each
rank computing on a contiguous 1/R of it, baselines repeat the whole step on every rank, and
rank 0 alone writes logs and checkpoints. The metrics equal a single-process run's to float
tolerance.

Resuming
--------
``train(..., resume=True)`` restores ``last.pt``: the trainable parameters, the optimiser
state, the torch / numpy / python RNG states, the data order (the epoch's permutation and the
position in it), step, epoch, best-so-far and elapsed time, and truncates ``metrics.jsonl`` to
the lines up to that step. The data order and the CIFAR augmentation draws are functions of
(seed, epoch, step) and SF's label draws of (seed, step), so a killed and resumed run takes the
same steps, reaches the same parameters bitwise and writes the same log (``time`` aside) as an
uninterrupted one.

Evaluation framework API
------------------------
:func:`build_setup` gives the model, losses, splits and batch builders of a configuration;
:func:`list_checkpoints` and :func:`load_checkpoint` read a run's checkpoints and
:meth:`Setup.load_params` puts one into the model::

    config = load_run_config("runs/rte-adamw")
    setup = build_setup(config)
    for info in list_checkpoints("runs/rte-adamw", kind="epoch"):
        params, step, epoch = load_checkpoint("runs/rte-adamw", info.name)
        setup.load_params(params)
        batch = setup.train.make(indices)          # Batch: .inputs for TorchProvider
        ...
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

import ngdref
from backends import dist_launch as dist_mod
from validation.experiments import data as data_mod
from validation.experiments import metrics as metrics_mod
from validation.experiments.config import (
    PER_SAMPLE_OPTIMIZERS,
    ConfigError,
    config_diff,
    load_config,
)
from validation.experiments.models import (
    build_mlp,
    build_t5,
    build_vit,
    count_trainable,
    load_t5_tokenizer,
    torch_dtype,
)

__all__ = [
    "Batch",
    "Checkpoint",
    "CheckpointInfo",
    "Setup",
    "Split",
    "TrainResult",
    "build_optimizer",
    "build_setup",
    "epoch_permutation",
    "list_checkpoints",
    "load_checkpoint",
    "load_run_config",
    "read_checkpoint",
    "read_metrics",
    "resolve_device",
    "steps_per_epoch",
    "train",
]

CHECKPOINT_FORMAT = 1
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
        the :mod:`backends.optim` closures and :class:`backends.TorchProvider` take.
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

    Subclasses hold host data and build batches on ``device`` in ``dtype``.
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
        raise NotImplementedError

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[Batch]:
        """Deterministic batches of the first ``limit`` rows (all by default), in order."""
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            yield self.make(np.arange(start, min(start + batch_size, n)))


class GlueSplit(Split):
    """GLUE examples, tokenised per batch by :func:`data.encode_glue` (label word + EOS)."""

    def __init__(
        self,
        name: str,
        examples: Sequence[data_mod.GlueExample],
        tokenizer: Any,
        max_length: int,
        device: torch.device,
    ) -> None:
        self.name = name
        self.examples = list(examples)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = device
        self.labels = data_mod.glue_label_indices(self.examples)

    def make(
        self, indices: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
    ) -> Batch:
        rows = [self.examples[int(i)] for i in indices]
        encoded = data_mod.encode_glue(rows, self.tokenizer, self.max_length)
        inputs = {k: v.to(self.device) for k, v in encoded.items()}
        return Batch(inputs, self.labels[torch.as_tensor(np.asarray(indices), dtype=torch.long)])


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

    def make(
        self, indices: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
    ) -> Batch:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
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

    def make(
        self, indices: Sequence[int] | np.ndarray, generator: torch.Generator | None = None
    ) -> Batch:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        labels = self.labels[idx]
        return Batch({"x": self.x[idx.to(self.device)], "labels": labels.to(self.device)}, labels)


def _limit(items: Any, limit: int | None) -> Any:
    return items if limit is None else items[:limit]


def _load_cifar10(
    split: str, source: str | os.PathLike[str], *, validation_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10's python distribution as normalised flat features (N, 3072) and labels.

    ``source`` is the ``cifar-10-batches-py`` directory (or its parent) with pickles
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` (keys b"data" (N, 3072) uint8,
    b"labels"). Pixels become ``(pixel / 255 - 0.5) / 0.5``; ``validation_fraction`` of the
    train images, drawn by ``numpy.random.default_rng(seed).permutation``, are held out.
    """
    root = Path(source)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = ["test_batch"] if split == "test" else [f"data_batch_{k}" for k in range(1, 6)]
    xs, ys = [], []
    for name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"data.source: {str(path)!r} does not exist (CIFAR-10)")
        with path.open("rb") as fh:
            raw = pickle.load(fh, encoding="bytes")
        xs.append(np.asarray(raw[b"data"], dtype=np.uint8))
        ys.append(np.asarray(raw[b"labels"], dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if split != "test":
        n = len(y)
        n_val = round(validation_fraction * n)
        held = np.zeros(n, dtype=bool)
        held[np.random.default_rng(seed).permutation(n)[:n_val]] = True
        rows = held if split == "validation" else ~held
        x, y = x[rows], y[rows]
    features = (torch.from_numpy(x).to(torch.float32) / 255.0 - 0.5) / 0.5
    return features, torch.from_numpy(y)


# =============================================================================================
# The setup
# =============================================================================================
@dataclass
class Setup:
    """Everything a run (or the evaluation framework) needs for one configuration.

    Attributes
    ----------
    config : dict
        The resolved configuration.
    model : torch.nn.Module
        On :attr:`device`, in eval mode, trainable parameters = the adapters (or all, MLP).
    loss : ngdref.LogitLoss
        The per-sample loss of the training targets: ``SequenceSoftmaxCrossEntropy(V)`` (T5,
        V = ``model.config.vocab_size``, label word + EOS positions) or
        ``SoftmaxCrossEntropy()`` (ViT over all 1000 head logits; MLP).
    train, validation : Split
    test : dict of str to Split
        Labelled test sets ("test"; MNLI "test_matched" and "test_mismatched"); empty when the
        test labels are private (GLUE under ``data.protocol="paper"``).
    tokenizer : T5 tokenizer or None
    device : torch.device
    dtype : torch.dtype
    task : str
    label_words : tuple of str or None
        T5: the task's label words in label-index order.
    output_fn : callable or None
        The :class:`backends.TorchProvider` ``output_fn`` of the training loss (None: the
        model output's ``.logits`` or the output itself; T5's (N, T, V) logits are flattened
        to (N, T * V), the layout of :attr:`loss`). The evaluation framework's first-label-token
        variant is ``lambda out: out.logits[:, 0]`` with targets ``batch.targets[:, 0]``.

    Examples
    --------
    One batch of 160 random training rows for the evaluation framework::

        rows = np.random.default_rng(0).choice(len(setup.train), 160, replace=False)
        batch = setup.train.make(rows)       # no generator: no augmentation
        provider = TorchProvider(setup.model, batch.inputs, output_fn=setup.output_fn)
        q = ngdref.batch_quantities(provider, setup.loss, batch.targets,
                                    reduction=setup.reduction(batch))
    """

    config: dict[str, Any]
    model: nn.Module
    loss: ngdref.LogitLoss
    train: Split
    validation: Split
    test: dict[str, Split]
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    task: str
    label_words: tuple[str, ...] | None = None
    output_fn: Callable[[Any], torch.Tensor] | None = None

    # ---- parameters -------------------------------------------------------------------------
    @property
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of the trainable parameters, in ``named_parameters`` order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_trainable(self) -> int:
        """P."""
        return count_trainable(self.model)

    def params(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable parameters, ``{name: tensor}``."""
        return {n: p.detach().cpu().clone() for n, p in self.trainable}

    def load_params(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy ``{name: tensor}`` (e.g. from :func:`load_checkpoint`) into the trainable params.

        Raises
        ------
        ValueError
            If the names or shapes differ from the model's trainable parameters.
        """
        own = dict(self.trainable)
        missing, extra = sorted(set(own) - set(params)), sorted(set(params) - set(own))
        if missing or extra:
            raise ValueError(
                f"params do not match the model's trainable parameters: missing {missing[:3]}"
                f"{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                f"{'...' if len(extra) > 3 else ''}"
            )
        with torch.no_grad():
            for name, p in own.items():
                value = params[name]
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"params[{name!r}] has shape {tuple(value.shape)}, expected "
                        f"{tuple(p.shape)}"
                    )
                p.copy_(value.to(p.device, p.dtype))

    # ---- losses -----------------------------------------------------------------------------
    def reduction(self, batch: Batch, spec: str | float = "hf") -> str | float:
        """The reduction R of the per-sample optimisers for ``batch``.

        "hf": the Hugging Face loss's, 1 / (label tokens of the batch) for T5 and "mean"
        (1/N) for the classifiers; "sum", "mean" and floats are passed through.
        """
        if spec != "hf":
            return spec
        if self.label_words is not None:
            return 1.0 / int((batch.targets != IGNORE_INDEX).sum())
        return "mean"

    def hf_loss(self, batch: Batch) -> torch.Tensor:
        """The baselines' differentiable mean loss of ``batch`` (the model's own for HF models)."""
        if isinstance(self.loss, ngdref.SoftmaxCrossEntropy) and "x" in batch.inputs:
            logits = self.model(batch.inputs["x"])
            return nn.functional.cross_entropy(logits, batch.targets)
        return self.model(**batch.inputs).loss

    # ---- evaluation -------------------------------------------------------------------------
    def predict(self, batch: Batch) -> tuple[torch.Tensor, float, int]:
        """Predicted class indices (N,) (-1: no label word), the summed loss and its count.

        T5: the teacher-forced logits of all label positions, greedy argmax decoded and
        compared with the label words (:func:`metrics.predict_label_words`). Classifiers: the
        argmax over all logits (ViT: all 1000 head classes; an index >= the number of CIFAR
        classes is simply wrong). The loss is summed over label tokens (T5) or samples.
        """
        with torch.no_grad(), _eval_mode(self.model):
            if "x" in batch.inputs:
                logits = self.model(batch.inputs["x"])
            else:
                logits = self.model(**batch.inputs).logits
            if self.label_words is not None:
                flat = logits.reshape(batch.size, -1)
                total = float(self.loss.value(flat, batch.targets).sum())
                count = int((batch.targets != IGNORE_INDEX).sum())
                pred = metrics_mod.predict_label_words(logits, self.tokenizer, self.label_words)
            else:
                total = float(
                    nn.functional.cross_entropy(logits, batch.targets, reduction="sum")
                )
                count = batch.size
                pred = logits.argmax(dim=-1).cpu()
        return pred, total, count

    def metrics(self, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """The task's metrics: GLUE's (:func:`metrics.glue_metrics`) or accuracy."""
        if self.label_words is not None:
            return metrics_mod.glue_metrics(self.task, predictions, labels)
        return {"accuracy": metrics_mod.accuracy(predictions, labels)}

    def score(self, metrics: Mapping[str, float]) -> float:
        """Best-checkpoint score: accuracy + the task's second metric (GLUE), else accuracy."""
        if self.label_words is not None:
            return metrics_mod.selection_score(self.task, metrics)
        return float(metrics["accuracy"])

    def evaluate(self, split: Split, limit: int | None = None) -> dict[str, float]:
        """Metrics and mean ``loss`` (HF's reduction) of ``split`` (its first ``limit`` rows)."""
        preds, labels, total, count = [], [], 0.0, 0
        batch_size = self.config["train"]["eval_batch_size"]
        for batch in split.batches(batch_size, limit):
            pred, batch_total, batch_count = self.predict(batch)
            preds.append(pred)
            labels.append(batch.class_labels)
            total += batch_total
            count += batch_count
        result = self.metrics(torch.cat(preds), torch.cat(labels))
        result["loss"] = total / count
        return result


def _shard(batch: Batch) -> Batch:
    """This rank's contiguous share of ``batch`` under torch.distributed (else ``batch``).

    The global batch is built (tokenised, padded, augmented) on every rank alike and then
    cut, so the shards share its padding and the per-sample optimisers take its step.
    """
    part = dist_mod.shard_slice(batch.size)
    if part is None:
        return batch
    return Batch({k: v[part] for k, v in batch.inputs.items()}, batch.class_labels[part])


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` / "auto": CUDA when available, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_setup(config: Mapping[str, Any], device: str | torch.device | None = None) -> Setup:
    """Build the model, losses and data splits of a resolved configuration.

    Parameters
    ----------
    config : mapping
        From :func:`config.load_config` (or a run's ``config.json``, :func:`load_run_config`).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.

    Returns
    -------
    Setup
        The model is freshly initialised (base weights from ``model.name``; adapters from
        ``config["seed"]``), in eval mode; load a checkpoint with :meth:`Setup.load_params`.
    """
    cfg = dict(config)
    dev = resolve_device(device)
    dtype = torch_dtype(cfg["model"]["dtype"])
    setup_name, task, seed = cfg["setup"], cfg["task"], int(cfg["seed"])
    dcfg = cfg["data"]
    if setup_name in ("t5-lora", "t5-prompt"):
        tokenizer = load_t5_tokenizer(cfg["model"])
        model = build_t5(cfg["model"], cfg["peft"], tokenizer, seed=seed).to(dev)
        glue = data_mod.get_glue_task(task)
        source = dcfg["source"]

        def glue_split(name: str, limit: int | None) -> GlueSplit:
            rows = data_mod.load_glue(
                glue,
                name,
                source,
                protocol=dcfg["protocol"],
                validation_size=dcfg["validation_size"],
                seed=dcfg["split_seed"],
            )
            return GlueSplit(
                name, _limit(rows, limit), tokenizer, cfg["model"]["max_length"], dev
            )

        train_split = glue_split("train", dcfg["max_train_samples"])
        val_split = glue_split("validation", dcfg["max_eval_samples"])
        test_names = ["test_matched", "test_mismatched"] if task == "mnli" else ["test"]
        test: dict[str, Split] = {}
        if dcfg["protocol"] == "holdout":
            test = {n: glue_split(n, dcfg["max_eval_samples"]) for n in test_names}
        return Setup(
            cfg,
            model,
            ngdref.SequenceSoftmaxCrossEntropy(int(model.config.vocab_size), IGNORE_INDEX),
            train_split,
            val_split,
            test,
            tokenizer,
            dev,
            dtype,
            task,
            label_words=glue.label_words,
        )
    if setup_name == "vit-lora":
        model = build_vit(cfg["model"], cfg["peft"], seed=seed).to(dev)
        image_size = int(model.config.image_size)
        splits = {}
        for name in ("train", "validation", "test"):
            part = data_mod.load_cifar100(
                name,
                dcfg["source"],
                label_set=dcfg["label_set"],
                validation_fraction=dcfg["validation_fraction"],
                seed=dcfg["split_seed"],
            )
            limit = dcfg["max_train_samples"] if name == "train" else dcfg["max_eval_samples"]
            splits[name] = ImageSplit(
                name,
                _limit(part.inputs, limit),
                _limit(part.labels, limit),
                image_size,
                augment=name == "train" and bool(dcfg["augment"]),
                device=dev,
                dtype=dtype,
            )
        num_classes = int(model.config.num_labels)
        top = int(splits["train"].labels.max())
        if top >= num_classes:
            raise ValueError(
                f"data: CIFAR label {top} does not fit the model's {num_classes}-way head"
            )
        return Setup(
            cfg, model, ngdref.SoftmaxCrossEntropy(), splits["train"], splits["validation"],
            {"test": splits["test"]}, None, dev, dtype, task,
        )
    if setup_name == "mlp":
        model = build_mlp(cfg["model"], seed=seed).to(dev)
        splits = {}
        for name in ("train", "validation", "test"):
            if task == "digits":
                part = data_mod.load_digits(name, seed=dcfg["split_seed"], dtype=dtype)
                x, y = part.inputs, part.labels
            else:
                x, y = _load_cifar10(
                    name,
                    dcfg["source"],
                    validation_fraction=dcfg["validation_fraction"],
                    seed=dcfg["split_seed"],
                )
            limit = dcfg["max_train_samples"] if name == "train" else dcfg["max_eval_samples"]
            x, y = _limit(x, limit), _limit(y, limit)
            if x[0].numel() != cfg["model"]["input_dim"]:
                raise ConfigError(
                    f"config key 'model.input_dim' is {cfg['model']['input_dim']} but task "
                    f"{task!r} has {x[0].numel()} input features"
                )
            splits[name] = TensorSplit(name, x.to(dtype), y, dev)
        return Setup(
            cfg, model, ngdref.SoftmaxCrossEntropy(), splits["train"], splits["validation"],
            {"test": splits["test"]}, None, dev, dtype, task,
        )
    raise ConfigError(f"config key 'setup' is not a known setup: {setup_name!r}")


# =============================================================================================
# Optimisers and schedules
# =============================================================================================
def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """ceil(num_train / batch_size): the last batch of an epoch may be smaller."""
    return math.ceil(num_train / batch_size)


def _total_steps(config: Mapping[str, Any], num_train: int) -> int:
    train_cfg = config["train"]
    total = train_cfg["epochs"] * steps_per_epoch(num_train, train_cfg["batch_size"])
    if train_cfg["max_steps"] is not None:
        total = min(total, train_cfg["max_steps"])
    return total


def build_optimizer(setup: Setup, total_steps: int) -> torch.optim.Optimizer:
    """The configured optimiser over the trainable parameters of ``setup.model``.

    Parameters
    ----------
    setup : Setup
    total_steps : int
        T, the horizon of EF's and SF's linear decay and of the "linear" schedule.

    Notes
    -----
    With ``reduction: "hf"`` a T5 per-sample optimiser is built with R = 1 and the runner sets
    ``param_groups[0]["reduction"] = setup.reduction(batch)`` (1 / label tokens) before each
    step; do the same when stepping it yourself.
    """
    import backends.optim as ngd_optim

    cfg = setup.config
    name = cfg["optimizer"]
    o = cfg["optimizers"][name]
    params = [p for _, p in setup.trainable]
    if name == "adam":
        return torch.optim.Adam(
            params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
            weight_decay=o["weight_decay"],
        )
    if name == "sgd":
        return torch.optim.SGD(
            params, lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=o["lr"],
            weight_decay=o["weight_decay"],
            scale_parameter=o["scale_parameter"],
            relative_step=o["relative_step"],
            warmup_init=o["warmup_init"],
        )
    common = {
        "reduction": 1.0 if o["reduction"] == "hf" and setup.label_words else (
            "mean" if o["reduction"] == "hf" else o["reduction"]
        ),
        "output_fn": setup.output_fn,
        "per_sample_method": cfg["train"]["per_sample_method"],
        "chunk_size": cfg["train"]["chunk_size"],
    }
    if name == "ief":
        return ngd_optim.IEF(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"],
            damping_mode=o["damping_mode"], damping_space=o["damping_space"],
            dedup_threshold=o["dedup_threshold"], **common,
        )
    if name == "ef":
        return ngd_optim.EF(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"], total_steps=total_steps,
            damping_mode=o["damping_mode"], dedup_threshold=o["dedup_threshold"], **common,
        )
    if name == "sf":
        return ngd_optim.SF(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"], total_steps=total_steps,
            num_samples=o["num_samples"], seed=int(cfg["seed"]), **common,
        )
    if name == "ngd":
        return ngd_optim.NGD(
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"], cg_tol=o["cg_tol"],
            cg_maxiter=o["cg_maxiter"], **common,
        )
    raise ConfigError(f"config key 'optimizer': unknown optimizer {name!r}")


def _lr_factor(opt_cfg: Mapping[str, Any], step: int, epoch: int, total: int) -> float:
    """The schedule's multiplier of ``lr`` for the step taken at (step, epoch)."""
    schedule = opt_cfg.get("schedule", "constant")
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return (total - step) / total
    return float(opt_cfg["gamma"]) ** sum(1 for m in opt_cfg["milestones"] if epoch >= m)


def epoch_permutation(seed: int, epoch: int, num_train: int) -> np.ndarray:
    """The training order of ``epoch``: ``numpy.random.default_rng([seed, epoch]).permutation``."""
    return np.random.default_rng([seed, epoch]).permutation(num_train)


def _augment_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    key = int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(key)


# =============================================================================================
# Checkpoints
# =============================================================================================
class Checkpoint(NamedTuple):
    """A checkpoint's trainable parameters (CPU tensors by name), step and epoch."""

    params: dict[str, torch.Tensor]
    step: int
    epoch: int


class CheckpointInfo(NamedTuple):
    """One checkpoint file: ``name`` ("epoch-3", "best", "last"), path, step, epoch, kind."""

    name: str
    path: Path
    step: int
    epoch: int
    kind: str


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    if not dist_mod.is_writer():  # under torchrun rank 0 alone writes files
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, mode) as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _save(path: Path, obj: Mapping[str, Any]) -> None:
    _atomic_write(path, lambda fh: torch.save(dict(obj), fh))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole dictionary stored in a checkpoint file (this runner's own files).

    Keys: ``format``, ``kind`` ("epoch", "best", "resume"), ``params``, ``step``, ``epoch``,
    ``config``; resume checkpoints add the optimiser, RNG and data-order state.
    """
    # weights_only=False: the file holds numpy / python RNG states; it is this runner's own.
    state = torch.load(Path(path), map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{str(path)!r} is not a checkpoint of this runner")
    return state


def _checkpoint_path(run_dir: str | os.PathLike[str], which: str | int) -> Path:
    folder = Path(run_dir) / "checkpoints"
    if isinstance(which, int) and not isinstance(which, bool):
        name = f"epoch-{which}"
    else:
        name = str(which)
    path = folder / (name if name.endswith(".pt") else f"{name}.pt")
    if not path.is_file():
        known = [info.name for info in list_checkpoints(run_dir)]
        raise FileNotFoundError(f"which: no checkpoint {name!r} in {str(folder)!r}; has {known}")
    return path


def load_checkpoint(run_dir: str | os.PathLike[str], which: str | int) -> Checkpoint:
    """Load a run's checkpoint.

    Parameters
    ----------
    run_dir : path
    which : str or int
        "epoch-k" or k (the end of epoch k; 0 = the initial model), "best" (best validation
        score) or "last" (the latest resumable state).

    Returns
    -------
    Checkpoint
        ``(params, step, epoch)``: params ``{name: CPU tensor}`` of the trainable parameters
        (put them into a :func:`build_setup` model with :meth:`Setup.load_params`), the number
        of steps taken and of completed epochs.
    """
    state = read_checkpoint(_checkpoint_path(run_dir, which))
    return Checkpoint(state["params"], int(state["step"]), int(state["epoch"]))


def list_checkpoints(
    run_dir: str | os.PathLike[str], kind: str | None = None
) -> list[CheckpointInfo]:
    """The checkpoints of a run: epoch-0, epoch-1, ... (by epoch), then best, then last.

    Parameters
    ----------
    run_dir : path
    kind : {"epoch", "best", "resume"}, optional
        Only checkpoints of this kind (``last.pt`` is "resume").
    """
    folder = Path(run_dir) / "checkpoints"
    infos = []
    for path in folder.glob("*.pt") if folder.is_dir() else []:
        state = read_checkpoint(path)
        infos.append(
            CheckpointInfo(path.stem, path, int(state["step"]), int(state["epoch"]), state["kind"])
        )
    order = {"epoch": 0, "best": 1, "resume": 2}
    infos.sort(key=lambda i: (order.get(i.kind, 3), i.epoch, i.step, i.name))
    return [i for i in infos if kind is None or i.kind == kind]


def load_run_config(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The resolved configuration a run was started with (its ``config.json``)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir: {str(path)!r} does not exist")
    return load_config(path)


def read_metrics(run_dir: str | os.PathLike[str], kind: str | None = None) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (only those of ``kind`` if given)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        # the legacy global generator is saved because user code may draw from it
        "numpy": np.random.get_state(),  # noqa: NPY002
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# =============================================================================================
# Training
# =============================================================================================
@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    run_dir : Path
    step, epoch : int
        Steps taken and epochs completed.
    finished : bool
        False when stopped early by ``stop_after`` (a simulated kill).
    diverged : bool
        True when training stopped at a non-finite loss or update (``on_divergence="stop"``).
    best : dict
        ``score``, ``step``, ``epoch``, ``metrics`` of the best validation.
    test : dict
        Test metrics of the best checkpoint (empty if not tested).
    params : dict
        The final trainable parameters (CPU).
    """

    run_dir: Path
    step: int
    epoch: int
    finished: bool
    diverged: bool
    best: dict[str, Any]
    test: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)


class _Stop(Exception):
    """Raised by ``stop_after`` to abandon the run without writing anything (a kill)."""


class _Run:
    """The mutable state of one training run (see :func:`train`)."""

    def __init__(self, setup: Setup, run_dir: Path, progress: bool) -> None:
        self.setup = setup
        self.config = setup.config
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.log_path = run_dir / "metrics.jsonl"
        self.seed = int(self.config["seed"])
        self.n_train = len(setup.train)
        self.total = _total_steps(self.config, self.n_train)
        self.name = self.config["optimizer"]
        self.opt_cfg = self.config["optimizers"][self.name]
        self.optimizer = build_optimizer(setup, self.total)
        self.per_sample = self.name in PER_SAMPLE_OPTIMIZERS
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.permutation: np.ndarray | None = None
        self.best: dict[str, Any] = {"score": -math.inf, "step": None, "epoch": None, "metrics": {}}
        self.best_params: dict[str, torch.Tensor] | None = None
        self.last_eval_step = -1
        self.log_lines = 0
        self.finished = False
        self.diverged = False
        self.elapsed_before = 0.0
        self.started = time.perf_counter()
        self.progress = progress

    # ---- bookkeeping ------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def log(self, record: dict[str, Any]) -> None:
        record = {**record, "time": round(self.elapsed(), 3)}
        self.log_lines += 1
        if not dist_mod.is_writer():
            return
        with self.log_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, allow_nan=True) + "\n")

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": kind,
            "params": self.setup.params(),
            "step": self.step,
            "epoch": self.epoch,
            "config": self.config,
        }

    def save_resume(self) -> None:
        state = self._base("resume")
        state.update(
            optimizer=self.optimizer.state_dict(),
            rng=_rng_state(),
            position=self.position,
            permutation=self.permutation,
            best=self.best,
            best_params=self.best_params,
            last_eval_step=self.last_eval_step,
            log_lines=self.log_lines,
            finished=self.finished,
            diverged=self.diverged,
            elapsed=self.elapsed(),
            total_steps=self.total,
        )
        _save(self.ckpt_dir / "last.pt", state)

    def restore(self) -> None:
        state = read_checkpoint(self.ckpt_dir / "last.pt")
        if state["total_steps"] != self.total:
            raise ValueError(
                f"checkpoint: last.pt was written for {state['total_steps']} total steps, this "
                f"configuration has {self.total}"
            )
        self.setup.load_params(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.position = int(state["position"])
        self.permutation = state["permutation"]
        self.best, self.best_params = state["best"], state["best_params"]
        self.last_eval_step = int(state["last_eval_step"])
        self.finished, self.diverged = bool(state["finished"]), bool(state["diverged"])
        self.elapsed_before = float(state["elapsed"])
        self.started = time.perf_counter()
        # keep the log lines written before the checkpoint: the later ones are written again
        self.log_lines = int(state["log_lines"])
        with self.log_path.open(encoding="utf-8") as fh:
            lines = fh.readlines()
        if len(lines) < self.log_lines:
            raise ValueError(
                f"metrics.jsonl has {len(lines)} lines but last.pt was written after "
                f"{self.log_lines}: the log does not belong to this checkpoint"
            )
        text = "".join(lines[: self.log_lines])
        _atomic_write(self.log_path, lambda fh: fh.write(text), mode="w")

    # ---- one step ---------------------------------------------------------------------------
    def take_step(self, batch: Batch) -> dict[str, Any]:
        group = self.optimizer.param_groups[0]
        if self.name not in ("ef", "sf"):
            group["lr"] = self.opt_cfg["lr"] * _lr_factor(
                self.opt_cfg, self.step, self.epoch, self.total
            )
        if self.per_sample:
            group["reduction"] = self.setup.reduction(batch, self.opt_cfg["reduction"])
            shard = _shard(batch)  # torchrun: this rank's samples of the global batch
            loss = self.optimizer.step(lambda: shard.inputs)
            diag = dict(self.optimizer.diagnostics)
            diag.pop("step", None)
            diag.pop("loss", None)
            return {"loss": loss, **diag}
        self.optimizer.zero_grad(set_to_none=True)
        with _eval_mode(self.setup.model):
            loss_t = self.setup.hf_loss(batch)
            loss = float(loss_t.detach())
            if not math.isfinite(loss):
                raise ngdref.NonFiniteError(f"loss is {loss} at step {self.step}")
            loss_t.backward()
        self.optimizer.step()
        return {"loss": loss, "lr": float(group["lr"])}

    def validate(self) -> None:
        limit = None  # max_eval_samples already trimmed the split
        metrics = self.setup.evaluate(self.setup.validation, limit)
        score = self.setup.score(metrics)
        # a model with non-finite outputs (a diverged baseline) never becomes the best
        improved = math.isfinite(metrics["loss"]) and score > self.best["score"]
        if improved:
            self.best = {
                "score": score,
                "step": self.step,
                "epoch": self.epoch + self.position / self.n_train,
                "metrics": metrics,
            }
            self.best_params = self.setup.params()
            best = self._base("best")
            best["metrics"] = metrics
            _save(self.ckpt_dir / "best.pt", best)
        self.last_eval_step = self.step
        self.log(
            {
                "kind": "validation",
                "step": self.step,
                "epoch": self.epoch + self.position / self.n_train,
                **metrics,
                "score": score,
                "best": improved,
            }
        )

    # ---- the loop ---------------------------------------------------------------------------
    def run(self, stop_after: int | None, callback: Callable[[dict], None] | None) -> None:
        tcfg = self.config["train"]
        batch_size = tcfg["batch_size"]
        eval_every = tcfg["eval_every"]
        bar = _progress_bar(self.total, self.step, self.progress, self.config)
        try:
            while self.step < self.total and not self.diverged:
                if self.permutation is None:
                    self.permutation = epoch_permutation(self.seed, self.epoch, self.n_train)
                while self.position < self.n_train and self.step < self.total:
                    rows = self.permutation[self.position : self.position + batch_size]
                    generator = _augment_generator(self.seed, self.epoch, self.step)
                    batch = self.setup.train.make(rows, generator)
                    try:
                        record = self.take_step(batch)
                    except (ngdref.NonFiniteError, ngdref.SingularMatrixError) as exc:
                        if tcfg["on_divergence"] == "raise":
                            raise
                        self._diverge(str(exc))
                        break
                    self.step += 1
                    self.position += len(rows)
                    record = {
                        "kind": "train",
                        "step": self.step,
                        "epoch": self.epoch + self.position / self.n_train,
                        **record,
                    }
                    if self.step % tcfg["log_every"] == 0 or self.step == self.total:
                        self.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
                    if callback is not None:
                        callback(record)
                    if eval_every != "epoch" and self.step % eval_every == 0:
                        self.validate()
                    if self.step % tcfg["checkpoint_every"] == 0:
                        self.save_resume()
                    if stop_after is not None and self.step >= stop_after:
                        raise _Stop
                if self.diverged:
                    break
                if self.position >= self.n_train:
                    self.epoch += 1
                    self.position = 0
                    self.permutation = None
                    if eval_every == "epoch":
                        self.validate()
                    lean = self._base("epoch")
                    _save(self.ckpt_dir / f"epoch-{self.epoch}.pt", lean)
                    self.save_resume()
        finally:
            bar.close()
        if self.last_eval_step != self.step:
            self.validate()
        self.finished = True
        self.save_resume()

    def _diverge(self, message: str) -> None:
        if self.config["train"]["on_divergence"] == "raise":
            raise FloatingPointError(message)
        self.diverged = True
        self.log({"kind": "diverged", "step": self.step, "message": message})

    def test(self) -> dict[str, Any]:
        """Test the best-validation parameters (if any), restore the final ones, write results.

        Nothing is tested when the test labels are private or no validation had finite outputs.
        """
        results: dict[str, Any] = {}
        if self.setup.test and self.best_params is not None:
            final = self.setup.params()
            self.setup.load_params(self.best_params)
            for name, split in self.setup.test.items():
                metrics = self.setup.evaluate(split)
                several = len(self.setup.test) > 1
                results.update({f"{name}_{k}" if several else k: v for k, v in metrics.items()})
            self.setup.load_params(final)
            self.log({"kind": "test", "step": self.best["step"], **results})
        summary = {
            "setup": self.config["setup"],
            "task": self.config["task"],
            "optimizer": self.name,
            "seed": self.seed,
            "steps": self.step,
            "epochs": self.epoch,
            "diverged": self.diverged,
            "num_trainable": self.setup.num_trainable,
            "best_validation": {**self.best, "score": (
                self.best["score"] if math.isfinite(self.best["score"]) else None
            )},
            "test": results,
        }
        text = json.dumps(summary, indent=2, allow_nan=True) + "\n"
        _atomic_write(self.run_dir / "results.json", lambda fh: fh.write(text), mode="w")
        return results


def _progress_bar(total: int, initial: int, enabled: bool, config: Mapping[str, Any]) -> Any:
    from tqdm.auto import tqdm

    desc = f"{config['setup']}/{config['task']}/{config['optimizer']}"
    return tqdm(
        total=total, initial=initial, disable=not enabled, desc=desc, unit="step",
        dynamic_ncols=True,
    )


def train(
    config: Mapping[str, Any],
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    stop_after: int | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    setup: Setup | None = None,
) -> TrainResult:
    """Train, validate, checkpoint and test one configuration.

    Parameters
    ----------
    config : mapping
        A resolved configuration (:func:`config.load_config`).
    run_dir : path
        Where the run's files go (module docstring). Without ``resume`` it must not hold a run
        already.
    resume : bool
        Continue from ``run_dir/checkpoints/last.pt`` (started afresh when there is none). The
        configuration must equal the stored ``config.json``.
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.
    progress : bool, optional
        tqdm progress bar (step, loss, ETA); default: when stderr is a terminal.
    stop_after : int, optional
        Abandon the run right after this many steps, writing nothing more (simulates a kill;
        for tests). The periodic checkpoints written before remain.
    callback : callable, optional
        Called with every train record.
    setup : Setup, optional
        A prebuilt :func:`build_setup` of ``config`` (its model is trained in place).

    Returns
    -------
    TrainResult

    Raises
    ------
    FileExistsError
        ``run_dir`` holds a run and ``resume`` is False.
    ConfigError
        ``resume`` with a configuration that differs from the stored one (the keys are named).
    """
    dist_mod.init_from_env()  # torchrun: join the process group (module docstring)
    config = dict(config)
    run = Path(run_dir)
    stored = run / "config.json"
    last = run / "checkpoints" / "last.pt"
    if resume and stored.is_file():
        previous = json.loads(stored.read_text(encoding="utf-8"))
        changed = config_diff(previous, config)
        if changed:
            raise ConfigError(
                f"resume: the configuration differs from {str(stored)!r} in {changed}; resume "
                "with the stored configuration or start a new run directory"
            )
    elif not resume and (stored.exists() or (run / "metrics.jsonl").exists()):
        raise FileExistsError(
            f"run_dir {str(run)!r} already holds a run; pass resume=True (--resume) to "
            "continue it or choose another directory"
        )
    dist_mod.barrier()  # every rank has checked run_dir before rank 0 writes to it
    if progress is None:
        progress = sys.stderr.isatty()
    progress = progress and dist_mod.is_writer()
    torch.manual_seed(int(config["seed"]))
    np.random.seed(int(config["seed"]) % 2**32)  # noqa: NPY002
    random.seed(int(config["seed"]))
    if setup is None:
        setup = build_setup(config, device)
    state = _Run(setup, run, progress)
    run.mkdir(parents=True, exist_ok=True)
    if resume and last.is_file():
        state.restore()
    else:
        text = json.dumps(config, indent=2) + "\n"
        _atomic_write(stored, lambda fh: fh.write(text), mode="w")
        _atomic_write(state.log_path, lambda fh: fh.write(""), mode="w")
        _save(state.ckpt_dir / "epoch-0.pt", state._base("epoch"))
    try:
        if not state.finished:
            state.run(stop_after, callback)
    except _Stop:
        return TrainResult(
            run, state.step, state.epoch, False, state.diverged, state.best,
            params=setup.params(),
        )
    test = state.test()
    return TrainResult(
        run, state.step, state.epoch, True, state.diverged, state.best, test, setup.params()
    )
