r"""A CPU reproduction in the paper's own setting: LoRA fine-tuning of a pretrained network.

``python -m validation.experiments reproduce --setup digits-lora [--quick]`` runs, on
scikit-learn's 8x8 digits (the runner's seeded 1,077 / 360 / 360 split), the paper's
parameter-efficient fine-tuning protocol (App. H, T5 + LoRA) scaled to a 15-minute budget on
two CPU cores:

1. **Pretraining** (once, in the calling process): an MLP 64-64-64-10 (ReLU, float32) is
   trained with Adam (lr 1e-3, batch 32, seed 0) on the training images of digits 0-4 only,
   so its 10-way head has never seen 5-9. The weights go to ``OUT/base_model.pt`` (with their
   SHA-256 in every run's configuration) and are copied into each run directory, so a run
   directory is evaluated with exactly the weights it was trained on.
2. **Fine-tuning** on the images of digits 5-9 (train / validation / test restricted to those
   labels; the head keeps its 10 outputs, as ViT keeps its 1000-way head): the base weights
   are frozen and LoRA adapters (peft, rank r = alpha, dropout 0, on all three linear layers,
   the head included) are trained with AdamW, SGD, iEF, EF and SF under the paper's T5-LoRA
   settings (configs/t5-lora.json: AdamW 1e-3 with weight decay 1e-2, SGD 0.1, iEF 100,
   EF / SF 0.01 normalised with linear decay, damping 1e-7, the duplicate filter at 0.99,
   mean loss, batch 32). Learning rates: from a decade below the paper's value to three
   above it, each with seed 0, the best validation accuracy kept; then seeds 1 and 2.
3. **Evaluation framework** on the AdamW run's epoch checkpoints (the paper's baseline for
   LoRA), under the authors' protocol (:mod:`validation.experiments.evaluate.protocols`), in
   float64, and a damping sweep at the first, middle and last checkpoint.

The driver, report and claims are :func:`validation.experiments.reproduce.driver.reproduce`'s; this
module provides the data, the pretraining, the model (:func:`build_lora_setup`) and the plan.
The paper's order to compare with is its GLUE + T5 + LoRA column of Table 1
(AdamW 80.1 > iEF 79.3 > SGD 77.3 > SF 76.5 > EF 63.1).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from validation.experiments.reproduce.plan import Experiment, Plan, ReproduceError, decade_grid

if TYPE_CHECKING:
    import torch

    from validation.experiments.train.runner import Setup

__all__ = [
    "BASE_FILE",
    "DIGITS_LORA",
    "FINETUNE_CLASSES",
    "FULL_LORA",
    "LORA_OPTIMIZERS",
    "PAPER_LORA_LR",
    "PRETRAIN_CLASSES",
    "QUICK_LORA",
    "build_lora_setup",
    "digits_subset",
    "pretrain",
    "run_config",
    "setup_for_run",
    "setup_of_run_dir",
]

SETUP = "digits-lora"
BASE_FILE = "base_model.pt"
LORA_OPTIMIZERS = ("adamw", "sgd", "ief", "ef", "sf")
#: the paper's T5 + LoRA learning rates (App. H; configs/t5-lora.json)
PAPER_LORA_LR: dict[str, float] = {
    "adamw": 1e-3, "sgd": 0.1, "ief": 100.0, "ef": 0.01, "sf": 0.01,
}
#: GLUE + T5 + LoRA, Table 1 (mean GLUE test metric x100)
PAPER_LORA_SCORE: dict[str, float] = {
    "adamw": 80.1, "ief": 79.3, "sgd": 77.3, "sf": 76.5, "ef": 63.1,
}
PAPER_LORA_ORDER = ("adamw", "ief", "sgd", "sf", "ef")
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
_PRETRAIN_LR = 1e-3
_PRETRAIN_BATCH = 32


def digits_subset(
    split: str, classes: tuple[int, ...], *, seed: int = 0, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, 64) and labels (n,) of the runner's digits ``split`` restricted to ``classes``.

    The split and its standardisation are :func:`validation.experiments.data.glue.load_digits`'s
    (statistics of the full training split, so pretraining and fine-tuning see the same
    input scale). Labels keep their values (5-9 stay 5-9 in the 10-way head).
    """
    import torch

    from validation.experiments.data.glue import load_digits

    part = load_digits(split, seed=seed, dtype=dtype or torch.float32)  # type: ignore[arg-type]
    mask = torch.isin(part.labels, torch.as_tensor(classes))
    return part.inputs[mask], part.labels[mask]


