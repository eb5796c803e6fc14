"""An iEF step on the ghost route where G (N x P) would not fit in 1 GiB stays under 1 GiB.

The step runs in a fresh Python process (so that no earlier test's peak hides it) and reports
the growth of its peak resident set size (``ru_maxrss``) over the step. The model is an MLP of
P = 8.4 million float32 parameters on a batch of N = 64: G would take N P 4 bytes = 2.15 GB
(2.0 GiB), so a route that materialised G -- or even half of it -- would exceed the 1 GiB
budget the test asserts; the ghost step holds the parameters, one copy of theta, the
activations (64 x 2048 floats per layer), the N x N Gram matrix and a few P-vectors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")

GIB = 2**30
SCRIPT = textwrap.dedent(
    """
    import resource
    import torch
    from torch import nn
    import ngdref
    from backends.torch.optim.methods import IEF

    torch.manual_seed(0)
    torch.set_num_threads(1)
    width, n = 2048, 64
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width),
                          nn.Tanh(), nn.Linear(width, 10))
    x, y = torch.randn(n, width), torch.randint(0, 10, (n,))
    opt = IEF(model, ngdref.SoftmaxCrossEntropy(), lr=0.1, damping=1e-3, per_sample="auto")
    p = sum(q.numel() for q in model.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    opt.step(lambda: (x, y))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(n, p, (after - before) * 1024)  # ru_maxrss is in KiB on Linux
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's convention")
def test_ghost_step_stays_under_1_gib_where_g_would_not_fit() -> None:
    root = Path(__file__).resolve().parents[4]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, cwd=root,
        timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr
    n, p, grown = (int(v) for v in done.stdout.split()[-3:])
    assert n * p * 4 > GIB  # G itself would exceed the budget
    assert grown < GIB, f"the step grew the peak RSS by {grown / GIB:.2f} GiB"
