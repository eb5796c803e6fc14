"""gamma of the evaluator (validation/experiments/evaluate/framework.py) against a dense,
independent recomputation on tiny digits-MLP runs of the runner.

Every gamma of the MLP from a dense Fisher (``torch.autograd.functional.jacobian`` and the
softmax-CE Hessian written out here), per-sample gradients from a loop of single-sample
``backward()`` calls, the updates from numpy solves (EF and iEF: the Gram form with the
near-duplicate filter re-implemented here; SF: the P x P system), the batches and SF's labels
from the documented seeds; the authors' protocol against a transcription of their evaluator.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.experiments.evaluate.cases import (  # noqa: F401  (fixtures)
    MICRO,
    PYTESTMARK,
    M,
    copy_run,
    dense_fisher,
    dense_jacobian,
    documented_batch,
    drawn_labels,
    fixture_mlp_evaluation,
    fixture_mlp_run,
    torch,
    train_mlp_run,
)
from validation.experiments.evaluate.framework import RATIOS, evaluate_run
from validation.experiments.evaluate.settings import DEFAULT_DAMPING
from validation.experiments.train.runner import build_setup, load_checkpoint, load_run_config

pytestmark = PYTESTMARK


# ---- the reference: other routes to every number of one batch --------------------------------
def _gram_update(grads: np.ndarray, rhs: np.ndarray, damping: float, threshold: float | None):
    """G_kept^T (G_kept G_kept^T + lambda I)^{-1} rhs_kept by numpy, kept by the authors' loop."""
    keep = (
        np.arange(len(grads)) if threshold is None
        else authors_true_row_filter(torch.as_tensor(grads), threshold)
    )
    g = grads[keep]
    c = np.linalg.solve(g @ g.T + damping * np.eye(len(keep)), rhs[keep])
    return g.T @ c


def authors_true_row_filter(J: Any, thresh: float) -> list[int]:
    """A transcription of the authors' ``update_generation`` filter (their loop, in torch)."""
    C = (J @ J.T).to(torch.float64)
    grad_inputs_norms = J.norm(dim=1).to(torch.float64)
    diagonal_vector = C.diag() ** 0.5
    cov_sim = C / (diagonal_vector.unsqueeze(dim=-1) @ diagonal_vector.unsqueeze(dim=0))
    remove_idx = []
    for i in range(J.shape[0]):
        for j in range(i + 1, J.shape[0]):
            if torch.abs(cov_sim[i, j]) > thresh:
                remove_idx.append(i if grad_inputs_norms[j] > grad_inputs_norms[i] else j)
    return [i for i in range(J.shape[0]) if i not in remove_idx]


def authors_remove_J_C_duplicates(iJ: Any, thresh: float, merge: bool) -> Any:
    """A transcription of the authors' ``remove_J_C_duplicates`` (retain_C_thresh=1: no prune).

    ``merge=False`` keeps their aliasing (``new_iJ_norm_sqr = iJ_norm_sqr``), so nothing is
    rescaled; ``merge=True`` gives the accumulator its own copy, as the code intends.
    """
    iJ_norm_sqr = iJ.norm(dim=1) ** 2
    iJ = iJ[torch.argsort(iJ_norm_sqr, descending=True), :]
    iC = iJ @ iJ.T
    iJ_norm_sqr = iC.diag()
    cC = iC / (iJ_norm_sqr.unsqueeze(-1) ** 0.5 @ iJ_norm_sqr.unsqueeze(0) ** 0.5)
    new_iJ_norm_sqr = iJ_norm_sqr.clone() if merge else iJ_norm_sqr
    remove_idx, actual_duplicate_idx = [], []
    for i in range(iC.shape[0]):
        if i in actual_duplicate_idx:
            continue
        for j in range(i + 1, iC.shape[0]):
            if j in actual_duplicate_idx:
                continue
            if torch.abs(cC[i, j]) > thresh:
                remove_idx.append(j)
                if iJ_norm_sqr[i] == iJ_norm_sqr[j]:
                    actual_duplicate_idx.append(j)
                new_iJ_norm_sqr[i] += iJ_norm_sqr[j]
    iJ = iJ.clone()
    for i in range(iC.shape[0]):
        if new_iJ_norm_sqr[i] > iJ_norm_sqr[i]:
            iJ[i, :] *= (new_iJ_norm_sqr[i] / iJ_norm_sqr[i]) ** 0.5
    return iJ[[i for i in range(iC.shape[0]) if i not in remove_idx], :]


def _tail_10(norms: np.ndarray) -> float:
    k = max(1, len(norms) // 10)
    ordered = np.sort(norms)
    return float(ordered[-k:].mean() / ordered[:k].mean())

def _single_sample_grads(model: Any, params: list[Any], x: Any, labels: Any, scale: float):
    """(N, P): the gradient of ``scale * CE(model(x_n), labels_n)``, one backward() each."""
    out = []
    for k in range(len(x)):
        for p in params:
            p.grad = None
        logits = model(x[k:k + 1])
        ce = torch.nn.functional.cross_entropy(logits, labels[k:k + 1], reduction="sum")
        loss = scale * ce
        loss.backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]).detach().numpy().copy())
    for p in params:
        p.grad = None
    return np.stack(out)


