"""``python -m validation``: cross-check every backend and peer-library oracle on small networks.

Two families of problems, each printed as a table of the largest relative
difference of each run to the reference, with the gamma ratios of the
reference updates to SGD:

- array-API problems (:mod:`validation.cases`): reference ``exact`` on NumPy in
  float64, against the exact and finite-difference providers on every array
  library and torch autograd (``torch-autograd[vmap|hooks|flat]``);
  beside them the JAX runs of :mod:`validation.jax_rows` (``JaxProvider`` in float64 and
  float32, and a Flax MLP with the same weights, also against the torch MLP directly);
- torch-only problems (:mod:`validation.torch_cases`: MLP, CNN, tiny T5 with
  LoRA and with prompt tuning, tiny ViT with LoRA): reference
  ``torch-autograd[vmap]`` in float64, against the hooks route and central
  differences.

Each problem then gets an "independent references" section
(:mod:`validation.independent.checks`): every update of the reference run
(SGD, EF, iEF with both dampings, SF, GN, NGD), its gamma ratios, the
lambda -> 0 limits G d = 1 and G d = s, the mean-reduction convention and the
toy problems' closed forms against dense P x P solves in NumPy that share no
code with ngdref's updates; and an "oracles" section (:mod:`validation.oracles.peers`):
curvlinops' GGN, EF and MC-Fisher products and BackPACK's per-sample
gradients and GGN products against ngdref's. The full numbers go to a JSON
report; the exit code is 1 if any run, independent check or oracle is beyond
its tolerance, and the failures are listed by problem and quantity at the end.

Runs whose array library (torch, CuPy with a GPU, transformers, jax) is missing are
reported as skipped; the NumPy core always runs. The oracles are required: a
missing or broken curvlinops or BackPACK is a failure unless ``--no-oracles``
is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from backends.arrays.adapters import unavailable
from validation.cases import Problem, problems
from validation.crosscheck import (
    CG_TOLERANCES,
    QUANTITIES,
    RATIOS,
    REFERENCE,
    Row,
    compute,
    crosscheck,
    make_provider,
    runs,
    torch_crosscheck,
    torch_reference_label,
)
from validation.independent.checks import ReferenceRun, independent_checks
from validation.independent.references import IndependentCheck, Verdict, error_message
from validation.jax_rows import jax_rows, jax_unavailable
from validation.oracles.peers import oracle_checks, oracles_skipped
from validation.oracles.setup import OracleCheck, OracleSetup
from validation.torch_cases import TorchProblem, torch_problems


def _format_table(rows: list[Row]) -> str:
    columns = [*QUANTITIES, "gamma_ratio"]
    width = max(len(r.run) for r in rows)
    head = (
        f"  {'run':<{width}} " + " ".join(f"{c[:9]:>9}" for c in columns)
        + "      tol  status   time"
    )
    lines = [head]
    for r in rows:
        if r.skipped:
            lines.append(f"  {r.run:<{width}} skipped: {r.skipped}")
            continue
        if r.error:
            lines.append(f"  {r.run:<{width}} FAIL, raised {r.error}")
            continue
        cells = " ".join(
            f"{r.differences[c]:9.1e}" if c in r.differences else f"{'-':>9}" for c in columns
        )
        tol, status = ("      ref", "ref ") if r.tolerance == 0 else (
            f"{r.tolerance:9.0e}", "ok  " if r.ok else "FAIL"
        )
        lines.append(f"  {r.run:<{width}} {cells} {tol}  {status} {r.seconds:6.2f}s")
    return "\n".join(lines)


def _format_checks(title: str, checks: list[Any], first: list[str], second: list[str]) -> str:
    """``title``, then a line per check: two padded columns, its verdict, and its note."""
    width = max(len(a) for a in first)
    qwidth = max(len(b) for b in second)
    lines = [title]
    for a, b, check in zip(first, second, checks, strict=True):
        lines.append(_verdict_line(f"    {a:<{width}}  {b:<{qwidth}}", check))
        note = getattr(check, "note", "")  # oracle checks have notes, independent ones not
        if note and not (check.skipped or check.error):
            lines.append(f"    {'':<{width}}  note: {note}")
    return "\n".join(lines)


def _verdict_line(head: str, check: Verdict) -> str:
    """``head`` and the check's verdict: skipped, raised, or difference, tolerance, status."""
    if check.skipped:
        return f"{head}  skipped: {check.skipped}"
    if check.error:
        return f"{head}  FAIL, raised {check.error}"
    status = "ok" if check.ok else "FAIL"
    return f"{head}  {check.difference:8.1e}  tol {check.tolerance:7.1e}  {status}"


