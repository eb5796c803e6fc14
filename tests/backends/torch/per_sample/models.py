"""Small torch models of the per-sample tests, an adapter giving them the ``BatchModel``
protocol, and the independent reference rows: a Python loop of ``torch.autograd.grad`` on a
copy of the model fed one sample at a time (float64), written without the code under test.

Each case is data: a name, a builder returning (model, inputs, axes) and whether
``torch.func.vmap`` can run it. ``axes[k]`` is the batch axis of positional input k (0 or 1),
or ``"packed"`` for a ``PackedSequence``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from backends.torch.per_sample.loop import slice_packed

N = 5
Inputs = tuple[Any, ...]
Axes = tuple[Any, ...]


def _take(value: Any, axis: Any, rows: slice) -> Any:
    if axis == "packed":
        return slice_packed(value, rows)
    return value[rows] if axis == 0 else value[:, rows]


class Adapter:
    """``BatchModel`` over an ``nn.Module`` called on positional ``inputs`` (batch axes
    ``axes``) and keyword tensors ``kwargs`` (batch axis 0); ``output_fn`` maps the output to
    the logits (N, ...)."""

    def __init__(
        self, model: nn.Module, inputs: Inputs, axes: Axes, *,
        kwargs: Mapping[str, torch.Tensor] | None = None,
        output_fn: Callable[[Any], torch.Tensor] = lambda out: out,
    ) -> None:
        self.model, self.inputs, self.axes = model, inputs, axes
        self.kwargs, self.output_fn = dict(kwargs or {}), output_fn
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self._shapes = {k: p.shape for k, p in named}
        self._theta = torch.cat([p.detach().reshape(-1) for _, p in named])
        if inputs:
            first, axis = inputs[0], axes[0]
            self.num_samples = len(first.sorted_indices) if axis == "packed" else \
                first.shape[axis]
        else:
            self.num_samples = next(iter(self.kwargs.values())).shape[0]

    def params_vector(self) -> torch.Tensor:
        return self._theta.clone()

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        sizes = [s.numel() for s in self._shapes.values()]
        return {
            k: piece.view(s)
            for (k, s), piece in zip(self._shapes.items(), torch.split(vector, sizes), strict=True)
        }

    def sub_batch_logits(self, params: Mapping[str, torch.Tensor], rows: slice) -> torch.Tensor:
        args = tuple(_take(x, a, rows) for x, a in zip(self.inputs, self.axes, strict=True))
        kwargs = {k: t[rows] for k, t in self.kwargs.items()}
        z = self.output_fn(functional_call(self.model, dict(params), args, kwargs))
        return z.reshape(z.shape[0], -1)

    @contextlib.contextmanager
    def module_mode(self) -> Iterator[None]:
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, flag in flags:
                m.training = flag


def one_sample(inputs: Inputs, axes: Axes, n: int) -> Inputs:
    """Sample n's inputs as a batch of one, by hand (a packed batch is re-packed from its
    padded tensor, without ``slice_packed``)."""
    out = []
    for x, axis in zip(inputs, axes, strict=True):
        if axis == "packed":  # a packed sequence has no layout: pack sample n alone
            padded, lengths = pad_packed_sequence(x, batch_first=True)
            seq = padded[n:n + 1, :int(lengths[n])]
            out.append(pack_padded_sequence(seq, lengths[n:n + 1], batch_first=True))
        else:
            out.append(x[n:n + 1] if axis == 0 else x[:, n:n + 1])
    return tuple(out)


def reference_rows(
    model: nn.Module, inputs: Inputs, axes: Axes, cotangents: torch.Tensor
) -> torch.Tensor:
    """G (N, P) by a loop over samples: a deep copy of the model in eval mode fed sample n
    alone, ``torch.autograd.grad`` of u_n . z_n with respect to its trainable parameters."""
    single = copy.deepcopy(model).eval()
    params = [p for p in single.parameters() if p.requires_grad]
    rows = []
    for n in range(cotangents.shape[0]):
        z = single(*one_sample(inputs, axes, n))
        grads = torch.autograd.grad((z.reshape(-1) * cotangents[n]).sum(), params,
                                    allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]))
    return torch.stack(rows)


# ------------------------------------------------------------------ the models
class LastStep(nn.Module):
    """A recurrent layer followed by a linear read-out of its last hidden state."""

    def __init__(self, rnn: nn.Module, hidden: int, classes: int) -> None:
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, classes)

    def forward(self, x: Any) -> torch.Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM: (h, c)
        return self.head(torch.tanh(h[-1]))


class Pooled(nn.Module):
    """A sequence layer, the mean over its positions (axis ``time``), a linear read-out."""

    def __init__(self, layer: nn.Module, d: int, classes: int, time: int) -> None:
        super().__init__()
        self.layer, self.head, self.time = layer, nn.Linear(d, classes), time

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(dim=self.time))


class ZeroStateCell(nn.Module):
    """A hand-written Elman cell whose initial state is ``torch.zeros(batch, hidden)``: a
    batch-sized constant, which module vmap cannot batch."""

    def __init__(self, d: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.inp, self.rec = nn.Linear(d, hidden), nn.Linear(hidden, hidden, bias=False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, d)
        h = torch.zeros(x.shape[0], self.hidden, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
        return self.head(h)


class Branchy(nn.Module):
    """Data-dependent Python control flow: each sample takes the branch its input selects."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, classes), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.a(xi) if float(xi.sum()) > 0 else torch.sin(self.b(xi)) for xi in x]
        return torch.stack(rows)


