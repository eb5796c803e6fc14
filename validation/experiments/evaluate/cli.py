"""The ``evaluate`` and ``sweep`` commands of ``python -m validation.experiments``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from validation.experiments.evaluate.protocols import (
    DAMPING_SCALES,
    PROTOCOLS,
    SF_DUPLICATES,
    EvaluationError,
)
from validation.experiments.evaluate.settings import (
    AUTHORS_DAMPING,
    DEFAULT_BATCHES,
    DEFAULT_DAMPING,
    DEFAULT_METHODS,
    DEFAULT_SWEEP_BATCHES,
    DEFAULT_SWEEP_DAMPINGS,
    DTYPES,
    EVALUATION_FILE,
    METHODS,
    SWEEP_FILE,
)

__all__ = ["register_evaluate", "register_sweep"]


def _parse_float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EvaluationError(f"dampings: expected comma-separated numbers, got {text!r}") from None


def _parse_damping(items: list[str]) -> float | dict[str, float] | None:
    """``--damping 1e-7`` (every method) and/or ``--damping ef=1e-5`` (one method)."""
    if not items:
        return None
    out: dict[str, float] = {}
    for item in items:
        method, sep, value = item.partition("=")
        try:
            if sep:
                out[method.strip()] = float(value)
            else:
                out.update(dict.fromkeys(DEFAULT_DAMPING, float(method)))
        except ValueError:
            raise EvaluationError(
                f"damping: expected a number or METHOD=NUMBER, got {item!r}"
            ) from None
    return out


def _parse_dedup(text: str) -> float | None:
    return None if text.lower() in ("none", "off") else float(text)


def _parse_reduction(text: str) -> str | float:
    return text if text in ("mean", "sum") else float(text)


def _common_arguments(parser: Any, default_checkpoints: str | None, batches: int) -> None:
    parser.add_argument("run_dir", help="a run directory of the training runner")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="ngdref",
        help="ngdref (R = 1/M, a damping per method) or authors (their evaluator: R = "
        "1/micro-batch, one lambda, g and imbalance from the de-duplicated rows)",
    )
    parser.add_argument(
        "--batches", type=int, default=batches,
        help=f"B batches per checkpoint (default {batches}; the paper: 100)",
    )
    parser.add_argument("--batch-size", type=int, default=160, help="M training rows per batch")
    parser.add_argument(
        "--micro-batch", type=int, default=40,
        help="samples per forward/backward pass (authors: also R = 1/micro-batch)",
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the batches and SF's labels")
    parser.add_argument(
        "--dedup-threshold", type=_parse_dedup, default=0.95,
        help="drop per-sample gradients with |cos| above this (0.95); 'none' keeps all",
    )
    parser.add_argument(
        "--checkpoints", default=default_checkpoints,
        help="comma-separated names (epoch-3, best) or first, middle, last "
        f"(default: {default_checkpoints or 'every epoch checkpoint'})",
    )
    parser.add_argument(
        "--reduction", type=_parse_reduction, default=None,
        help="ngdref protocol: R of the per-sample quantities and the damping: mean (1/M, "
        "default), sum, or a float",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="K sampled labels for SF")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float64", help="the model's dtype for the evaluation"
    )
    parser.add_argument(
        "--sf-duplicates", choices=SF_DUPLICATES, default="drop",
        help="authors protocol: SF's near-duplicate sampled rows dropped (their released "
        "code) or merged (its intent)",
    )
    parser.add_argument(
        "--damping-scale", choices=DAMPING_SCALES, default="absolute",
        help="sampled_max: every damping is relative to the largest squared norm of SF's "
        "kept sampled rows (the authors' evaluator's negative damping); default absolute",
    )
    parser.add_argument(
        "--dedup-zero-rows", choices=("drop", "keep"), default="drop",
        help="whether the duplicate filter drops all-zero per-sample gradients (the "
        "authors' keeps them)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh instead of resuming"
    )
    parser.add_argument(
        "--progress", choices=("auto", "on", "off"), default="auto",
        help="auto: a tqdm bar on a terminal, else a line per checkpoint and a summary (log "
        "files); on: the bar; off: neither",
    )


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _common_kwargs(args: Any) -> dict[str, Any]:
    return {
        "protocol": args.protocol, "batches": args.batches, "batch_size": args.batch_size,
        "micro_batch": args.micro_batch, "seed": args.seed,
        "dedup_threshold": args.dedup_threshold, "checkpoints": args.checkpoints,
        "reduction": args.reduction, "num_samples": args.num_samples, "dtype": args.dtype,
        "sf_duplicates": args.sf_duplicates, "damping_scale": args.damping_scale,
        "dedup_zero_rows": args.dedup_zero_rows, "device": args.device,
        "overwrite": args.overwrite,
        "progress": None if args.progress == "auto" else args.progress == "on",
    }


def _run_evaluate(args: Any) -> int:
    from validation.experiments.evaluate.framework import evaluate_run

    try:
        evaluate_run(
            args.run_dir, damping=_parse_damping(args.damping), methods=args.methods,
            **_common_kwargs(args),
        )
    except EvaluationError as exc:
        return _fail(exc)
    print(Path(args.run_dir) / EVALUATION_FILE)
    return 0


def _run_sweep(args: Any) -> int:
    from validation.experiments.evaluate.framework import sweep_run

    try:
        sweep_run(
            args.run_dir,
            dampings=(
                DEFAULT_SWEEP_DAMPINGS if args.dampings is None
                else _parse_float_list(args.dampings)
            ),
            **_common_kwargs(args),
        )
    except EvaluationError as exc:
        return _fail(exc)
    print(Path(args.run_dir) / SWEEP_FILE)
    return 0


def register_evaluate(subparsers: Any) -> None:
    """``evaluate RUN_DIR``: gamma ratios of SGD, EF, iEF, SF at each epoch checkpoint."""
    parser = subparsers.add_parser(
        "evaluate",
        help="gamma ratios (Eq. 15) of EF, iEF, SF vs SGD (and of KFAC, eKFAC, ieKFAC vs iEF) "
        "at each epoch checkpoint of a run",
        description="Writes RUN_DIR/evaluation.json (resumable). Damping is in the convention "
        "of the protocol's R (ngdref: --reduction, default mean, R = 1/M; authors: "
        "1/micro-batch).",
    )
    _common_arguments(parser, None, DEFAULT_BATCHES)
    parser.add_argument(
        "--damping", action="append", default=[], metavar="[METHOD=]VALUE",
        help="lambda per damped method (a bare number sets all; the K-FAC family's is "
        "lambda / R^2 in the sum convention, as EF's); defaults "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_DAMPING.items())
        + f" (ngdref), {AUTHORS_DAMPING:g} for all (authors)",
    )
    parser.add_argument(
        "--methods", default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.set_defaults(func=_run_evaluate)


def register_sweep(subparsers: Any) -> None:
    """``sweep RUN_DIR``: the ratios over a damping grid at the first, middle, last checkpoint."""
    parser = subparsers.add_parser(
        "sweep",
        help="the evaluate ratios over a damping grid at the first, middle and last checkpoint",
        description="Writes RUN_DIR/sweep.json (resumable).",
    )
    _common_arguments(parser, "first,middle,last", DEFAULT_SWEEP_BATCHES)
    parser.add_argument(
        "--dampings", default=None,
        help="comma-separated grid (default 1e-12,1e-11,...,1e2), convention of the protocol",
    )
    parser.set_defaults(func=_run_sweep)
