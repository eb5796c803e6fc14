"""The training runner's optimisers, learning-rate schedules and per-epoch randomness.

Re-exported by :mod:`validation.experiments.train.runner`, whose docstring describes the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from validation.experiments.config.load import (
    KFAC_OPTIMIZERS,
    ConfigError,
)
from validation.experiments.data.splits import IGNORE_INDEX
from validation.experiments.models.setup import (
    LabelWordSampledCE,
    Setup,
)


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


def _baseline_optimizer(
    name: str, o: Mapping[str, Any], params: list[torch.nn.Parameter]
) -> torch.optim.Optimizer | None:
    """Adam, AdamW, SGD or Adafactor from their config section (None for the other names)."""
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
    return None


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
    import backends.torch.optim.methods as ngd_optim

    cfg = setup.config
    name = cfg["optimizer"]
    o = cfg["optimizers"][name]
    params = [p for _, p in setup.trainable]
    baseline = _baseline_optimizer(name, o, params)
    if baseline is not None:
        return baseline
    common = {
        "reduction": 1.0 if o["reduction"] == "hf" and setup.label_words else (
            "mean" if o["reduction"] == "hf" else o["reduction"]
        ),
        "output_fn": setup.output_fn,
        "per_sample": cfg["train"]["per_sample"],
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
        sf_loss = setup.loss
        if setup.label_words is not None and o["sample_positions"] == "label_word":
            sf_loss = LabelWordSampledCE(setup.loss.vocab_size, ignore_index=IGNORE_INDEX)
        return ngd_optim.SF(
            setup.model, sf_loss, lr=o["lr"], damping=o["damping"], total_steps=total_steps,
            num_samples=o["num_samples"], seed=int(cfg["seed"]), **common,
        )
    if name in KFAC_OPTIMIZERS:
        from backends.torch.optim import kfac as kfac_optim

        cls = {"kfac": kfac_optim.KFAC, "ekfac": kfac_optim.EKFAC, "iekfac": kfac_optim.IEKFAC}
        extra = {"seed": int(cfg["seed"])} if name == "kfac" else {}
        return cls[name](
            setup.model, setup.loss, lr=o["lr"], damping=o["damping"],
            update_interval=o["update_interval"], running_average=o["running_average"],
            damped_inverse=o["damped_inverse"], reduction=common["reduction"],
            output_fn=setup.output_fn, **extra,
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
