"""Where each configuration value comes from: the paper, the authors' released code, or neither.

The paper (Wu et al. 2024, App. H) and the authors' released code (github
HANDSOMEJACKANDY/improved-empirical-fisher: ``configs/*.yaml``, ``example_glue_sst2_train.py``)
disagree on a few settings. Each disagreement is a named option: the top-level key ``follow``
("paper", the default, or "released") switches all of a setup's :data:`RELEASED` values at
once, and each stays a plain key that ``--set`` can change on its own::

    python -m validation.experiments config t5-prompt --optimizer ief --set follow=released
    python -m validation.experiments config vit-lora --set data.label_set=coarse

:func:`provenance` labels every value of a resolved configuration; the ``config`` command prints
it. Labels: ``paper`` (stated in the paper), ``released`` (the released code; the paper is
silent), ``paper+released`` (both agree), ``ngdref`` (neither: this project's choice, e.g.
file locations, logging, the NGD optimiser the paper does not train with), ``choice`` (what to
run: setup, task, optimizer, seed) and ``set`` (a value changed from what ``follow`` gives).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["RELEASED", "SOURCES", "apply_follow", "provenance"]

#: setup -> dotted key -> (the released code's value, where it comes from); the defaults are
#: the paper's values
RELEASED: dict[str, dict[str, tuple[Any, str]]] = {
    "t5-prompt": {
        "optimizers.ief.schedule": (
            "linear",
            "t5-prompt-tuning-iEF.yaml has no scheduler block, so get_linear_schedule_with_warmup "
            "decays the lr linearly to 0; the paper: constant",
        ),
        "optimizers.ief.damping": (1e-7, "t5-prompt-tuning-iEF.yaml damping 1.e-7; paper 1e-12"),
    },
    "vit-lora": {
        "optimizers.ief.lr": (50.0, "vit-lora-iEF.yaml lr 50; the paper 100"),
        "optimizers.ief.damping": (1e-12, "vit-lora-iEF.yaml damping 1.e-12; the paper 1e-7"),
        "data.label_set": (
            "coarse",
            "the released code feeds CIFAR-100's 20 coarse labels; the paper: the 100 fine ones",
        ),
    },
}

_HF = ("setup", "task", "optimizer", "seed")
# (key prefix, label, note); the longest matching prefix wins, unmatched keys are "ngdref"
_COMMON: list[tuple[str, str, str]] = [
    *[(k, "choice", "what to run") for k in _HF],
    ("follow", "choice", "paper or released values for the keys they disagree on"),
    ("model.dtype", "released", "float32 as the released code; the paper does not say"),
    ("train.batch_size", "paper+released", "32 (App. H)"),
    ("train.epochs", "paper", "per task, App. H Table 3"),
    ("train.eval_every", "paper", "per task, App. H Table 3"),
    ("optimizers.adamw", "paper", "App. H"),
    ("optimizers.adamw.betas", "ngdref", "torch default; not stated"),
    ("optimizers.adamw.eps", "ngdref", "torch default; not stated"),
    ("optimizers.adafactor", "paper", "App. H: lr 0.3, wd 1e-5, no parameter scaling"),
    ("optimizers.sgd", "paper", "App. H"),
    ("optimizers.ief", "paper", "App. H"),
    ("optimizers.ief.dedup_threshold", "released", "|cos| > 0.99 in the released optimiser"),
    ("optimizers.ef", "paper", "App. H: normalised, linear decay"),
    ("optimizers.ef.dedup_threshold", "released", "|cos| > 0.99 in the released optimiser"),
    ("optimizers.sf", "paper", "App. H: normalised, linear decay"),
    ("optimizers.ngd", "ngdref", "exact NGD is not among the paper's training runs"),
    ("optimizers.ief.milestones", "ngdref", "unused by the constant / linear schedules"),
    ("optimizers.ief.gamma", "ngdref", "unused by the constant / linear schedules"),
]
_T5: list[tuple[str, str, str]] = [
    ("model.name", "paper+released", "t5-base"),
    ("model.max_length", "paper+released", "100 tokens"),
    ("model.padding_side", "released", "the released preprocess_function pads on the left"),
    ("peft", "paper+released", "App. H"),
    ("peft.bias", "released", "peft's LoraConfig default"),
    ("peft.task_type", "released", "PromptTuningConfig(task_type=CAUSAL_LM) on the T5 model"),
    ("peft.init", "released", "PromptTuningInit.TEXT"),
    ("peft.init_text", "released", "the released task strings"),
    ("optimizers.sf.sample_positions", "released", "fisher_sampling draws labels[:, 0] only"),
]
_VIT: list[tuple[str, str, str]] = [
    ("model.name", "paper+released", "google/vit-base-patch16-224"),
    ("peft", "paper+released", "r 8, alpha 8, dropout 0.1 on query/value, their biases"),
    ("data.validation_fraction", "released", "90/10 split of CIFAR-100 train"),
    ("data.augment", "released", "RandomResizedCrop(224) + flip"),
    ("data.label_set", "paper", "CIFAR-100's 100 fine labels"),
]
_MLP: list[tuple[str, str, str]] = [
    ("train.batch_size", "paper", "64 (App. H)"),
    ("train.epochs", "ngdref", "digits: the CPU reproduction (the paper: 60 on CIFAR-10)"),
    ("model.hidden_sizes", "ngdref", "digits: the CPU reproduction (the paper: 2048, 2048)"),
    ("model.activation", "ngdref", "not stated in the paper"),
    ("model.dtype", "ngdref", "float64 for a CPU reference run; the paper does not say and the "
     "released code has no MLP (its T5 and ViT runs are float32)"),
    ("optimizers.adam", "paper", "App. H: 1e-4, x0.1 step"),
    ("optimizers.adam.milestones", "ngdref", "a quarter of the epochs, as the paper's 15 of 60"),
    ("optimizers.sgd.milestones", "ngdref", "a quarter of the epochs, as the paper's 15 of 60"),
    ("optimizers.ief.damping", "ngdref", "the paper does not state the MLP's damping"),
    ("optimizers.ef.damping", "ngdref", "the paper does not state the MLP's damping"),
    ("optimizers.sf.damping", "ngdref", "the paper does not state the MLP's damping"),
]
_MLP_CIFAR10: list[tuple[str, str, str]] = [
    ("train.epochs", "paper", "60 (App. H)"),
    ("model.hidden_sizes", "paper", "3072-2048-2048-10 (App. H)"),
    ("optimizers.adam.milestones", "paper", "x0.1 at epoch 15 (App. H)"),
    ("optimizers.sgd.milestones", "paper", "x0.1 at epoch 15 (App. H)"),
]
#: setup (``mlp/cifar10`` for the full-scale MLP) -> (key prefix, label, note) rows, the
#: longest matching prefix wins, a later row of the same prefix overrides an earlier one
SOURCES: dict[str, list[tuple[str, str, str]]] = {
    "t5-lora": _COMMON + _T5,
    "t5-prompt": _COMMON + _T5,
    "vit-lora": _COMMON + _VIT,
    "mlp": _COMMON + _MLP,
    "mlp/cifar10": _COMMON + _MLP + _MLP_CIFAR10,
}


def apply_follow(config: dict[str, Any], follow: str) -> dict[str, Any]:
    """A copy of ``config`` with the :data:`RELEASED` values of its setup when ``follow`` is
    "released" (unchanged for "paper")."""
    out = copy.deepcopy(config)
    if follow != "released":
        return out
    for key, (value, _) in RELEASED.get(out["setup"], {}).items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[leaf] = value
    return out


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping) and v:
            yield from _leaves(v, key)
        else:
            yield key, v


def _source(setup: str, key: str) -> tuple[str, str]:
    best = ("ngdref", "")
    length = -1
    for prefix, label, note in SOURCES.get(setup, []):
        matches = key == prefix or key.startswith(prefix + ".")
        if matches and len(prefix) >= length:
            best, length = (label, note), len(prefix)
    return best


def provenance(
    config: Mapping[str, Any], expected: Mapping[str, Any]
) -> list[tuple[str, Any, str, str]]:
    """``(dotted key, value, label, note)`` for every value of a resolved configuration.

    Parameters
    ----------
    config : mapping
        The resolved configuration.
    expected : mapping
        The same setup resolved with only the choices (setup, task, optimizer, seed, follow)
        applied: a value that differs from it was set by hand (label "set").
    """
    setup = str(config["setup"])
    released = RELEASED.get(setup, {})
    if setup == "mlp" and config.get("task") == "cifar10":
        setup = "mlp/cifar10"
    follow = config.get("follow", "paper")
    wanted = dict(_leaves(expected))
    rows = []
    for key, value in _leaves(config):
        label, note = _source(setup, key)
        if key in released:
            other, why = released[key]
            label = "released" if follow == "released" else "paper"
            note = why if follow == "released" else f"released code: {other!r} ({why})"
        if key in wanted and wanted[key] != value and label != "choice":
            label, note = "set", f"changed from {wanted[key]!r} ({label})"
        rows.append((key, value, label, note))
    return rows
