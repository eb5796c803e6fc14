"""Run configurations of the paper's experiments: JSON files, overrides and checks.

A configuration is a nested ``dict`` read from one of the JSON files in
``validation/experiments/configs/`` (one per setup: ``t5-lora``, ``t5-prompt``, ``vit-lora``,
``mlp``, and the full-scale ``mlp-cifar10``). The setup's file is also its schema: an override
may only set keys that the file has, with a value of the same kind, so a typo fails with an error
that names the key instead of being silently ignored. Keys starting with ``_`` are comments.

Overrides are ``"dotted.key=value"`` strings (the CLI's repeated ``--set``); the value is parsed
as JSON and taken as a plain string when it is not JSON::

    load_config("t5-lora", ["task=rte", "optimizer=ief", "optimizers.ief.lr=50",
                            "data.source=/data/glue_data", "train.max_steps=100"])

``optim.KEY`` is shorthand for ``optimizers.<the selected optimizer>.KEY``.

:func:`resolve_config` then fills in what depends on the task ("task" epochs and validation
frequency from :data:`validation.experiments.data.glue.GLUE_TASKS`, the prompt-tuning init text)
and checks the values; :func:`~validation.experiments.train.runner.train` writes the resolved
configuration to ``config.json`` in the run directory.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .renamed import renamed

__all__ = [
    "BASELINE_OPTIMIZERS",
    "CONFIG_DIR",
    "KFAC_OPTIMIZERS",
    "OVERRIDE_EXAMPLE",
    "PER_SAMPLE_OPTIMIZERS",
    "SETUPS",
    "ConfigError",
    "apply_overrides",
    "config_diff",
    "default_config",
    "load_config",
    "parse_override",
    "resolve_config",
    "with_new_defaults",
]

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

#: the example override of error messages and ``--help`` (a key of every setup; tested)
OVERRIDE_EXAMPLE = "train.batch_size=16"

#: setup name -> the task names it accepts
SETUPS: dict[str, tuple[str, ...]] = {
    "t5-lora": ("cola", "sst2", "qqp", "mrpc", "mnli", "qnli", "rte"),
    "t5-prompt": ("cola", "sst2", "qqp", "mrpc", "mnli", "qnli", "rte"),
    "vit-lora": ("cifar100",),
    "mlp": ("digits", "cifar10"),
}
#: torch / transformers optimisers, trained on the Hugging Face mean loss
BASELINE_OPTIMIZERS = ("adam", "adamw", "adafactor", "sgd")
#: the :mod:`backends.torch.optim.methods` optimisers, built from per-sample quantities
#: the K-FAC family of App. D.2.2 (:mod:`backends.torch.optim.kfac`); lr and damping are ngdref
#: choices (the paper gives none), see the ``_doc`` of their config sections
KFAC_OPTIMIZERS = ("kfac", "ekfac", "iekfac")
PER_SAMPLE_OPTIMIZERS = ("ief", "ef", "sf", "ngd", *KFAC_OPTIMIZERS)
#: the step-size schedules a config may name (EF and SF decay linearly by themselves)
SCHEDULES = ("constant", "linear", "step")

# keys that take either an int or one of these words (the schema's default is the word)
_INT_OR_WORD = {"train.epochs": ("task",), "train.eval_every": ("task", "epoch")}
# keys whose value may be a string or a number (reduction: "hf", "mean", "sum" or a float R)
_STR_OR_NUMBER = {"reduction"}


class ConfigError(ValueError):
    """A configuration key or value that is not allowed; the message names the key."""


def _strip_comments(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_comments(v) for k, v in obj.items() if not k.startswith("_")}
    if isinstance(obj, list):
        return [_strip_comments(v) for v in obj]
    return obj


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            raw = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object")
    return _strip_comments(raw)


def default_config(setup: str) -> dict[str, Any]:
    """The paper's defaults of a setup, as written in ``configs/<setup>.json`` (no comments).

    Parameters
    ----------
    setup : str
        "t5-lora", "t5-prompt", "vit-lora", "mlp", or the name of another file in
        ``configs/`` (e.g. "mlp-cifar10").

    Raises
    ------
    ConfigError
        If there is no such file.
    """
    path = CONFIG_DIR / f"{setup}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"setup must be one of {known}; got {setup!r}")
    return _read_json(path)


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"a.b=value"`` into ``("a.b", value)``; value parsed as JSON, else a string.

    ``"true"``, ``"null"``, ``"1e-7"``, ``"[15, 30]"`` are JSON; ``"/data/glue"`` and ``"ief"``
    are kept as strings.

    Raises
    ------
    ConfigError
        If there is no ``=`` or the key is empty.
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(
            f"override {text!r} must have the form key=value (e.g. {OVERRIDE_EXAMPLE})"
        )
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _check_value(key: str, default: Any, value: Any) -> Any:
    """``value`` if it is of the kind of the schema's ``default`` (numbers: int vs float too)."""
    leaf = key.rsplit(".", 1)[-1]
    if key in _INT_OR_WORD:
        words = _INT_OR_WORD[key]
        if value in words or (_kind(value) == "number" and isinstance(value, int) and value > 0):
            return value
        raise ConfigError(
            f"config key {key!r} must be an int >= 1 or one of {words}; got {value!r}"
        )
    if leaf in _STR_OR_NUMBER and _kind(value) in ("string", "number"):
        return value
    if default is None or value is None:
        return value  # a null default accepts anything; a null value means "unset"
    want, got = _kind(default), _kind(value)
    if want != got:
        raise ConfigError(
            f"config key {key!r} must be a {want} (like the default {default!r}); got {value!r}"
        )
    if want == "number" and isinstance(default, int) and not isinstance(value, int):
        if float(value).is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r} must be an integer; got {value!r}")
    if want == "number":
        return type(default)(value) if isinstance(default, float) else value
    if want == "object":
        _check_tree(key, default, value)
    return value


