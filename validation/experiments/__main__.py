"""Command line of the paper's experiments: ``python -m validation.experiments COMMAND ...``.

Commands
--------
``train SETUP``
    Train one configuration (SETUP: t5-lora, t5-prompt, vit-lora, mlp, mlp-cifar10, or a JSON
    file such as a run's ``config.json``). ``--task``, ``--optimizer``, ``--seed``,
    ``--epochs``, ``--max-steps`` and repeated ``--set key=value`` override the defaults;
    ``--out`` is the run directory, ``--resume`` continues it (an error when there is nothing
    to continue), ``--resume-or-start`` continues it or starts it when it is missing or empty.
``config SETUP``
    Print the resolved configuration (same options), each value labelled with its source: the
    paper, the authors' released code, both, or neither (``--json``: plain JSON). ``--set
    follow=released`` takes the released code's values where they differ from the paper's.
``checkpoints RUN_DIR``
    List a run's checkpoints.

Examples::

    python -m validation.experiments train t5-lora --task rte --optimizer ief \\
        --set data.source=/data/glue_data --out runs/rte-ief-s0
    python -m validation.experiments train mlp --optimizer ief --max-steps 200
    python -m validation.experiments train runs/rte-ief-s0/config.json --out runs/rte-ief-s0 \\
        --resume

Adding a command: write ``register(subparsers)`` that adds a parser with
``set_defaults(func=run)`` where ``run(args) -> int``, and append it to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["COMMANDS", "build_parser", "config_from_args", "main"]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by every command that builds a configuration."""
    from validation.experiments.config.load import OVERRIDE_EXAMPLE

    parser.add_argument(
        "setup",
        help="t5-lora, t5-prompt, vit-lora, mlp, mlp-cifar10, or a JSON config file",
    )
    parser.add_argument("--task", help="GLUE task (cola, sst2, ...), cifar100, digits, cifar10")
    parser.add_argument(
        "--optimizer",
        help="adamw, adam, adafactor, sgd, ief, ef, sf, ngd, kfac, ekfac, iekfac (per setup)",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--epochs", type=int, help="train.epochs")
    parser.add_argument("--max-steps", type=int, help="train.max_steps (caps the run)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. {OVERRIDE_EXAMPLE} or optim.lr=50 ('optim.KEY' is "
        "the selected optimizer's section); `config SETUP` prints every key (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration of ``args`` (setup, shorthand flags, then ``--set``)."""
    from validation.experiments.config.load import load_config

    overrides: list[tuple[str, Any]] = []
    for key, flag in (
        ("task", "task"),
        ("optimizer", "optimizer"),
        ("seed", "seed"),
        ("train.epochs", "epochs"),
        ("train.max_steps", "max_steps"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append((key, value))
    return load_config(args.setup, [*overrides, *args.overrides])


def _default_run_dir(config: dict[str, Any]) -> Path:
    return Path("runs") / config["setup"] / config["task"] / config["optimizer"] / (
        f"seed{config['seed']}"
    )


# ---- train -----------------------------------------------------------------------------------
def _run_train(args: argparse.Namespace) -> int:
    from validation.experiments.train.runner import train

    config = config_from_args(args)
    run_dir = Path(args.out) if args.out else _default_run_dir(config)
    progress = None if args.progress == "auto" else args.progress == "on"
    result = train(
        config, run_dir, resume=args.resume, resume_or_start=args.resume_or_start,
        device=args.device, progress=progress,
    )
    summary = {
        "run_dir": str(result.run_dir),
        "steps": result.step,
        "epochs": result.epoch,
        "diverged": result.diverged,
        "diverged_step": result.diverged_step,
        "best_validation": result.best,
        "test": result.test,
    }
    from backends.torch.distributed.launch import is_writer

    if is_writer():  # torchrun: one summary, from rank 0
        print(json.dumps(summary, indent=2, allow_nan=True))
    return 0


def register_train(subparsers: Any) -> None:
    """``train``: run one configuration."""
    parser = subparsers.add_parser("train", help="train one configuration")
    _add_config_arguments(parser)
    parser.add_argument("--out", help="run directory (default runs/SETUP/TASK/OPTIMIZER/seedN)")
    resume = parser.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true",
        help="continue the run in --out from its newest intact checkpoint (error if none)",
    )
    resume.add_argument(
        "--resume-or-start", action="store_true",
        help="as --resume, but start a new run when --out is missing or empty",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N, mps"
    )
    parser.add_argument(
        "--progress", choices=("auto", "on", "off"), default="auto",
        help="auto: a tqdm bar on a terminal, else a line per epoch and checkpoint (log "
        "files); on: the bar; off: neither",
    )
    parser.set_defaults(func=_run_train)


# ---- config ----------------------------------------------------------------------------------
def _run_config(args: argparse.Namespace) -> int:
    from validation.experiments.config.load import SETUPS, load_config
    from validation.experiments.config.provenance import provenance

    config = config_from_args(args)
    if args.json:
        print(json.dumps(config, indent=2))
        return 0
    # what the choices alone give: a value that differs from it was set by hand
    base = args.setup if args.setup in SETUPS or args.setup == "mlp-cifar10" else config["setup"]
    choices = [(k, config[k]) for k in ("task", "optimizer", "seed", "follow") if k in config]
    expected = load_config(base, choices)
    rows = provenance(config, expected)
    width = max(len(f"{key} = {json.dumps(value)}") for key, value, _, _ in rows)
    print(f"# {config['setup']} / {config['task']} / {config['optimizer']}, follow="
          f"{config.get('follow')!r}: [paper] the paper, [released] the authors' released code, "
          "[paper+released] both, [ngdref] neither, [set] changed by hand")
    for key, value, label, note in rows:
        text = f"{key} = {json.dumps(value)}"
        print(f"{text:<{width}}  [{label}] {note}".rstrip())
    return 0


def register_config(subparsers: Any) -> None:
    """``config``: print the resolved configuration and where each value comes from."""
    parser = subparsers.add_parser(
        "config", help="print the resolved configuration, each value with its source"
    )
    _add_config_arguments(parser)
    parser.add_argument(
        "--json", action="store_true", help="print the configuration as plain JSON instead"
    )
    parser.set_defaults(func=_run_config)


# ---- checkpoints -----------------------------------------------------------------------------
def _run_checkpoints(args: argparse.Namespace) -> int:
    from validation.experiments.train.runner import list_checkpoints

    for info in list_checkpoints(args.run_dir):
        print(f"{info.name:<12} kind={info.kind:<7} epoch={info.epoch:<4} step={info.step}")
    return 0


def register_checkpoints(subparsers: Any) -> None:
    """``checkpoints``: list a run's checkpoints."""
    parser = subparsers.add_parser("checkpoints", help="list the checkpoints of a run")
    parser.add_argument("run_dir")
    parser.set_defaults(func=_run_checkpoints)


from validation.experiments.evaluate.cli import register_evaluate, register_sweep  # noqa: E402
from validation.experiments.figures.plots import register_figures  # noqa: E402
from validation.experiments.reproduce.driver import register_reproduce  # noqa: E402

#: the commands, in help order; each adds one subparser
COMMANDS: list[Callable[[Any], None]] = [
    register_train, register_config, register_checkpoints, register_evaluate, register_sweep,
    register_figures, register_reproduce,
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="python -m validation.experiments",
        description="The paper's experiments (Wu et al. 2024): training runs and checkpoints.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the command; config, file and model-loading errors exit with 2."""
    from validation.experiments.config.load import ConfigError
    from validation.experiments.train.checkpoints import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, CheckpointError, OSError) as exc:  # config, run files, data, model
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run_and_leave() -> int:
    """:func:`main`; under torchrun, then leave the process group (all ranks together if the
    command succeeded; :func:`backends.torch.distributed.launch.leave`)."""
    code = 1
    try:
        code = main()
        return code
    finally:
        if "torch.distributed" in sys.modules:  # no torch import for the commands without it
            from backends.torch.distributed.launch import leave

            leave(synchronise=code == 0)


if __name__ == "__main__":
    sys.exit(_run_and_leave())