def _ngdref_updates(
    grads: np.ndarray, s: np.ndarray, sampled: np.ndarray, damping: dict[str, float],
    threshold: float,
) -> dict[str, np.ndarray]:
    """"ngdref": g over all rows, the filter inside the EF / iEF solves, SF's P x P system."""
    g = grads.sum(axis=0)
    return {
        "sgd": g,
        "ef": _gram_update(grads, np.ones(len(grads)), damping["ef"], threshold),
        "ief": _gram_update(grads, s, damping["ief"], threshold),
        "sf": np.linalg.solve(sampled.T @ sampled + damping["sf"] * np.eye(len(g)), g),
    }


def _authors_updates(
    grads: np.ndarray, s: np.ndarray, sampled: np.ndarray, damping: dict[str, float],
    threshold: float,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """"authors": their all-pairs filter first (g from the kept rows, returned too), SF from
    their Woodbury formula on their filtered sampled rows."""
    keep = authors_true_row_filter(torch.as_tensor(grads), threshold)
    grads, s = grads[keep], s[keep]
    j_hat = authors_remove_J_C_duplicates(torch.as_tensor(sampled), 0.99, merge=False)
    j_hat = j_hat.numpy()
    g = grads.sum(axis=0)
    lam = damping["sf"]
    c_hat = j_hat @ j_hat.T + lam * np.eye(len(j_hat))
    sf = (g - j_hat.T @ np.linalg.solve(c_hat, j_hat @ g)) / lam  # their Woodbury form
    updates = {
        "sgd": g,
        "ef": _gram_update(grads, np.ones(len(grads)), damping["ef"], None),
        "ief": _gram_update(grads, s, damping["ief"], None),
        "sf": sf,
    }
    return updates, grads


def dense_reference(
    setup: Any, rows: np.ndarray, key: int, damping: dict[str, float], *,
    protocol: str = "ngdref", micro_batch: int = MICRO, threshold: float = 0.95,
) -> tuple[dict[str, float], dict[str, float]]:
    """gamma of SGD, EF, iEF, SF and both imbalances of one MLP batch, all by other routes.

    "ngdref": R = 1/M, the all-pairs filter inside the EF / iEF solves, g over all rows.
    "authors": R = 1/micro_batch, their all-pairs filter first, g and the imbalance over the
    kept rows, SF from their Woodbury formula on their filtered sampled rows.
    """
    model = setup.model.eval()
    params = [p for _, p in setup.trainable]
    x = setup.train.x[torch.as_tensor(rows)].to(params[0].dtype)
    y = setup.train.labels[torch.as_tensor(rows)]
    r = 1.0 / micro_batch if protocol == "authors" else 1.0 / len(rows)
    grads = _single_sample_grads(model, params, x, y, r)  # rows R grad l_n
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    onehot = np.eye(probs.shape[1])[y.numpy()]
    s = np.sum((r * (probs - onehot)) ** 2, axis=1)
    # dense F = R sum_n J_n^T (diag p_n - p_n p_n^T) J_n, J from autograd.functional.jacobian
    fisher = r * dense_fisher(dense_jacobian(setup, x), probs)
    # SF's labels: inverse CDF of Python's Mersenne Twister uniforms for the documented key;
    # the sampled rows are the gradients of R * CE at the drawn labels (R, not sqrt(R))
    drawn = torch.as_tensor(drawn_labels(probs, key))
    sampled = _single_sample_grads(model, params, x, drawn, r)  # mean-loss rows (SF's sampled rows)
    if protocol == "authors":
        updates, grads = _authors_updates(grads, s, sampled, damping, threshold)
    else:
        updates = _ngdref_updates(grads, s, sampled, damping, threshold)
    g = updates["sgd"]
    gammas = {m: math.sqrt(d @ fisher @ d) / abs(d @ g) for m, d in updates.items()}
    norms = np.linalg.norm(grads, axis=1)
    return gammas, {"max_min": float(norms.max() / norms.min()), "tail_10": _tail_10(norms)}


def check_against_dense(
    run: Path, evaluation: dict[str, Any], damping: dict[str, float], **protocol: Any
) -> None:
    """Every batch of every checkpoint of ``evaluation`` against :func:`dense_reference`,
    with the model cast to float64 (as the evaluator does). Tolerance 1e-8 relative: float64
    throughout, and the near-undamped solves of these 12 x 12 Gram matrices (condition
    numbers below ~1e6 here) lose at most ~1e-10; the two routes differ only by rounding."""
    setup = build_setup(load_run_config(run), "cpu")
    setup.model.to(torch.float64)
    settings = evaluation["settings"]
    n_train = len(setup.train)
    for entry in evaluation["checkpoints"]:
        params, step, _ = load_checkpoint(run, entry["name"])
        setup.load_params(params)
        per_batch = []
        for b in range(settings["batches"]):
            rows, key = documented_batch(step, b, n_train, settings["batch_size"])
            gammas, imbalance = dense_reference(setup, rows, key, damping, **protocol)
            per_batch.append(gammas)
            for name, (num, den) in RATIOS.items():
                if num not in gammas or den not in gammas:
                    continue  # the K-FAC family: tests/experiments/evaluate/test_kfac.py
                assert entry["ratios"][name]["values"][b] == pytest.approx(
                    gammas[num] / gammas[den], rel=1e-8
                ), (entry["name"], b, name)
            for stat, value in imbalance.items():
                assert entry["imbalance"][stat]["values"][b] == pytest.approx(value, rel=1e-10)
        for method in ("sgd", "ef", "ief", "sf"):
            values = [g[method] for g in per_batch]
            assert entry["gamma"][method]["mean"] == pytest.approx(np.mean(values), rel=1e-8)
            assert entry["gamma"][method]["std"] == pytest.approx(
                np.std(values), rel=1e-6, abs=1e-12
            )



def test_every_gamma_equals_a_dense_recomputation(
    mlp_run: Path, mlp_evaluation: dict[str, Any]
) -> None:
    """All B batches of every checkpoint: rows from default_rng([seed, b]).choice, SF's key
    from SeedSequence([seed, step, b])."""
    check_against_dense(mlp_run, mlp_evaluation, DEFAULT_DAMPING)


@pytest.mark.parametrize("threshold", [0.95, 0.3])
def test_authors_protocol_equals_their_formulas(
    mlp_run: Path, tmp_path: Path, threshold: float
) -> None:
    """The authors' protocol against a transcription of their evaluator: R = 1/micro-batch,
    one lambda, their all-pairs filter (threshold 0.3 makes it drop rows here), g and the
    imbalance from the kept rows, SF from their Woodbury formula on their filtered sampled
    rows."""
    run = copy_run(mlp_run, tmp_path / "run")
    lam = 1e-6
    result = evaluate_run(
        run, protocol="authors", batches=2, batch_size=M, micro_batch=4, damping=lam,
        dedup_threshold=threshold, progress=False,
    )
    assert result["settings"]["reduction"] == "1/micro_batch"
    if threshold < 0.5:
        assert min(c["rows_kept"]["mean"] for c in result["checkpoints"]) < M
    check_against_dense(
        run, result, dict.fromkeys(("ef", "ief", "sf"), lam), protocol="authors",
        micro_batch=4, threshold=threshold,
    )


@pytest.fixture(scope="module")
def mlp32_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The MLP run of :func:`mlp_run`, 1 epoch, trained in float32."""
    return train_mlp_run(tmp_path_factory, "mlp32", "train.epochs=1", "model.dtype=float32")


def test_float32_run_is_evaluated_in_float64(mlp32_run: Path) -> None:
    """A float32 run's checkpoints are scored with the model cast to float64: the numbers
    equal the float64 dense route to 1e-8 (float32 arithmetic would be ~1e-4 off)."""
    result = evaluate_run(mlp32_run, batches=2, batch_size=M, micro_batch=MICRO, progress=False)
    assert result["settings"]["dtype"] == "float64"
    check_against_dense(mlp32_run, result, DEFAULT_DAMPING)


@pytest.mark.parametrize("duplicates", ["drop", "merge"])
def test_sf_duplicate_filter_matches_the_authors_loop(duplicates: str) -> None:
    """``authors_sf_rows`` against the transcription of ``remove_J_C_duplicates``: rows with
    planted near-duplicates (a chain a ~ b ~ c and an exact copy), compared as the set of
    rows kept and their Gram matrix G_hat^T G_hat (order-free), to 1e-12."""
    from validation.experiments.evaluate.authors_sf import authors_sf_rows

    rng = np.random.default_rng(3)
    base = rng.standard_normal((6, 9))
    base[1] = base[0] + 0.05 * rng.standard_normal(9)  # near-duplicate of row 0
    base[2] = base[1] * 0.5 + 0.08 * rng.standard_normal(9)  # chain 0 ~ 1 ~ 2
    base[4] = -2.0 * base[3]  # exact (anti-)duplicate, different norm
    base[5] = base[3].copy()  # exact copy: equal norms
    rows = torch.as_tensor(base)
    expected = authors_remove_J_C_duplicates(rows, 0.99, merge=duplicates == "merge").numpy()
    index, scale = authors_sf_rows(base @ base.T, 0.99, duplicates)
    got = base[index] * scale[:, None]
    assert len(got) == len(expected) < 6
    np.testing.assert_allclose(got.T @ got, expected.T @ expected, rtol=0, atol=1e-12 * np.abs(
        expected.T @ expected).max())

