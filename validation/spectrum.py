r"""Top eigenvalues of F, EF, iEF, SF, eKFAC, ieKFAC on the digits MLP, matrix-free (eigsh).

``python -m validation.spectrum [--quick] [--out spectrum.png] [--force]`` trains the NumPy
tanh MLP of :mod:`backends.arrays.mlp` (64-32-32-10, P = 3,466) with SGD on scikit-learn's 8x8
digits (the seeded, standardised 1,077-image train split of
:func:`validation.experiments.data.images.load_digits`), and at initialisation and after
training takes one batch of N training samples (160, the paper's evaluation batch) and
computes, matrix-free with :func:`backends.scipy.operators.curvature_operator` and
``scipy.sparse.linalg.eigsh``, the top-k eigenpairs of

    F = sum_n J_n^T H_n J_n,  F_EF = G^T G,  F_iEF = G^T diag(s)^-1 G,  F_SF (one draw),
    eKFAC and ieKFAC (block-diagonal, from backends.torch.kfac.curvature on a torch copy of the MLP)

(sum convention), one batch and one operator per method, never a P x P matrix. It
prints, per method, lambda_1, the decay lambda_k / lambda_1, and the overlap
||V_F^T V_M||_F^2 / k in [0, 1] of its top-k eigenvectors with F's, and plots the
eigenvalues. ``--out`` defaults to a fresh temporary directory; an existing file is
never overwritten without ``--force``.

What to expect (the matrices: :ref:`conv-curvature`): with u_n = e_n / ||e_n||, F_EF =
sum_n s_n J_n^T u_n u_n^T J_n weights sample n by s_n = ||e_n||^2 and F_iEF = sum_n J_n^T
u_n u_n^T J_n by 1, while for a confident softmax (1 - p_y = eps) H_n has norm O(eps) =
O(sqrt(s_n)). Once most samples are fitted (a large gradient-norm imbalance) EF's spectrum
shrinks by about the typical s_n and is dominated by the few worst-fitted samples; iEF's
grows relative to F's. The SciPy guide page (docs/guide/scipy.md) quotes a run.
The model is the NumPy MLP (the operators are NumPy's), not the torch MLP of the
``mlp`` experiment set-up, whose data split it shares.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse.linalg import eigsh

import ngdref
from backends import MLPProvider, mlp_init
from backends.scipy.operators import (
    CurvatureOperator,
    curvature_operator,
    kfac_curvature_operator,
)

__all__ = ["METHODS", "Spectrum", "main", "operators", "spectra", "torch_mlp", "train"]

METHODS = ("fisher", "ef", "ief", "sf", "ekfac", "iekfac")
LABELS = {"fisher": "F (exact)", "ef": "EF", "ief": "iEF", "sf": "SF", "ekfac": "eKFAC",
          "iekfac": "ieKFAC"}
STYLES = {"fisher": "o-", "ef": "s--", "ief": "^-", "sf": "x:", "ekfac": "v--", "iekfac": "d-."}


@dataclass(frozen=True)
class Spectrum:
    """Top-k eigenvalues (descending) of one method at one checkpoint, and its overlap with F's."""

    checkpoint: str
    method: str
    eigenvalues: np.ndarray
    overlap: float


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    import torch  # the digits loader's, and backends.torch.kfac.curvature's: only when run

    from validation.experiments.data.images import load_digits

    split = load_digits("train", seed=seed, dtype=torch.float64)
    return split.inputs.numpy(), split.labels.numpy()


def train(
    params: np.ndarray, x: np.ndarray, y: np.ndarray, sizes: tuple[int, ...], *,
    epochs: int, lr: float, batch_size: int, seed: int,
) -> np.ndarray:
    """Mini-batch SGD on the mean cross-entropy; returns the trained parameters."""
    loss, rng = ngdref.SoftmaxCrossEntropy(), np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(x.shape[0])
        for start in range(0, x.shape[0], batch_size):
            idx = order[start:start + batch_size]
            provider = MLPProvider(params, x[idx], sizes)
            e = loss.grad(provider.logits(), y[idx]) / idx.size
            params = params - lr * provider.vjp_sum(e)
    return params


def _accuracy(params: np.ndarray, x: np.ndarray, y: np.ndarray, sizes: tuple[int, ...]) -> float:
    return float(np.mean(np.argmax(MLPProvider(params, x, sizes).logits(), axis=1) == y))


def torch_mlp(params: np.ndarray, sizes: tuple[int, ...]) -> Any:
    """The same tanh MLP in torch (float64): backends.arrays.mlp's theta layout is
    named_parameters'."""
    import torch

    layers: list[torch.nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers[:-1]).double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), model.parameters())
    return model


def operators(
    provider: MLPProvider, inputs: np.ndarray, targets: np.ndarray, seed: int
) -> dict[str, CurvatureOperator]:
    """Every method's matrix-free operator on one batch (eKFAC, ieKFAC from the torch twin)."""
    import torch

    from backends.torch.kfac.curvature import kfac_curvature

    loss = ngdref.SoftmaxCrossEntropy()
    ops = {m: curvature_operator(m, provider, loss, targets, key=seed) for m in METHODS[:4]}
    model = torch_mlp(provider.params, provider.sizes)
    curvature = kfac_curvature(model, loss, torch.from_numpy(inputs), torch.from_numpy(targets),
                               methods=("ekfac", "iekfac"))
    return ops | {m: kfac_curvature_operator(curvature, m) for m in ("ekfac", "iekfac")}


