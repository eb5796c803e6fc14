"""Data-parallel optimisers (backends.torch.distributed.comm): R ranks take the single-process step.

R = 2 and 3 processes on gloo over 127.0.0.1 (a FileStore rendezvous in a temporary folder,
so no port has to be guessed; gloo's pair sockets bind to the loopback interface) are
spawned ONCE per world size; each runs every case below in turn and saves what it saw.
The expected value is the same optimiser run in this (non-distributed) process on the
concatenated batch: the single-process optimisers are themselves checked against
independent routes in tests/backends/torch/optim/test_steps.py.

Run a worker by hand:
``python -m tests.backends.torch.distributed.test_data_parallel RANK WORLD FOLDER``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.distributed.launch import launch_local, local_group  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402

D_IN, HIDDEN, POSITIONS, VOCAB = 4, 6, 2, 3
IGNORE = -100
N = 7
#: shard sizes per world size; with R = 3 rank 1 holds sample 3 alone, all of it ignored
SHARDS = {1: [N], 2: [4, 3], 3: [3, 1, 3]}
STEPS = 3  # two steps, a state_dict round trip into a new optimiser, one more step
#: norm-wise relative tolerance of the parameter displacement and diagnostics, per dtype.
#: The R-rank and 1-rank steps differ only in the order of sums (block rows of the Gram
#: matrix, the all-reduce of G^T w, F v): each is a backward-stable sum with error
#: <= P eps max|terms|, amplified by the condition number of the damped N x N system
#: (< 1e3 for these dampings): float64 ~ 72 * 1.1e-16 * 1e3 ~ 1e-11 < 1e-10; float32 (rows
#: and sums of G^T w in float32, the solve in float64) ~ 72 * 6e-8 ~ 4e-6 < 1e-5.
RTOL = {"float64": 1e-10, "float32": 1e-5}
#: the block-diagonal (local-solve) method must miss the exact step by far more than RTOL
BLOCK_DIAGONAL_MISS = 1e-3

#: name -> (optimiser, hyperparameters, dtype); reduction "mean" divides by the GLOBAL N
CASES: dict[str, tuple[type, dict[str, Any], str]] = {
    "ief": (IEF, {"lr": 0.5, "damping": 1e-3}, "float64"),
    "ief_vmap": (IEF, {"lr": 0.5, "damping": 1e-3, "per_sample": "vmap"}, "float64"),
    "ief_float32": (IEF, {"lr": 0.5, "damping": 1e-3}, "float32"),
    "ief_mixed_routes": (IEF, {"lr": 0.5, "damping": 1e-3}, "float64"),
    "ef": (EF, {"lr": 0.1, "damping": 1e-3, "total_steps": 5}, "float64"),
    "sf": (SF, {"lr": 0.1, "damping": 1e-2, "total_steps": 5, "seed": 3, "num_samples": 2},
           "float64"),
    "sf_float32": (SF, {"lr": 0.1, "damping": 1e-2, "total_steps": 5, "seed": 3}, "float32"),
    "ngd": (NGD, {"lr": 0.5, "damping": 1e-2}, "float64"),
    # each rank's shard in hooked passes of 2 samples (its rows stacked, then shared)
    "ief_chunked": (IEF, {"lr": 0.5, "damping": 1e-3, "chunk_size": 2}, "float64"),
    "sf_chunked": (SF, {"lr": 0.1, "damping": 1e-2, "total_steps": 5, "seed": 3,
                        "num_samples": 2, "per_sample": "ghost", "chunk_size": 2}, "float64"),
}
#: "ief_mixed_routes": each rank its own per-sample route (layouts merged by the rows)
ROUTES = ("auto", "hooks", "vmap")
#: diagnostics that must equal the single-process ones
COMPARED = ("loss", "update_norm", "grad_norm_imbalance", "kept", "residual", "cg_iterations")


# ---- the problem (shared by the workers and the reference) ----------------------------------
def make_model(dtype: str, hidden: int = HIDDEN) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(D_IN, hidden), nn.Tanh(), nn.Linear(hidden, POSITIONS * VOCAB))
    return net.to(getattr(torch, dtype))


def make_data(dtype: str, duplicate: bool = False) -> tuple[Any, Any]:
    """x (N, D_IN), token targets (N, POSITIONS); sample 3 all ignored, sample 5 half."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=gen, dtype=torch.float64).to(getattr(torch, dtype))
    y = torch.randint(0, VOCAB, (N, POSITIONS), generator=gen)
    y[3] = IGNORE
    y[5, 1] = IGNORE
    if duplicate:  # the first and the last sample, on different ranks, are the same
        x[N - 1], y[N - 1], y[3] = x[0], y[0], y[2]  # and no zero row
    return x, y


def shard(world: int, rank: int) -> slice:
    sizes = SHARDS[world]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def flat(model: nn.Module) -> Any:
    return torch.cat([p.detach().reshape(-1).to(torch.float64) for p in model.parameters()])


