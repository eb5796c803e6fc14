r"""The paper's evaluation framework (Wu et al. 2024, Sec. 6 and App. F; SPEC §5).

For every epoch checkpoint of a baseline run (``epoch-0`` = the initial model, then each epoch
end), B random batches of M training samples (no augmentation; the same rows for every
checkpoint) are drawn. On each batch the SGD, EF, iEF and SF updates are computed from the same
per-sample gradients, and each is scored with the approximation-quality indicator (Eq. 15)

.. math::
    \gamma(d) = \frac{\sqrt{d^\top F d}}{|d^\top g|}, \qquad
    F = R \sum_n J_n^\top H_n J_n, \quad g = R \sum_n \nabla_\theta l_n

where F and g come from the SAME batch (F by the matrix-free :func:`ngdref.fisher_vp`, no matrix
is formed). Reported per checkpoint: the mean and std over the B batches of
gamma_EF/gamma_SGD, gamma_iEF/gamma_SGD, gamma_SF/gamma_iEF and gamma_SF/gamma_EF (SPEC §5
reports both of the last two), and of the gradient-norm imbalance
max_n ||grad l_n|| / min_n ||grad l_n||. Ratios below 1 mean "better than SGD" (or than the
denominator's method).

The updates (SPEC §3; Gram forms, damping in sample space for EF and iEF)::

    SGD  g = G^T 1
    EF   G^T (G G^T + lambda_EF I)^{-1} 1                       (Eq. 5)
    iEF  G^T (G G^T + lambda_iEF I)^{-1} s                      (Eq. 8)
    SF   (F_SF + lambda_SF I_P)^{-1} g, one sampled label per sample (K = 1, Eq. 49)

EF and iEF first drop near-duplicate per-sample gradients (``|cos| > dedup_threshold``, 0.95 as
in the authors' evaluator, keeping the larger-norm row).

Conventions
-----------
Reduction
    Every per-sample quantity is that of the loss ``R * sum_n l_n`` with R = 1/M by default
    (``reduction="mean"``): the Hugging Face mean of the loss the evaluator keeps, the
    convention of the paper's damping values. For the MLP and ViT this is the runs' own 1/N;
    for T5 it is the token mean over the first label tokens, 1/M (training's token mean over
    label word + EOS is 1/(2M) for one-token label words); ``reduction="sum"`` or a float R
    select another. gamma ratios and the imbalance do not depend on R; the damping values
    do: in the sum convention (R = 1) the same updates need lambda_EF M^2, lambda_iEF M^2
    (sample space) and lambda_SF M (parameter space). The raw gamma values scale as
    R^{-1/2}. Micro-batching does not change R (it is a memory bound, the rows are
    concatenated).
T5: only the first label token
    As the authors' evaluator, the T5 logits are those of the first label position only
    (C = vocabulary size) and the targets are the first label tokens (the label word's first
    token; the EOS and padding are dropped): the per-sample loss is
    ``l_n = CE(logits_n[0], labels_n[0])``. Training uses label word + EOS.
Eval mode
    Every pass runs with dropout off (:class:`backends.TorchProvider` does this).
Randomness
    Batch b's rows are ``numpy.random.default_rng([seed, b]).choice(num_train, M,
    replace=False)`` (:func:`batch_rows`): the same for every checkpoint and damping. SF's
    sampled labels come from the integer key :func:`sf_key` (seed, the checkpoint's step, b),
    so they are the same in :func:`evaluate_run` and :func:`sweep_run` for one checkpoint.

Files
-----
``run_dir/evaluation.json`` (:func:`evaluate_run`)::

    {"settings": {...every argument...},
     "checkpoints": [{"name": "epoch-0", "epoch": 0, "step": 0,
                      "ratios": {"ef/sgd": {"mean": m, "std": s, "values": [B floats]},
                                 "ief/sgd": ..., "sf/ief": ..., "sf/ef": ...},
                      "imbalance": {"mean": m, "std": s, "values": [B floats]},
                      "gamma": {"sgd": {"mean": m, "std": s}, "ef": ..., "ief": ..., "sf": ...}},
                     ...]}

``run_dir/sweep.json`` (:func:`sweep_run`)::

    {"settings": {...},
     "checkpoints": [{"name": "epoch-0", "epoch": 0, "dampings": [D floats],
                      "ratios": {"ef/sgd": {"mean": [D floats], "std": [D floats]}, ...}}, ...]}

std is the population standard deviation (ddof = 0) over the B batches. Both files are
rewritten atomically after each checkpoint, and a rerun with the same settings skips the
checkpoints already in the file (resume). Non-finite values (a sweep's singular solve, a zero
d^T g) are written as JSON NaN / Infinity.

Command line::

    python -m validation.experiments evaluate runs/mlp/digits/adam/seed0 --batches 100
    python -m validation.experiments evaluate RUN --damping ef=1e-5 --damping sf=1e-5 \
        --checkpoints first,last
    python -m validation.experiments sweep RUN --dampings 1e-12,1e-9,1e-6,1e-3,1
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import ngdref
from ngdref.linalg import singular_rtol

# torch, the provider and the runner are imported where they are used, so that the command
# line (``python -m validation.experiments --help``) registers these commands without them
if TYPE_CHECKING:
    import torch

    from backends.torch_provider import TorchProvider
    from validation.experiments.train import Batch, CheckpointInfo, Setup

__all__ = [
    "DEFAULT_DAMPING",
    "DEFAULT_SWEEP_DAMPINGS",
    "EVALUATION_FILE",
    "METHODS",
    "RATIOS",
    "SWEEP_FILE",
    "EvaluationError",
    "EvaluationProblem",
    "batch_rows",
    "evaluate_run",
    "evaluation_problem",
    "first_label_token",
    "register_evaluate",
    "register_sweep",
    "resolve_checkpoints",
    "sf_key",
    "sweep_run",
]

EVALUATION_FILE = "evaluation.json"
SWEEP_FILE = "sweep.json"
METHODS = ("sgd", "ef", "ief", "sf")
#: ratio name -> (numerator method, denominator method)
RATIOS: dict[str, tuple[str, str]] = {
    "ef/sgd": ("ef", "sgd"),
    "ief/sgd": ("ief", "sgd"),
    "sf/ief": ("sf", "ief"),
    "sf/ef": ("sf", "ef"),
}
#: lambda per method in the mean convention (R = 1/M). iEF: near-undamped, as the authors'
#: evaluator; EF and SF: the paper's damping of its T5-LoRA / ViT EF and SF runs (App. H). EF
#: and SF need a task-specific value (SPEC §5): check it with :func:`sweep_run`.
DEFAULT_DAMPING: dict[str, float] = {"ef": 1e-7, "ief": 1e-12, "sf": 1e-7}
#: 1e-12, 1e-11, ..., 1e2
DEFAULT_SWEEP_DAMPINGS: tuple[float, ...] = tuple(float(f"1e{k}") for k in range(-12, 3))
#: settings that may differ between a run and its resumption
_RESUMABLE = ("checkpoints", "device")
_WORDS = ("first", "middle", "last")


class EvaluationError(ValueError):
    """Bad input to the evaluation framework; the message names the argument."""


# =============================================================================================
# Batches, keys and the per-batch problem
# =============================================================================================
def batch_rows(seed: int, index: int, num_train: int, batch_size: int) -> np.ndarray:
    """Training rows of evaluation batch ``index``: M distinct rows, fixed by (seed, index).

    ``numpy.random.default_rng([seed, index]).choice(num_train, batch_size, replace=False)``;
    independent of the checkpoint, so every checkpoint sees the same batches.
    """
    rng = np.random.default_rng([seed, index])
    return rng.choice(num_train, size=batch_size, replace=False)


def sf_key(seed: int, step: int, index: int) -> int:
    """Integer key of SF's sampled labels on batch ``index`` of the checkpoint at ``step``.

    ``numpy.random.SeedSequence([seed, step, index])``'s first 64-bit word; passed to
    :meth:`ngdref.LogitLoss.sample` (Python's Mersenne Twister draws the uniforms).
    """
    state = np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)
    return int(state[0])


def first_label_token(output: Any) -> torch.Tensor:
    """T5 logits of the first label position only: ``output.logits[:, 0]``, (N, V)."""
    from backends.torch_provider import default_output_fn

    return default_output_fn(output)[:, 0]


@dataclass(frozen=True)
class EvaluationProblem:
    """The model on one evaluation batch, as the framework scores it.

    Attributes
    ----------
    provider : backends.TorchProvider
        The model (eval mode) on the batch; ``chunk_size`` = the micro-batch.
    loss : ngdref.LogitLoss
        The per-sample loss: softmax CE (T5: over the vocabulary at the first label position).
    targets : torch.Tensor, shape (M,)
        Class labels (T5: the first label tokens).
    factor : float
        R, the reduction factor of every per-sample quantity.
    """

    provider: TorchProvider
    loss: ngdref.LogitLoss
    targets: torch.Tensor
    factor: float


def evaluation_problem(
    setup: Setup, batch: Batch, *, micro_batch: int | None = 40, reduction: str | float = "mean"
) -> EvaluationProblem:
    r"""The provider, loss, targets and R of one batch under the evaluator's conventions.

    For a T5 setup (sequence loss) only the first label position is kept:

    .. math:: l_n = -\log \mathrm{softmax}(z_{n,0})[y_{n,0}]

    with :math:`z_{n,0}` the teacher-forced logits of the first label position; other setups
    use their own loss and logits.

    Parameters
    ----------
    setup : Setup
        From :func:`validation.experiments.train.build_setup`, parameters loaded.
    batch : Batch
        E.g. ``setup.train.make(rows)`` (no generator: no augmentation).
    micro_batch : int, optional
        Samples per forward/backward pass (memory bound; the results do not depend on it).
    reduction : {"mean", "sum"} or float
        R = 1/M, 1 or the given factor.

    Raises
    ------
    EvaluationError
        If a T5 sample's first label position is padding (-100).
    """
    from backends.torch_provider import TorchProvider
    from validation.experiments.train import IGNORE_INDEX

    if isinstance(setup.loss, ngdref.SequenceSoftmaxCrossEntropy):
        targets = batch.targets[:, 0]
        if bool((targets == IGNORE_INDEX).any()):
            raise EvaluationError(
                "batch: a sample's first label token is padding (-100); the evaluator scores "
                "the first label token of every sample"
            )
        loss: ngdref.LogitLoss = ngdref.SoftmaxCrossEntropy()
        output_fn: Callable[[Any], torch.Tensor] | None = first_label_token
    else:
        targets, loss, output_fn = batch.targets, setup.loss, setup.output_fn
    provider = TorchProvider(
        setup.model,
        batch.inputs,
        output_fn=output_fn,
        chunk_size=micro_batch,
        per_sample_method=setup.config["train"]["per_sample_method"],
    )
    factor = ngdref.reduction_factor(reduction, batch.size)
    return EvaluationProblem(provider, loss, targets, factor)


@dataclass
class _BatchState:
    """What every update of one batch shares: G, s, g, sampled gradients, F v, gamma(g)."""

    problem: EvaluationProblem
    quantities: ngdref.BatchQuantities
    sampled: torch.Tensor | None
    fisher: Callable[[torch.Tensor], torch.Tensor]
    gamma_sgd: float
    imbalance: float

    def gamma(self, update: torch.Tensor) -> float:
        return float(ngdref.gamma(update, self.fisher, self.quantities.grad))


def _batch_state(
    setup: Setup,
    rows: np.ndarray,
    *,
    key: int,
    micro_batch: int,
    reduction: str | float,
    num_samples: int,
    with_sf: bool,
) -> _BatchState:
    problem = evaluation_problem(
        setup, setup.train.make(rows), micro_batch=micro_batch, reduction=reduction
    )
    p, loss, y, r = problem.provider, problem.loss, problem.targets, problem.factor
    q = ngdref.batch_quantities(p, loss, y, reduction=r)
    sampled = (
        ngdref.sampled_grads(p, loss, y, key, num_samples=num_samples, reduction=r)
        if with_sf
        else None
    )
    fisher = ngdref.fisher_vp(p, loss, y, reduction=r)
    gamma_sgd = float(ngdref.gamma(q.grad, fisher, q.grad))
    imbalance = ngdref.grad_norm_imbalance(q.per_sample_grads)
    return _BatchState(problem, q, sampled, fisher, gamma_sgd, imbalance)


def _with_context(exc: Exception, where: str) -> Exception:
    """The same exception type with ``where`` prefixed (callers catch by type)."""
    try:
        return type(exc)(f"{where}: {exc}")
    except TypeError:  # a type whose constructor takes other arguments
        return RuntimeError(f"{where}: {type(exc).__name__}: {exc}")


# =============================================================================================
# Arguments
# =============================================================================================
def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise EvaluationError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _damping_value(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvaluationError(f"{name} must be a number >= 0, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise EvaluationError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _resolve_damping(damping: float | Mapping[str, float] | None) -> dict[str, float]:
    """A number for every damped method: one number for all, or a partial dict over defaults."""
    if damping is None:
        return dict(DEFAULT_DAMPING)
    if isinstance(damping, Mapping):
        unknown = sorted(set(damping) - set(DEFAULT_DAMPING))
        if unknown:
            raise EvaluationError(
                f"damping: unknown method(s) {unknown}; damped methods are "
                f"{sorted(DEFAULT_DAMPING)}"
            )
        out = dict(DEFAULT_DAMPING)
        for method, value in damping.items():
            out[method] = _damping_value(f"damping[{method!r}]", value)
        return out
    value = _damping_value("damping", damping)
    return dict.fromkeys(DEFAULT_DAMPING, value)


def _resolve_methods(methods: Iterable[str] | str) -> tuple[str, ...]:
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    unknown = [m for m in items if m not in METHODS]
    if unknown or not items:
        raise EvaluationError(
            f"methods must be a non-empty subset of {METHODS}, got {list(items)!r}"
        )
    return tuple(m for m in METHODS if m in items)


def _check_dedup(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise EvaluationError(f"dedup_threshold must be None or in (0, 1], got {value!r}")
    return float(value)


def _check_reduction(reduction: Any) -> str | float:
    try:
        ngdref.reduction_factor(reduction, 1)
    except (TypeError, ValueError) as exc:
        raise EvaluationError(f"reduction: {exc}") from None
    return reduction


def resolve_checkpoints(
    run_dir: str | os.PathLike[str],
    checkpoints: str | int | Sequence[str | int] | None = None,
) -> list[CheckpointInfo]:
    """The checkpoints of ``run_dir`` to evaluate, in the run's order.

    Parameters
    ----------
    run_dir : path
    checkpoints : None, str, int or sequence
        None: every epoch checkpoint (epoch-0, epoch-1, ...). Otherwise names
        (a comma-separated string or a sequence): a checkpoint name of the run ("epoch-3",
        "best"), an int k for "epoch-k", or "first", "middle", "last" for the first, middle
        ((E-1)//2-th of E) and last epoch checkpoint ("last" is the last epoch checkpoint, not
        the resumable ``last.pt``). Duplicates are removed.

    Raises
    ------
    EvaluationError
        ``run_dir`` has no epoch checkpoint, or a name is not a checkpoint of the run.
    """
    from validation.experiments.train import list_checkpoints

    listed = list_checkpoints(run_dir)  # reads every file once: keep it to one call
    epochs = [info for info in listed if info.kind == "epoch"]
    if not epochs:
        raise EvaluationError(
            f"run_dir: {os.fspath(run_dir)!r} has no epoch checkpoints "
            "(checkpoints/epoch-K.pt); point it at a run directory of the training runner"
        )
    if checkpoints is None:
        return epochs
    if isinstance(checkpoints, str):
        names: list[Any] = [c.strip() for c in checkpoints.split(",") if c.strip()]
    elif isinstance(checkpoints, int):
        names = [checkpoints]
    else:
        names = list(checkpoints)
    if not names:
        raise EvaluationError("checkpoints is empty: name at least one checkpoint")
    known = {info.name: info for info in listed if info.kind != "resume"}
    chosen: list[CheckpointInfo] = []
    for name in names:
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            name = f"epoch-{int(name)}"
        if name == "first":
            info = epochs[0]
        elif name == "middle":
            info = epochs[(len(epochs) - 1) // 2]
        elif name == "last":
            info = epochs[-1]
        elif isinstance(name, str) and name in known:
            info = known[name]
        else:
            raise EvaluationError(
                f"checkpoints: unknown checkpoint {name!r}; {os.fspath(run_dir)!r} has "
                f"{list(known)} (or {', '.join(_WORDS)})"
            )
        if info.name not in [c.name for c in chosen]:
            chosen.append(info)
    order = {info.name: k for k, info in enumerate(listed)}
    return sorted(chosen, key=lambda info: order[info.name])


def _check_batch_size(batch_size: int, setup: Setup) -> None:
    n = len(setup.train)
    if batch_size > n:
        raise EvaluationError(
            f"batch_size={batch_size} is larger than the training split ({n} samples): "
            "the evaluation batches are drawn without replacement"
        )


# =============================================================================================
# Files
# =============================================================================================
def _atomic_write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _load_previous(path: Path, settings: Mapping[str, Any], overwrite: bool) -> list[dict]:
    """The checkpoint entries of an earlier run of the same settings (resume)."""
    if overwrite or not path.is_file():
        return []
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        old = previous["settings"]
        entries = list(previous["checkpoints"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise EvaluationError(
            f"run_dir: {str(path)!r} exists but is not a file of this evaluator ({exc}); "
            "delete it or pass overwrite=True (--overwrite)"
        ) from None
    changed = sorted(
        k for k in set(old) | set(settings)
        if k not in _RESUMABLE and old.get(k) != settings.get(k)
    )
    if changed:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise EvaluationError(
            f"run_dir: {str(path)!r} was written with other settings ({detail}); resume with "
            "the same settings or pass overwrite=True (--overwrite) to start afresh"
        )
    return entries


def _summary(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean, std = float(np.mean(arr)), float(np.std(arr))
    return {"mean": mean, "std": std, "values": [float(x) for x in arr]}


def _report(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


def _settings_json(settings: dict[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON so that comparisons see what the file will hold."""
    return json.loads(json.dumps(settings, allow_nan=True))


def _prepare(
    run_dir: str | os.PathLike[str],
    checkpoints: Any,
    device: str | torch.device | None,
) -> tuple[Path, list[CheckpointInfo], Setup]:
    from validation.experiments.train import build_setup, load_run_config

    run = Path(run_dir)
    config = load_run_config(run)  # FileNotFoundError naming run_dir
    infos = resolve_checkpoints(run, checkpoints)
    setup = build_setup(config, device)
    return run, infos, setup


# =============================================================================================
# evaluate
# =============================================================================================
def _evaluate_checkpoint(
    setup: Setup,
    info: CheckpointInfo,
    *,
    batches: int,
    batch_size: int,
    micro_batch: int,
    seed: int,
    damping: Mapping[str, float],
    dedup_threshold: float | None,
    methods: tuple[str, ...],
    reduction: str | float,
    num_samples: int,
) -> dict[str, Any]:
    gammas: dict[str, list[float]] = {m: [] for m in methods}
    imbalance: list[float] = []
    for b in range(batches):
        where = f"checkpoint {info.name}, batch {b}"
        rows = batch_rows(seed, b, len(setup.train), batch_size)
        try:
            state = _batch_state(
                setup, rows, key=sf_key(seed, info.step, b), micro_batch=micro_batch,
                reduction=reduction, num_samples=num_samples, with_sf="sf" in methods,
            )
            q = state.quantities
            for method in methods:
                if method == "sgd":
                    gammas["sgd"].append(state.gamma_sgd)
                    continue
                if method == "ef":
                    update = ngdref.ef_update(
                        q.per_sample_grads, damping=damping["ef"], dedup_threshold=dedup_threshold
                    )
                elif method == "ief":
                    update = ngdref.ief_update(
                        q.per_sample_grads, q.logit_grad_sq_norms, damping=damping["ief"],
                        dedup_threshold=dedup_threshold,
                    )
                else:
                    update = ngdref.sf_update(
                        q.grad, state.sampled, damping=damping["sf"], num_samples=num_samples
                    )
                gammas[method].append(state.gamma(update))
        except (ngdref.SingularMatrixError, ngdref.NonFiniteError, ValueError) as exc:
            raise _with_context(exc, where) from exc
        imbalance.append(state.imbalance)
    with np.errstate(divide="ignore", invalid="ignore"):  # gamma 0 or inf: inf, NaN
        ratios = {
            name: _summary(np.asarray(gammas[num]) / np.asarray(gammas[den]))
            for name, (num, den) in RATIOS.items()
            if num in methods and den in methods
        }
    return {
        "name": info.name,
        "epoch": info.epoch,
        "step": info.step,
        "ratios": ratios,
        "imbalance": _summary(imbalance),
        "gamma": {
            m: {k: v for k, v in _summary(gammas[m]).items() if k != "values"} for m in methods
        },
    }


def _over_checkpoints(
    kind: str,
    run_dir: str | Path,
    checkpoints: Any,
    device: Any,
    settings: dict[str, Any],
    filename: str,
    overwrite: bool,
    progress: bool,
    process: Callable[[Setup, Any], tuple[dict[str, Any], str]],
) -> dict[str, Any]:
    """Run ``process`` on every checkpoint not yet in ``run_dir/filename``, resumably.

    ``process(setup, info)`` returns the checkpoint's entry and a one-line summary. The file
    is rewritten atomically after each checkpoint, so a killed evaluation loses at most one.
    """
    from backends import dist_launch
    from validation.experiments.train import load_checkpoint

    dist_launch.init_from_env()  # torchrun: the checkpoints are shared out among the ranks
    world, rank = dist_launch.world_and_rank()
    progress = progress and dist_launch.is_writer()
    run, infos, setup = _prepare(run_dir, checkpoints, device)
    settings["checkpoints"] = [info.name for info in infos]
    _check_batch_size(settings["batch_size"], setup)
    path = run / filename
    entries = _load_previous(path, settings, overwrite)
    done = {entry["name"] for entry in entries}
    for info in infos:
        if info.name in done:
            _report(progress, f"{kind} {info.name}: already in {path}, skipped")
    todo = [info for info in infos if info.name not in done]
    for start in range(0, len(todo), world):  # a round: one checkpoint per rank
        result: Any = None
        if start + rank < len(todo):
            info = todo[start + rank]
            started = time.perf_counter()
            try:
                params, _, _ = load_checkpoint(run, info.name)
                setup.load_params(params)
                entry, summary = process(setup, info)
                line = (f"{kind} {info.name} (epoch {info.epoch}, step {info.step}): "
                        f"{summary}, {time.perf_counter() - started:.1f} s]")
                result = (entry, line)
            except Exception as exc:  # every rank raises it (no rank waits forever)
                result = exc
        for item in dist_launch.gather_objects(result):
            if isinstance(item, Exception):
                raise item
            if item is not None:
                entries.append(item[0])
                entries.sort(key=lambda e: (e["epoch"], e.get("step", 0), e["name"]))
                if dist_launch.is_writer():  # torchrun: rank 0 writes
                    _atomic_write_json(path, {"settings": settings, "checkpoints": entries})
                _report(progress, item[1])
    return {"settings": settings, "checkpoints": entries}


def evaluate_run(
    run_dir: str | os.PathLike[str],
    *,
    batches: int = 100,
    batch_size: int = 160,
    micro_batch: int = 40,
    seed: int = 0,
    damping: float | Mapping[str, float] | None = None,
    dedup_threshold: float | None = 0.95,
    methods: Iterable[str] | str = METHODS,
    checkpoints: str | int | Sequence[str | int] | None = None,
    reduction: str | float = "mean",
    num_samples: int = 1,
    device: str | torch.device | None = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    r"""Score SGD, EF, iEF and SF with gamma (Eq. 15) at the epoch checkpoints of a run.

    For each checkpoint and each of B batches of M training rows (:func:`batch_rows`):

    .. math::
        \gamma(d) = \frac{\sqrt{d^\top F d}}{|d^\top g|}, \quad
        d \in \{g,\; G^\top(GG^\top + \lambda_{EF} I)^{-1} 1,\;
        G^\top(GG^\top + \lambda_{iEF} I)^{-1} s,\; (F_{SF} + \lambda_{SF} I)^{-1} g\}

    with G, s, g, F and F_SF all from that batch, in the convention R (module docstring).
    Writes ``run_dir/evaluation.json`` after each checkpoint (atomically) and skips the
    checkpoints it already holds when rerun with the same settings.

    Parameters
    ----------
    run_dir : path
        A run directory of the training runner (``config.json``, ``checkpoints/epoch-K.pt``).
    batches : int
        B, batches per checkpoint (the paper: 100).
    batch_size : int
        M, training rows per batch (the paper: 160); at most the training split's size.
    micro_batch : int
        Samples per forward/backward pass (the authors: 40); a memory bound only.
    seed : int >= 0
        Fixes the batches (the same for every checkpoint) and SF's sampled labels.
    damping : float or dict, optional
        lambda per method in the convention of ``reduction``: a number for EF, iEF and SF, or
        ``{"ef": .., "ief": .., "sf": ..}`` (missing keys take the defaults). Default
        :data:`DEFAULT_DAMPING`: iEF 1e-12, EF and SF 1e-7 (mean convention). EF and iEF are
        damped in sample space (lambda I_M), SF in parameter space.
    dedup_threshold : float or None
        EF and iEF drop per-sample gradients with ``|cos| >`` this to a larger-norm one before
        the solve (the authors' evaluator: 0.95); None keeps all.
    methods : iterable of str
        Subset of ("sgd", "ef", "ief", "sf"); only the ratios whose two methods are present
        are reported.
    checkpoints : optional
        See :func:`resolve_checkpoints` (default: every epoch checkpoint).
    reduction : {"mean", "sum"} or float
        R: "mean" (default, 1/M: the Hugging Face mean of the evaluated loss), "sum" (the
        paper's Eq. 1) or a factor.
    num_samples : int
        K, sampled labels per sample for SF (the paper: 1).
    device : str or torch.device, optional
        Where the model runs ("cpu", "cuda", "auto").
    overwrite : bool
        Start afresh even if ``evaluation.json`` exists (otherwise its settings must match).
    progress : bool
        Print one line per checkpoint to stderr.

    Returns
    -------
    dict
        The content of ``evaluation.json`` (module docstring).

    Raises
    ------
    EvaluationError
        Bad arguments (the message names them), a run without epoch checkpoints, an unknown
        checkpoint, ``batch_size`` larger than the training split, or an ``evaluation.json``
        written with other settings.
    FileNotFoundError
        ``run_dir`` has no ``config.json``.
    ngdref.SingularMatrixError
        A damped system is singular (e.g. SF with damping 0); the message names the batch.
    """
    settings = _settings_json(
        {
            "batches": _positive_int("batches", batches),
            "batch_size": _positive_int("batch_size", batch_size),
            "micro_batch": _positive_int("micro_batch", micro_batch),
            "seed": _positive_int("seed", seed, minimum=0),
            "damping": _resolve_damping(damping),
            "damping_space": {"ef": "sample", "ief": "sample", "sf": "parameter"},
            "dedup_threshold": _check_dedup(dedup_threshold),
            "methods": list(_resolve_methods(methods)),
            "checkpoints": None,
            "reduction": _check_reduction(reduction),
            "num_samples": _positive_int("num_samples", num_samples),
            "device": None if device is None else str(device),
        }
    )
    def process(setup: Setup, info: Any) -> tuple[dict[str, Any], str]:
        entry = _evaluate_checkpoint(
            setup, info,
            batches=settings["batches"], batch_size=settings["batch_size"],
            micro_batch=settings["micro_batch"], seed=settings["seed"],
            damping=settings["damping"], dedup_threshold=settings["dedup_threshold"],
            methods=tuple(settings["methods"]), reduction=settings["reduction"],
            num_samples=settings["num_samples"],
        )
        summary = "  ".join(
            f"{name} {r['mean']:.3g}±{r['std']:.2g}" for name, r in entry["ratios"].items()
        )
        imb = entry["imbalance"]
        return entry, (
            f"{summary}  imbalance {imb['mean']:.3g}±{imb['std']:.2g}  "
            f"[{settings['batches']} batches"
        )

    return _over_checkpoints(
        "evaluate", run_dir, checkpoints, device, settings, EVALUATION_FILE, overwrite, progress,
        process,
    )


# =============================================================================================
# sweep
# =============================================================================================
class _GramSweep:
    r"""Sample-space Gram solves :math:`(K + \lambda I)^{-1} b` for many lambda from one eigh.

    K = G G^T (float64) of the rows kept by the near-duplicate filter, factorised once per
    batch; each damping then costs O(M^2). Mirrors :func:`ngdref.solve_damped_gram` ("absolute"
    mode, identity weights) including its singularity rule; the tests check the two agree.
    """

    def __init__(self, rows: torch.Tensor, dedup_threshold: float | None) -> None:
        import torch

        self.rows = rows
        gram = ngdref.gram_matrix(rows)
        m = gram.shape[0]
        if dedup_threshold is None:
            self.index = torch.arange(m, device=rows.device)
        else:
            self.index = torch.nonzero(ngdref.near_duplicate_mask(gram, dedup_threshold))[:, 0]
        kept = gram[self.index][:, self.index]
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(kept)
        self.size = m

    def update(self, rhs: torch.Tensor, damping: float) -> torch.Tensor:
        """G^T c with (K_kept + lambda I) c_kept = rhs_kept, c = 0 at dropped rows."""
        import torch

        shifted = self.eigenvalues + damping
        rtol = singular_rtol(torch, self.size, self.rows.dtype, damping)
        largest = float(shifted.abs().max())
        if largest == 0.0 or float(shifted.min()) <= rtol * largest:
            raise ngdref.SingularMatrixError(
                f"the damped Gram matrix is singular to working precision at damping={damping}"
            )
        b = rhs.to(torch.float64)[self.index]
        c_kept = self.eigenvectors @ ((self.eigenvectors.T @ b) / shifted)
        c = torch.zeros(self.size, dtype=torch.float64, device=self.rows.device)
        c[self.index] = c_kept
        return c.to(self.rows.dtype) @ self.rows


class _WoodburySweep:
    r"""SF's :math:`(\hat G^\top \hat G + \lambda I_P)^{-1} g` for many lambda from one eigh.

    .. math:: \frac{1}{\lambda}\left[g - \hat G^\top (\hat G \hat G^\top + \lambda I)^{-1}
              \hat G g\right]

    Mirrors :func:`ngdref.sf_update` (float64, the same singularity rule); when P <= M K it
    calls :func:`ngdref.sf_update` itself.
    """

    def __init__(self, grad: torch.Tensor, sampled: torch.Tensor, num_samples: int) -> None:
        import torch

        self.grad, self.sampled, self.num_samples = grad, sampled, num_samples
        rows = sampled / num_samples**0.5
        self.small = rows.shape[1] <= rows.shape[0]
        if self.small:
            return
        self.dtype = rows.dtype
        self.a64 = rows.to(torch.float64)
        self.g64 = grad.to(torch.float64)
        self.ag = self.a64 @ self.g64
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(ngdref.gram_matrix(rows))
        self.size = rows.shape[0]

    def update(self, damping: float) -> torch.Tensor:
        if self.small:
            return ngdref.sf_update(
                self.grad, self.sampled, damping=damping, num_samples=self.num_samples
            )
        if damping == 0:
            raise ngdref.SingularMatrixError("SF needs damping > 0 when P > M K")
        import torch

        shifted = self.eigenvalues + damping
        rtol = singular_rtol(torch, self.size, self.dtype, damping)
        largest = float(shifted.abs().max())
        if largest == 0.0 or float(shifted.min()) <= rtol * largest:
            raise ngdref.SingularMatrixError(
                f"the damped sampled Gram matrix is singular at damping={damping}"
            )
        c = self.eigenvectors @ ((self.eigenvectors.T @ self.ag) / shifted)
        return ((self.g64 - c @ self.a64) / damping).to(self.grad.dtype)


def _sweep_checkpoint(
    setup: Setup,
    info: CheckpointInfo,
    *,
    dampings: Sequence[float],
    batches: int,
    batch_size: int,
    micro_batch: int,
    seed: int,
    dedup_threshold: float | None,
    reduction: str | float,
    num_samples: int,
) -> tuple[dict[str, Any], int]:
    import torch

    d = len(dampings)
    values = {name: np.full((d, batches), np.nan) for name in RATIOS}
    singular = 0
    for b in range(batches):
        rows = batch_rows(seed, b, len(setup.train), batch_size)
        try:
            state = _batch_state(
                setup, rows, key=sf_key(seed, info.step, b), micro_batch=micro_batch,
                reduction=reduction, num_samples=num_samples, with_sf=True,
            )
        except (ngdref.NonFiniteError, ValueError) as exc:
            raise _with_context(exc, f"checkpoint {info.name}, batch {b}") from exc
        q = state.quantities
        gram = _GramSweep(q.per_sample_grads, dedup_threshold)
        assert state.sampled is not None
        woodbury = _WoodburySweep(q.grad, state.sampled, num_samples)
        ones = torch.ones_like(q.logit_grad_sq_norms)
        for k, lam in enumerate(dampings):
            gamma: dict[str, float] = {"sgd": state.gamma_sgd}
            for method in ("ef", "ief", "sf"):
                try:
                    if method == "ef":
                        update = gram.update(ones, lam)
                    elif method == "ief":
                        update = gram.update(q.logit_grad_sq_norms, lam)
                    else:
                        update = woodbury.update(lam)
                except ngdref.SingularMatrixError:
                    gamma[method] = math.nan
                    singular += 1
                    continue
                gamma[method] = state.gamma(update)
            with np.errstate(divide="ignore", invalid="ignore"):  # gamma 0 or inf: inf, NaN
                for name, (num, den) in RATIOS.items():
                    values[name][k, b] = np.float64(gamma[num]) / gamma[den]
    with np.errstate(invalid="ignore"):
        ratios = {
            name: {
                "mean": [float(x) for x in np.mean(v, axis=1)],
                "std": [float(x) for x in np.std(v, axis=1)],
            }
            for name, v in values.items()
        }
    entry = {"name": info.name, "epoch": info.epoch, "dampings": list(dampings), "ratios": ratios}
    return entry, singular


def sweep_run(
    run_dir: str | os.PathLike[str],
    *,
    dampings: Sequence[float] = DEFAULT_SWEEP_DAMPINGS,
    batches: int = 100,
    batch_size: int = 160,
    micro_batch: int = 40,
    seed: int = 0,
    dedup_threshold: float | None = 0.95,
    checkpoints: str | int | Sequence[str | int] | None = "first,middle,last",
    reduction: str | float = "mean",
    num_samples: int = 1,
    device: str | torch.device | None = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    r"""The ratios of :func:`evaluate_run` over a damping grid (one lambda for EF, iEF and SF).

    For every lambda in ``dampings`` and each batch:

    .. math::
        \frac{\gamma(d_{EF}(\lambda))}{\gamma(g)},\;
        \frac{\gamma(d_{iEF}(\lambda))}{\gamma(g)},\;
        \frac{\gamma(d_{SF}(\lambda))}{\gamma(d_{iEF}(\lambda))},\;
        \frac{\gamma(d_{SF}(\lambda))}{\gamma(d_{EF}(\lambda))}

    G, s, g, the sampled gradients and the Fisher-vector product are computed once per batch;
    G G^T and the sampled Gram matrix are eigendecomposed once, so each lambda costs two
    M x M back-substitutions and one Fisher-vector product per method. At a lambda of the grid
    the numbers equal :func:`evaluate_run`'s with ``damping=lambda`` (same batches, same SF
    draws). A singular solve gives NaN for that batch and lambda (counted in the progress
    line) instead of stopping the sweep. Writes ``run_dir/sweep.json`` (module docstring)
    after each checkpoint; reruns with the same settings skip the checkpoints already there.

    Parameters
    ----------
    run_dir : path
    dampings : sequence of float >= 0
        The grid, in the convention of ``reduction`` (default 1e-12, 1e-11, ..., 1e2).
    batches, batch_size, micro_batch, seed, dedup_threshold, reduction, num_samples, device,
    overwrite, progress
        As in :func:`evaluate_run`.
    checkpoints : optional
        Default "first,middle,last" (the first, middle and last epoch checkpoints);
        see :func:`resolve_checkpoints`.

    Returns
    -------
    dict
        The content of ``sweep.json``.

    Raises
    ------
    EvaluationError
        As :func:`evaluate_run`, and an empty or negative ``dampings``.
    """
    if isinstance(dampings, (str, bytes)) or not isinstance(dampings, Iterable):
        raise EvaluationError(f"dampings must be a sequence of numbers >= 0, got {dampings!r}")
    grid = [_damping_value(f"dampings[{k}]", v) for k, v in enumerate(dampings)]
    if not grid:
        raise EvaluationError("dampings is empty: give at least one damping value")
    settings = _settings_json(
        {
            "dampings": grid,
            "batches": _positive_int("batches", batches),
            "batch_size": _positive_int("batch_size", batch_size),
            "micro_batch": _positive_int("micro_batch", micro_batch),
            "seed": _positive_int("seed", seed, minimum=0),
            "damping_space": {"ef": "sample", "ief": "sample", "sf": "parameter"},
            "dedup_threshold": _check_dedup(dedup_threshold),
            "checkpoints": None,
            "reduction": _check_reduction(reduction),
            "num_samples": _positive_int("num_samples", num_samples),
            "device": None if device is None else str(device),
        }
    )
    def process(setup: Setup, info: Any) -> tuple[dict[str, Any], str]:
        entry, singular = _sweep_checkpoint(
            setup, info, dampings=grid,
            batches=settings["batches"], batch_size=settings["batch_size"],
            micro_batch=settings["micro_batch"], seed=settings["seed"],
            dedup_threshold=settings["dedup_threshold"], reduction=settings["reduction"],
            num_samples=settings["num_samples"],
        )
        best = []
        for name in ("ef/sgd", "ief/sgd"):
            means = np.asarray(entry["ratios"][name]["mean"])
            if np.isfinite(means).any():
                k = int(np.nanargmin(means))
                best.append(f"min {name} {means[k]:.3g} at {grid[k]:.0e}")
        note = f"{singular} singular solves -> NaN, " if singular else ""
        return entry, (
            f"{'  '.join(best)}  [{len(grid)} dampings x {settings['batches']} batches, {note}"
        ).rstrip(", ")

    return _over_checkpoints(
        "sweep", run_dir, checkpoints, device, settings, SWEEP_FILE, overwrite, progress, process
    )


# =============================================================================================
# Command line
# =============================================================================================
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


def _common_arguments(parser: Any, default_checkpoints: str | None) -> None:
    parser.add_argument("run_dir", help="a run directory of the training runner")
    parser.add_argument("--batches", type=int, default=100, help="B batches per checkpoint")
    parser.add_argument("--batch-size", type=int, default=160, help="M training rows per batch")
    parser.add_argument(
        "--micro-batch", type=int, default=40, help="samples per forward/backward pass (memory)"
    )
    parser.add_argument("--seed", type=int, default=0, help="fixes the batches and SF's labels")
    parser.add_argument(
        "--dedup-threshold", type=_parse_dedup, default=0.95,
        help="EF/iEF drop per-sample gradients with |cos| above this (0.95); 'none' keeps all",
    )
    parser.add_argument(
        "--checkpoints", default=default_checkpoints,
        help="comma-separated names (epoch-3, best) or first, middle, last "
        f"(default: {default_checkpoints or 'every epoch checkpoint'})",
    )
    parser.add_argument(
        "--reduction", type=_parse_reduction, default="mean",
        help="R of the per-sample quantities and the damping: mean (1/M, default), sum, or a "
        "float",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="K sampled labels for SF")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, auto")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh instead of resuming"
    )
    parser.add_argument(
        "--progress", choices=("on", "off"), default="on", help="a line per checkpoint"
    )


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def _run_evaluate(args: Any) -> int:
    try:
        evaluate_run(
            args.run_dir, batches=args.batches, batch_size=args.batch_size,
            micro_batch=args.micro_batch, seed=args.seed, damping=_parse_damping(args.damping),
            dedup_threshold=args.dedup_threshold, methods=args.methods,
            checkpoints=args.checkpoints, reduction=args.reduction,
            num_samples=args.num_samples, device=args.device, overwrite=args.overwrite,
            progress=args.progress == "on",
        )
    except EvaluationError as exc:
        return _fail(exc)
    print(Path(args.run_dir) / EVALUATION_FILE)
    return 0


def _run_sweep(args: Any) -> int:
    try:
        sweep_run(
            args.run_dir,
            dampings=(
                DEFAULT_SWEEP_DAMPINGS if args.dampings is None
                else _parse_float_list(args.dampings)
            ),
            batches=args.batches, batch_size=args.batch_size, micro_batch=args.micro_batch,
            seed=args.seed, dedup_threshold=args.dedup_threshold,
            checkpoints=args.checkpoints, reduction=args.reduction,
            num_samples=args.num_samples, device=args.device, overwrite=args.overwrite,
            progress=args.progress == "on",
        )
    except EvaluationError as exc:
        return _fail(exc)
    print(Path(args.run_dir) / SWEEP_FILE)
    return 0


def register_evaluate(subparsers: Any) -> None:
    """``evaluate RUN_DIR``: gamma ratios of SGD, EF, iEF, SF at each epoch checkpoint."""
    parser = subparsers.add_parser(
        "evaluate",
        help="gamma ratios (Eq. 15) of EF, iEF, SF vs SGD at each epoch checkpoint of a run",
        description="Writes RUN_DIR/evaluation.json (resumable). Damping is in the convention "
        "of --reduction (default mean, R = 1/M).",
    )
    _common_arguments(parser, None)
    parser.add_argument(
        "--damping", action="append", default=[], metavar="[METHOD=]VALUE",
        help="lambda for ef, ief, sf (a bare number sets all three); defaults "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_DAMPING.items()),
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of sgd,ef,ief,sf"
    )
    parser.set_defaults(func=_run_evaluate)


def register_sweep(subparsers: Any) -> None:
    """``sweep RUN_DIR``: the ratios over a damping grid at the first, middle, last checkpoint."""
    parser = subparsers.add_parser(
        "sweep",
        help="the evaluate ratios over a damping grid at the first, middle and last checkpoint",
        description="Writes RUN_DIR/sweep.json (resumable).",
    )
    _common_arguments(parser, "first,middle,last")
    parser.add_argument(
        "--dampings", default=None,
        help="comma-separated grid (default 1e-12,1e-11,...,1e2), convention of --reduction",
    )
    parser.set_defaults(func=_run_sweep)