def _unknown_key(key: str, known: Iterable[str]) -> ConfigError:
    known = sorted(known)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (known here: {', '.join(known)})")


def _check_tree(prefix: str, schema: Mapping[str, Any], tree: Mapping[str, Any]) -> None:
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in schema:
            raise _unknown_key(key, schema)
        checked = _check_value(key, schema[k], v)
        if checked is not v and isinstance(tree, dict):
            tree[k] = checked


def apply_overrides(
    config: dict[str, Any], overrides: Iterable[str | tuple[str, Any]]
) -> dict[str, Any]:
    """A copy of ``config`` with the overrides applied and checked against the setup's schema.

    Parameters
    ----------
    config : dict
        A configuration (its ``"setup"`` names the schema, :func:`default_config`).
    overrides : iterable of "key=value" strings or (key, value) pairs
        ``optim.KEY`` stands for ``optimizers.<config["optimizer"]>.KEY`` (the optimizer
        selected after the earlier overrides).

    Raises
    ------
    ConfigError
        An unknown key (the message names it and the keys known at that level) or a value of
        the wrong kind.
    """
    out = copy.deepcopy(config)
    schema = default_config(out["setup"])
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        if key == "optim" or key.startswith("optim."):
            key = f"optimizers.{out.get('optimizer')}" + key[len("optim"):]
        parts = key.split(".")
        node, spec = out, schema
        for depth, part in enumerate(parts[:-1]):
            here = ".".join(parts[: depth + 1])
            if not isinstance(spec, dict) or part not in spec:
                raise _unknown_key(here, spec if isinstance(spec, dict) else {})
            if not isinstance(spec[part], dict):
                raise ConfigError(f"config key {here!r} is a {_kind(spec[part])}, not a section")
            node = node.setdefault(part, {})
            spec = spec[part]
        leaf = parts[-1]
        if leaf not in spec:
            raise _unknown_key(key, spec)
        node[leaf] = _check_value(key, spec[leaf], value)
    return out