def run_case(name: str, world: int, rank: int, **options: Any) -> dict[str, Any]:
    """Take STEPS steps of case ``name`` on this rank's shard; parameters after each."""
    cls, hyper, dtype = CASES[name]
    hyper = {**hyper, "reduction": "mean", **options}
    if name == "ief_mixed_routes" and world > 1:
        hyper["per_sample"] = ROUTES[rank % len(ROUTES)]
    model = make_model(dtype)
    x, y = make_data(dtype)
    part = shard(world, rank)
    loss = ngdref.SequenceSoftmaxCrossEntropy(VOCAB)
    opt = cls(model, loss, **hyper)
    out: dict[str, Any] = {"params": [flat(model)], "diagnostics": []}
    for step in range(STEPS):
        if step == 2:  # resume: a new optimiser from the state_dict
            state = copy.deepcopy(opt.state_dict())
            opt = cls(model, loss, **hyper)
            opt.load_state_dict(state)
        opt.step(lambda: (x[part], y[part]))
        out["params"].append(flat(model))
        out["diagnostics"].append(dict(opt.diagnostics))
    return out


class BagOfTokens(nn.Module):
    """Embedding (padding_idx 0: a zero row that gets no gradient) summed over positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 4, padding_idx=0, dtype=torch.float64)
        self.head = nn.Linear(4, VOCAB, dtype=torch.float64)

    def forward(self, tokens: Any) -> Any:
        return self.head(self.embed(tokens).sum(dim=1))


def run_padded(world: int, rank: int) -> Any:
    """One iEF step where each rank pads its token shard to its own length (T differs)."""
    gen = torch.Generator().manual_seed(8)  # shard lengths 5, 3 (R = 2) and 4, 5, 3 (R = 3)
    lengths = torch.randint(1, 6, (N,), generator=gen)
    tokens = torch.randint(1, 20, (N, 5), generator=gen)
    tokens[torch.arange(5)[None, :] >= lengths[:, None]] = 0
    y = torch.randint(0, VOCAB, (N,), generator=gen)
    part = shard(world, rank)
    mine = tokens[part][:, : int(lengths[part].max())]  # this shard's own padding
    model = BagOfTokens()
    opt = IEF(model, ngdref.SoftmaxCrossEntropy(), lr=0.5, damping=1e-3, reduction="mean",
              per_sample="ghost")
    opt.step(lambda: (mine, y[part]))
    return flat(model)


# ---- the worker ----------------------------------------------------------------------------
def _failure(world: int, rank: int, kind: str) -> dict[str, Any]:
    """Run one bad step; what this rank raised and whether its parameters stayed put."""
    dtype = "float64"
    hidden = HIDDEN + 1 if kind == "model_mismatch" and rank == world - 1 else HIDDEN
    model = make_model("float32" if kind == "dtype_mismatch" and rank == 1 else dtype, hidden)
    x, y = make_data(dtype, duplicate=kind == "singular")
    x = x.to(next(model.parameters()).dtype)
    part = shard(world, rank)
    loss = ngdref.SequenceSoftmaxCrossEntropy(VOCAB)
    damping = 0.0 if kind == "singular" else 1e-3
    lr = 0.25 if kind == "lr_mismatch" and rank == world - 1 else 0.5
    opt = IEF(model, loss, lr=lr, damping=damping, dedup_threshold=None)

    def closure() -> Any:
        if kind == "closure" and rank == 0:
            raise KeyError("boom")
        if kind == "nan_loss" and rank == world - 1 and opt.steps_taken == 1:
            return x[part] * float("nan"), y[part]
        return x[part], y[part]

    steps = 2 if kind == "nan_loss" else 1
    before = None
    try:
        for _ in range(steps):
            before = flat(model)
            opt.step(closure)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc), "step": opt.steps_taken,
                "unchanged": bool(torch.equal(before, flat(model)))}
    return {"type": None}


FAILURES = ("closure", "nan_loss", "singular", "model_mismatch", "dtype_mismatch", "lr_mismatch")


def _block_diagonal(world: int, rank: int) -> Any:
    """What DDP around a local solve would do: each rank iEF on its shard, then average."""
    import torch.distributed as dist

    model = make_model("float64")
    x, y = make_data("float64")
    part = shard(world, rank)
    opt = IEF(model, ngdref.SequenceSoftmaxCrossEntropy(VOCAB), lr=0.5, damping=1e-3,
              reduction="mean", distributed=False)
    if bool(torch.any(y[part] != IGNORE)):  # a shard without labels has no local step
        opt.step(lambda: (x[part], y[part]))
    theta = flat(model)
    dist.all_reduce(theta)
    return theta / world


def worker(rank: int, world: int, folder: Path) -> None:
    import torch.distributed as dist

    with local_group(rank, world, folder):
        results: dict[str, Any] = {name: run_case(name, world, rank) for name in CASES}
        results["failures"] = {kind: _failure(world, rank, kind) for kind in FAILURES}
        results["block_diagonal"] = _block_diagonal(world, rank)
        results["padded"] = run_padded(world, rank)
        pair = dist.new_group([0, 1])  # every rank takes part in creating the group
        if rank < 2:  # ranks 0 and 1 share the batch in SHARDS[2]; a third rank stays out
            results["ief_pair"] = run_case("ief", 2, rank, process_group=pair)
        torch.save(results, folder / f"rank{rank}.pt")


# ---- the tests -----------------------------------------------------------------------------
def spawn(
    world: int, folder: Path, module: str = "tests.backends.torch.distributed.test_data_parallel"
) -> list[Any]:
    """Run ``world`` workers of ``module`` (at most 300 s); what each saved."""
    launch_local(world, module, folder)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=["R2", "R3"])
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    world = request.param
    return world, spawn(world, tmp_path_factory.mktemp(f"dist{world}"))


def relative(a: Any, b: Any) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("name", list(CASES))
def test_r_ranks_take_the_single_process_step(ranks: Any, name: str) -> None:
    world, results = ranks
    expected = run_case(name, 1, 0)  # torch.distributed is not initialised here
    rtol = RTOL[CASES[name][2]]
    start = expected["params"][0]
    for step in range(1, STEPS + 1):
        mine = results[0][name]["params"][step]
        for other in results[1:]:  # bit-identical parameters on every rank
            assert torch.equal(other[name]["params"][step], mine)
        assert relative(mine - start, expected["params"][step] - start) < rtol, step
        got, want = results[0][name]["diagnostics"][step - 1], expected["diagnostics"][step - 1]
        for key in COMPARED:
            if key in want:  # equal infinities: the imbalance with an all-ignored sample
                close = abs(got[key] - want[key]) <= rtol * abs(want[key])
                if key == "cg_iterations":  # the stopping test ||r_k|| <= tol compares a
                    # rounded norm with a threshold: a sum in another order may cross it one
                    # iteration earlier or later, while the step still agrees to rtol above
                    close = abs(got[key] - want[key]) <= 1
                assert got[key] == want[key] or close, (key, got[key], want[key])
        assert got["world_size"] == world and got["num_samples"] == N
        assert got["bytes_sent"] > 0


def test_shards_padded_to_their_own_lengths_take_the_global_step(ranks: Any) -> None:
    """Ghost factors of an embedding with T differing between ranks (zero-padded to one T)."""
    _, results = ranks
    start = flat(BagOfTokens())
    want = run_padded(1, 0)
    for r in results:
        assert relative(r["padded"] - start, want - start) < RTOL["float64"]


def test_the_block_diagonal_local_solve_is_not_the_step(ranks: Any) -> None:
    """What the equality test would catch: DDP averaging of per-rank iEF steps."""
    _, results = ranks
    expected = run_case("ief", 1, 0)
    start, exact = expected["params"][0], expected["params"][1]
    block = results[0]["block_diagonal"]
    assert relative(block - start, exact - start) > BLOCK_DIAGONAL_MISS
    assert relative(results[0]["ief"]["params"][1] - start, exact - start) < RTOL["float64"]


FAILURE_CASES = {  # kind -> (exception type on every rank, text in the message, failing rank)
    "closure": ("KeyError", "boom", 0),
    "nan_loss": ("NonFiniteError", "NaN", -1),
    "singular": ("SingularMatrixError", "singular", None),
    "model_mismatch": ("ValueError", "model: rank", None),
    "dtype_mismatch": ("ValueError", "float32", None),
    "lr_mismatch": ("RuntimeError", "step sizes", None),
}


@pytest.mark.parametrize("kind", list(FAILURE_CASES))
def test_an_error_on_one_rank_is_raised_on_every_rank(ranks: Any, kind: str) -> None:
    world, results = ranks
    kind_type, text, failing = FAILURE_CASES[kind]
    if kind == "dtype_mismatch" and world < 2:
        pytest.skip("needs two ranks")
    seen = [r["failures"][kind] for r in results]
    assert {s["type"] for s in seen} == {kind_type}, seen
    assert len({s["message"] for s in seen}) == 1, seen  # the same message everywhere
    assert text in seen[0]["message"]
    if failing is not None:
        assert f"rank {failing % world} of {world}" in seen[0]["message"]
    assert all(s["unchanged"] for s in seen)


def test_process_group_selects_the_ranks(ranks: Any) -> None:
    _, results = ranks
    expected = run_case("ief", 1, 0)
    start, want = expected["params"][0], expected["params"][STEPS]
    got = [r["ief_pair"]["params"][STEPS] for r in results[:2]]
    assert torch.equal(got[0], got[1])
    assert relative(got[0] - start, want - start) < RTOL["float64"]


def test_singular_is_also_the_single_process_answer() -> None:
    """The cross-rank duplicate makes the global Gram singular, as on one process."""
    model = make_model("float64")
    x, y = make_data("float64", duplicate=True)
    opt = IEF(model, ngdref.SequenceSoftmaxCrossEntropy(VOCAB), lr=0.5, damping=0.0,
              dedup_threshold=None)
    with pytest.raises(ngdref.SingularMatrixError):
        opt.step(lambda: (x, y))


def test_distributed_without_a_process_group_is_refused() -> None:
    with pytest.raises(ValueError, match="not initialised"):
        IEF(make_model("float64"), ngdref.SequenceSoftmaxCrossEntropy(VOCAB), lr=1.0,
            damping=1e-3, distributed=True)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
