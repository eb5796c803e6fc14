"""What the evaluation tests share: tiny digits-MLP runs of the runner, their settings, and
the independent routes to the evaluator's numbers (dense Jacobian and Fisher, SF's and KFAC's
label draws, the documented batches).

Imported by the tests of tests/experiments/evaluate/ (``test_framework.py``, ``test_dense.py``,
``test_sweep.py``, ``test_kfac.py``); the fixtures (``fixture_*``) are imported into each test
module that uses them.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.experiments.cases import require_hf_stack

torch = require_hf_stack()

from validation.experiments.config.load import load_config  # noqa: E402
from validation.experiments.evaluate.framework import EVALUATION_FILE, SWEEP_FILE, evaluate_run  # noqa: E402
from validation.experiments.train.runner import train  # noqa: E402

#: the marks of every evaluation test module: one torch thread, the Hugging Face warnings off
PYTESTMARK = [
    pytest.mark.usefixtures("torch_one_thread"),
    pytest.mark.filterwarnings(
        "ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"
    ),
]

# the MLP evaluation: B batches of M rows, micro-batches of 5 (uneven: 5 + 5 + 2)
B, M, MICRO = 3, 12, 5
MLP_SETTINGS = {"batches": B, "batch_size": M, "micro_batch": MICRO, "progress": False}
#: Adam on 48 digits, hidden layer of 8 (64-8-10, P = 610), batches of 16: 3 steps an epoch
MLP_OVERRIDES = (
    "optimizer=adam", "optim.lr=0.01", "model.hidden_sizes=[8]", "train.batch_size=16",
    "data.max_train_samples=48", "data.max_eval_samples=16",
)


def train_mlp_run(factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    """A run directory of :data:`MLP_OVERRIDES` plus ``overrides``, trained on the CPU."""
    config = load_config("mlp", [*MLP_OVERRIDES, *overrides])
    run = factory.mktemp(name) / "run"
    train(config, run, progress=False, device="cpu")
    return run


@pytest.fixture(scope="module", name="mlp_run")
def fixture_mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP of :data:`MLP_OVERRIDES`, 2 epochs: checkpoints epoch-0..2."""
    return train_mlp_run(tmp_path_factory, "mlp", "train.epochs=2")


@pytest.fixture(scope="module", name="mlp_evaluation")
def fixture_mlp_evaluation(mlp_run: Path) -> dict[str, Any]:
    return evaluate_run(mlp_run, **MLP_SETTINGS)


def copy_run(run: Path, dest: Path, keep_results: bool = False) -> Path:
    """A copy of a run directory (without the evaluator's files unless asked)."""
    shutil.copytree(run, dest)
    if not keep_results:
        for name in (EVALUATION_FILE, SWEEP_FILE):
            (dest / name).unlink(missing_ok=True)
    return dest


def documented_batch(step: int, b: int, n_train: int, m: int) -> tuple[np.ndarray, int]:
    """Batch b's rows and SF's key at seed 0 as the evaluator documents them:
    ``default_rng([0, b]).choice(n_train, m)`` and ``SeedSequence([0, step, b])``."""
    rows = np.random.default_rng([0, b]).choice(n_train, size=m, replace=False)
    key = int(np.random.SeedSequence([0, step, b]).generate_state(1, np.uint64)[0])
    return rows, key


def drawn_labels(probs: np.ndarray, key: int) -> np.ndarray:
    """ngdref.LogitLoss.sample's documented draw: Python's Mersenne Twister, inverse CDF.

    probs (N, C) -> labels (N,): ``min(searchsorted(cumsum(p_n), u_n, "right"), C - 1)``.
    """
    rng = random.Random(key)
    u = [rng.random() for _ in range(len(probs))]
    return np.array([min(int(np.searchsorted(np.cumsum(p), v, side="right")), len(p) - 1)
                     for p, v in zip(probs, u, strict=True)])


def dense_jacobian(setup: Any, x: Any) -> np.ndarray:
    """J (N, C, P): the logits' Jacobian in the trainable parameters, by autograd.functional."""
    names = [n for n, _ in setup.trainable]
    params = [p for _, p in setup.trainable]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def logits_of(flat: Any) -> Any:
        pieces = torch.split(flat, sizes)
        return torch.func.functional_call(
            setup.model, {n: t.reshape(p.shape)
                          for n, t, p in zip(names, pieces, params, strict=True)}, (x,))

    return torch.autograd.functional.jacobian(logits_of, theta).numpy()


def dense_fisher(jac: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """sum_n J_n^T (diag p_n - p_n p_n^T) J_n (P, P): softmax-CE, sum convention."""
    return sum(jac[n].T @ (np.diag(p) - np.outer(p, p)) @ jac[n] for n, p in enumerate(probs))
