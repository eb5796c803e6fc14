"""Cross-backend comparison: every quantity of the paper from every provider and array library.

The quantities are those of the conventions page (:ref:`conv-curvature`, :ref:`conv-updates`,
:ref:`conv-gamma`).

For each problem, each applicable run (a provider kind on an array library in
a dtype, or a torch autograd route) computes the Jacobian, the per-sample
gradients, s, every update (SGD, EF, iEF with sample- and parameter-space
damping, SF with shared uniforms, GN, NGD by Woodbury and by CG) and the
gamma ratio of each update to SGD (through that run's own Fisher-vector
product). Each is compared with the reference by the
relative difference ||a - a_ref|| / ||a_ref||.

Two families of problems:

- the array-API problems of :mod:`validation.cases`; reference ``exact`` on
  NumPy in float64. Besides the exact and finite-difference providers on every
  array library, torch autograd joins as run kind ``torch-autograd``:
  :class:`backends.TorchProvider` on an ``nn.Linear``/``nn.Tanh`` stack with
  the same parameter layout (routes ``vmap`` and ``hooks``) and on a module
  that holds theta as one ``nn.Parameter`` and calls the array-API model
  function on torch tensors (route ``flat``);
- the torch-only problems of :mod:`validation.torch_cases`; reference
  ``torch-autograd[vmap]`` in float64, cross-checked against the hooks route
  and central differences of the model's ordinary forward (``fd[torch]``).

Problems with a large output (``large_output``, the T5 cases standing for a
32k vocabulary) solve GN and NGD matrix-free by conjugate gradients (GN on
``v -> sum_n J_n^T J_n v``, NGD through :func:`ngdref.fisher_vp`): their
``gn`` and ``ngd-cg`` columns are CG solves and their ``ngd`` (Woodbury) column
is not computed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import ngdref
from backends.arrays.adapters import LIBRARIES, to_numpy, unavailable
from validation.cases import Problem
from validation.independent.references import error_message, sf_key

UPDATES = ("sgd", "ef", "ief", "ief-param", "sf", "gn", "ngd", "ngd-cg")
QUANTITIES = ("jacobian", "per_sample_grads", "s", *UPDATES)
RATIOS = ("ef", "ief", "sf", "gn", "ngd")
TORCH_ROUTES = ("vmap", "hooks", "flat")

#: largest accepted relative difference to the reference, per (run kind, dtype).
#: The damped solves (lambda = 1e-3 against O(1) curvature) amplify input errors
#: by up to ~1/lambda = 1e3, and the Woodbury form (1/lambda)[g - ...] cancels
#: digits too. exact/float64: rounding only (eps 2.2e-16; seen up to 1e-11).
#: fd/float64: central-difference Jacobians are accurate to ~eps^(2/3) = 4e-11
#: (seen up to 7e-11 after the solves). exact/float32: eps 1.2e-7 times the
#: amplification (seen up to 5e-4, in the GN/NGD Woodbury solves).
#: torch-autograd/float64: torch's reverse and forward modes differentiate the
#: same float64 function as the hand-written derivatives, in another order of
#: operations: rounding only, so the exact/float64 bound applies (seen up to
#: 2e-11, in the GN Woodbury solve).
TOLERANCES = {
    ("exact", "float64"): 1e-9,
    ("fd", "float64"): 1e-7,
    ("exact", "float32"): 2e-3,
    ("torch-autograd", "float64"): 1e-9,
}

#: Tolerances of the torch-only problems' runs against ``torch-autograd[vmap]``,
#: per (run, model has float32 internals).
#: Float64 models (MLP, CNN): hooks and vmap are two reverse-mode routes through
#: one float64 graph whose reductions may run in different orders, so rounding
#: only (1e-9 as exact/float64; bitwise equal here on one thread); central
#: differences with step eps^(1/3) are accurate to eps^(2/3) = 4e-11, times the
#: ~1e3 amplification of the damped solves (1e-7 as fd/float64; seen 2.5e-10).
#: Hugging Face models keep float32 internals (T5LayerNorm's variance, eager
#: ViT attention's softmax), so their derivatives carry float32 rounding,
#: eps_32 = 1.2e-7 relative, and their Fisher-vector products ~2e-8: two
#: routes that round in different orders may differ by that times the
#: amplification of the solves, whose damping is ~3e-3 lambda_max(F) (CG
#: stops at a residual of 1e-6): 1e-5. Central differences of a forward with
#: float32 noise are noise-limited: with the steps of
#: :mod:`validation.torch_cases` (scanned) the Jacobian is accurate to 1e-4 ..
#: 3e-4, which the damped solves amplify by up to lambda_max / lambda ~ 300 in
#: the worst direction and by ~30 in what is seen (2.6e-3 for T5-LoRA's GN):
#: 2e-2, i.e. the Jacobian bound times 70. An error of the provider (a wrong
#: factor, a missing term, a mask ignored) moves these by O(1).
TORCH_TOLERANCES = {
    ("hooks", False): 1e-9,
    ("fd", False): 1e-7,
    ("hooks", True): 1e-5,
    ("fd", True): 2e-2,
}


@dataclass(frozen=True)
class Run:
    """One provider kind on one array library in one dtype (or one torch autograd route)."""

    kind: str
    library: str
    dtype: str = "float64"
    route: str = ""

    @property
    def label(self) -> str:
        if self.kind == "torch-autograd":
            return f"torch-autograd[{self.route}]"
        return f"{self.kind}[{self.library}{'' if self.dtype == 'float64' else ',' + self.dtype}]"

    @property
    def tolerance(self) -> float:
        return TOLERANCES[(self.kind, self.dtype)]

    def unavailable(self) -> str:
        """Why this run cannot run here ('' when it can)."""
        return unavailable(self.library)


REFERENCE = Run("exact", "numpy")


def runs() -> list[Run]:
    """Every run of the array-API matrix, available or not (unavailable ones are skipped)."""
    out = [Run(kind, library) for kind in ("exact", "fd") for library in LIBRARIES]
    out += [Run("exact", library, "float32") for library in ("numpy", "torch", "cupy")]
    out += [Run("torch-autograd", "torch", route=route) for route in TORCH_ROUTES]
    return out


def variant_updates(provider: Any, loss: Any, targets: Any, damping: float,
                    cg_tol: float) -> dict[str, Any]:
    """The compared updates beyond :func:`ngdref.directions`' defaults: iEF with parameter-space
    damping (``"ief-param"``) and NGD by conjugate gradients (``"ngd-cg"``)."""
    return {
        "ief-param": ngdref.directions(provider, loss, targets, damping=damping,
                                       methods=("ief",), damping_space="parameter")["ief"],
        "ngd-cg": ngdref.directions(provider, loss, targets, damping=damping, methods=("ngd",),
                                    ngd_solver="cg", cg_tol=cg_tol)["ngd"],
    }


def quantities(
    provider: ngdref.JacobianProvider,
    loss: ngdref.LogitLoss,
    targets: Any,
    *,
    damping: float,
    cg_tol: float = 1e-12,
    large_output: bool = False,
) -> dict[str, Any]:
    """Every compared quantity of one provider on one batch, as NumPy arrays.

    Parameters
    ----------
    provider, loss, targets
        The model on the batch (sum convention throughout).
    damping : float
        lambda of every update.
    cg_tol : float
        Relative residual of the CG solves.
    large_output : bool
        Solve GN and NGD by CG only (see the module docstring).

    Returns
    -------
    dict
        quantity name -> numpy array; ``"gamma_ratio"`` -> {method: float}
        (gamma of each update over gamma of SGD, through this provider's
        :func:`ngdref.fisher_vp`).
    """
    methods = ("sgd", "ef", "ief", "sf") if large_output else ngdref.METHODS
    q = ngdref.batch_quantities(provider, loss, targets)
    # SF's labels come from uniforms drawn here, so the independent reference can draw them too
    updates = ngdref.directions(
        provider, loss, targets, damping=damping, key=sf_key(provider, loss), methods=methods
    )
    updates.update(variant_updates(provider, loss, targets, damping, cg_tol))
    fvp = ngdref.fisher_vp(provider, loss, targets)
    if large_output:

        def gn_vp(v: Any) -> Any:
            return provider.vjp_sum(provider.jvp(v))

        updates["gn"] = ngdref.ngd_update_cg(gn_vp, q.grad, damping=damping, tol=cg_tol)
    out: dict[str, Any] = {
        "jacobian": to_numpy(provider.jacobian()),
        "per_sample_grads": to_numpy(q.per_sample_grads),
        "s": to_numpy(q.logit_grad_sq_norms),
    }
    out.update({name: to_numpy(d) for name, d in updates.items()})
    ngd = updates["ngd-cg"] if large_output else updates["ngd"]
    ratio_of = {**updates, "ngd": ngd}
    out["gamma_ratio"] = {
        m: ngdref.gamma_ratio(ratio_of[m], q.grad, fisher_vp=fvp) for m in RATIOS
    }
    return out


def make_provider(problem: Problem, run: Run) -> tuple[Any, Any]:
    """(provider, targets) of ``run`` on the array-API ``problem``."""
    if run.kind == "torch-autograd":
        return problem.torch_provider(run.route)
    return problem.provider(run.kind, run.library, run.dtype)


#: CG's relative residual per (provider kind, dtype): what each Fisher-vector product supports.
#: Exact float64 products are accurate to rounding. A finite-difference jvp is accurate to
#: ~eps^(2/3) = 4e-11 relative, so the true residual of CG on it bottoms out near 1e-10 and a
#: tolerance below that is (rightly) reported as not reached. float32: eps 1.2e-7.
#: the same for finite differences on the torch-only models; with float32 internals (HF) the
#: finite-difference Jacobian itself is accurate to only ~1e-4 (see TORCH_TOLERANCES).
FD_CG_TOLERANCE = {False: 5e-10, True: 1e-3}
CG_TOLERANCES = {
    **{(kind, "float64"): 1e-12 for kind in ("exact", "torch-autograd")},
    ("fd", "float64"): 5e-10,
    **{(kind, "float32"): 1e-6 for kind in ("exact", "torch-autograd", "fd")},
}


def compute(problem: Problem, run: Run) -> dict[str, Any]:
    """All quantities of ``problem`` by ``run``, as NumPy arrays (and gamma ratios as floats)."""
    provider, targets = make_provider(problem, run)
    return quantities(
        provider,
        problem.loss,
        targets,
        damping=problem.damping,
        cg_tol=CG_TOLERANCES[(run.kind, run.dtype)],
    )


def relative_difference(a: np.ndarray, ref: np.ndarray) -> float:
    """||a - ref|| / ||ref|| in float64 (absolute when ref is zero)."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    scale = np.linalg.norm(ref)
    diff = np.linalg.norm(a - ref)
    return float(diff / scale) if scale > 0 else float(diff)


