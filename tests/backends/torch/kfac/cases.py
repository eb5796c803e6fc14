"""The K-FAC capture's test cases as data: one small classifier per layer kind and layout.

Every model takes a batch-first input (N, ...) as the optimisers do and ends in logits
(N, C); sequence-first layers get their (T, N, d) input by a transpose inside the model.
N = 3 samples, with sizes that collide on purpose (T == N, width == N, C == N), so that a
capture that guessed the batch axis from a length would read the wrong one.
``diagonal`` names the parameters whose block is diagonal (no Kronecker form, or not
recorded), ``lookups`` the lookup tables, diagonal under ``convention="reduce"`` too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

N = 3
CLASSES = 3


def _float(*shape: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(*shape, dtype=torch.float64)


def _ids(*shape: int, vocab: int = 7, pad: bool = False) -> Callable[[], torch.Tensor]:
    def make() -> torch.Tensor:
        ids = torch.randint(1 if pad else 0, vocab, shape)
        if pad:
            ids[0, -1] = ids[2, 0] = 0
        return ids
    return make


@dataclass(frozen=True)
class KCase:
    """A classifier on one batch: ``build()`` (float64), ``inputs()``, the expected
    diagonal blocks and lookup tables (parameter names)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], torch.Tensor]
    diagonal: tuple[str, ...] = ()
    lookups: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name

    def batch(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = self.build().double().eval()
        torch.manual_seed(1)
        return model, self.inputs(), torch.randint(0, CLASSES, (N,))


class Head(nn.Module):
    """z = out(tanh(after(layer(before(x)))).flatten(1)): one layer in a layout, a head."""

    def __init__(self, layer: nn.Module, width: int, before: Callable[[Any], Any] | None = None,
                 after: Callable[[Any], Any] | None = None) -> None:
        super().__init__()
        self.layer, self.out = layer, nn.Linear(width, CLASSES)
        self.before, self.after = before or (lambda x: x), after or (lambda y: y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.after(self.layer(self.before(x)))).flatten(1))


def _seq_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _split(y: torch.Tensor) -> torch.Tensor:
    return y.reshape(-1, 2 * 2)  # (N T, 2) -> (N, T 2), T = 2


def _first(y: Any) -> Any:
    return y[0]


def _first_seq_first(y: Any) -> Any:
    return y[0].transpose(0, 1)


