r"""K-FAC factors from the registry's parts against the same sums formed from a single-sample loop.

Reference: each sample's forward pass runs alone (float64) while a spy sees torch's own calls
of ``F.linear`` (also inside ``F.multi_head_attention_forward``), ``F.embedding``,
``F.conv{1,2,3}d`` and ``F.conv_transpose{1,2,3}d`` with a trainable weight (or a row block of
one). Per call and per row block of the weight it forms, independently of the
registry, the input side x_t and the gradient side y_t at every position:

=====================  ===========================================  ============================
call                   x_t (input side)                             y_t (gradient side)
=====================  ===========================================  ============================
linear                 the input at t                               dl_n / d(output at t)
embedding              one-hot of the index at t                    dl_n / d(output at t), zero
                                                                    at padding_idx
convolution            dy[c_j, t] / dW[c_j, :] (the patch of output dl_n / d(output at t),
                       position t, by autograd; c_j a row of        channels of group j
                       group j)
transposed conv        the input at t, channels of group j          d<b, conv_t(e_{c_j, t})> /
                                                                    dW[c_j] (the gradient a unit
                                                                    input at t sends to row c_j)
=====================  ===========================================  ============================

and A = c^-1 sum x x^T, B = sum_n w_n sum_t y y^T (expand) or with x_n = mean_t x_t,
y_n = sum_t y_t (reduce). Parameters without a Kronecker form (norm layers' rows, an
embedding bag, uses of mixed forms) are checked through their diagonal sum_n w_n g_n^2
against the loop's rows. The tolerance is :func:`.harness.rtol` (float64): A and B are sums of
at most 2^9 products of float64 numbers from two exact routes.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.axes import BATCH_FIRST  # noqa: E402
from backends.torch.layers import (  # noqa: E402
    Recorder,
    diagonal,
    grad_factors,
    input_factors,
    joint,
    kronecker,
    kronecker_ready,
)
from ngdref import kfac as K  # noqa: E402

from .cases import CASES, TiedEmbeddings, Twice  # noqa: E402
from .harness import (  # noqa: E402
    Case,
    assert_close,
    cast,
    inputs,
    loss,
    models,
    record,
    reference_rows,
    trainable,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

_CONV = {torch.conv1d, torch.conv2d, torch.conv3d}
_TRANSPOSED = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}
_NAMES = ("linear", "embedding", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
          "conv_transpose2d", "conv_transpose3d")


def _owner(w: torch.Tensor, params: list[nn.Parameter]) -> tuple[nn.Parameter, int] | None:
    """The trainable parameter that ``w`` is (or a row block of) and its first row."""
    for p in params:
        if w is p or w._base is p:
            return p, (w.data_ptr() - p.data_ptr()) // (p.stride(0) * p.element_size())
    return None


class Spy:
    """Records (role, parameter, first row, func, (args, kwargs), output) of the calls of
    torch.nn.functional that take a trainable weight or bias (or a row block of one)
    positionally, as torch's modules do; ``F.multi_head_attention_forward`` calls ``linear``
    through the module's globals, so replacing the attributes of ``F`` sees those too."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params, self.calls = params, []
        self.saved = {name: getattr(F, name) for name in _NAMES}

    def __enter__(self) -> Spy:
        for name, func in self.saved.items():
            setattr(F, name, self._wrap(func))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, func in self.saved.items():
            setattr(F, name, func)

    def _wrap(self, func: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            out = func(*args, **kwargs)
            roles = (("weight", 1),) if func is F.embedding else (("weight", 1), ("bias", 2))
            for role, i in roles:
                t = args[i] if len(args) > i else None
                found = _owner(t, self.params) if isinstance(t, torch.Tensor) else None
                if found is not None:
                    self.calls.append((role, *found, func, (args, kwargs), out))
            return out

        return call


def _last(t: torch.Tensor) -> torch.Tensor:
    """(B, C, *spatial) -> (B T, C): every image's positions, channels last."""
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _probe_patches(func: Any, args: tuple, row: int) -> torch.Tensor:
    """(B T, C_in k / G): d y[b, row, t] / d W[row] for every image b and output position t."""
    x, w = args[0].detach(), args[1].detach().requires_grad_(True)
    y = func(x, w, None, *args[3:])
    b, t = y.shape[0], y[0, row].numel()
    unit = torch.zeros(b * t, *y.shape, dtype=y.dtype)
    k = torch.arange(b * t)
    unit.view(b * t, b, y.shape[1], t)[k, k // t, row, k % t] = 1
    (jac,) = torch.autograd.grad(y, w, unit, is_grads_batched=True)
    return jac[:, row].reshape(b * t, -1)


def _probe_transposed(func: Any, args: tuple, grad: torch.Tensor, row: int) -> torch.Tensor:
    """(B T_in, C_out k / G): the gradient a unit input at each image and position sends to
    W[row] under the output gradient ``grad``."""
    x, w = args[0], args[1].detach().requires_grad_(True)
    out = []
    for b in range(x.shape[0]):
        for p in range(x[0, row].numel()):
            unit = torch.zeros_like(x)
            unit[b, row].view(-1)[p] = 1
            (g,) = torch.autograd.grad((func(unit, w, None, *args[3:]) * grad).sum(), w)
            out.append(g[row].reshape(-1))
    return torch.stack(out)


def _sides(role: str, func: Any, call: tuple, out: torch.Tensor, grad: torch.Tensor,
           p: nn.Parameter, start: int) -> list[tuple[int, Any, torch.Tensor]]:
    """Per row block of the call: (first row, x (T, .) or None for a bias, y (T, .))."""
    args, kwargs = call
    if role == "bias":
        y = grad.reshape(-1, grad.shape[-1]) if func is F.linear else _last(grad)
        return [(start, None, y)]
    if func is F.linear:
        return [(start, args[0].reshape(-1, args[0].shape[-1]), grad.reshape(-1, grad.shape[-1]))]
    if func is F.embedding:
        index = args[0].reshape(-1)
        y = grad.reshape(index.numel(), -1)
        pad = kwargs.get("padding_idx", args[2] if len(args) > 2 else None)
        if pad is not None:
            y = y * (index != pad)[:, None]
        return [(0, F.one_hot(index, p.shape[0]).double(), y)]
    groups = args[-1] if func in _CONV else args[6]
    if func in _CONV:
        rows = out.shape[1] // groups
        y = _last(grad)
        return [(j * rows, _probe_patches(func, args, j * rows), y[:, j * rows:(j + 1) * rows])
                for j in range(groups)]
    rows = args[0].shape[1] // groups
    x = _last(args[0])
    return [(j * rows, x[:, j * rows:(j + 1) * rows],
             _probe_transposed(func, args, grad, j * rows)) for j in range(groups)]


def reference_sides(case: Case, model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """{(parameter, first row): per sample, its calls' [(x (T, .) or None, y (T, .))]}."""
    params = [p for _, p in trainable(model)]
    out: dict[tuple[int, int], list] = {}
    for i in range(case.n):
        a, kw = case.single(i, *cast(args, kwargs, torch.float64))
        spy = Spy(params)
        with spy:
            y = model(*a, **kw)
        if not spy.calls:  # no call the spy knows (embedding bags, norms): diagonal only
            return out
        grads = torch.autograd.grad(loss(case, case.outputs(y), 1, [i]),
                                    [c[-1] for c in spy.calls], allow_unused=True,
                                    materialize_grads=True)
        per: dict[tuple[int, int], list] = {}
        for (role, p, start, func, call_args, result), g in zip(spy.calls, grads, strict=True):
            for row, x, yy in _sides(role, func, call_args, result, g, p, start):
                per.setdefault((id(p), row), []).append((x, yy.detach()))
        for key, pairs in per.items():
            out.setdefault(key, []).append(pairs)
    return out


def _dense_factors(calls: list, weights: torch.Tensor, convention: str) -> tuple:
    """(A with normalisation "mean", B) from every call's (x, y) per sample, concatenated
    along positions (x_n (T_n, .), y_n (T_n, .))."""
    pairs = [(None if c[0][0] is None else torch.cat([x.detach() for x, _ in c]),
              torch.cat([y for _, y in c])) for c in calls]
    a = None
    if convention == "expand":
        if pairs[0][0] is not None:
            xs = torch.cat([x for x, _ in pairs])
            a = xs.T @ xs / xs.shape[0]
        b = sum(w * y.T @ y for w, (_, y) in zip(weights, pairs, strict=True))
    else:
        if pairs[0][0] is not None:
            xs = torch.stack([x.mean(dim=0) for x, _ in pairs])
            a = xs.T @ xs / xs.shape[0]
        b = sum(w * torch.outer(y.sum(0), y.sum(0)) for w, (_, y) in zip(weights, pairs,
                                                                          strict=True))
    return a, b


@pytest.mark.parametrize("convention", ["expand", "reduce"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_factors_match_loop_sums(case, convention) -> None:
    model, reference = models(case, torch.float64)
    args, kwargs = inputs(case, torch.float64)
    batch = record(case, model, args, kwargs)
    weights = torch.rand(case.n, generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64) + 0.5
    sides = reference_sides(case, reference, args, kwargs)
    rows = None
    ref_params = dict(trainable(reference))
    offset = 0
    for name, p in batch.params:
        uses, shape = batch.uses[p], tuple(p.shape)
        if not kronecker_ready(uses):
            rows = reference_rows(case, reference, args, kwargs) if rows is None else rows
            g = rows[:, offset:offset + p.numel()]
            expected = (weights[:, None] * g * g).sum(dim=0)
            assert_close(diagonal(uses, shape, weights=weights), expected, torch.float64,
                         f"{name} diagonal")
        else:
            a = input_factors(uses, shape, convention=convention)
            b = grad_factors(uses, weights=weights, convention=convention)
            parts = kronecker(uses, shape, a, b, convention=convention)
            for part, got_a, got_b in zip(parts, a, b, strict=True):
                row = part.start // (part.shape[1] if len(part.shape) == 2 else 1)
                pairs = sides[(id(ref_params[name]), row)]
                ref_a, ref_b = _dense_factors(pairs, weights, convention)
                assert_close(got_b, ref_b, torch.float64, f"{name} rows {row}: B")
                if got_a is not None:  # a lookup table's A: its diagonal (V,)
                    assert_close(torch.diag(got_a) if got_a.ndim == 1 else got_a, ref_a,
                                 torch.float64, f"{name} rows {row}: A")
        offset += p.numel()


#: one sample, one position: g = u v^T exactly, so the Kronecker block (sum normalisation,
#: w = 1) must be vec(g) vec(g)^T: which factor sits on the rows is checked, not assumed
RANK_ONE = [
    Case("linear", lambda: nn.Linear(3, 2), lambda: ((torch.randn(1, 3, dtype=torch.float64),),
                                                     {}), n=1),
    Case("embedding", lambda: nn.Embedding(4, 3), lambda: ((torch.tensor([[2]]),), {}), n=1),
    Case("conv", lambda: nn.Conv1d(2, 3, 3, groups=1), lambda: (
        (torch.randn(1, 2, 3, dtype=torch.float64),), {}), n=1),
    Case("conv_transpose", lambda: nn.ConvTranspose1d(2, 3, 2, bias=False), lambda: (
        (torch.randn(1, 2, 1, dtype=torch.float64),), {}), n=1),
]


@pytest.mark.parametrize("case", RANK_ONE, ids=str)
def test_block_of_a_rank_one_gradient_is_its_outer_product(case) -> None:
    model, reference = models(case, torch.float64)
    args, kwargs = inputs(case, torch.float64)
    batch = record(case, model, args, kwargs)
    g = reference_rows(case, reference, args, kwargs)
    name, p = batch.params[0]
    uses, shape = batch.uses[p], tuple(p.shape)
    a = input_factors(uses, shape, normalisation="sum")
    (part,) = kronecker(uses, shape, a, grad_factors(uses))
    block = K.kfac_block_matrix(part.factors)
    gw = g[0, :p.numel()]
    assert_close(block, torch.outer(gw, gw), torch.float64, f"{name} block")


class Net(nn.Module):
    """The layers backends/kfac.py supports today: Conv2d (groups=1, zero padding), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: Any) -> Any:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("convention", ["expand", "reduce"])
def test_factors_reproduce_backends_kfac(convention, bias) -> None:
    """The integrator's switch-over: the same A and B as backends/kfac.py for its layers."""
    from backends.torch.kfac.curvature import kfac_curvature

    torch.manual_seed(4)
    model = Net().double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randint(0, 4, (5,))
    loss_fn = ngdref.SoftmaxCrossEntropy()
    today = kfac_curvature(model, loss_fn, x, y, methods=("ekfac", "iekfac"),
                           convention=convention, bias=bias)
    recorder = Recorder(model, lambda m, a, k: BATCH_FIRST, 5)
    with recorder.recording():
        z = model(x)
    e = loss_fn.grad(z.detach(), y)
    uses = recorder.uses([z], [e])
    s = (e * e).sum(dim=1)
    for block in today.blocks:
        module = model.get_submodule(block.name.removesuffix(".bias").removesuffix("bias"))
        p = module.bias if block.name.endswith("bias") else module.weight
        mine = joint(uses[p], uses[module.bias]) if bias == "joint" else uses[p]
        shape = block.shape
        for method, w in (("ekfac", None), ("iekfac", 1 / s)):
            a = input_factors(mine, shape, convention=convention)
            b = grad_factors(mine, weights=w, convention=convention)
            (part,) = kronecker(mine, shape, a, b, convention=convention)
            want = block.factors[method]
            assert_close(part.factors.grad_factor, want.grad_factor, torch.float64, "B")
            if want.input_factor is not None:
                assert_close(part.factors.input_factor, want.input_factor, torch.float64, "A")
            assert part.input_terms == block.input_terms or block.input_terms == 0


@pytest.mark.parametrize("build", [TiedEmbeddings, Twice], ids=["tied_embeddings", "twice"])
def test_shared_weight_is_one_kronecker_block(build) -> None:
    """Two Embeddings sharing one weight and a Linear called twice: one block each, whose
    A counts the positions of both uses (backends/kfac.py raises KeyError on the first)."""
    torch.manual_seed(5)
    model = build().double()
    x = torch.randint(0, 7, (3, 4)) if build is TiedEmbeddings else torch.randn(
        3, 2, 3, dtype=torch.float64)
    recorder = Recorder(model, lambda m, a, k: BATCH_FIRST, 3)
    with recorder.recording():
        out = model(x)
    uses = recorder.uses([out.sum()], [torch.ones((), dtype=torch.float64)])
    weight = model.a.weight if build is TiedEmbeddings else model.lin.weight
    assert len(uses[weight]) == 2 and kronecker_ready(uses[weight])
    (a,) = input_factors(uses[weight], tuple(weight.shape), normalisation="sum")
    positions = 2 * x.shape[0] * x.shape[1]  # every use's positions, each counted once
    with torch.no_grad():
        inner = torch.tanh(model.lin(x)) if build is Twice else None
    expected = positions if inner is None else float((x * x).sum() + (inner * inner).sum())
    trace = a.sum() if a.ndim == 1 else torch.trace(a)  # a lookup table's A: its diagonal
    assert float(trace) == pytest.approx(expected, rel=1e-12)
