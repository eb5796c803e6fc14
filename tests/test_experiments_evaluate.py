"""The evaluation framework (validation/experiments/evaluate.py) on tiny runs of the runner.

Runs are trained here by the runner itself: an MLP on scikit-learn's digits (2 epochs, Adam) and
a tiny random T5 + LoRA on an SST-2 file in GLUE's TSV format (1 epoch). Expected values come
from other routes than the evaluator's:

- every gamma of the MLP from a dense Fisher (``torch.autograd.functional.jacobian`` and the
  softmax-CE Hessian written out here), per-sample gradients from a loop of single-sample
  ``backward()`` calls, the updates from numpy solves (EF and iEF: the Gram form with the
  near-duplicate filter re-implemented here; SF: the P x P system), the batches and SF's labels
  from the documented seeds;
- the T5 evaluator's per-sample loss from Hugging Face's logits at the first label position;
- the sweep's factorised solves from evaluate's library calls at the same damping;
- a resumed evaluation from an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from validation.experiments.__main__ import main  # noqa: E402
from validation.experiments.config import load_config  # noqa: E402
from validation.experiments.evaluate import (  # noqa: E402
    EVALUATION_FILE,
    METHODS,
    RATIOS,
    SWEEP_FILE,
    EvaluationError,
    evaluate_run,
    evaluation_problem,
    sweep_run,
)
from validation.experiments.evaluate_settings import DEFAULT_DAMPING  # noqa: E402
from validation.experiments.train import (  # noqa: E402
    build_setup,
    load_checkpoint,
    load_run_config,
    train,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning"
)

# the MLP evaluation: B batches of M rows, micro-batches of 5 (uneven: 5 + 5 + 2)
B, M, MICRO = 3, 12, 5
MLP_SETTINGS = {"batches": B, "batch_size": M, "micro_batch": MICRO, "progress": False}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- runs ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Adam on 48 digits, hidden layer of 8 (P = 610), 2 epochs: checkpoints epoch-0..2."""
    config = load_config(
        "mlp",
        ["optimizer=adam", "optim.lr=0.01", "model.hidden_sizes=[8]", "train.epochs=2",
         "train.batch_size=16", "data.max_train_samples=48", "data.max_eval_samples=16"],
    )
    run = tmp_path_factory.mktemp("mlp") / "run"
    train(config, run, progress=False, device="cpu")
    return run


@pytest.fixture(scope="module")
def mlp_evaluation(mlp_run: Path) -> dict[str, Any]:
    return evaluate_run(mlp_run, **MLP_SETTINGS)


def copy_run(run: Path, dest: Path, keep_results: bool = False) -> Path:
    """A copy of a run directory (without the evaluator's files unless asked)."""
    shutil.copytree(run, dest)
    if not keep_results:
        for name in (EVALUATION_FILE, SWEEP_FILE):
            (dest / name).unlink(missing_ok=True)
    return dest


POSITIVE = ["a great film", "wonderful acting", "i loved it", "superb story"]
NEGATIVE = ["a dull film", "awful acting", "i hated it", "boring story"]


