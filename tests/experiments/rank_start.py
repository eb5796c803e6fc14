"""A torchrun-like worker (``python -m tests.experiments.rank_start RANK WORLD FOLDER``) for
tests/experiments/test_run_start.py: every rank starts two runs that must be refused, and
writes what it got to ``FOLDER/rankR.json``.

1. ``train.batch_size=1`` on two ranks: refused before anything exists.
2. ``FOLDER/locked`` whose lock another process holds: rank 0 cannot take it and every rank
   raises the same refusal (no rank waits at a barrier for one that gave up).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backends.torch.distributed.launch import local_group
from validation.experiments.config.load import load_config
from validation.experiments.train.runner import train


def worker(rank: int, world: int, folder: Path) -> None:
    got = {}
    with local_group(rank, world, folder):
        for case, overrides, run in (
            ("batch", ["train.batch_size=1"], folder / "batch"),
            ("locked", [], folder / "locked"),
        ):
            config = load_config("mlp", ["optimizer=ief", "model.hidden_sizes=[4]",
                                         "data.max_train_samples=16", "train.batch_size=8",
                                         "train.max_steps=2", *overrides])
            try:
                train(config, run, progress=False, device="cpu")
                got[case] = "started"
            except (ValueError, OSError) as exc:
                got[case] = f"{type(exc).__name__}: {exc}"
    (folder / f"rank{rank}.json").write_text(json.dumps(got))


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