def _format_oracles(checks: list[OracleCheck]) -> str:
    return _format_checks(
        "  oracles: relative difference ||oracle - ngdref|| / ||ngdref|| "
        "(products: Frobenius over 3 random vectors)",
        checks, [c.oracle for c in checks], [c.quantity for c in checks],
    )


def _format_independent(checks: list[IndependentCheck]) -> str:
    return _format_checks(
        "  independent references: ||ngdref - dense|| / ||dense|| (dense P x P solves in NumPy, "
        "bounds from kappa, size and eps)",
        checks, [c.quantity for c in checks], [c.route for c in checks],
    )


def _jsonable(value: Any) -> Any:
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _row_dict(row: Row) -> dict[str, Any]:
    return row.__dict__ | {"ok": row.ok}


def _array_api_oracles(
    problem: Problem, reference: dict[str, Any], oracles: bool
) -> list[OracleCheck]:
    if not oracles:
        return oracles_skipped()
    reason = problem.torch_unavailable()
    if reason:  # the oracles are torch libraries: without torch they are missing
        return [OracleCheck("all oracles", "all", math.nan, math.nan,
                            error=f"{reason} (pass --no-oracles to run without the oracles)")]
    provider, targets = make_provider(problem, REFERENCE)
    _, inputs, torch_targets = problem.arrays("torch")
    setup = OracleSetup(
        module=problem.torch_module("vmap"),
        inputs=inputs,
        targets=torch_targets,
        loss=problem.loss,
        provider=provider,
        provider_targets=targets,
        per_sample_grads=reference["per_sample_grads"],
        backpack=True,  # nn.Linear / nn.Tanh stacks
    )
    return oracle_checks(setup)


def _run_array_api(problem: Problem, all_runs: list, oracles: bool) -> dict[str, Any]:
    start = time.perf_counter()
    reference = compute(problem, REFERENCE)
    print(f"  reference {REFERENCE.label} ({time.perf_counter() - start:.2f} s)")
    ratios = ", ".join(f"{m} {reference['gamma_ratio'][m]:.3g}" for m in RATIOS)
    print(f"  gamma / gamma_SGD of the reference updates: {ratios}", flush=True)
    rows = [crosscheck(problem, run, reference) for run in all_runs if run != REFERENCE]
    jax = jax_rows(problem, reference)  # JaxProvider runs, reported beside the array libraries
    print(_format_table(rows + jax), flush=True)
    provider, targets = make_provider(problem, REFERENCE)
    independent = independent_checks(ReferenceRun(
        problem.name, provider, problem.loss, targets, reference, problem.damping,
        cg_tol=CG_TOLERANCES[(REFERENCE.kind, REFERENCE.dtype)], theta=problem.params,
    ))
    print(_format_independent(independent), flush=True)
    checks = _array_api_oracles(problem, reference, oracles)
    print(_format_oracles(checks), flush=True)
    return {
        "problem": problem.name,
        "family": "array-api",
        "reference": REFERENCE.label,
        "num_params": int(problem.params.size),
        "num_samples": int(problem.inputs.shape[0]),
        "damping": problem.damping,
        "reference_gamma_ratio": reference["gamma_ratio"],
        "rows": [_row_dict(r) for r in rows],
        "jax_rows": [_row_dict(r) for r in jax],
        "independent": [c.as_dict() for c in independent],
        "oracles": [c.as_dict() for c in checks],
    }


