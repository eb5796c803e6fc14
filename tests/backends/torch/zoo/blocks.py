"""The small modules the zoo's models are assembled from (:mod:`.models`).

Every zoo model maps one batch (a tensor, or keyword tensors, the samples on the first axis)
to logits (N, C). The pieces here only move axes around and pick outputs; the layers under
test are ``torch.nn``'s own. A few models take several inputs or build tensors inside the
forward pass (masks, offsets, initial states): those are written out as classes here.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class Transpose(nn.Module):
    """``x.transpose(a, b)``: batch-first (N, T, ...) to sequence-first (T, N, ...) and back."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.a, self.b)


class Mean(nn.Module):
    """Mean over one axis (the positions)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=self.dim)


class Output(nn.Module):
    """Entry ``index`` of a module's tuple output (RNN outputs, attention's (out, weights))."""

    def __init__(self, index: int = 0) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Any) -> Any:
        return x[self.index]


class Flat(nn.Module):
    """(N, ...) -> (N, -1): logits or a head's input, whatever the layout before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1)


class MergeBatch(nn.Module):
    """(N, T, ...) -> (N T, ...): the batch merged into another axis (a conv over N T rows)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, *x.shape[2:])


class SplitBatch(nn.Module):
    """(N T, ...) -> (N, T ...): undo :class:`MergeBatch` for a known T, flattening the rest."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.t * x[0].numel())


class SeqLogits(nn.Module):
    """Sequence-first (T, N, V) -> (N, T V): one row of T V logits per sample."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).reshape(x.shape[1], -1)


class Attention(nn.Module):
    """``nn.MultiheadAttention`` on its query and optional memory, masks as given.

    ``attn_mask`` is a causal (T, S) float mask built from the lengths (a constant, not per
    sample); ``key_padding_mask`` (N, S) True where a key is padding, a model input.
    """

    def __init__(self, mha: nn.MultiheadAttention, *, causal: bool = False) -> None:
        super().__init__()
        self.mha, self.causal = mha, causal

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if memory is None else memory
        t_axis = 1 if self.mha.batch_first else 0
        attn_mask = None
        if self.causal:
            t, s = x.shape[t_axis], kv.shape[t_axis]
            attn_mask = torch.triu(torch.full((t, s), float("-inf"), dtype=x.dtype), 1)
        out, _ = self.mha(x, kv, kv, key_padding_mask=mask, attn_mask=attn_mask,
                          need_weights=False)
        return out


class Keywords(nn.Module):
    """``tail(body(**inputs))``: a body of several keyword inputs, then positional layers."""

    def __init__(self, body: nn.Module, *tail: nn.Module) -> None:
        super().__init__()
        self.body, self.tail = body, nn.Sequential(*tail)

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.tail(self.body(**inputs))


class TwoInputs(nn.Module):
    """``module(x, y)`` for keyword inputs x and y (Bilinear, decoders, cross-attention).

    ``seq_first``: both inputs are batch-first (N, T, d) model inputs, transposed to (T, N, d)
    for the module and its output transposed back.
    """

    def __init__(self, module: nn.Module, *, seq_first: bool = False) -> None:
        super().__init__()
        self.module, self.seq_first = module, seq_first

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.seq_first:
            return self.module(x.transpose(0, 1), y.transpose(0, 1)).transpose(0, 1)
        return self.module(x, y)


class Masked(nn.Module):
    """``module(x, mask)`` with the mask as the keyword ``mask_name`` (padding masks)."""

    def __init__(self, module: nn.Module, mask_name: str) -> None:
        super().__init__()
        self.module, self.mask_name = module, mask_name

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.module(x, **{self.mask_name: mask})


class BagWithOffsets(nn.Module):
    """``nn.EmbeddingBag`` on a flat index vector with offsets built from padded tokens.

    tokens (N, L) with lengths (N,): sample n's bag is its first lengths[n] tokens. The bags
    are concatenated into one 1-D input and ``offsets`` mark where each starts (the layout of
    EmbeddingBag's 1-D form), built inside the forward pass from the batch it is given.
    """

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.bag = bag

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(tokens.shape[1]) < lengths[:, None]
        offsets = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)[:-1]])
        return self.bag(tokens[keep], offsets)


class WeightedBag(nn.Module):
    """``nn.EmbeddingBag(mode="sum")`` with ``per_sample_weights`` (N, L), a model input."""

    def __init__(self, bag: nn.EmbeddingBag) -> None:
        super().__init__()
        self.bag = bag

    def forward(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.bag(tokens, per_sample_weights=weights)


class PackedLSTM(nn.Module):
    """An LSTM over padded sequences (N, T, d) packed by their lengths (N,); h_T of the top
    layer of each sample, at its own length."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return h[-1]


class CellLoop(nn.Module):
    """A torch cell (RNNCell, GRUCell, LSTMCell) run over T steps of (N, T, d) inputs.

    ``zero_state``: start from ``torch.zeros(batch, hidden)`` built in the forward pass (the
    batch size read off the input, as hand-written loops do); else from the cell's default.
    """

    def __init__(self, cell: nn.RNNCellBase, *, zero_state: bool) -> None:
        super().__init__()
        self.cell, self.zero_state = cell, zero_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state: Any = None
        if self.zero_state:
            h = torch.zeros(x.shape[0], self.cell.hidden_size, dtype=x.dtype)
            state = (h, h) if isinstance(self.cell, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return state[0] if isinstance(state, tuple) else state


class HandCell(nn.Module):
    """h_t = tanh(W x_t + U h_{t-1}) written by hand, h_0 = torch.zeros(batch, hidden)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w, self.u = nn.Linear(d, hidden), nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.u.in_features, dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(self.w(x[:, t]) + self.u(h))
        return h


class RawCell(nn.Module):
    """The same recurrence with raw parameters (no submodule), so that a per-sample route
    must treat the whole cell as one module: h_t = tanh(W x_t + b + U h_{t-1}), h_0 =
    torch.zeros(batch, hidden)."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w_x = nn.Parameter(torch.randn(hidden, d) / d**0.5)
        self.w_h = nn.Parameter(torch.randn(hidden, hidden) / hidden**0.5)
        self.b_h = nn.Parameter(torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(x.shape[0], self.w_h.shape[0], dtype=x.dtype)
        for t in range(x.shape[1]):
            h = torch.tanh(F.linear(x[:, t], self.w_x, self.b_h) + F.linear(h, self.w_h))
        return h


class TwiceLinear(nn.Module):
    """One Linear used twice (shared weights): head(tanh(L(tanh(L(x)))))."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


class TiedEmbeddings(nn.Module):
    """Two Embeddings sharing one weight (``b.weight = a.weight``), on two token inputs."""

    def __init__(self, vocab: int, d: int, classes: int) -> None:
        super().__init__()
        self.a, self.b = nn.Embedding(vocab, d), nn.Embedding(vocab, d)
        self.b.weight = self.a.weight
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x).mean(1) + torch.tanh(self.b(y)).mean(1))


class TiedLMHead(nn.Module):
    """An Embedding whose weight is also the output projection (``F.linear(h, emb.weight)``):
    logits over the vocabulary of the mean of the tokens' hidden states."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(vocab, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mix(self.emb(x))).mean(1), self.emb.weight)


class Broadcast(nn.Module):
    """ViT-style parameters added to every sample: a class token (1, 1, d) expanded over the
    batch and prepended, a position embedding (1, T + 1, d) added, a scalar gain multiplied."""

    def __init__(self, t: int, d: int, classes: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, t + 1, d))
        self.gain = nn.Parameter(torch.tensor(1.5))
        self.mix, self.head = nn.Linear(d, d), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls_tokens = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls_tokens, x], dim=1) + self.pos_embedding
        return self.head(torch.tanh(self.gain * self.mix(tokens))[:, 0])