@pytest.fixture(scope="module")
def t5_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny T5 + LoRA, AdamW, 1 epoch on 8 SST-2 rows (GLUE's TSV layout)."""
    root = tmp_path_factory.mktemp("glue")
    (root / "SST-2").mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train.tsv", 24), ("dev.tsv", 8)):
        lines = ["sentence\tlabel"] + [
            f"{(POSITIVE if k % 2 else NEGATIVE)[rng.integers(4)]}\t{k % 2}" for k in range(n)
        ]
        (root / "SST-2" / name).write_text("\n".join(lines) + "\n")
    config = load_config(
        "t5-lora",
        ["optimizer=adamw", "model.name=tiny", "model.max_length=24", f"data.source={root}",
         "data.max_train_samples=8", "data.max_eval_samples=8", "train.batch_size=4",
         "train.eval_batch_size=8", "train.epochs=1", "peft.dropout=0.1"],
    )
    run = tmp_path_factory.mktemp("t5") / "run"
    train(config, run, progress=False, device="cpu")
    return run


# ---- the file format -------------------------------------------------------------------------
def _is_float(x: Any) -> bool:
    return isinstance(x, float)


def check_evaluation_format(result: dict[str, Any], path: Path, names: list[str]) -> None:
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert set(on_disk) == {"settings", "checkpoints"}
    assert [c["name"] for c in on_disk["checkpoints"]] == names
    batches = on_disk["settings"]["batches"]
    for entry in on_disk["checkpoints"]:
        assert set(entry) == {
            "name", "epoch", "step", "ratios", "imbalance", "rows_kept", "gamma"
        }
        assert entry["epoch"] == int(entry["name"].split("-")[1])
        assert isinstance(entry["step"], int)
        assert set(entry["ratios"]) == {
            "ef/sgd", "ief/sgd", "sf/ief", "sf/ef", "kfac/ief", "ekfac/ief", "iekfac/ief"
        }
        assert set(entry["imbalance"]) == {"max_min", "tail_10"}
        for summary in [*entry["ratios"].values(), *entry["imbalance"].values()]:
            assert set(summary) == {"mean", "std", "values"}
            assert len(summary["values"]) == batches
            assert all(_is_float(v) and math.isfinite(v) for v in summary["values"])
            assert summary["mean"] == pytest.approx(np.mean(summary["values"]), rel=1e-12)
            assert summary["std"] == pytest.approx(np.std(summary["values"]), rel=1e-9, abs=1e-15)
        for stat in entry["imbalance"].values():
            assert all(v >= 1.0 for v in stat["values"])
        assert all(v == int(v) for v in entry["rows_kept"]["values"])
        assert set(entry["gamma"]) == {"sgd", "ef", "ief", "sf", "kfac", "ekfac", "iekfac"}
        for summary in entry["gamma"].values():
            assert set(summary) == {"mean", "std"}
            assert _is_float(summary["mean"]) and summary["mean"] > 0


def test_evaluation_json_format(mlp_run: Path, mlp_evaluation: dict[str, Any]) -> None:
    check_evaluation_format(
        mlp_evaluation, mlp_run / EVALUATION_FILE, ["epoch-0", "epoch-1", "epoch-2"]
    )
    settings = mlp_evaluation["settings"]
    assert settings == {
        "protocol": "ngdref", "batches": B, "batch_size": M, "micro_batch": MICRO, "seed": 0,
        "damping": DEFAULT_DAMPING, "dedup_threshold": 0.95,
        "methods": ["sgd", "ef", "ief", "sf", "kfac", "ekfac", "iekfac"],
        "checkpoints": ["epoch-0", "epoch-1", "epoch-2"],
        "reduction": "mean", "num_samples": 1, "dtype": "float64", "sf_duplicates": None,
        "device": "cpu",
    }
    assert DEFAULT_DAMPING == {
        "ef": 1e-7, "ief": 1e-12, "sf": 1e-7, "kfac": 1e-7, "ekfac": 1e-7, "iekfac": 1e-12,
    }
    steps = [c["step"] for c in mlp_evaluation["checkpoints"]]
    assert steps == [0, 3, 6]  # 48 rows / 16 per step


# ---- gamma against a dense, independent recomputation ----------------------------------------
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
    names = [n for n, _ in setup.trainable]
    params = [p for _, p in setup.trainable]
    dtype = params[0].dtype
    x = setup.train.x[torch.as_tensor(rows)].to(dtype)
    y = setup.train.labels[torch.as_tensor(rows)]
    n = len(rows)
    r = 1.0 / micro_batch if protocol == "authors" else 1.0 / n

    def single_sample_grads(labels: Any, scale: float) -> np.ndarray:
        out = []
        for k in range(n):
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

    grads = single_sample_grads(y, r)  # rows R grad l_n
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1).numpy()
    onehot = np.eye(probs.shape[1])[y.numpy()]
    s = np.sum((r * (probs - onehot)) ** 2, axis=1)

    # dense F = R sum_n J_n^T (diag p_n - p_n p_n^T) J_n, J from autograd.functional.jacobian
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def logits_of(flat: Any) -> Any:
        pieces = torch.split(flat, sizes)
        return torch.func.functional_call(
            model, {nm: t.reshape(sh) for nm, t, sh in zip(names, pieces, shapes, strict=True)},
            (x,),
        )

    jac = torch.autograd.functional.jacobian(logits_of, theta).numpy()  # (N, C, P)
    fisher = np.zeros((theta.numel(), theta.numel()))
    for k in range(n):
        h = np.diag(probs[k]) - np.outer(probs[k], probs[k])
        fisher += r * jac[k].T @ h @ jac[k]

    # SF's labels: inverse CDF of Python's Mersenne Twister uniforms for the documented key;
    # the sampled rows are the gradients of R * CE at the drawn labels (R, not sqrt(R))
    rng = random.Random(key)
    uniforms = [rng.random() for _ in range(n)]
    drawn = np.array([
        min(int(np.searchsorted(np.cumsum(probs[k]), uniforms[k], side="right")),
            probs.shape[1] - 1)
        for k in range(n)
    ])
    sampled = single_sample_grads(torch.as_tensor(drawn), r)  # mean-loss rows (SPEC §9)
    p_dim = theta.numel()
    if protocol == "authors":
        keep = authors_true_row_filter(torch.as_tensor(grads), threshold)
        grads, s = grads[keep], s[keep]
        j_hat = authors_remove_J_C_duplicates(torch.as_tensor(sampled), 0.99, merge=False)
        j_hat = j_hat.numpy()
        g = grads.sum(axis=0)
        lam = damping["sf"]
        c_hat = j_hat @ j_hat.T + lam * np.eye(len(j_hat))
        sf = (g - j_hat.T @ np.linalg.solve(c_hat, j_hat @ g)) / lam  # their Woodbury form
        dedup: float | None = None
    else:
        g = grads.sum(axis=0)
        sf = np.linalg.solve(sampled.T @ sampled + damping["sf"] * np.eye(p_dim), g)
        dedup = threshold
    updates = {
        "sgd": g,
        "ef": _gram_update(grads, np.ones(len(grads)), damping["ef"], dedup),
        "ief": _gram_update(grads, s, damping["ief"], dedup),
        "sf": sf,
    }
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
            rows = np.random.default_rng([0, b]).choice(
                n_train, size=settings["batch_size"], replace=False
            )
            key = int(np.random.SeedSequence([0, step, b]).generate_state(1, np.uint64)[0])
            gammas, imbalance = dense_reference(setup, rows, key, damping, **protocol)
            per_batch.append(gammas)
            for name, (num, den) in RATIOS.items():
                if num not in gammas or den not in gammas:
                    continue  # the K-FAC family: tests/test_kfac_experiments.py
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
    """The MLP run of :func:`mlp_run`, trained in float32."""
    config = load_config(
        "mlp",
        ["optimizer=adam", "optim.lr=0.01", "model.hidden_sizes=[8]", "train.epochs=1",
         "train.batch_size=16", "data.max_train_samples=48", "data.max_eval_samples=16",
         "model.dtype=float32"],
    )
    run = tmp_path_factory.mktemp("mlp32") / "run"
    train(config, run, progress=False, device="cpu")
    return run


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
    from validation.experiments.protocols import authors_sf_rows

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