@dataclass
class Row:
    """The comparison of one run on one problem with the reference."""

    problem: str
    run: str
    tolerance: float
    differences: dict[str, float]
    gamma_ratio: dict[str, float]
    skipped: str = ""
    seconds: float = 0.0
    error: str = ""

    @property
    def worst(self) -> float:
        return max(self.differences.values(), default=0.0)

    @property
    def ok(self) -> bool:
        if self.error:
            return False
        return bool(self.skipped) or (math.isfinite(self.worst) and self.worst <= self.tolerance)


def compare(values: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Relative differences of every quantity both hold, and the worst gamma-ratio difference."""
    differences = {
        k: relative_difference(values[k], reference[k])
        for k in QUANTITIES
        if k in values and k in reference
    }
    differences["gamma_ratio"] = max(
        abs(values["gamma_ratio"][m] - reference["gamma_ratio"][m])
        / abs(reference["gamma_ratio"][m])
        for m in RATIOS
    )
    return differences


def _timed(fn: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    values = fn()
    return values, time.perf_counter() - start


def _checked_row(
    problem: str, label: str, tolerance: float, fn: Callable[[], dict[str, Any]],
    reference: dict[str, Any],
) -> Row:
    """Run ``fn`` and compare with ``reference``; an exception becomes a failing row."""
    start = time.perf_counter()
    try:
        values = fn()
    except Exception as err:  # a crashing run is a failed cross-check, not a crashed suite
        return Row(problem, label, tolerance, {}, {}, seconds=time.perf_counter() - start,
                   error=error_message(err))
    return Row(problem, label, tolerance, compare(values, reference), values["gamma_ratio"],
               seconds=time.perf_counter() - start)


def crosscheck(problem: Problem, run: Run, reference: dict[str, Any]) -> Row:
    """Compare ``run`` on ``problem`` with the reference values."""
    reason = run.unavailable()
    if not reason and run.kind == "torch-autograd":
        reason = problem.torch_unavailable()
    if reason:
        return Row(problem.name, run.label, run.tolerance, {}, {}, skipped=reason)
    return _checked_row(
        problem.name, run.label, run.tolerance, lambda: compute(problem, run), reference
    )


# ---- torch-only problems ------------------------------------------------------------------------
@dataclass
class TorchRuns:
    """Everything computed on one torch-only problem: its batch, providers and values."""

    batch: Any
    reference_provider: Any
    reference: dict[str, Any]
    seconds: float
    rows: list[Row] = field(default_factory=list)


def torch_reference_label() -> str:
    """The label of the torch-only problems' reference run."""
    return "torch-autograd[vmap]"


def torch_crosscheck(problem: Any) -> TorchRuns:
    """Reference (vmap), hooks and central differences on a :class:`TorchProblem`.

    Parameters
    ----------
    problem : validation.torch_cases.TorchProblem

    Returns
    -------
    TorchRuns
        ``rows`` holds the hooks row (or a skipped row when the route does not
        apply), then the fd row; the reference itself is checked by
        :mod:`validation.independent.checks`, not against itself.
    """
    from backends import FiniteDifferenceProvider, TorchProvider
    from validation.torch_cases import flat_logits_function

    batch = problem.build()
    large = problem.large_output
    f32 = problem.float32_internals

    def run(provider: Any, cg_tol: float = problem.cg_tol) -> dict[str, Any]:
        return quantities(
            provider, batch.loss, batch.targets, damping=problem.damping,
            cg_tol=cg_tol, large_output=large,
        )

    ref_provider = TorchProvider(batch.model, batch.inputs, per_sample="vmap")
    reference, seconds = _timed(lambda: run(ref_provider))
    rows: list[Row] = []
    hooks_tol = TORCH_TOLERANCES[("hooks", f32)]
    if problem.hooks:
        rows.append(_checked_row(
            problem.name, "torch-autograd[hooks]", hooks_tol,
            lambda: run(TorchProvider(batch.model, batch.inputs, per_sample="hooks")),
            reference,
        ))
    else:
        rows.append(Row(problem.name, "torch-autograd[hooks]", hooks_tol, {}, {},
                        skipped="a trainable parameter is outside nn.Linear"))
    fn = flat_logits_function(batch.model, batch.forward_inputs)
    theta = ref_provider.params_vector()
    rows.append(_checked_row(
        problem.name, "fd[torch]", TORCH_TOLERANCES[("fd", f32)],
        lambda: run(
            FiniteDifferenceProvider(fn, theta, None, step=problem.relative_step),
            max(problem.cg_tol, FD_CG_TOLERANCE[f32]),
        ),
        reference,
    ))
    return TorchRuns(batch, ref_provider, reference, seconds, rows)