def _torch_oracles(problem: TorchProblem, result: Any, oracles: bool) -> list[OracleCheck]:
    if not oracles:
        return oracles_skipped()
    batch = result.batch
    setup = OracleSetup(
        module=batch.model,
        inputs=batch.forward_inputs,
        targets=batch.targets,
        loss=batch.loss,
        provider=result.reference_provider,
        provider_targets=batch.targets,
        per_sample_grads=result.reference["per_sample_grads"],
        backpack=problem.backpack,
        float32_internals=problem.float32_internals,
    )
    return oracle_checks(setup)


def _run_torch(problem: TorchProblem, oracles: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "problem": problem.name,
        "family": "torch",
        "reference": torch_reference_label(),
        "notes": problem.notes,
    }
    empty: dict[str, list] = {"rows": [], "independent": [], "oracles": []}
    reason = problem.unavailable()
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return entry | empty | {"skipped": reason}
    try:
        result = torch_crosscheck(problem)
    except Exception as err:  # the reference itself failed: report, go on with the others
        message = error_message(err)
        print(f"  FAIL, the reference run raised {message}", flush=True)
        return entry | empty | {"error": message}
    reference = result.reference
    ratios = ", ".join(f"{m} {reference['gamma_ratio'][m]:.3g}" for m in RATIOS)
    provider = result.reference_provider
    print(
        f"  P = {provider.num_params}, N = {provider.num_samples}, C = {provider.num_outputs}, "
        f"damping = {problem.damping:g}; {problem.notes}"
        + ("; GN and NGD by CG (large output)" if problem.large_output else "")
    )
    print(f"  reference {torch_reference_label()} ({result.seconds:.2f} s)")
    print(f"  gamma / gamma_SGD of the reference updates: {ratios}", flush=True)
    print(_format_table(result.rows), flush=True)
    independent = independent_checks(ReferenceRun(
        problem.name, provider, result.batch.loss, result.batch.targets, reference,
        problem.damping, cg_tol=problem.cg_tol, large_output=problem.large_output,
        float32_internals=problem.float32_internals,
    ))
    print(_format_independent(independent), flush=True)
    checks = _torch_oracles(problem, result, oracles)
    print(_format_oracles(checks), flush=True)
    return entry | {
        "num_params": provider.num_params,
        "num_samples": provider.num_samples,
        "num_outputs": provider.num_outputs,
        "damping": problem.damping,
        "large_output": problem.large_output,
        "reference_gamma_ratio": reference["gamma_ratio"],
        "rows": [_row_dict(r) for r in result.rows],
        "independent": [c.as_dict() for c in independent],
        "oracles": [c.as_dict() for c in checks],
    }


def failed_items(entry: dict[str, Any]) -> list[str]:
    """'problem: section quantity' for every failing run, independent check and oracle."""
    name = entry["problem"]
    items = [f"{name}: reference raised {entry['error']}"] if entry.get("error") else []
    items += [
        f"{name}: run {r['run']}" for r in entry["rows"] + entry.get("jax_rows", []) if not r["ok"]
    ]
    items += [
        f"{name}: independent {c['quantity']}"
        + (f" raised {c['error']}" if c["error"] else
           f" {c['difference']:.2g} > tol {c['tolerance']:.2g}")
        for c in entry["independent"] if not c["ok"]
    ]
    items += [
        f"{name}: oracle {c['oracle']} {c['quantity']}"
        + (f" raised {c['error']}" if c["error"] else "")
        for c in entry["oracles"] if not c["ok"]
    ]
    return items