class Twice(nn.Module):
    """One Linear called twice, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4 * N, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))).flatten(1))


class TiedEmbeddings(nn.Module):
    """Two Embeddings sharing one weight (two index tensors), and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Embedding(7, 3, padding_idx=0), nn.Embedding(7, 3)
        self.b.weight = self.a.weight
        self.out = nn.Linear(3 * N, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out((torch.tanh(self.a(ids)) * self.b(ids.flip(-1))).flatten(1))


class TiedModuleHead(nn.Module):
    """An Embedding tied to the output nn.Linear: uses of two layouts (the diagonal)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(CLASSES, 4), nn.Linear(4, CLASSES, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids)).mean(1))


class FunctionalHead(nn.Module):
    """An Embedding whose weight is also used by ``F.linear`` outside any module call."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.mix = nn.Embedding(CLASSES, 4), nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(self.mix(self.emb(ids))).mean(1), self.emb.weight)


class Recurrent(nn.Module):
    """A GRU (no layer kind: per-sample gradients by another route) and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.out = nn.GRU(4, 3, batch_first=True), nn.Linear(3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gru(x)[0][:, -1])


def _attention(**kwargs: Any) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(**{"embed_dim": 4, "num_heads": 2, "dropout": 0.0, **kwargs})
    for p in m.parameters():  # torch starts the projection biases at zero
        nn.init.normal_(p, std=0.5)
    return m


class SelfAttention(nn.Module):
    """Self-attention (packed q, k, v) in either layout, and a head."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = _attention(batch_first=batch_first)
        self.out = nn.Linear(4 * N, CLASSES)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        y = self.attn(h, h, h, need_weights=False)[0]
        y = y if self.batch_first else y.transpose(0, 1)
        return self.out(torch.tanh(y).flatten(1))


class CrossAttention(nn.Module):
    """Sequence-first attention with kdim, vdim (separate projections) and bias_k, bias_v."""

    def __init__(self) -> None:
        super().__init__()
        self.key, self.value = nn.Linear(4, 3), nn.Linear(4, 5)
        self.attn = _attention(kdim=3, vdim=5, add_bias_kv=True)
        self.out = nn.Linear(4 * N, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)
        y = self.attn(h, self.key(h), self.value(h), need_weights=False)[0]
        return self.out(torch.tanh(y.transpose(0, 1)).flatten(1))


def _conv(cls: type, *args: Any, width: int, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: Head(cls(*args, **kwargs), width)


def _gru() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Recurrent()


CASES = [
    KCase("linear_tokens_t_eq_n", lambda: Head(nn.Linear(4, N), N * N), _float(N, N, 4)),
    KCase("linear_sequence_first_t_eq_n", lambda: Head(nn.Linear(4, 2), 2 * N, _seq_first,
                                                       _seq_first), _float(N, N, 4)),
    KCase("linear_merged_batch", lambda: Head(nn.Linear(4, 2), 2 * 2, _merge, _split),
          _float(N, 2, 4)),
    KCase("linear_called_twice", Twice, _float(N, N, 4)),
    KCase("conv1d_groups_dilation_reflect",
          _conv(nn.Conv1d, 4, 4, 3, stride=2, padding=2, dilation=2, groups=2,
                padding_mode="reflect", width=4 * 3), _float(N, 4, 6)),
    KCase("conv2d_zero_padding", _conv(nn.Conv2d, 2, 3, 3, stride=2, padding=1, width=3 * 4),
          _float(N, 2, 4, 4)),
    KCase("conv2d_same_replicate", _conv(nn.Conv2d, 2, N, 2, padding="same",
                                         padding_mode="replicate", width=N * 9),
          _float(N, 2, 3, 3)),
    KCase("conv3d_groups_circular", _conv(nn.Conv3d, 2, 4, 2, groups=2, padding=1,
                                          padding_mode="circular", width=4 * 8),
          _float(N, 2, 1, 1, 1)),
    KCase("conv_transpose1d_groups_output_padding",
          _conv(nn.ConvTranspose1d, 4, 2, 3, stride=2, padding=1, output_padding=1, groups=2,
                width=2 * 6), _float(N, 4, 3)),
    KCase("conv_transpose2d", _conv(nn.ConvTranspose2d, 2, 3, 2, stride=2, width=3 * 16),
          _float(N, 2, 2, 2)),
    KCase("embedding_padding_idx", lambda: Head(nn.Embedding(7, N, padding_idx=0), N * N),
          _ids(N, N, pad=True), lookups=("layer.weight",)),
    KCase("embedding_sequence_first_t_eq_n",
          lambda: Head(nn.Embedding(7, 2), 2 * N, _seq_first, _seq_first), _ids(N, N),
          lookups=("layer.weight",)),
    KCase("embeddings_tied", TiedEmbeddings, _ids(N, N, pad=True), lookups=("a.weight",)),
    KCase("embedding_tied_to_linear_head", TiedModuleHead, _ids(N, 2, vocab=CLASSES),
          diagonal=("emb.weight",)),
    KCase("embedding_reused_by_f_linear", FunctionalHead, _ids(N, 2, vocab=CLASSES),
          diagonal=("emb.weight",)),
    # the bags' rows have no Kronecker form (a diagonal block); the head after them, whose
    # input the provenance tracker proves per sample, keeps its factors
    KCase("embedding_bag_mean", lambda: Head(nn.EmbeddingBag(7, 2, mode="mean"), 2),
          _ids(N, 4), diagonal=("layer.weight",)),
    KCase("layer_norm_sequence_first", lambda: Head(nn.LayerNorm(N), N * N, _seq_first,
                                                    _seq_first), _float(N, N, N),
          diagonal=("layer.weight", "layer.bias")),
    KCase("group_norm", lambda: Head(nn.GroupNorm(2, 4), 4 * 2), _float(N, 4, 2),
          diagonal=("layer.weight", "layer.bias")),
    KCase("attention_batch_first", lambda: SelfAttention(True), _float(N, N, 4)),
    KCase("attention_sequence_first_t_eq_n", lambda: SelfAttention(False), _float(N, N, 4)),
    KCase("attention_kdim_vdim_bias_kv", CrossAttention, _float(N, N, 4),
          diagonal=("attn.bias_k", "attn.bias_v")),
    KCase("gru", _gru, _float(N, 2, 4),
          diagonal=("gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0")),
]

#: cases where ``bias="joint"`` pairs weights and biases (linear maps, grouped convolutions,
#: attention's packed in-projection), and one where a transposed convolution keeps its bias
JOINT = [c for c in CASES if c.name in (
    "linear_tokens_t_eq_n", "linear_called_twice", "conv1d_groups_dilation_reflect",
    "attention_sequence_first_t_eq_n", "conv_transpose1d_groups_output_padding")]