def _base_model(hidden_sizes: tuple[int, ...]) -> torch.nn.Module:
    from validation.experiments.models.builders import MLP

    return MLP(64, hidden_sizes, 10, "relu")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pretrain(out: Path, plan: Plan) -> None:
    """Pretrain the base MLP on digits 0-4 into ``out/base_model.pt`` (skipped if present).

    Adam (lr 1e-3), batch 32, ``plan.pretrain_epochs`` epochs over the training images of
    digits 0-4, seed 0, one torch thread (deterministic); float32 state dict.
    """
    import torch

    path = Path(out) / BASE_FILE
    if path.is_file():
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = _base_model(plan.hidden_sizes)
        x, y = digits_subset("train", PRETRAIN_CLASSES)
        optimizer = torch.optim.Adam(model.parameters(), lr=_PRETRAIN_LR)
        model.train()
        for epoch in range(plan.pretrain_epochs):
            order = np.random.default_rng([0, epoch]).permutation(len(y))
            for start in range(0, len(y), _PRETRAIN_BATCH):
                idx = torch.as_tensor(order[start:start + _PRETRAIN_BATCH])
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)


def run_config(
    plan: Plan, optimizer: str, lr: float, seed: int, out: Path | None = None
) -> dict[str, Any]:
    """The configuration of one fine-tuning run: the ``mlp`` runner settings with the paper's
    T5-LoRA optimiser sections, ``setup = "digits-lora"`` and a ``digits_lora`` section naming
    the base weights ``out/base_model.pt`` (path and SHA-256; None without ``out``)."""
    from validation.experiments.config.load import KFAC_OPTIMIZERS, load_config

    config = load_config("mlp", [
        ("task", "digits"), ("seed", seed), ("train.epochs", plan.epochs),
        ("train.batch_size", plan.batch_size), ("model.hidden_sizes", list(plan.hidden_sizes)),
        ("model.dtype", plan.dtype), ("data.max_train_samples", plan.max_train_samples),
    ])
    lora_optimizers = load_config("t5-lora", [])["optimizers"]
    config["setup"] = SETUP
    config["optimizer"] = optimizer
    config["optimizers"] = {  # and the K-FAC family's sections, for --optimizer kfac etc.
        name: dict(lora_optimizers[name]) for name in (*LORA_OPTIMIZERS, *KFAC_OPTIMIZERS)
    }
    config["optimizers"][optimizer]["lr"] = float(lr)
    config["digits_lora"] = {
        "_doc": "base: an MLP pretrained on digits 0-4 (lora_digits.pretrain); LoRA adapters "
        "on every linear layer are fine-tuned on digits 5-9",
        "pretrain_classes": list(PRETRAIN_CLASSES),
        "finetune_classes": list(FINETUNE_CLASSES),
        "pretrain_epochs": plan.pretrain_epochs,
        "rank": plan.lora_rank,
        "alpha": plan.lora_rank,
        "dropout": 0.0,
        "base_path": None,
        "base_sha256": None,
    }
    if out is not None:
        base = Path(out).resolve() / BASE_FILE
        config["digits_lora"]["base_path"] = str(base)
        config["digits_lora"]["base_sha256"] = _sha256(base)
    return config


