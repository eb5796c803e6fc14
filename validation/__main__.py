"""``python -m validation``: cross-check every backend and peer-library oracle on small networks.

Two families of problems, each printed as a table of the largest relative
difference of each run to the reference, with the gamma ratios of the
reference updates to SGD:

- array-API problems (:mod:`validation.cases`): reference ``exact`` on NumPy in
  float64, against the exact and finite-difference providers on every array
  library and torch autograd (``torch-autograd[vmap|hooks|flat]``);
- torch-only problems (:mod:`validation.torch_cases`: MLP, CNN, tiny T5 with
  LoRA and with prompt tuning, tiny ViT with LoRA): reference
  ``torch-autograd[vmap]`` in float64, against the hooks route and central
  differences.

Each problem then gets an "oracles" section (:mod:`validation.oracles`):
curvlinops' GGN, EF and MC-Fisher products and BackPACK's per-sample
gradients and GGN products against ngdref's. The full numbers go to a JSON
report; the exit code is 1 if any run or oracle is beyond its tolerance.
Runs whose library (torch, CuPy with a GPU, transformers, curvlinops,
BackPACK) is missing are reported as skipped; the NumPy core always runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from backends.arrays import unavailable
from validation.cases import Problem, problems
from validation.crosscheck import (
    QUANTITIES,
    RATIOS,
    REFERENCE,
    Row,
    compute,
    crosscheck,
    error_message,
    make_provider,
    runs,
    torch_crosscheck,
    torch_reference_label,
)
from validation.oracles import OracleCheck, OracleSetup, oracle_checks
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


def _format_oracles(checks: list[OracleCheck]) -> str:
    lines = [
        "  oracles: relative difference ||oracle - ngdref|| / ||ngdref|| "
        "(products: Frobenius over 3 random vectors)"
    ]
    width = max(len(c.oracle) for c in checks)
    qwidth = max(len(c.quantity) for c in checks)
    for c in checks:
        if c.skipped:
            lines.append(f"    {c.oracle:<{width}}  {c.quantity:<{qwidth}}  skipped: {c.skipped}")
            continue
        if c.error:
            lines.append(f"    {c.oracle:<{width}}  {c.quantity:<{qwidth}}  FAIL, raised {c.error}")
            continue
        status = "ok" if c.ok else "FAIL"
        lines.append(
            f"    {c.oracle:<{width}}  {c.quantity:<{qwidth}}  {c.difference:8.1e}"
            f"  tol {c.tolerance:7.1e}  {status}"
        )
        if c.note:
            lines.append(f"    {'':<{width}}  note: {c.note}")
    return "\n".join(lines)


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


def _array_api_oracles(problem: Problem, reference: dict[str, Any]) -> list[OracleCheck]:
    reason = problem.torch_unavailable()
    if reason:
        return [OracleCheck("all oracles", "all", math.nan, math.nan, skipped=reason)]
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


def _run_array_api(problem: Problem, all_runs: list) -> dict[str, Any]:
    reference = compute(problem, REFERENCE)
    ratios = ", ".join(f"{m} {reference['gamma_ratio'][m]:.3g}" for m in RATIOS)
    print(f"  gamma / gamma_SGD of the reference updates: {ratios}", flush=True)
    rows = [crosscheck(problem, run, reference) for run in all_runs]
    print(_format_table(rows), flush=True)
    checks = _array_api_oracles(problem, reference)
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
        "oracles": [c.as_dict() for c in checks],
    }


def _run_torch(problem: TorchProblem) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "problem": problem.name,
        "family": "torch",
        "reference": torch_reference_label(),
        "notes": problem.notes,
    }
    reason = problem.unavailable()
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return entry | {"skipped": reason, "rows": [], "oracles": []}
    try:
        result = torch_crosscheck(problem)
    except Exception as err:  # the reference itself failed: report, go on with the others
        message = error_message(err)
        print(f"  FAIL, the reference run raised {message}", flush=True)
        return entry | {"error": message, "rows": [], "oracles": []}
    reference = result.reference
    ratios = ", ".join(f"{m} {reference['gamma_ratio'][m]:.3g}" for m in RATIOS)
    provider = result.reference_provider
    print(
        f"  P = {provider.num_params}, N = {provider.num_samples}, C = {provider.num_outputs}, "
        f"damping = {problem.damping:g}; {problem.notes}"
        + ("; GN and NGD by CG (large output)" if problem.large_output else "")
    )
    print(f"  gamma / gamma_SGD of the reference updates: {ratios}", flush=True)
    print(_format_table(result.rows), flush=True)
    batch = result.batch
    setup = OracleSetup(
        module=batch.model,
        inputs=batch.forward_inputs,
        targets=batch.targets,
        loss=batch.loss,
        provider=provider,
        provider_targets=batch.targets,
        per_sample_grads=reference["per_sample_grads"],
        backpack=problem.backpack,
        float32_internals=problem.float32_internals,
    )
    checks = oracle_checks(setup)
    print(_format_oracles(checks), flush=True)
    return entry | {
        "num_params": provider.num_params,
        "num_samples": provider.num_samples,
        "num_outputs": provider.num_outputs,
        "damping": problem.damping,
        "large_output": problem.large_output,
        "reference_gamma_ratio": reference["gamma_ratio"],
        "rows": [_row_dict(r) for r in result.rows],
        "oracles": [c.as_dict() for c in checks],
    }


def _failures(entry: dict[str, Any]) -> int:
    return (
        bool(entry.get("error"))
        + sum(not r["ok"] for r in entry["rows"])
        + sum(not c["ok"] for c in entry["oracles"])
    )


def main(argv: list[str] | None = None) -> int:
    """Run the validation; return the exit code (0: everything within tolerance)."""
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__)
    parser.add_argument("--report", default="validation_report.json", help="JSON report path")
    parser.add_argument("--problem", action="append", help="run only these problems (repeatable)")
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
        return _validate(core, extra, args.report, not args.problem or "kfac" in args.problem)
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
    core: list[Problem], extra: list[TorchProblem], report_path: str, with_kfac: bool = False
) -> int:
    all_runs = runs()
    print(
        "ngdref cross-backend validation: relative difference ||a - ref|| / ||ref|| to "
        f"{REFERENCE.label} (array-API problems) or {torch_reference_label()} (torch problems)"
    )
    missing = sorted({r.library for r in all_runs if unavailable(r.library)})
    for library in missing:
        print(f"  note: {library} runs are skipped ({unavailable(library)})")
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
            entry = _run_array_api(problem, all_runs)
        else:
            print(f"\n[{i}/{total}] {problem.name} (torch)", flush=True)
            entry = _run_torch(problem)
        entry["seconds"] = time.perf_counter() - case_start
        print(f"  ({entry['seconds']:.1f} s)", flush=True)
        report.append(entry)
    if with_kfac:  # K-FAC family vs curvlinops and exact iEF (issue 11)
        from validation.kfac_oracles import kfac_entry

        report.append(kfac_entry(_format_oracles))
    failures = sum(_failures(e) for e in report)
    seconds = time.perf_counter() - start
    with open(report_path, "w") as f:
        json.dump(
            _jsonable(
                {
                    "reference": REFERENCE.label,
                    "torch_reference": torch_reference_label(),
                    "failures": failures,
                    "seconds": seconds,
                    "problems": report,
                }
            ),
            f,
            indent=2,
        )
    verdict = "all runs agree" if not failures else f"{failures} run(s) beyond tolerance"
    print(f"\n{verdict} ({seconds:.1f} s); report: {report_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