def spectra(checkpoint: str, ops: dict[str, CurvatureOperator], k: int) -> list[Spectrum]:
    """Top-k eigenpairs of every operator by eigsh, and their overlap with F's."""
    pairs = {}
    for method, op in ops.items():
        start = np.full(op.shape[0], 1.0 / np.sqrt(op.shape[0]))  # deterministic ARPACK start
        values, vectors = eigsh(op, k=k, which="LA", v0=start)
        order = np.argsort(values)[::-1]
        pairs[method] = (values[order], vectors[:, order])
    v_f = pairs["fisher"][1]
    return [
        Spectrum(checkpoint, m, vals, float(np.sum((v_f.T @ vecs) ** 2)) / k)
        for m, (vals, vecs) in pairs.items()
    ]


def table(results: Sequence[Spectrum], imbalance: dict[str, float]) -> str:
    """A plain-text table: lambda_1, lambda_k / lambda_1, overlap with F's top-k."""
    k = results[0].eigenvalues.size
    lines = [f"{'checkpoint':<12}{'method':<11}{'lambda_1':>12}{f'l_{k}/l_1':>12}"
             f"{'overlap_F':>11}   imbalance"]
    for r in results:
        lines.append(
            f"{r.checkpoint:<12}{LABELS[r.method]:<11}{r.eigenvalues[0]:>12.4g}"
            f"{r.eigenvalues[-1] / r.eigenvalues[0]:>12.3g}{r.overlap:>11.3f}   "
            f"{imbalance[r.checkpoint]:.3g}"
        )
    return "\n".join(lines)


def plot(results: Sequence[Spectrum], out: Path) -> None:
    """lambda_i per method on a log axis, one panel per checkpoint (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checkpoints = list(dict.fromkeys(r.checkpoint for r in results))
    fig, axes = plt.subplots(1, len(checkpoints), figsize=(5 * len(checkpoints), 4), sharey=True)
    for ax, name in zip(np.atleast_1d(axes), checkpoints, strict=True):
        for r in (r for r in results if r.checkpoint == name):
            index = np.arange(1, r.eigenvalues.size + 1)
            ax.semilogy(index, r.eigenvalues, STYLES[r.method], ms=4,
                        label=f"{LABELS[r.method]} (overlap with F {r.overlap:.2f})")
        ax.set_title(f"digits MLP, {name}")
        ax.set_xlabel("i")
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel(r"top eigenvalues $\lambda_i$ (sum convention)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _output_path(out: str | None, force: bool) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix="ngdref-spectrum-")) / "spectrum.png"
    path = Path(out)
    if path.exists() and not force:
        raise FileExistsError(f"--out {path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {path}: directory {path.parent} does not exist")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m validation.spectrum", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="PNG path (default: a new temporary directory)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--quick", action="store_true", help="tiny scale (CI): N=40, k=6, 2 epochs")
    p.add_argument("--k", type=int, help="eigenvalues per method (default 20, quick 6)")
    p.add_argument("--batch", type=int, help="samples N of the curvature batch (default 160)")
    p.add_argument("--epochs", type=int, help="SGD epochs (default 30, quick 2)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> list[Spectrum]:
    args = _parser().parse_args(argv)
    k = args.k or (6 if args.quick else 20)
    n = args.batch or (40 if args.quick else 160)
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 30)
    if k < 1 or n < 1 or epochs < 0:
        raise SystemExit("--k and --batch must be >= 1 and --epochs >= 0")
    out = _output_path(args.out, args.force)
    began = time.perf_counter()
    x, y = _digits(args.seed)
    sizes = (64, 32, 32, 10)
    params0 = mlp_init(sizes, args.seed, xp=np)
    params = train(params0, x, y, sizes, epochs=epochs, lr=0.5, batch_size=64, seed=args.seed)
    batch = np.random.default_rng(args.seed + 1).choice(x.shape[0], n, replace=False)
    results, imbalance = [], {}
    for name, theta in (("init", params0), (f"epoch {epochs}", params)):
        provider = MLPProvider(theta, x[batch], sizes)
        q = ngdref.batch_quantities(provider, ngdref.SoftmaxCrossEntropy(), y[batch])
        imbalance[name] = ngdref.grad_norm_imbalance(q.per_sample_grads)
        results += spectra(name, operators(provider, x[batch], y[batch], args.seed), k)
    plot(results, out)
    print(f"digits MLP {sizes}, P = {params.size}, N = {n}, k = {k}; train accuracy "
          f"{_accuracy(params0, x, y, sizes):.3f} -> {_accuracy(params, x, y, sizes):.3f}")
    print(table(results, imbalance))
    print(f"plot: {out}   ({time.perf_counter() - began:.1f} s)")
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