def main(argv: list[str] | None = None) -> int:
    """Run the validation; return the exit code (0: everything within tolerance)."""
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__)
    parser.add_argument("--report", default="validation_report.json", help="JSON report path")
    parser.add_argument("--problem", action="append", help="run only these problems (repeatable)")
    parser.add_argument(
        "--no-oracles", action="store_true",
        help="do not run curvlinops and BackPACK (by default a missing oracle is a failure)",
    )
    args = parser.parse_args(argv)
    # every model here is built from a config: nothing may try to reach a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    core = problems()
    extra = torch_problems()
    names = [p.name for p in core] + [p.name for p in extra] + ["kfac"]
    if args.problem:
        unknown = sorted(set(args.problem) - set(names))
        if unknown:
            parser.error(f"--problem {unknown} matched none of {names}")
        core = [p for p in core if p.name in args.problem]
        extra = [p for p in extra if p.name in args.problem]
    threads = _single_threaded_torch()
    try:
        # the K-FAC checks compare with curvlinops: they are oracle checks
        with_kfac = not args.no_oracles and (not args.problem or "kfac" in args.problem)
        return _validate(
            core, extra, args.report, oracles=not args.no_oracles, with_kfac=with_kfac
        )
    finally:
        _restore_torch_threads(threads)


def _single_threaded_torch() -> int | None:
    """Run torch on one thread; return the previous count (None without torch).

    The models here are tiny, so intra-op threads buy nothing, and on a busy
    2-core machine OpenMP's spinning workers made a tiny T5 forward pass 50x
    slower (4 ms on one thread, 200 ms on two).
    """
    if unavailable("torch"):
        return None
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


def _restore_torch_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _validate(
    core: list[Problem],
    extra: list[TorchProblem],
    report_path: str,
    *,
    oracles: bool,
    with_kfac: bool = False,
) -> int:
    all_runs = runs()
    print(
        "ngdref cross-backend validation: relative difference ||a - ref|| / ||ref|| to "
        f"{REFERENCE.label} (array-API problems) or {torch_reference_label()} (torch problems)"
    )
    missing = sorted({r.library for r in all_runs if unavailable(r.library)})
    for library in missing:
        print(f"  note: {library} runs are skipped ({unavailable(library)})")
    if jax_unavailable():
        print(f"  note: jax runs are skipped ({jax_unavailable()})")
    report = []
    total = len(core) + len(extra)
    start = time.perf_counter()
    for i, problem in enumerate([*core, *extra], 1):
        case_start = time.perf_counter()
        if isinstance(problem, Problem):
            print(
                f"\n[{i}/{total}] {problem.name} (P = {problem.params.size}, "
                f"N = {problem.inputs.shape[0]}, damping = {problem.damping:g})",
                flush=True,
            )
            entry = _run_array_api(problem, all_runs, oracles)
        else:
            print(f"\n[{i}/{total}] {problem.name} (torch)", flush=True)
            entry = _run_torch(problem, oracles)
        entry["seconds"] = time.perf_counter() - case_start
        print(f"  ({entry['seconds']:.1f} s)", flush=True)
        report.append(entry)
    if with_kfac:  # K-FAC family vs curvlinops and exact iEF (issue 11)
        from validation.oracles.kfac import kfac_entry

        report.append(kfac_entry(_format_oracles))
    failed = [item for entry in report for item in failed_items(entry)]
    seconds = time.perf_counter() - start
    _write_report(report_path, report, failed, seconds)
    if failed:
        print(f"\n{len(failed)} check(s) beyond tolerance or failed ({seconds:.1f} s):")
        print("\n".join(f"  FAIL {item}" for item in failed))
        print(f"report: {report_path}")
        return 1
    print(f"\nall runs, independent references and oracles agree ({seconds:.1f} s); "
          f"report: {report_path}")
    return 0


def _write_report(
    path: str, report: list[dict[str, Any]], failed: list[str], seconds: float
) -> None:
    document = {
        "reference": REFERENCE.label,
        "torch_reference": torch_reference_label(),
        "failures": len(failed),
        "failed": failed,
        "seconds": seconds,
        "problems": report,
    }
    with open(path, "w") as f:
        json.dump(_jsonable(document), f, indent=2)

if __name__ == "__main__":
    sys.exit(main())
