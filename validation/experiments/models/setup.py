"""The model, losses and data splits of one configuration (:func:`build_setup`).

:class:`Setup` is what a training run and the evaluation framework share: the model (in eval
mode, only the adapters trainable), the per-sample loss of the training targets, the splits,
the reduction of the Hugging Face loss, and the task's evaluation (metrics, selection score).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import ngdref
from validation.experiments import metrics as metrics_mod
from validation.experiments.config.load import ConfigError
from validation.experiments.data import glue as data_mod
from validation.experiments.data.splits import (
    IGNORE_INDEX,
    Batch,
    GlueSplit,
    ImageSplit,
    Split,
    TensorSplit,
)
from validation.experiments.models.builders import (
    build_mlp,
    build_t5,
    build_vit,
    count_trainable,
    load_t5_tokenizer,
    torch_dtype,
)

__all__ = ["LabelWordSampledCE", "Setup", "build_setup", "resolve_device"]


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
        On ``device``, in eval mode, trainable parameters = the adapters (or all, MLP).
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
        to (N, T * V), the layout of ``loss``). The evaluation framework's first-label-token
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


class LabelWordSampledCE(ngdref.SequenceSoftmaxCrossEntropy):
    r"""T5's sequence cross-entropy whose SF draws replace only the label word (the authors' SF).

    :meth:`sample` draws position 0 of the targets (the label word's first token) from the
    model's predictive distribution and keeps the observed token at every later position (EOS),
    as the released code's ``fisher_sampling`` does (``labels[:, 0:1] = sampled``). SF's sampled
    row of sample n is then the gradient of

    .. math:: -\log p_{n0}(\hat y_{n0}) - \sum_{t \ge 1} \log p_{nt}(y_{nt})

    (reduced like the training loss). Every other method (value, grad, Hessian) is the plain
    :class:`ngdref.SequenceSoftmaxCrossEntropy`. The all-positions variant, every non-ignored
    position drawn (the Fisher of the whole sequence loss), is ``sf.sample_positions: "all"``.
    """

    def sample(
        self, logits: Any, key: Any, *, num_samples: int = 1, targets: Any = None
    ) -> Any:
        """Draws of shape (K, N, T): position 0 sampled, the observed targets elsewhere."""
        if targets is None:
            raise ValueError(
                "targets: LabelWordSampledCE.sample keeps the observed tokens after the label "
                "word, so it needs the observed targets"
            )
        drawn = super().sample(logits, key, num_samples=num_samples, targets=targets)
        later = torch.zeros_like(targets, dtype=torch.bool)
        later[:, 1:] = True
        return torch.where(later[None], targets[None].expand_as(drawn), drawn)


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
    """``None`` / "auto": CUDA when available, else CPU; otherwise ``torch.device(device)``,
    checked to exist here.

    Raises
    ------
    ConfigError
        ``device`` is not a device name torch knows (``"tpu"``), or names a CUDA (or MPS)
        device this machine does not have; the message names the value and the choices.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(
            f"device (--device) {device!r} is not a torch device; use auto, cpu, cuda or "
            "cuda:N"
        ) from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            have = f"{count} CUDA device(s)" if count else (
                "no CUDA (this torch " + ("has no CUDA build" if torch.version.cuda is None
                                          else "finds no GPU") + ")"
            )
            raise ConfigError(
                f"device (--device) {device!r}: this machine has {have}; use cpu or auto"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device (--device) {device!r}: MPS is not available here; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"device (--device) {device!r}: the runner runs on cpu, cuda or mps, not "
            f"{dev.type!r}"
        )
    return dev


def _build_t5(cfg: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> Setup:
    dcfg, task = cfg["data"], cfg["task"]
    tokenizer = load_t5_tokenizer(cfg["model"])
    model = build_t5(cfg["model"], cfg["peft"], tokenizer, seed=int(cfg["seed"])).to(dev)
    _check_vocabulary(cfg["model"], len(tokenizer), int(model.config.vocab_size))
    glue = data_mod.get_glue_task(task)
    causal = cfg["peft"]["type"] == "prompt" and cfg["peft"]["task_type"] == "causal_lm"
    prefix = cfg["peft"]["num_virtual_tokens"] if causal else 0

    def glue_split(name: str, limit: int | None) -> GlueSplit:
        rows = data_mod.load_glue(
            glue,
            name,
            dcfg["source"],
            protocol=dcfg["protocol"],
            validation_size=dcfg["validation_size"],
            seed=dcfg["split_seed"],
        )
        return GlueSplit(
            name, _limit(rows, limit), tokenizer, cfg["model"]["max_length"], dev,
            padding_side=cfg["model"]["padding_side"], decoder_prefix=prefix,
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
        ngdref.SequenceSoftmaxCrossEntropy(int(model.config.vocab_size), ignore_index=IGNORE_INDEX),
        train_split,
        val_split,
        test,
        tokenizer,
        dev,
        dtype,
        task,
        label_words=glue.label_words,
    )


def _check_vocabulary(model_cfg: Mapping[str, Any], tokens: int, vocab: int) -> None:
    """Token ids (inputs, label words) must index the model's vocabulary: a tokenizer larger
    than the model's embedding would reach it with an index it does not have."""
    if tokens > vocab:
        key = "model.tokenizer" if model_cfg.get("tokenizer") else "model.name"
        raise ConfigError(
            f"config key {key!r}: its tokenizer has {tokens} tokens but model.name="
            f"{model_cfg['name']!r} has a vocabulary of {vocab}: token ids (labels included) "
            f"up to {tokens - 1} would index past its embedding; use the model's own tokenizer"
        )


def _build_vit(cfg: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> Setup:
    dcfg = cfg["data"]
    model = build_vit(cfg["model"], cfg["peft"], seed=int(cfg["seed"])).to(dev)
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
        raise ValueError(f"data: CIFAR label {top} does not fit the model's {num_classes}-way head")
    return Setup(
        cfg, model, ngdref.SoftmaxCrossEntropy(), splits["train"], splits["validation"],
        {"test": splits["test"]}, None, dev, dtype, cfg["task"],
    )


def _build_mlp(cfg: dict[str, Any], dev: torch.device, dtype: torch.dtype) -> Setup:
    dcfg, task = cfg["data"], cfg["task"]
    model = build_mlp(cfg["model"], seed=int(cfg["seed"])).to(dev)
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


_BUILDERS = {"t5-lora": _build_t5, "t5-prompt": _build_t5, "vit-lora": _build_vit,
             "mlp": _build_mlp}


def build_setup(config: Mapping[str, Any], device: str | torch.device | None = None) -> Setup:
    """Build the model, losses and data splits of a resolved configuration.

    Parameters
    ----------
    config : mapping
        From :func:`~validation.experiments.config.load.load_config` (or a run's
        ``config.json``, :func:`load_run_config`).
    device : str or torch.device, optional
        Default: CUDA when available, else CPU.

    Returns
    -------
    Setup
        The model is freshly initialised (base weights from ``model.name``; adapters from
        ``config["seed"]``), in eval mode; load a checkpoint with :meth:`Setup.load_params`.
    """
    cfg = dict(config)
    if cfg.get("setup") not in _BUILDERS:
        raise ConfigError(f"config key 'setup' is not a known setup: {cfg.get('setup')!r}")
    return _BUILDERS[cfg["setup"]](cfg, resolve_device(device), torch_dtype(cfg["model"]["dtype"]))