class Tied(nn.Module):
    """One weight used twice, a frozen layer between, and a sparse embedding in front whose
    padding row (token 0) is not trained (torch's convention, zero gradient)."""

    def __init__(self, vocab: int, d: int, classes: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, sparse=True, padding_idx=0)
        self.shared = nn.Linear(d, d)
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).mean(dim=1)
        h = torch.tanh(self.shared(self.frozen(torch.tanh(self.shared(h)))))
        return self.head(h)


def _seq(n: int, t: int, d: int, first: bool) -> torch.Tensor:
    return torch.randn(t, n, d) if first else torch.randn(n, t, d)


def _mlp() -> tuple[nn.Module, Inputs, Axes]:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    return model, (torch.randn(N, 4),), (0,)


def _recurrent(kind: type, t: int, batch_first: bool) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, Inputs, Axes]:
        rnn = kind(3, 4, num_layers=2, batch_first=batch_first)
        return LastStep(rnn, 4, 3), (_seq(N, t, 3, not batch_first),), (0 if batch_first else 1,)
    return build


def _packed(kind: type, batch_first: bool) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, Inputs, Axes]:
        lengths = torch.tensor([2, N, 3, 1, 4])  # unsorted, one of length T == N
        x = _seq(N, N, 3, not batch_first)
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        return LastStep(kind(3, 4, batch_first=batch_first), 4, 3), (packed,), ("packed",)
    return build


def _cnn() -> tuple[nn.Module, Inputs, Axes]:
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 5 * 5, 3))
    return model, (torch.randn(N, 2, 5, 5),), (0,)


def _encoder(batch_first: bool) -> Callable[[], Any]:
    def build() -> tuple[nn.Module, Inputs, Axes]:
        layer = nn.TransformerEncoderLayer(N, 1, dim_feedforward=7, batch_first=batch_first)
        return (Pooled(layer, N, 3, 1 if batch_first else 0),
                (_seq(N, N, N, not batch_first),), (0 if batch_first else 1,))
    return build


def _zero_state() -> tuple[nn.Module, Inputs, Axes]:
    return ZeroStateCell(3, 4, 3), (torch.randn(N, N, 3),), (0,)


def _branchy() -> tuple[nn.Module, Inputs, Axes]:
    x = torch.randn(N, 4)
    x[0] = x[0].abs()
    x[1] = -x[1].abs()  # both branches are taken
    return Branchy(4, 3), (x,), (0,)


def _tied() -> tuple[nn.Module, Inputs, Axes]:
    ids = torch.randint(1, 7, (N, 4))
    ids[1, 2:] = 0  # padding
    return Tied(7, N, 3), (ids,), (0,)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, Inputs, Axes]]
    vmap: bool  # whether torch.func.vmap over samples runs this model


CASES = [
    Case("mlp-dropout", _mlp, True),
    Case("cnn-same-padding", _cnn, True),
    Case("encoder-batch-first-T=d=N", _encoder(True), True),
    Case("encoder-seq-first-T=d=N", _encoder(False), True),
    Case("gru-batch-first", _recurrent(nn.GRU, 6, True), False),
    Case("gru-seq-first-T=N", _recurrent(nn.GRU, N, False), False),
    Case("lstm-batch-first-T=N", _recurrent(nn.LSTM, N, True), False),
    Case("lstm-seq-first", _recurrent(nn.LSTM, 4, False), False),
    Case("rnn-seq-first-T=N", _recurrent(nn.RNN, N, False), False),
    Case("gru-packed", _packed(nn.GRU, True), False),
    Case("lstm-packed-seq-first", _packed(nn.LSTM, False), False),
    Case("zero-state-cell-T=N", _zero_state, False),
    Case("control-flow", _branchy, False),
    Case("tied-frozen-sparse-padded-embedding-d=N", _tied, False),
]


def build(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, Inputs, Axes]:
    """The case's model and inputs in ``dtype``, drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model, inputs, axes = case.build()
    model = model.to(dtype)

    def cast(x: Any) -> Any:
        if isinstance(x, PackedSequence):
            return x._replace(data=x.data.to(dtype))
        return x.to(dtype) if torch.is_floating_point(x) else x

    return model, tuple(cast(x) for x in inputs), axes