def test_micro_batch_changes_nothing(mlp_run: Path, tmp_path: Path) -> None:
    """Micro-batches bound memory only: one pass of 12 or passes of 5 + 5 + 2 agree, the
    eKFAC and ieKFAC curvatures merged over the micro-batches included (KFAC's labels are
    drawn per micro-batch, so it is left out). Their damped K-FAC solves have condition
    numbers up to ~1e6 here (lambda = 1e-3, 0.144 in the sum convention): 1e-8 relative."""
    run = copy_run(mlp_run, tmp_path / "run")
    settings = {**MLP_SETTINGS, "micro_batch": M, "checkpoints": "last", "batches": 2,
                "methods": ("sgd", "ef", "ief", "sf", "ekfac", "iekfac"),
                "damping": {"ekfac": 1e-3, "iekfac": 1e-3}}
    whole = evaluate_run(run, **settings)["checkpoints"][0]
    chunked = evaluate_run(run, **{**settings, "micro_batch": 5}, overwrite=True)
    assert set(whole["ratios"]) == set(RATIOS) - {"kfac/ief"}
    for name in whole["ratios"]:
        assert chunked["checkpoints"][0]["ratios"][name]["values"] == pytest.approx(
            whole["ratios"][name]["values"], rel=1e-8 if "kfac" in name else 1e-10
        )


