"""The evaluation's ``damping_scale="sampled_max"`` and ``dedup_zero_rows="keep"`` against the
authors' evaluator (``update_generation`` and ``remove_J_C_duplicates`` of their release)
written out in float64 NumPy:

    J      = R G, filtered by their pairwise loop at 0.95 (zero rows kept: NaN cosines)
    J_hat  = R G_hat sorted by norm, their loop at 0.99 removing later close rows
    damping = max diag(J_hat J_hat^T) * lambda          (their ``damping < 0``)
    SF  = (g - J_hat^T (J_hat J_hat^T + damping I)^-1 J_hat g) / damping,  g = sum of kept J
    EF  = J^T (J J^T + damping I)^-1 1,   iEF = J^T (J J^T + damping I)^-1 s

(their EF and iEF invert by an eigendecomposition, here by a solve: the same to rounding).
Tolerance: 16 kappa M P eps, kappa the condition number of the damped system solved.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from validation.experiments.evaluate.protocols import score_batch  # noqa: E402

EPS = float(np.finfo(np.float64).eps)


def _their_true_filter(j: np.ndarray, threshold: float) -> list[int]:
    c = j @ j.T
    d = np.sqrt(np.diag(c))
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = c / np.outer(d, d)
    norms = np.linalg.norm(j, axis=1)
    removed = []
    for i in range(j.shape[0]):
        for k in range(i + 1, j.shape[0]):
            if abs(similarity[i, k]) > threshold:
                removed.append(i if norms[k] > norms[i] else k)
    return [i for i in range(j.shape[0]) if i not in removed]


def _their_sampled_filter(j_hat: np.ndarray, threshold: float) -> np.ndarray:
    """remove_J_C_duplicates with retain_C_thresh=1 (nothing pruned) as released (drop)."""
    order = np.argsort(-np.linalg.norm(j_hat, axis=1) ** 2, kind="stable")
    j_hat = j_hat[order]
    c = j_hat @ j_hat.T
    sq = np.diag(c).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        similarity = c / np.outer(np.sqrt(sq), np.sqrt(sq))
    removed, exact = [], []
    for i in range(c.shape[0]):
        if i in exact:
            continue
        for k in range(i + 1, c.shape[0]):
            if k in exact:
                continue
            if abs(similarity[i, k]) > threshold:
                removed.append(k)
                if sq[i] == sq[k]:
                    exact.append(k)
                sq[i] += sq[k]  # their accumulator aliases the norms it compares
    return j_hat[[i for i in range(c.shape[0]) if i not in removed]]


def _batch() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    m, p = 8, 20
    g = rng.standard_normal((m, p)) * rng.uniform(0.2, 3.0, (m, 1))
    g[5] = 1.5 * g[1]  # a near duplicate: one of the pair is dropped
    g[6] = 0.0  # a zero row: their filter keeps it
    g_hat = rng.standard_normal((m, p))
    g_hat[3] = -0.5 * g_hat[2]  # a duplicate sampled row
    g_hat[6] = 0.0
    return g, rng.uniform(0.1, 1.0, m), g_hat


@pytest.mark.parametrize("lam", [1e-4, 1e-1])
def test_sampled_max_damping_is_the_authors_evaluators(lam: float) -> None:
    g, s, g_hat = _batch()
    r = 0.25  # R = 1 / micro_batch
    scorer = score_batch(
        torch.from_numpy(g), torch.from_numpy(s), torch.from_numpy(g_hat),
        lambda _: (lambda v: 0.0), protocol="authors", factor=r, dedup_threshold=0.95,
        num_samples=1, damping_scale="sampled_max", dedup_zero_rows="keep",
    )
    j, j_hat = r * g, _their_sampled_filter(r * g_hat, 0.99)
    kept = _their_true_filter(j, 0.95)
    assert scorer.kept == len(kept) == 7 and 6 in kept
    j, s_kept = j[kept], (r * r * s)[kept]
    damping = float(np.max(np.diag(j_hat @ j_hat.T))) * lam
    assert scorer.scale * lam == pytest.approx(damping, rel=4 * EPS)
    grad = j.sum(axis=0)
    c = j @ j.T + damping * np.eye(len(kept))
    c_hat = j_hat @ j_hat.T + damping * np.eye(j_hat.shape[0])
    expected = {
        "sf": (grad - j_hat.T @ np.linalg.solve(c_hat, j_hat @ grad)) / damping,
        "ef": j.T @ np.linalg.solve(c, np.ones(len(kept))),
        "ief": j.T @ np.linalg.solve(c, s_kept),
    }
    for method, want in expected.items():
        kappa = np.linalg.cond(c_hat if method == "sf" else c)
        got = scorer.update(method, lam).numpy()
        bound = 16 * kappa * g.size * EPS
        assert np.linalg.norm(got - want) <= bound * np.linalg.norm(want), method


def test_absolute_and_dropped_zero_rows_stay_the_defaults() -> None:
    g, s, g_hat = _batch()
    scorer = score_batch(
        torch.from_numpy(g), torch.from_numpy(s), torch.from_numpy(g_hat),
        lambda _: (lambda v: 0.0), protocol="authors", factor=0.25, dedup_threshold=0.95,
        num_samples=1,
    )
    assert scorer.scale == 1.0 and scorer.kept == 6  # the zero row dropped too
    with pytest.raises(ValueError, match="needs the sampled gradients"):
        score_batch(
            torch.from_numpy(g), torch.from_numpy(s), None, lambda _: (lambda v: 0.0),
            protocol="ngdref", factor=0.25, dedup_threshold=0.95, num_samples=1,
            damping_scale="sampled_max",
        )


def test_a_file_written_before_the_options_resumes_at_their_defaults(tmp_path) -> None:
    import json

    from validation.experiments.evaluate.protocols import EvaluationError
    from validation.experiments.evaluate.settings import common_settings, load_previous

    settings = common_settings(batches=2)
    older = {k: v for k, v in settings.items() if k not in ("damping_scale", "dedup_zero_rows")}
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"settings": older, "checkpoints": [{"name": "epoch-0"}]}))
    assert load_previous(path, settings, overwrite=False) == [{"name": "epoch-0"}]
    with pytest.raises(EvaluationError, match="damping_scale: 'absolute' -> 'sampled_max'"):
        load_previous(path, {**settings, "damping_scale": "sampled_max"}, overwrite=False)