def build_lora_setup(
    config: dict[str, Any], run_dir: str | Path, device: str | torch.device | None = "cpu"
) -> Setup:
    """The fine-tuning set-up of a ``digits-lora`` configuration: base weights from
    ``run_dir/base_model.pt`` (copied there from the configuration's ``base_path`` on first
    use and checked against ``base_sha256``), LoRA adapters seeded by ``config["seed"]``, and
    the digits 5-9 splits.

    Raises
    ------
    ReproduceError
        The base weights are missing or are not the ones the configuration names.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    import ngdref
    from validation.experiments.data.splits import TensorSplit
    from validation.experiments.models.builders import torch_dtype
    from validation.experiments.models.setup import Setup, resolve_device

    lora = config["digits_lora"]
    run = Path(run_dir)
    path = run / BASE_FILE
    if not path.is_file() and lora.get("base_path"):
        source = Path(lora["base_path"])
        if source.is_file():
            run.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, path)
    if not path.is_file():
        raise ReproduceError(f"run_dir: {str(path)!r} is missing (the pretrained base weights)")
    if lora.get("base_sha256") and _sha256(path) != lora["base_sha256"]:
        raise ReproduceError(
            f"run_dir: {str(path)!r} is not the base the run's config.json names (SHA-256 differs)"
        )
    dev = resolve_device(device)
    dtype = torch_dtype(config["model"]["dtype"])
    model = _base_model(tuple(config["model"]["hidden_sizes"]))
    model.load_state_dict(torch.load(path, weights_only=True))
    torch.manual_seed(int(config["seed"]))
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    model = get_peft_model(model, LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=targets,
    ))
    model = model.to(dev, dtype).eval()
    classes = tuple(lora["finetune_classes"])
    limit = config["data"]["max_train_samples"]
    splits = {}
    for name in ("train", "validation", "test"):
        x, y = digits_subset(name, classes, seed=config["data"]["split_seed"], dtype=dtype)
        if name == "train" and limit is not None:
            x, y = x[:limit], y[:limit]
        splits[name] = TensorSplit(name, x, y, dev)
    return Setup(
        config, model, ngdref.SoftmaxCrossEntropy(), splits["train"], splits["validation"],
        {"test": splits["test"]}, None, dev, dtype, "digits-5-9",
    )


def setup_for_run(
    config: dict[str, Any], run_dir: str | Path, device: str | torch.device | None = "cpu"
) -> Setup | None:
    """The prebuilt set-up of a run this module defines, or None (the runner builds it)."""
    if config.get("setup") != SETUP:
        return None
    return build_lora_setup(config, run_dir, device)


def setup_of_run_dir(
    run_dir: str | Path, device: str | torch.device | None = "cpu"
) -> Setup | None:
    """The set-up of a ``digits-lora`` run directory (read from its ``config.json``, which the
    runner's schemas do not cover), or None for any other run directory."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # the runner's loader reports it
    if not isinstance(config, dict):
        return None
    return setup_for_run(config, run_dir, device)


def _describe(plan: Plan, steps_per_epoch: int) -> str:
    return (
        f"Plan `{plan.name}`: an MLP 64-{'-'.join(map(str, plan.hidden_sizes))}-10 "
        f"({plan.dtype}) pretrained with Adam for {plan.pretrain_epochs} epochs on the training "
        f"images of digits 0-4, then LoRA adapters (rank {plan.lora_rank}, alpha "
        f"{plan.lora_rank}, every linear layer, base frozen) fine-tuned on digits 5-9: batch "
        f"{plan.batch_size}, {plan.epochs} epochs of {steps_per_epoch} steps, mean loss, the "
        "paper's T5-LoRA optimiser settings (AdamW with weight decay 1e-2; SGD; iEF constant "
        "lr; EF/SF normalised with linear decay; damping 1e-7; duplicate filter 0.99). "
        "Learning rate chosen on validation accuracy (seed 0) from the grid below; then seeds "
        f"{', '.join(map(str, plan.seeds))} at that value. Test accuracy is that of the "
        "best-validation checkpoint on the test images of digits 5-9; the final training loss "
        "is the mean of the last epoch's batch losses. Mean ± sample std over the seeds."
    )


def _prepare(out: Path, plan: Plan) -> None:
    pretrain(out, plan)


#: the measured plan (the reproductions guide): five learning rates per optimiser (a decade
#: below the paper's to three above; a first run with one decade above chose that top edge for
#: AdamW, EF and SF), 3 seeds
FULL_LORA = Plan(
    name="digits-lora",
    epochs=10,
    step_epoch=10,
    lr_grid=decade_grid(PAPER_LORA_LR, LORA_OPTIMIZERS, below=1, count=5),
    seeds=(0, 1, 2),
    hidden_sizes=(64, 64),
    eval_batches=100,
    eval_every=1,
    sweep_batches=20,
    batch_size=32,
    pretrain_epochs=30,
    lora_rank=4,
)
#: a smoke test of every stage (tests; about a minute)
QUICK_LORA = Plan(
    name="digits-lora-quick",
    epochs=2,
    step_epoch=2,
    lr_grid={opt: (PAPER_LORA_LR[opt],) for opt in LORA_OPTIMIZERS},
    seeds=(0, 1),
    hidden_sizes=(16,),
    max_train_samples=96,
    eval_batches=2,
    eval_batch_size=80,
    eval_every=1,
    sweep_batches=1,
    sweep_dampings=(1e-7, 1e-3),
    batch_size=32,
    pretrain_epochs=2,
    lora_rank=2,
)


#: the LoRA experiment for :func:`validation.experiments.reproduce.driver.reproduce`
DIGITS_LORA = Experiment(
    name=SETUP,
    optimizers=LORA_OPTIMIZERS,
    baseline="adamw",
    paper_lr=PAPER_LORA_LR,
    paper_order=PAPER_LORA_ORDER,
    paper_score=PAPER_LORA_SCORE,
    paper_score_label="GLUE + T5 + LoRA (x100)",
    title="LoRA fine-tuning reproduction on scikit-learn digits (Wu et al. 2024, PEFT setting "
    "scaled)",
    run_config=run_config,
    describe=_describe,
    prepare=_prepare,
    toy_figures=False,
)