# ---- sweep -----------------------------------------------------------------------------------
def test_sweep_format_and_equality_with_evaluate(mlp_run: Path, tmp_path: Path) -> None:
    """At each lambda of the grid the sweep (Gram matrices formed once per batch, reused for
    every lambda) gives evaluate's numbers with damping = lambda for EF, iEF and SF: same
    batches, same SF draws, same library solves; they agree to rounding (1e-9 leaves room
    for other BLAS builds)."""
    run = copy_run(mlp_run, tmp_path / "run")
    grid = [1e-12, 1e-6, 1e-3]
    settings = {"batches": 2, "batch_size": M, "micro_batch": MICRO, "progress": False}
    sweep = sweep_run(run, dampings=grid, **settings)
    assert json.loads((run / SWEEP_FILE).read_text()) == json.loads(json.dumps(sweep))
    assert set(sweep) == {"settings", "checkpoints"}
    assert sweep["settings"]["dampings"] == grid
    assert sweep["settings"]["checkpoints"] == ["epoch-0", "epoch-1", "epoch-2"]
    for entry in sweep["checkpoints"]:
        assert set(entry) == {"name", "epoch", "dampings", "ratios"}
        assert entry["dampings"] == grid
        assert set(entry["ratios"]) == set(RATIOS)
        for summary in entry["ratios"].values():
            assert set(summary) == {"mean", "std"}
            assert len(summary["mean"]) == len(summary["std"]) == len(grid)
    for k, lam in enumerate(grid):
        evaluation = evaluate_run(
            run, damping=lam, checkpoints="first,middle,last", overwrite=True,
            methods=METHODS, **settings,
        )
        for swept, evaluated in zip(sweep["checkpoints"], evaluation["checkpoints"], strict=True):
            assert swept["name"] == evaluated["name"]
            for name, summary in evaluated["ratios"].items():
                assert swept["ratios"][name]["mean"][k] == pytest.approx(
                    summary["mean"], rel=1e-9
                ), (swept["name"], lam, name)
                assert swept["ratios"][name]["std"][k] == pytest.approx(
                    summary["std"], rel=1e-6, abs=1e-12
                ), (swept["name"], lam, name)


