"""The zoo's sequence models (attention, transformers, recurrent layers and cells) and its
parameter patterns (shared, tied, frozen, broadcast, functional); see :mod:`.models`.

Sequence-first layers get (T, N, d) tensors with T == N (the default layout of
``nn.MultiheadAttention`` and the transformer layers), and one case with T != N beside it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .blocks import (
    AdaptiveLogits,
    Attention,
    Broadcast,
    CellLoop,
    Frozen,
    Functional,
    HandCell,
    Keywords,
    Masked,
    Mean,
    Output,
    PackedLSTM,
    RawCell,
    Seq2Seq,
    TiedEmbeddings,
    TiedLMHead,
    Transpose,
    TwiceLinear,
    TwoInputs,
)
from .case import (
    LENGTHS,
    LIMIT_BOTH,
    LIMIT_FORWARD_AD,
    LIMIT_VMAP,
    MHA,
    SEQ_MASK,
    VOCAB,
    Case,
    constant,
    keywords,
    lazy,
    seq,
    tokens,
    x,
)

_HEAD = lazy(nn.Linear, 4, 4)
_TANH = lazy(nn.Tanh)


def _pooled(body: Callable[[], nn.Module], *, seq_first: bool) -> Callable[[], nn.Module]:
    """batch-first input -> [transpose] -> body -> mean over the positions -> Linear head."""
    if seq_first:
        return seq(lazy(Transpose, 0, 1), body, _TANH, lazy(Mean, 0), _HEAD)
    return seq(body, _TANH, lazy(Mean, 1), _HEAD)


def _encoder_layer(**kw: object) -> nn.Module:
    return nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, **kw)


def _decoder_layer(**kw: object) -> nn.Module:
    return nn.TransformerDecoderLayer(4, 2, dim_feedforward=8, dropout=0.0, **kw)


def _pair(module: Callable[[], nn.Module], *, seq_first: bool) -> Callable[[], nn.Module]:
    """Keyword inputs x and y through a two-input module, pooled, a Linear head."""
    return lambda: Keywords(TwoInputs(module(), seq_first=seq_first), nn.Tanh(), Mean(1),
                            nn.Linear(4, 4))


def _masked(module: Callable[[], nn.Module], name: str) -> Callable[[], nn.Module]:
    """Keyword inputs x and mask through a module taking the mask as ``name``, pooled."""
    return lambda: Keywords(Masked(module(), name), nn.Tanh(), Mean(1), nn.Linear(4, 4))


def _attention() -> list[Case]:
    def mha(**kw: object) -> Callable[[], nn.Module]:
        causal = bool(kw.pop("causal", False))
        return lambda: Attention(MHA(4, 2, **kw), causal=causal)

    return [
        Case("mha_batch_first", _pooled(mha(batch_first=True), seq_first=False), x(4, 4), 4,
             ("MultiheadAttention",), limits=LIMIT_FORWARD_AD),
        Case("mha_seq_first", _pooled(mha(), seq_first=True), x(4, 4), 4,
             ("MultiheadAttention",), limits=LIMIT_FORWARD_AD),
        Case("mha_seq_first_t3", _pooled(mha(), seq_first=True), x(3, 4), 4,
             ("MultiheadAttention",), limits=LIMIT_FORWARD_AD),
        Case("mha_key_padding_mask", _masked(mha(batch_first=True), "mask"),
             keywords(x=x(4, 4), mask=constant(SEQ_MASK)), 4,
             ("MultiheadAttention", "key_padding_mask"), limits=LIMIT_FORWARD_AD),
        Case("mha_causal_bias_kv_seq_first",
             _pooled(mha(add_bias_kv=True, add_zero_attn=True, causal=True), seq_first=True),
             x(4, 4), 4, ("MultiheadAttention", "attn_mask", "add_bias_kv"),
             limits=LIMIT_FORWARD_AD),
        Case("mha_kdim_vdim", _pair(lambda: Attention(MHA(4, 2, kdim=3, vdim=3,
                                                         batch_first=True)), seq_first=False),
             keywords(x=x(4, 4), y=x(3, 3)), 4, ("MultiheadAttention", "kdim", "vdim"),
             limits=LIMIT_FORWARD_AD),
    ]


def _transformers() -> list[Case]:
    two = keywords(x=x(4, 4), y=x(3, 4))
    return [
        Case("encoder_layer_seq_first", _pooled(_encoder_layer, seq_first=True), x(4, 4), 4,
             ("TransformerEncoderLayer",), limits=LIMIT_FORWARD_AD),
        Case("encoder_layer_batch_first_norm_first",
             _pooled(lambda: _encoder_layer(batch_first=True, norm_first=True,
                                            activation="gelu"), seq_first=False),
             x(4, 4), 4, ("TransformerEncoderLayer",), limits=LIMIT_FORWARD_AD),
        Case("decoder_layer_seq_first", _pair(_decoder_layer, seq_first=True), two, 4,
             ("TransformerDecoderLayer",), limits=LIMIT_FORWARD_AD),
        Case("decoder_layer_batch_first", _pair(lambda: _decoder_layer(batch_first=True),
                                               seq_first=False), two, 4,
             ("TransformerDecoderLayer",), limits=LIMIT_FORWARD_AD),
        Case("encoder_padding_mask",
             _masked(lambda: nn.TransformerEncoder(
                 _encoder_layer(batch_first=True), 2, norm=nn.LayerNorm(4),
                 enable_nested_tensor=False), "src_key_padding_mask"),
             keywords(x=x(4, 4), mask=constant(SEQ_MASK)), 4,
             ("TransformerEncoder", "src_key_padding_mask"), limits=LIMIT_FORWARD_AD),
        Case("decoder_stack_seq_first",
             _pair(lambda: nn.TransformerDecoder(_decoder_layer(), 1, norm=nn.LayerNorm(4)),
                  seq_first=True), two, 4, ("TransformerDecoder",), limits=LIMIT_FORWARD_AD),
        Case("transformer_seq2seq_seq_first", lambda: Seq2Seq(VOCAB, 4, batch_first=False),
             keywords(x=tokens(3), y=tokens(4)), VOCAB, ("Transformer", "Embedding"), positions=4,
             limits=LIMIT_FORWARD_AD),
    ]


def _recurrent() -> list[Case]:
    def rnn(kind: type, *, seq_first: bool, **kw: object) -> Callable[[], nn.Module]:
        width = 4 if kw.get("proj_size") is None else int(kw["proj_size"])  # type: ignore[arg-type]
        width *= 2 if kw.get("bidirectional") else 1
        body = seq(lazy(kind, 4, 4, batch_first=not seq_first, **kw), lazy(Output, 0))
        t_axis = 0 if seq_first else 1
        pre = (lazy(Transpose, 0, 1),) if seq_first else ()
        return seq(*pre, body, _TANH, lazy(Mean, t_axis), lazy(nn.Linear, width, 4))

    def cell(kind: type, zero_state: bool) -> Callable[[], nn.Module]:
        return seq(lambda: CellLoop(kind(4, 4), zero_state=zero_state), _HEAD)

    cases = []
    for kind, extra in ((nn.RNN, {"num_layers": 2, "nonlinearity": "relu"}), (nn.GRU, {}),
                        (nn.LSTM, {})):
        name = kind.__name__.lower()
        cases += [
            Case(f"{name}_batch_first", rnn(kind, seq_first=False, **extra), x(4, 4), 4,
                 (kind.__name__,), limits=LIMIT_VMAP),
            Case(f"{name}_seq_first_bidirectional",
                 rnn(kind, seq_first=True, bidirectional=True), x(4, 4), 4, (kind.__name__,),
                 limits=LIMIT_VMAP),
        ]
    return [
        *cases,
        Case("lstm_proj", rnn(nn.LSTM, seq_first=False, proj_size=2), x(4, 4), 4, ("LSTM",),
             limits=LIMIT_VMAP),
        Case("lstm_packed", lambda: Keywords(PackedLSTM(nn.LSTM(4, 4, batch_first=True)),
                                             nn.Linear(4, 4)),
             keywords(x=x(4, 4), lengths=constant(LENGTHS)), 4, ("LSTM", "PackedSequence"),
             limits=LIMIT_BOTH),
        Case("rnn_cell", cell(nn.RNNCell, False), x(4, 4), 4, ("RNNCell",), limits=LIMIT_VMAP),
        Case("gru_cell_zero_state", cell(nn.GRUCell, True), x(4, 4), 4, ("GRUCell",),
             limits=LIMIT_VMAP),
        Case("lstm_cell_zero_state", cell(nn.LSTMCell, True), x(4, 4), 4, ("LSTMCell",),
             limits=LIMIT_VMAP),
        Case("hand_cell_zero_state", seq(lambda: HandCell(4, 4), _HEAD), x(4, 4), 4,
             ("HandCell",)),
        Case("raw_cell_zero_state", seq(lambda: RawCell(4, 4), _HEAD), x(4, 4), 4,
             ("RawCell",)),
    ]


def _parameters() -> list[Case]:
    return [
        Case("adaptive_log_softmax", lambda: AdaptiveLogits(4, 6, [2, 4]), x(4), 6,
             ("AdaptiveLogSoftmaxWithLoss",)),
        Case("shared_linear_twice", lambda: TwiceLinear(4, 4), x(4), 4, ("Linear",)),
        Case("tied_embeddings", lambda: TiedEmbeddings(VOCAB, 4, 4),
             keywords(x=tokens(4), y=tokens(3)), 4, ("Embedding",)),
        Case("tied_lm_head", lambda: TiedLMHead(VOCAB, 4), tokens(4), VOCAB,
             ("Embedding",)),
        Case("frozen_middle", lambda: Frozen(4, 4), x(4), 4, ("Linear",)),
        Case("broadcast_class_token", lambda: Broadcast(3, 4, 4), x(3, 4), 4,
             ("cls_token", "pos_embedding", "gain")),
        Case("functional_parameters", lambda: Functional(4, 5, 4), x(4), 4,
             ("ParameterList", "ParameterDict")),
    ]


SEQUENCE_CASES: list[Case] = [*_attention(), *_transformers(), *_recurrent(),
                               *_parameters()]
