"""Write the API reference pages from the packages' public names, before autosummary runs.

The pages are generated, not written by hand, so that they follow the code: a name added to
``ngdref.__all__`` or to ``backends/__init__.py`` (whose lazy attributes resolve on access)
appears without a docs edit, and a module that moves inside ``backends/`` keeps its page (the
names are documented where users import them, ``backends.IEF``, not where they live).

- ``ngdref``: every name of ``ngdref.__all__`` under its top-level name, grouped by topic;
  then, per submodule, the names of its ``__all__`` that the top level does not re-export.
- ``backends``: every public attribute of the package (``dir(backends)``, which includes the
  lazy ones), grouped by topic; a name no group claims lands in "Other" rather than vanishing.
- ``validation``: the modules that keep their path in the package layout (the command-line
  tools are described in the user guide).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Any

#: topic -> top-level ngdref names, in reading order (names missing here go to "Other")
NGDREF_GROUPS: dict[str, list[str]] = {
    "Updates from one provider": [
        "directions", "batch_quantities", "sampled_grads", "BatchQuantities", "METHODS",
    ],
    "Update directions from arrays": [
        "sgd_update", "ef_update", "ief_update", "sf_update", "gn_update", "ngd_update",
        "ngd_update_cg", "gram_update",
    ],
    "Damped Gram solves and per-sample rows": [
        "DampedGram", "GramSolve", "near_duplicate_mask", "PerSampleRows", "DenseRows",
        "as_rows", "gram_matrix",
    ],
    "Dense curvature matrices": [
        "fisher_matrix", "gn_matrix", "ef_matrix", "ief_matrix", "ief_matrix_logit", "sf_matrix",
    ],
    "Quality indicator and diagnostics": [
        "gamma", "gamma_ratio", "fisher_vp", "fisher_quadratic_form", "QuadraticForm",
        "grad_norm_imbalance", "loss_reductions", "projections",
    ],
    "Losses and providers": [
        "LogitLoss", "SoftmaxCrossEntropy", "SquaredError", "SigmoidBinaryCrossEntropy",
        "SequenceSoftmaxCrossEntropy", "reduction_factor", "JacobianProvider",
    ],
    "K-FAC family": ["KroneckerFactors", "kfac_factors", "kfac_inverse_apply", "kfac_block_matrix"],
    "Conjugate gradient": ["conjugate_gradient", "CGResult"],
    "Errors": ["SingularMatrixError", "NotConvergedError", "NonFiniteError"],
}

#: topic -> public backends names (lazy ones included)
BACKENDS_GROUPS: dict[str, list[str]] = {
    "Torch models": ["TorchProvider", "default_output_fn", "GhostRows"],
    "Torch optimisers: exact methods": ["IEF", "EF", "SF", "NGD"],
    "Torch optimisers: the K-FAC family": ["KFAC", "EKFAC", "IEKFAC"],
    "SciPy linear operators": [
        "CurvatureOperator", "curvature_operator", "kfac_operator", "kfac_curvature_operator",
    ],
    "Array-API providers": [
        "FiniteDifferenceProvider", "default_relative_step", "MLPProvider", "mlp_init",
        "mlp_apply", "mlp_num_params", "LinearProvider",
    ],
    "The paper's toy problems": [
        "least_squares_toy", "least_squares_toy_closed_form", "LeastSquaresToyClosedForm",
        "logistic_toy", "logistic_toy_closed_form", "LogisticToyClosedForm",
    ],
}

#: modules of validation/ whose path the package layout keeps
VALIDATION_MODULES = ["validation.spectrum", "validation.tiny_models", "validation.cases"]


def _title(text: str, char: str) -> str:
    return f"{text}\n{char * len(text)}\n"


def _autosummary(names: list[str], module: str | None = None) -> str:
    lines = [".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
    if module is not None:
        lines = [f".. currentmodule:: {module}", "", *lines]
    lines += [f"   {name}" for name in names]
    return "\n".join(lines) + "\n"


def _grouped(groups: dict[str, list[str]], public: list[str], module: str) -> str:
    claimed = [n for names in groups.values() for n in names]
    unknown = sorted(set(claimed) - set(public))
    if unknown:
        raise RuntimeError(f"docs/_ext/api_pages.py lists names {module} lacks: {unknown}")
    parts = [f".. currentmodule:: {module}\n"]
    other = sorted(set(public) - set(claimed))
    for topic, names in [*groups.items(), ("Other", other)]:
        if names:
            parts += [_title(topic, "-"), _autosummary(names)]
    return "\n".join(parts)


def _documentable(value: Any) -> bool:
    return inspect.isclass(value) or inspect.isfunction(value) or isinstance(value, tuple)


def ngdref_page() -> str:
    import ngdref

    top = [n for n in ngdref.__all__ if not inspect.ismodule(getattr(ngdref, n))]
    exported = {id(getattr(ngdref, n)) for n in top}
    parts = [
        _title("ngdref", "="),
        "The math, written once against the array API standard: every function takes its "
        "namespace from its inputs and returns arrays of that namespace, device and dtype. "
        "The conventions these functions follow are on one page, :doc:`/conventions`.\n",
        ".. automodule:: ngdref\n   :no-members:\n   :no-index:\n",
        _grouped(NGDREF_GROUPS, top, "ngdref"),
        _title("Submodules", "-"),
        "Names of the submodules that the top level does not re-export (building blocks and "
        "option tables). Argument checks live in :mod:`ngdref.checks`.\n",
    ]
    for info in sorted(pkgutil.iter_modules(ngdref.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"ngdref.{info.name}")
        extra = [
            n for n in getattr(module, "__all__", [])
            if id(getattr(module, n)) not in exported and _documentable(getattr(module, n))
        ]
        if extra:
            parts += [_title(f"ngdref.{info.name}", "~"), _autosummary(extra, module.__name__)]
    return "\n".join(parts)


def backends_page() -> str:
    import backends

    public = [
        n for n in dir(backends)
        if not n.startswith("_") and _documentable(getattr(backends, n))
        and getattr(getattr(backends, n), "__module__", "").startswith("backends")
    ]
    return "\n".join([
        _title("backends", "="),
        "Where arrays and derivatives come from: Jacobian providers, the torch optimisers and "
        "the SciPy operators. In a checkout the package is ``backends``; installed, it is "
        "``ngdref.backends`` (the same modules). The torch names are imported on first "
        "access, so ``import backends`` never imports torch.\n",
        _grouped(BACKENDS_GROUPS, public, "backends"),
    ])


def validation_page() -> str:
    parts = [
        _title("validation", "="),
        "The check suite and the paper's experiments, run from a checkout (not installed). "
        "Their commands are described in :doc:`/guide/experiments` and "
        ":doc:`/guide/benchmarks`; the modules below are the ones other code imports.\n",
    ]
    for name in VALIDATION_MODULES:
        parts += [_title(name, "-"), f".. automodule:: {name}\n   :members:\n"]
    return "\n".join(parts)


def write_pages(api_dir: Path) -> None:
    """Write ``ngdref.rst``, ``backends.rst`` and ``validation.rst`` into ``api_dir``
    (only when their text changed, so an unchanged build stays incremental)."""
    for name, make in (("ngdref", ngdref_page), ("backends", backends_page),
                       ("validation", validation_page)):
        path = api_dir / f"{name}.rst"
        text = ".. This file is generated by docs/_ext/api_pages.py: edit that.\n\n" + make()
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
