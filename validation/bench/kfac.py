"""Benchmark and gamma table of the K-FAC family (issue 11) on the workloads of ``bench.steps``.

Two parts, per workload (T5 + LoRA, ViT + LoRA, MLP; float32, eval mode):

1. Step cost: the median time of an AdamW step, an exact iEF step (``backends.IEF``, hooks),
   and one step of ``backends.IEKFAC``, ``EKFAC`` and ``KFAC``, alternating within every
   repeat after a warm-up, printed side by side with the ratios ieKFAC / AdamW and
   ieKFAC / iEF. lr = 1e-12 so every step sees the same parameters. Nothing is asserted.
2. Approximation quality: gamma / gamma_SGD (Eq. 15, smaller is better) of the exact SGD, EF,
   iEF and SF updates and of KFAC, eKFAC and ieKFAC under each of the two choices the paper
   leaves open (``damped_inverse`` "exact" / "pi" x ``normalisation`` "mean" / "sum"), at
   several dampings (sum convention; EF and iEF damped in sample space as in the paper).

Usage: ``python -m validation.bench.kfac [--quick] [--repeats 5] [--threads 1] [--no-gamma]``
"""

from __future__ import annotations

import argparse
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

import ngdref
from backends.torch.kfac.curvature import kfac_directions
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC
from backends.torch.optim.methods import IEF
from backends.torch.provider import TorchProvider
from ngdref import kfac as K
from validation.bench.report import _machine
from validation.bench.steps import LR, MIN_TIME, _ngd_step, _plain_step
from validation.bench.timing import median_times
from validation.bench.workloads import BUILDERS, WORKLOADS, Workload

KFAC_DAMPING = 1e-3  # absolute, sum convention
GAMMA_DAMPINGS = (1e-6, 1e-3, 1.0)
EXACT = ("ef", "ief", "sf")


def step_functions(w: Workload) -> dict[str, Any]:
    """The compared steps of one workload."""
    fns = {
        "AdamW step": _plain_step(w, torch.optim.AdamW(w.trainable, lr=LR)),
        "iEF step (hooks)": _ngd_step(w, IEF, "hooks"),
    }
    for cls in (IEKFAC, EKFAC, KFAC):
        optimizer = cls(w.model, w.loss, lr=LR, damping=KFAC_DAMPING)
        fns[f"{cls.__name__} step"] = lambda o=optimizer: o.step(lambda: w.batch)
    return fns


def gamma_rows(w: Workload, damping: float) -> dict[str, float]:
    """gamma / gamma_SGD of the exact updates and of every K-FAC variant at ``damping``."""
    provider = TorchProvider(w.model, w.provider_inputs)
    targets = w.targets
    exact = ngdref.directions(
        provider, w.loss, targets, damping=damping, methods=("sgd", *EXACT), key=0
    )
    fisher = ngdref.fisher_quadratic_form(provider, w.loss, targets)
    grad = exact["sgd"]
    rows = {m: ngdref.gamma_ratio(exact[m], grad, quadratic_form=fisher) for m in EXACT}
    for inverse in K.DAMPED_INVERSES:
        for normalisation in K.NORMALISATIONS:
            updates = kfac_directions(
                w.model, w.loss, w.provider_inputs, targets, damping=damping,
                damped_inverse=inverse, normalisation=normalisation,
            )
            for m, d in updates.items():
                rows[f"{m}[{inverse},{normalisation}]"] = ngdref.gamma_ratio(
                    d, grad, quadratic_form=fisher
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workload", action="append", choices=WORKLOADS)
    parser.add_argument("--no-gamma", action="store_true", help="skip the gamma table")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    print(_machine(args.threads))
    print(f"# float32, eval mode, lr={LR}, K-FAC damping {KFAC_DAMPING:g} (absolute, sum); "
          f"per-call medians of {repeats} alternating repeats after 1 warm-up round")
    for name in args.workload or WORKLOADS:
        w = BUILDERS[name](args.quick, torch.device("cpu"))
        print(f"\n## {name}: {w.description}, P = {w.num_params}")
        wall, _ = median_times(step_functions(w), repeats, 1, min_time=MIN_TIME)
        for thing, seconds in wall.items():
            print(f"  {thing:<18} {1e3 * seconds:10.2f} ms")
        kfac = wall["IEKFAC step"]
        print(f"  ratio ieKFAC / AdamW {kfac / wall['AdamW step']:.2f}, "
              f"ieKFAC / iEF {kfac / wall['iEF step (hooks)']:.2f}")
        if args.no_gamma:
            continue
        print("  gamma / gamma_SGD (smaller is better):")
        for damping in GAMMA_DAMPINGS:
            rows = gamma_rows(w, damping)
            cells = ", ".join(f"{k} {v:.3g}" for k, v in rows.items())
            print(f"    damping {damping:g}: {cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
