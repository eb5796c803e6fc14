"""The experiments' configuration (validation/experiments/config/load.py) and its command line.

Overrides parsed from ``key=value``, per-task defaults, the paper's and the released code's
values as named presets, errors that name the key, and the ``config`` command's labels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.experiments.cases import require_hf_stack

require_hf_stack()

from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config.load import (  # noqa: E402
    ConfigError,
    apply_overrides,
    config_diff,
    default_config,
    load_config,
    parse_override,
    with_new_defaults,
)


# ---- configuration --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.batch_size=16", ("train.batch_size", 16)),
        ("optimizers.ief.damping=1e-12", ("optimizers.ief.damping", 1e-12)),
        ("data.source=/data/glue_data", ("data.source", "/data/glue_data")),
        ("data.augment=false", ("data.augment", False)),
        ("data.validation_size=null", ("data.validation_size", None)),
        ("optim.milestones=[15, 30]", ("optim.milestones", [15, 30])),
        ("task=a=b", ("task", "a=b")),
    ],
)
def test_parse_override(text: str, expected: tuple[str, Any]) -> None:
    assert parse_override(text) == expected


def test_overrides_and_task_defaults() -> None:
    config = load_config("t5-lora", ["task=RTE", "optimizer=ief", "optim.lr=50", "seed=2"])
    assert (config["task"], config["seed"]) == ("rte", 2)
    assert (config["train"]["epochs"], config["train"]["eval_every"]) == (40, 30)
    assert config["optimizers"]["ief"]["lr"] == 50.0
    assert isinstance(config["optimizers"]["ief"]["lr"], float)
    assert load_config("vit-lora")["train"]["epochs"] == 5
    assert load_config("t5-prompt")["optimizers"]["adafactor"] == {
        "lr": 0.3, "weight_decay": 1e-05, "scale_parameter": False, "relative_step": False,
        "warmup_init": False, "schedule": "constant", "milestones": [], "gamma": 0.1,
    }


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("train.batchsize=3", r"unknown config key 'train\.batchsize'; did you mean 'batch_size'"),
        ("trian.batch_size=3", r"unknown config key 'trian'"),
        ("optimizers.ief.lrr=1", r"unknown config key 'optimizers\.ief\.lrr'"),
        ("train.batch_size=abc", r"config key 'train\.batch_size' must be a number"),
        ("train.batch_size=2.5", r"config key 'train\.batch_size' must be an integer"),
        ("train.epochs=many", r"config key 'train\.epochs' must be an int >= 1 or one of"),
        ("data.augment=1", r"config key 'data\.augment' must be a bool"),
        ("optimizer=lbfgs", r"config key 'optimizer' must be one of"),
        ("task=sst2", r"config key 'task' must be one of \('cifar100',\)"),
        ("data.label_set=medium",
         r"config key 'data\.label_set' must be one of \('fine', 'coarse'\)"),
        ("train.batch_size", r"must have the form key=value"),
    ],
)
def test_bad_config_keys_and_values_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config("vit-lora", [override])


def test_config_file_is_checked_against_its_setup(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"setup": "mlp", "train": {"batch_sise": 8}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.batch_sise'"):
        load_config(path)
    path.write_text(json.dumps({"setup": "mlp", "_note": "x", "train": {"batch_size": 8}}))
    assert load_config(path)["train"]["batch_size"] == 8
    with pytest.raises(ConfigError, match="setup must be one of"):
        default_config("resnet")
    assert apply_overrides(default_config("mlp"), [])["optimizer"] == "adam"


def test_a_renamed_key_is_read_under_its_new_name_and_both_names_are_refused(
    tmp_path: Path,
) -> None:
    """train.per_sample_method (stored runs and files written before the rename) is read as
    train.per_sample; a stored config with it compares equal to today's; both at once: refused."""
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"setup": "mlp", "train": {"per_sample_method": "vmap"}}))
    loaded = load_config(path)
    assert loaded["train"]["per_sample"] == "vmap" and "per_sample_method" not in loaded["train"]
    stored = json.loads(json.dumps(load_config("mlp")))
    stored["train"]["per_sample_method"] = stored["train"].pop("per_sample")
    assert config_diff(with_new_defaults(stored), load_config("mlp")) == []
    assert "per_sample_method" in stored["train"]  # the caller's dict is left as it was
    path.write_text(json.dumps(
        {"setup": "mlp", "train": {"per_sample_method": "vmap", "per_sample": "auto"}}))
    with pytest.raises(ConfigError, match=r"train\.per_sample_method is the old name"):
        load_config(path)


def test_cli_config_command_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "mlp", "--optimizer", "ief", "--set", "optim.lr=0.5",
                 "--epochs", "3", "--seed", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optimizers"]["ief"]["lr"] == 0.5
    assert (printed["train"]["epochs"], printed["seed"], printed["optimizer"]) == (3, 4, "ief")
    assert main(["config", "mlp", "--set", "train.bach_size=3"]) == 2
    assert "train.bach_size" in capsys.readouterr().err


