"""Data-parallel exact iEF / EF / SF steps against DDP + AdamW on the same global batch.

::

    python -m validation.bench.distributed                      # R = 1, 2 on gloo, loopback
    python -m validation.bench.distributed --world-sizes 1 2 4 --batch 64 --hidden 512

For each R, R local processes (gloo over 127.0.0.1,
:func:`backends.torch.distributed.launch.launch_local`)
share one global batch of ``--batch`` samples of a float32 MLP (``--inputs`` -> ``--hidden``
x ``--depth`` -> 10, softmax cross-entropy, mean reduction), in contiguous shards. In every
process each method's model takes a step in turn (alternating, after ``--warmup`` rounds),
``--repeats`` times: the per-sample optimisers through :mod:`backends.torch.distributed.comm`, and
DDP-wrapped AdamW (one gradient all-reduce per step). Printed per R and method: the median
wall time of a step on rank 0 (all ranks start it together after a barrier), the bytes one
rank sent in it (``diagnostics["bytes_sent"]``; DDP: its gradient all-reduce, 2 (R - 1) P 4 / R),
the ratio to DDP + AdamW at the same R, and to the same method at R = 1. Nothing is
asserted; on a loaded 2-core machine R = 2 cannot be faster than R = 1 (both ranks share the
cores): the lead re-runs it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

METHODS = ("ief", "ef", "sf", "adamw")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m validation.bench.distributed")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=32, help="global batch N")
    parser.add_argument("--inputs", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--per-sample", default="auto", help="the optimisers' per_sample route")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=600.0)
    return parser.parse_args(argv)


def _model(args: argparse.Namespace) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    width = args.inputs
    for _ in range(args.depth):
        layers += [nn.Linear(width, args.hidden), nn.Tanh()]
        width = args.hidden
    return nn.Sequential(*layers, nn.Linear(width, 10))


def _steppers(args: argparse.Namespace, x: Any, y: Any) -> dict[str, Any]:
    """method -> a function taking one step on this rank's shard; returns bytes sent."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    import ngdref
    from backends.torch.optim.methods import EF, IEF, SF

    loss = ngdref.SoftmaxCrossEntropy()
    common = {"reduction": "mean", "per_sample": args.per_sample}
    total = args.warmup + args.repeats
    builders = {
        "ief": lambda m: IEF(m, loss, lr=1.0, damping=1e-7, **common),
        "ef": lambda m: EF(m, loss, lr=0.01, damping=1e-7, total_steps=total, **common),
        "sf": lambda m: SF(m, loss, lr=0.01, damping=1e-7, total_steps=total, **common),
    }
    steppers: dict[str, Any] = {}
    for name in args.methods:
        if name == "adamw":
            ddp = DistributedDataParallel(_model(args))
            adamw = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
            size = sum(p.numel() for p in ddp.parameters())
            world = torch.distributed.get_world_size()

            def adamw_step(ddp: Any = ddp, adamw: Any = adamw, size: int = size,
                           world: int = world) -> int:
                adamw.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                adamw.step()
                return 2 * (world - 1) * size * 4 // world

            steppers[name] = adamw_step
        else:
            opt = builders[name](_model(args))

            def step(opt: Any = opt) -> int:
                opt.step(lambda: (x, y))
                return int(opt.diagnostics["bytes_sent"])

            steppers[name] = step
    return steppers


def worker(rank: int, world: int, folder: Path, argv: list[str]) -> None:
    import torch
    import torch.distributed as dist

    from backends.torch.distributed.launch import local_group, shard_slice

    args = _parse(argv)
    with local_group(rank, world, folder, timeout=args.timeout):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, args.inputs, generator=gen)
        y = torch.randint(0, 10, (args.batch,), generator=gen)
        part = shard_slice(args.batch)
        steppers = _steppers(args, x[part], y[part])
        times: dict[str, list[float]] = {name: [] for name in steppers}
        sent: dict[str, int] = {}
        for round_ in range(args.warmup + args.repeats):
            for name, step in steppers.items():  # alternating, one step each
                dist.barrier()
                start = time.perf_counter()
                sent[name] = step()
                elapsed = time.perf_counter() - start
                if round_ >= args.warmup:
                    times[name].append(elapsed)
        if rank == 0:
            out = {name: {"median_s": statistics.median(t), "bytes": sent[name]}
                   for name, t in times.items()}
            (folder / "result.json").write_text(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    from backends.torch.distributed.launch import launch_local

    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    size = sum(p.numel() for p in _model(args).parameters())
    print(f"MLP {args.inputs}-{'-'.join([str(args.hidden)] * args.depth)}-10, P = {size}, "
          f"global batch N = {args.batch}, float32, per_sample={args.per_sample!r}, gloo on "
          f"127.0.0.1; median of {args.repeats} steps on rank 0")
    results: dict[int, dict[str, Any]] = {}
    for world in args.world_sizes:
        with tempfile.TemporaryDirectory() as folder:
            launch_local(world, "validation.bench.distributed", Path(folder), argv,
                         timeout=args.timeout)
            results[world] = json.loads((Path(folder) / "result.json").read_text())
    print(f"{'R':>2} {'method':>7} {'step ms':>9} {'MB sent':>9} {'/ DDP+AdamW':>12} "
          f"{'/ same at R=1':>14}")
    for world, per in results.items():
        for name, row in per.items():
            base = per.get("adamw")
            first = results.get(1, {}).get(name)
            ratio = f"{row['median_s'] / base['median_s']:.2f}" if base else "-"
            scale = f"{row['median_s'] / first['median_s']:.2f}" if first else "-"
            print(f"{world:>2} {name:>7} {1e3 * row['median_s']:>9.1f} "
                  f"{row['bytes'] / 1e6:>9.3f} {ratio:>12} {scale:>14}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1].isdigit():  # a rank of launch_local
        worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())