def test_sweep_forms_each_gram_matrix_once_per_batch(
    mlp_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep over D dampings forms two Gram matrices per batch (the true rows' and the
    sampled rows'), whatever D: the damping grid reuses them (issue 7)."""
    import ngdref.rows

    calls = []
    products = ngdref.rows._products64

    def counted(a: Any, b: Any) -> Any:
        calls.append(tuple(a.shape))
        return products(a, b)

    monkeypatch.setattr(ngdref.rows, "_products64", counted)
    run = copy_run(mlp_run, tmp_path / "run")
    for grid in ([1e-6], [1e-9, 1e-6, 1e-3, 1.0]):
        calls.clear()
        sweep_run(run, dampings=grid, batches=2, batch_size=M, checkpoints="last",
                  progress=False, overwrite=True)
        assert len(calls) == 2 * 2, (grid, calls)


def test_sweep_middle_checkpoint_and_resume(
    mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(mlp_run, tmp_path / "run")
    settings = {"batches": 1, "batch_size": M, "dampings": [1e-6, 1e6], "progress": False}
    first = sweep_run(run, checkpoints="middle", **settings)
    assert [c["name"] for c in first["checkpoints"]] == ["epoch-1"]
    both = sweep_run(run, checkpoints="first,middle", **{**settings, "progress": True})
    err = capsys.readouterr().err
    assert "sweep epoch-1: already in" in err and "sweep epoch-0 (epoch 0, step 0): " in err
    assert "1/1" in err  # the tqdm bar over the one batch left to do
    assert [c["name"] for c in both["checkpoints"]] == ["epoch-0", "epoch-1"]
    assert both["checkpoints"][1] == first["checkpoints"][0]
    # a damping far above the Gram matrices' scale (~1 here) makes EF and SF multiples of g,
    # but iEF (damped in sample space) a multiple of G^T s, which is not g
    ratios = {name: r["mean"][1] for name, r in both["checkpoints"][0]["ratios"].items()}
    assert ratios["ef/sgd"] == pytest.approx(1, abs=1e-5)
    assert ratios["sf/ef"] == pytest.approx(1, abs=1e-5)
    assert abs(ratios["ief/sgd"] - 1) > 1e-3


# ---- resume ----------------------------------------------------------------------------------
def test_resume_recomputes_only_missing_checkpoints(
    mlp_run: Path, mlp_evaluation: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = copy_run(mlp_run, tmp_path / "run", keep_results=True)
    path = run / EVALUATION_FILE
    stored = json.loads(path.read_text())
    stored["checkpoints"] = stored["checkpoints"][:-1]  # as if killed before the last one
    path.write_text(json.dumps(stored))
    resumed = evaluate_run(run, **{**MLP_SETTINGS, "progress": True})
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("evaluate epoch")]
    assert len(lines) == 3
    assert "skipped" in lines[0] and "skipped" in lines[1]
    assert lines[2].startswith("evaluate epoch-2 (epoch 2, step 6): ef/sgd ")
    assert "3/3" in err  # the tqdm bar counted the 3 batches still to do
    assert json.loads(path.read_text()) == json.loads(json.dumps(mlp_evaluation))
    assert resumed["checkpoints"][-1] == mlp_evaluation["checkpoints"][-1]
    # a rerun with other settings refuses to mix them, naming what differs
    with pytest.raises(EvaluationError, match=r"batch_size: 12 -> 10"):
        evaluate_run(run, **{**MLP_SETTINGS, "batch_size": 10})


# ---- T5: the first label token ---------------------------------------------------------------
def test_t5_evaluator_keeps_only_the_first_label_token(t5_run: Path) -> None:
    setup = build_setup(load_run_config(t5_run), "cpu")
    params, _, _ = load_checkpoint(t5_run, "epoch-1")
    setup.load_params(params)
    batch = setup.train.make(np.arange(6))
    labels = batch.targets
    assert labels.shape[1] >= 2  # label word + EOS: training sees more than the first token
    # dropout (T5's and LoRA's 0.1) switched on: the evaluator must still run in eval mode
    setup.model.train()
    problem = evaluation_problem(setup, batch, micro_batch=4)
    assert problem.factor == pytest.approx(1 / 6)
    torch.testing.assert_close(problem.targets, labels[:, 0])
    values = problem.loss.value(problem.provider.logits(), problem.targets)
    e = problem.loss.grad(problem.provider.logits(), problem.targets)
    grads = problem.provider.vjp(e)
    with torch.no_grad():
        noisy = setup.model(**batch.inputs).logits[:, 0]  # dropout active
        setup.model.eval()
        hf_logits = setup.model(**batch.inputs).logits  # (N, T, V), teacher forced
    assert not torch.allclose(noisy, hf_logits[:, 0])
    expected = torch.nn.functional.cross_entropy(hf_logits[:, 0], labels[:, 0], reduction="none")
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)
    full = torch.nn.functional.cross_entropy(
        hf_logits.transpose(1, 2), labels, reduction="none", ignore_index=-100
    ).sum(dim=1)
    assert not torch.allclose(values, full)  # the EOS term is really left out
    # per-sample gradients: single-sample backward passes of that first-token CE
    trainable = [p for _, p in setup.trainable]
    for n in range(2):
        one = {k: v[n:n + 1] for k, v in batch.inputs.items()}
        loss = torch.nn.functional.cross_entropy(
            setup.model(**one).logits[:, 0], labels[n:n + 1, 0], reduction="sum"
        )
        expected_row = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trainable)])
        torch.testing.assert_close(grads[n], expected_row, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("protocol", "batch_size"), [("ngdref", 6), ("authors", 8)]  # authors: 2 micro-batches
)
def test_t5_evaluation_file(t5_run: Path, tmp_path: Path, protocol: str, batch_size: int) -> None:
    run = copy_run(t5_run, tmp_path / "run")
    result = evaluate_run(
        run, protocol=protocol, batches=2, batch_size=batch_size, micro_batch=4, progress=False
    )
    check_evaluation_format(result, run / EVALUATION_FILE, ["epoch-0", "epoch-1"])