def load_config(
    setup_or_path: str | os.PathLike[str],
    overrides: Iterable[str | tuple[str, Any]] = (),
) -> dict[str, Any]:
    """Read a setup's defaults or a JSON file, apply overrides, resolve and check.

    Parameters
    ----------
    setup_or_path : str or path
        A setup name ("t5-lora", "t5-prompt", "vit-lora", "mlp", "mlp-cifar10") or the path
        of a JSON file (e.g. a run's ``config.json``); a file is checked against the schema of
        its ``"setup"`` and may leave keys out (they take the setup's defaults).
    overrides : iterable
        See :func:`apply_overrides`. ``follow=released`` (or ``paper``) is applied first: it
        sets the setup's released-code values (:data:`provenance.RELEASED`), and every other
        override then applies on top.

    Returns
    -------
    dict
        The resolved configuration (:func:`resolve_config`).
    """
    text = os.fspath(setup_or_path)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file {text!r} does not exist")
        given = renamed(_read_json(path), ConfigError)
        if "setup" not in given:
            raise ConfigError(f"config file {text!r} has no 'setup' key")
        base = default_config(str(given["setup"]))
        _check_tree("", base, given)
        config = _merge(base, given)
    else:
        config = default_config(text)
    parsed = [parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    follow = [value for key, value in parsed if key == "follow"]
    if follow:  # the paper / released preset first, so that later --set values win
        from validation.experiments.config.provenance import apply_follow

        config = apply_follow(apply_overrides(config, [("follow", follow[-1])]), follow[-1])
    return resolve_config(apply_overrides(config, parsed))


def _merge(base: dict[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in given.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _positive_int(key: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"config key {key!r} must be an int >= 1; got {value!r}")


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill in task-dependent values and check the whole configuration.

    - ``train.epochs == "task"`` and ``train.eval_every == "task"``: the GLUE task's values
      (App. H, Table 3; CIFAR-100: 5 epochs, every 1000 steps).
    - ``peft.init_text == "task"``: the task's prompt-tuning initialisation
      (:ref:`experiments-setups`).

    Returns
    -------
    dict
        A new, resolved configuration.

    Raises
    ------
    ConfigError
        A value that is not allowed; the message names the key.
    """
    cfg = copy.deepcopy(config)
    setup = cfg.get("setup")
    if setup not in SETUPS:
        raise ConfigError(f"config key 'setup' must be one of {sorted(SETUPS)}; got {setup!r}")
    task = str(cfg.get("task", "")).lower().replace("-", "").replace("_", "")
    if task not in SETUPS[setup]:
        raise ConfigError(
            f"config key 'task' must be one of {SETUPS[setup]} for setup {setup!r}; "
            f"got {cfg.get('task')!r}"
        )
    cfg["task"] = task
    optimizer = cfg.get("optimizer")
    if optimizer not in cfg["optimizers"]:
        raise ConfigError(
            f"config key 'optimizer' must be one of {sorted(cfg['optimizers'])} for setup "
            f"{setup!r}; got {optimizer!r}"
        )
    _resolve_task_values(cfg)
    _check_choices(cfg)
    _check_optimizer(cfg)
    _check_seeds_and_source(cfg)
    return cfg


#: the largest finite value of each model dtype (an lr above it overflows every step)
_DTYPE_MAX = {"float32": 3.4028234663852886e38, "float64": 1.7976931348623157e308}
#: the seeds a run feeds to numpy, torch and Python: ints in [0, 2**63)
_SEED_KEYS = ("seed", "data.split_seed", "model.init_seed", "model.tiny.init_seed")


def _check_seeds_and_source(cfg: Mapping[str, Any]) -> None:
    """Seeds in [0, 2**63); data.source only where the task reads it; the divergence factor."""
    for key in _SEED_KEYS:
        present, value = _lookup(cfg, key)
        if not present or (value is None and key != "seed"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
            raise ConfigError(f"config key {key!r} must be an int in [0, 2**63); got {value!r}")
    if cfg["setup"] == "mlp" and cfg["task"] == "digits" and cfg["data"]["source"] is not None:
        raise ConfigError(
            f"config key 'data.source' is {cfg['data']['source']!r} but task 'digits' reads no "
            "source (scikit-learn ships the digits); leave it unset, or choose task cifar10"
        )
    present, factor = _lookup(cfg, "train.divergence_factor")
    if present and factor is not None and not (
        isinstance(factor, (int, float)) and not isinstance(factor, bool)
        and math.isfinite(factor) and factor > 1
    ):
        raise ConfigError(
            f"config key 'train.divergence_factor' must be null or a number > 1; got {factor!r}"
        )


def _resolve_task_values(cfg: dict[str, Any]) -> None:
    """Fill in the "task" defaults (epochs, eval_every, prompt init text) and check train.*."""
    from validation.experiments.data import glue as data

    setup, task, train = cfg["setup"], cfg["task"], cfg["train"]
    if setup.startswith("t5"):
        glue = data.GLUE_TASKS[task]
        epochs, every = glue.epochs, glue.eval_every
    elif task == "cifar100":
        epochs, every = data.CIFAR100_EPOCHS, data.CIFAR100_EVAL_EVERY
    else:
        epochs, every = None, None
    for key, value in (("epochs", epochs), ("eval_every", every)):
        if train[key] == "task":
            if value is None:
                raise ConfigError(f"config key 'train.{key}': task {task!r} has no default")
            train[key] = value
    for key in ("batch_size", "eval_batch_size", "epochs", "checkpoint_every", "log_every"):
        _positive_int(f"train.{key}", train[key])
    _positive_int("train.max_steps", train["max_steps"], allow_none=True)
    _positive_int("train.chunk_size", train["chunk_size"], allow_none=True)
    if train["eval_every"] != "epoch":
        _positive_int("train.eval_every", train["eval_every"])
    if setup == "t5-prompt" and cfg["peft"]["init_text"] == "task":
        cfg["peft"]["init_text"] = data.GLUE_TASKS[task].prompt_init


def _check_optimizer(cfg: Mapping[str, Any]) -> None:
    """The selected optimizer's schedule, lr and reduction."""
    optimizer = cfg["optimizer"]
    opt = cfg["optimizers"][optimizer]
    prefix = f"optimizers.{optimizer}"
    if "schedule" in opt and opt["schedule"] not in SCHEDULES:
        raise ConfigError(
            f"config key '{prefix}.schedule' must be one of {SCHEDULES}; got {opt['schedule']!r}"
        )
    if "lr" in opt:
        lr, dtype = opt["lr"], cfg["model"]["dtype"]
        largest = _DTYPE_MAX.get(dtype, _DTYPE_MAX["float64"])
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr <= largest:
            raise ConfigError(
                f"config key '{prefix}.lr' must be a finite number >= 0 that model.dtype "
                f"{dtype} can hold (<= {largest:.4g}); got {lr!r}"
            )
    if "reduction" in opt:
        red = opt["reduction"]
        ok = red in ("hf", "mean", "sum") or (
            isinstance(red, (int, float)) and not isinstance(red, bool) and red > 0
        )
        if not ok:
            raise ConfigError(
                f"config key '{prefix}.reduction' must be 'hf', 'mean', 'sum' or a float > 0; "
                f"got {red!r}"
            )


#: dotted key -> the values it may take (checked when the setup has the key)
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "float64"),
    "model.padding_side": ("left", "right"),
    "data.label_set": ("fine", "coarse"),
    "data.protocol": ("holdout", "paper"),
    "peft.task_type": ("causal_lm", "seq2seq_lm"),
    "optimizers.sf.sample_positions": ("label_word", "all"),
    "optimizers.kfac.damped_inverse": ("exact", "pi"),
    "optimizers.ekfac.damped_inverse": ("exact", "pi"),
    "optimizers.iekfac.damped_inverse": ("exact", "pi"),
    "follow": ("paper", "released"),
}


def _lookup(cfg: Mapping[str, Any], key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _check_choices(cfg: Mapping[str, Any]) -> None:
    for key, allowed in CHOICES.items():
        present, value = _lookup(cfg, key)
        if present and value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {allowed}; got {value!r}")


def with_new_defaults(stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored (resolved) configuration with every key its setup's schema gained since it was
    written at the schema's default (a run started before ``train.divergence_factor`` existed
    compares equal to the same run now); the stored values are kept as they are."""
    stored = renamed(stored, ConfigError)
    setup = stored.get("setup")
    if not isinstance(setup, str) or not (CONFIG_DIR / f"{setup}.json").is_file():
        return stored
    return _merge(default_config(setup), stored)


def config_diff(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configurations (sorted)."""
    keys = sorted(set(a) | set(b))
    out: list[str] = []
    for k in keys:
        key = f"{prefix}.{k}" if prefix else k
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, key)
        elif va != vb:
            out.append(key)
    return out