# ---- every setup's defaults ----------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["t5-lora", "t5-prompt", "vit-lora", "mlp", "mlp-cifar10"])
def test_the_override_example_of_messages_and_help_is_a_key_of_every_setup(setup: str) -> None:
    from validation.experiments.__main__ import build_parser
    from validation.experiments.config.load import OVERRIDE_EXAMPLE

    with pytest.raises(ConfigError, match=re.escape(OVERRIDE_EXAMPLE)):
        parse_override("train.batch_size")
    _, value = parse_override(OVERRIDE_EXAMPLE)
    assert load_config(setup, [OVERRIDE_EXAMPLE])["train"]["batch_size"] == value
    assert OVERRIDE_EXAMPLE in build_parser()._subparsers._group_actions[0].choices[
        "train"].format_help().replace("\n", " ").replace("  ", " ")


def test_mlp_config_is_the_readme_digits_setup() -> None:
    """The reproductions guide's digits set-up is the reproduction's plan: MLP 64-128-128-10 on
    digits, batch 64, 20 epochs, x0.1 step after a quarter of them (the plan sets its own dtype)."""
    from validation.experiments.reproduce.driver import FULL

    config = load_config("mlp")
    assert (config["task"], config["model"]["input_dim"], config["model"]["num_classes"]) == (
        "digits", 64, 10)
    assert config["model"]["hidden_sizes"] == list(FULL.hidden_sizes) == [128, 128]
    assert (config["train"]["batch_size"], config["train"]["epochs"]) == (64, FULL.epochs)
    for name in ("adam", "sgd"):
        opt = config["optimizers"][name]
        assert (opt["schedule"], opt["milestones"], opt["gamma"]) == (
            "step", [FULL.step_epoch], 0.1)


@pytest.mark.parametrize("setup", ["t5-lora", "t5-prompt", "vit-lora", "mlp", "mlp-cifar10"])
def test_training_configs_filter_duplicates_at_0_99(setup: str) -> None:
    """The team convention: 0.99 in the optimisers and training configs (0.95 in evaluation)."""
    optimizers = default_config(setup)["optimizers"]
    assert {n: optimizers[n]["dedup_threshold"] for n in ("ief", "ef")} == {"ief": 0.99,
                                                                           "ef": 0.99}


# ---- the paper's and the released code's values --------------------------------------------------
def test_released_code_values_are_a_named_option() -> None:
    paper = load_config("t5-prompt", ["optimizer=ief"])
    released = load_config("t5-prompt", ["optimizer=ief", "follow=released"])
    assert (paper["optimizers"]["ief"]["schedule"], paper["optimizers"]["ief"]["damping"]) == (
        "constant", 1e-12)
    assert (released["optimizers"]["ief"]["schedule"],
            released["optimizers"]["ief"]["damping"]) == ("linear", 1e-7)
    vit = load_config("vit-lora", ["follow=released", "optimizers.ief.damping=1e-9"])
    assert (vit["optimizers"]["ief"]["lr"], vit["data"]["label_set"]) == (50.0, "coarse")
    assert vit["optimizers"]["ief"]["damping"] == 1e-9  # a later --set wins over the preset
    assert load_config("vit-lora")["optimizers"]["ief"]["lr"] == 100.0
    with pytest.raises(ConfigError, match=r"'follow' must be one of \('paper', 'released'\)"):
        load_config("vit-lora", ["follow=authors"])


def test_cli_config_labels_paper_and_released_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["config", "vit-lora", "--optimizer", "ief"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "[paper] released code: 50.0" in lines["optimizers.ief.lr"]
    assert "[paper+released]" in lines["peft.r"]
    assert "[ngdref]" in lines["optimizers.ngd.lr"]
    assert main(["config", "vit-lora", "--optimizer", "ief", "--set", "follow=released",
                 "--set", "optim.damping=1e-9"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "= 50.0" in lines["optimizers.ief.lr"] and "[released]" in lines["optimizers.ief.lr"]
    assert "[set] changed from 1e-12" in lines["optimizers.ief.damping"]
    assert '"coarse"' in lines["data.label_set"] and "[released]" in lines["data.label_set"]
    # the scaled digits MLP is this project's set-up; the full-scale one is the paper's
    for setup, label in (("mlp", "[ngdref]"), ("mlp-cifar10", "[paper]")):
        assert main(["config", setup]) == 0
        lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
        assert label in lines["train.epochs"] and label in lines["model.hidden_sizes"]
        assert label in lines["optimizers.adam.milestones"]


@pytest.mark.parametrize(("setup", "value", "label"), [
    ("t5-lora", "float32", "[released]"), ("vit-lora", "float32", "[released]"),
    ("mlp", "float64", "[ngdref]"), ("mlp-cifar10", "float64", "[ngdref]"),
])
def test_model_dtype_provenance_says_what_is_true(
    setup: str, value: str, label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The MLP trains in float64 here; labelling it [released] 'float32 as the released
    code' was false (the released code has no MLP; its T5 and ViT runs are float32)."""
    assert main(["config", setup]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    line = lines["model.dtype"]
    assert f'"{value}"' in line and label in line, line
    if label == "[released]":
        assert "float32 as the released code" in line