# ---- bad input -------------------------------------------------------------------------------
def test_run_dir_without_checkpoints(mlp_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(mlp_run / "config.json", empty / "config.json")
    with pytest.raises(EvaluationError, match=r"run_dir: .* has no epoch checkpoints"):
        evaluate_run(empty, progress=False)
    with pytest.raises(EvaluationError, match=r"run_dir: .* has no epoch checkpoints"):
        sweep_run(empty, progress=False)
    with pytest.raises(FileNotFoundError, match=r"run_dir: .*config\.json"):
        evaluate_run(tmp_path / "nowhere", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoints": "epoch-9"}, r"checkpoints: unknown checkpoint 'epoch-9'"),
        ({"checkpoints": ["first", "latest"]}, r"checkpoints: unknown checkpoint 'latest'"),
        ({"checkpoints": ""}, r"checkpoints is empty"),
        ({"batch_size": 49}, r"batch_size=49 is larger than the training split \(48"),
        ({"batches": 0}, r"batches must be an int >= 1"),
        ({"micro_batch": 2.5}, r"micro_batch must be an int"),
        ({"seed": -1}, r"seed must be an int >= 0"),
        ({"damping": -1e-3}, r"damping must be a finite number >= 0"),
        ({"damping": {"ngd": 1.0}}, r"damping: unknown method\(s\) \['ngd'\]"),
        ({"damping": {"sf": float("nan")}}, r"damping\['sf'\] must be a finite number"),
        ({"dedup_threshold": 1.5}, r"dedup_threshold must be None or in \(0, 1\]"),
        ({"methods": ["sgd", "ngd"]}, r"methods must be a non-empty subset"),
        ({"reduction": "token"}, r"reduction: reduction must be 'sum', 'mean'"),
        ({"protocol": "paper"}, r"protocol must be one of \('ngdref', 'authors'\)"),
        ({"dtype": "float16"}, r"dtype must be one of"),
        ({"protocol": "authors", "reduction": "mean"}, r"reduction: the authors' protocol"),
        ({"protocol": "authors"}, r"batch_size=12 must be a multiple of micro_batch=5"),
        ({"protocol": "authors", "micro_batch": 4, "damping": {"ef": 1e-3}},
         r"damping: the authors' protocol uses one lambda"),
        ({"protocol": "authors", "micro_batch": 4, "sf_duplicates": "sum"},
         r"sf_duplicates must be one of"),
    ],
)
def test_bad_arguments_are_named(mlp_run: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        evaluate_run(mlp_run, **{**MLP_SETTINGS, **kwargs})


@pytest.mark.parametrize(
    ("dampings", "match"),
    [([], r"dampings is empty"), ([1e-3, -1.0], r"dampings\[1\] must be a finite number >= 0"),
     ("1e-3", r"dampings must be a sequence")],
)
def test_bad_sweep_grid_is_named(mlp_run: Path, dampings: Any, match: str) -> None:
    with pytest.raises(EvaluationError, match=match):
        sweep_run(mlp_run, dampings=dampings, progress=False)


def test_singular_sf_names_the_batch(mlp_run: Path, tmp_path: Path) -> None:
    """SF with damping 0 has no inverse when P > M: the error says where, and keeps its type."""
    import ngdref

    run = copy_run(mlp_run, tmp_path / "run")
    with pytest.raises(ngdref.SingularMatrixError, match=r"checkpoint epoch-0, batch 0: "):
        evaluate_run(run, **MLP_SETTINGS, damping={"sf": 0.0})


# ---- command line ----------------------------------------------------------------------------
def test_command_line(mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = copy_run(mlp_run, tmp_path / "run")
    common = ["--batches", "1", "--batch-size", "8", "--micro-batch", "3", "--progress", "off"]
    assert main(["evaluate", str(run), *common, "--checkpoints", "first,last",
                 "--damping", "1e-5", "--damping", "ief=1e-10", "--dedup-threshold", "none"]) == 0
    result = json.loads((run / EVALUATION_FILE).read_text())
    assert result["settings"]["damping"] == {
        "ef": 1e-5, "ief": 1e-10, "sf": 1e-5, "kfac": 1e-5, "ekfac": 1e-5, "iekfac": 1e-5,
    }
    assert result["settings"]["dedup_threshold"] is None
    assert [c["name"] for c in result["checkpoints"]] == ["epoch-0", "epoch-2"]
    assert main(["sweep", str(run), *common, "--dampings", "1e-8,1e-4"]) == 0
    sweep = json.loads((run / SWEEP_FILE).read_text())
    assert sweep["settings"]["dampings"] == [1e-8, 1e-4]
    capsys.readouterr()
    assert main(["evaluate", str(run), *common, "--checkpoints", "epoch-7"]) == 2
    assert "checkpoints: unknown checkpoint 'epoch-7'" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nowhere")]) == 2
    assert "run_dir" in capsys.readouterr().err


def test_readme_evaluate_examples_point_at_runs_it_creates() -> None:
    """Every ``evaluate`` / ``sweep`` run directory in README's experiment commands is the
    ``--out`` of a ``train`` line before it (a newcomer can run the block top to bottom)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    commands = [
        line.split("#")[0].split()
        for line in readme.splitlines()
        if line.startswith("python -m validation.experiments ")
    ]
    created: set[str] = set()
    checked = 0
    for words in commands:
        command = words[3]
        if command == "train" and "--out" in words:
            created.add(words[words.index("--out") + 1])
        elif command in ("evaluate", "sweep"):
            assert words[4] in created, f"README: {' '.join(words)} uses a run never created"
            checked += 1
    assert checked >= 2


def test_cli_defaults_are_the_documented_ones() -> None:
    """``evaluate`` and ``sweep`` default to DEFAULT_BATCHES / DEFAULT_SWEEP_BATCHES (not the
    paper's 100, which took minutes per digits checkpoint), protocol ngdref, float64, and a
    progress bar when stderr is a terminal."""
    from validation.experiments import evaluate as ev
    from validation.experiments.__main__ import build_parser

    parser = build_parser()
    args = parser.parse_args(["evaluate", "RUN"])
    assert (args.batches, args.protocol, args.dtype, args.progress) == (
        ev.DEFAULT_BATCHES, "ngdref", "float64", "auto"
    )
    assert ev.DEFAULT_BATCHES < 100
    args = parser.parse_args(["sweep", "RUN"])
    assert args.batches == ev.DEFAULT_SWEEP_BATCHES