class Functional(nn.Module):
    """Raw parameters used through ``torch.nn.functional`` (no module owns a call)."""

    def __init__(self, d: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, d) / d**0.5)
        self.b_in = nn.Parameter(torch.randn(hidden))
        self.extra = nn.ParameterList([nn.Parameter(torch.randn(classes, hidden))])
        self.scales = nn.ParameterDict({"out": nn.Parameter(torch.randn(classes))})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(F.linear(x, self.w_in, self.b_in))
        return F.linear(h, self.extra[0]) * self.scales["out"]


class Frozen(nn.Module):
    """Three Linears, the middle one frozen (``requires_grad=False``), and a frozen bias."""

    def __init__(self, d: int, classes: int) -> None:
        super().__init__()
        self.first, self.middle, self.last = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, classes)
        self.middle.requires_grad_(False)
        self.last.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.middle(torch.tanh(self.first(x)))))


class AdaptiveLogits(nn.Module):
    """``nn.AdaptiveLogSoftmaxWithLoss.log_prob`` (N, C) as logits (softmax(log p) = p)."""

    def __init__(self, d: int, classes: int, cutoffs: list[int]) -> None:
        super().__init__()
        self.mix = nn.Linear(d, d)
        self.out = nn.AdaptiveLogSoftmaxWithLoss(d, classes, cutoffs, div_value=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.log_prob(torch.tanh(self.mix(x)))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (sequence-first) on source and target tokens sharing one
    Embedding; logits (N, T V) over the target positions, for a sequence loss."""

    def __init__(self, vocab: int, d: int, *, batch_first: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        with warnings.catch_warnings():  # the nested-tensor fast path needs batch_first
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                d, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=2 * d,
                dropout=0.0, batch_first=batch_first,
            )
        self.out = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        src, tgt = self.emb(x), self.emb(y)
        if not self.transformer.batch_first:
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        t = tgt.shape[1] if self.transformer.batch_first else tgt.shape[0]
        causal = nn.Transformer.generate_square_subsequent_mask(t, dtype=src.dtype)
        out = self.out(self.transformer(src, tgt, tgt_mask=causal))
        if not self.transformer.batch_first:
            out = out.transpose(0, 1)
        return out.reshape(out.shape[0], -1)
