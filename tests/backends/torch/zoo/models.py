"""The zoo as data: every trainable ``torch.nn`` layer in a tiny float64 model (:data:`CASES`).

Layers that exist in batch-first and sequence-first layouts appear in both (the model takes
batch-first inputs, as :class:`backends.torch.provider.TorchProvider` wants them, and
transposes inside); sizes collide on purpose (T == N, d == N, C == N, channels == N); the
options that change what a per-sample gradient is (groups, dilation, stride, string padding,
padding modes, padding_idx, bags, masks, packed sequences, initial states) each have a case.
:mod:`.coverage` checks that every trainable class of ``torch.nn`` is in a case or excluded
with a reason.

``Case.refuse`` marks semantics without a per-sample meaning (batch statistics, frequencies
over the batch, weights renormalised by the forward pass itself): every route must refuse
them by name. A model in train mode otherwise (dropout) is evaluated in eval mode by the
reference, the documented policy of the optimisers and the provider.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .blocks import (
    BagWithOffsets,
    Flat,
    Keywords,
    Mean,
    MergeBatch,
    SeqLogits,
    SplitBatch,
    Transpose,
    TwoInputs,
    WeightedBag,
)
from .case import (
    LENGTHS,
    LIMIT_BOTH,
    LIMIT_FORWARD_AD,
    LIMIT_VMAP,
    VOCAB,
    Case,
    constant,
    keywords,
    lazy,
    long_rows,
    running_stats,
    seq,
    tokens,
    x,
)
from .sequence_models import SEQUENCE_CASES


# ---- the cases ------------------------------------------------------------------------------
def _linear() -> list[Case]:
    tanh, linear = lazy(nn.Tanh), ("Linear",)

    def tokens_first(t_axis: int, out: int) -> tuple[Callable[[], nn.Module], ...]:
        return (lazy(nn.Linear, 4, 4), tanh, lazy(Mean, t_axis), lazy(nn.Linear, 4, out))

    def weight_norm() -> nn.Module:
        return nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))

    return [
        Case("linear", seq(lazy(nn.Linear, 4, 5), tanh, lazy(nn.Linear, 5, 4)), x(4), 4, linear),
        Case("linear_tokens", seq(*tokens_first(1, 3)), x(4, 4), 3, linear),
        Case("linear_seq_first", seq(lazy(Transpose, 0, 1), *tokens_first(0, 3)), x(4, 4), 3,
             linear),
        Case("linear_seq_first_t3", seq(lazy(Transpose, 0, 1), *tokens_first(0, 3)), x(3, 4), 3,
             linear),
        Case("linear_merged_batch", seq(lazy(MergeBatch), lazy(nn.Linear, 4, 4), tanh,
                                        lazy(SplitBatch, 3), lazy(nn.Linear, 12, 4)),
             x(3, 4), 4, linear),
        Case("linear_tagger_seq_first", seq(lazy(Transpose, 0, 1), lazy(nn.Linear, 4, 4), tanh,
                                            lazy(nn.Linear, 4, 3), lazy(SeqLogits)),
             x(4, 4), 3, linear, positions=4),
        Case("bilinear", lambda: Keywords(TwoInputs(nn.Bilinear(3, 4, 4)), nn.Tanh(),
                                          nn.Linear(4, 4)),
             keywords(x=x(3), y=x(4)), 4, ("Bilinear",)),
        Case("linear_weight_norm", seq(weight_norm, tanh, lazy(nn.Linear, 4, 4)), x(4), 4,
             ("weight_norm", "parametrizations"), limits=LIMIT_FORWARD_AD),
    ]


def _conv() -> list[Case]:
    tanh, flat = lazy(nn.Tanh), lazy(Flat)
    return [
        Case("conv1d_stride", seq(lazy(nn.Conv1d, 4, 4, 3, stride=2, padding=1), tanh, flat,
                                  lazy(nn.Linear, 16, 3)), x(4, 7), 3, ("Conv1d",)),
        Case("conv1d_groups_same_reflect",
             seq(lazy(nn.Conv1d, 4, 4, 3, groups=2, dilation=2, padding="same",
                   padding_mode="reflect"), tanh, flat, lazy(nn.Linear, 24, 3)),
             x(4, 6), 3, ("Conv1d",)),
        Case("conv1d_merged_batch", seq(lazy(MergeBatch), lazy(nn.Conv1d, 2, 4, 2), tanh,
                                        lazy(SplitBatch, 3), lazy(nn.Linear, 48, 3)),
             x(3, 2, 5), 3, ("Conv1d",)),
        Case("conv2d", seq(lazy(nn.Conv2d, 2, 4, 3, stride=2, padding=1), tanh, flat,
                           lazy(nn.Linear, 16, 3)), x(2, 4, 4), 3, ("Conv2d",)),
        Case("conv2d_circular", seq(lazy(nn.Conv2d, 2, 4, 3, stride=2, padding=1,
                                      padding_mode="circular"), tanh, flat, lazy(nn.Linear, 36, 3)),
             x(2, 5, 5), 3, ("Conv2d",)),
        Case("conv2d_depthwise_dilation_valid",
             seq(lazy(nn.Conv2d, 4, 4, 2, groups=4, dilation=2, padding="valid"), tanh, flat,
                 lazy(nn.Linear, 36, 3)), x(4, 5, 5), 3, ("Conv2d",)),
        Case("conv2d_same_replicate",
             seq(lazy(nn.Conv2d, 2, 4, 3, padding="same", padding_mode="replicate", bias=False),
                 tanh, flat, lazy(nn.Linear, 64, 3)), x(2, 4, 4), 3, ("Conv2d",)),
        Case("conv3d", seq(lazy(nn.Conv3d, 2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
                           tanh, flat, lazy(nn.Linear, 32, 3)), x(2, 3, 4, 4), 3, ("Conv3d",)),
        Case("conv_transpose1d",
             seq(lazy(nn.ConvTranspose1d, 4, 2, 3, stride=2, output_padding=1, groups=2), tanh,
                 flat, lazy(nn.Linear, 16, 3)), x(4, 3), 3, ("ConvTranspose1d",)),
        Case("conv_transpose2d",
             seq(lazy(nn.ConvTranspose2d, 2, 4, 2, stride=2, padding=1, dilation=2), tanh, flat,
                 lazy(nn.Linear, 100, 3)), x(2, 3, 3), 3, ("ConvTranspose2d",)),
        Case("conv_transpose3d", seq(lazy(nn.ConvTranspose3d, 2, 2, 2), tanh, flat,
                                     lazy(nn.Linear, 54, 3)),
             x(2, 2, 2, 2), 3, ("ConvTranspose3d",)),
    ]


def _embedding() -> list[Case]:
    tanh, head = lazy(nn.Tanh), lazy(nn.Linear, 4, 4)

    def emb(**kw: Any) -> Callable[[], nn.Module]:
        return seq(lazy(nn.Embedding, VOCAB, 4, **kw), tanh, lazy(Mean, 1), head)

    def bag(**kw: Any) -> Callable[[], nn.Module]:
        return seq(lazy(nn.EmbeddingBag, VOCAB, 4, **kw), tanh, head)

    return [
        Case("embedding", emb(), tokens(4), 4, ("Embedding",)),
        Case("embedding_seq_first", seq(lazy(Transpose, 0, 1), lazy(nn.Embedding, VOCAB, 4), tanh,
                                        lazy(Mean, 0), head), tokens(4), 4, ("Embedding",)),
        Case("embedding_padding_idx", emb(padding_idx=0), tokens(4, padded=True), 4,
             ("Embedding",)),
        Case("embedding_scale_grad_by_freq", emb(scale_grad_by_freq=True), tokens(4), 4,
             ("Embedding", "scale_grad_by_freq"),
             refuse="the gradient of a token's row is divided by its count over the whole "
                    "batch, so it is not a sum of per-sample gradients"),
        Case("embedding_max_norm", emb(max_norm=1.0), tokens(4), 4, ("Embedding", "max_norm"),
             refuse="the forward pass renormalises the weight rows in place, so the "
                    "parameters change and the rows depend on which samples came first",
             prepare=long_rows, limits=LIMIT_VMAP),
        Case("embedding_sparse", emb(sparse=True), tokens(4), 4, ("Embedding", "sparse"),
             limits=LIMIT_VMAP),
        Case("embedding_bag_offsets",
             lambda: Keywords(BagWithOffsets(nn.EmbeddingBag(VOCAB, 4, mode="sum")), nn.Tanh(),
                              nn.Linear(4, 4)),
             keywords(tokens=tokens(5), lengths=constant(LENGTHS)), 4, ("EmbeddingBag",),
             limits=LIMIT_BOTH),
        Case("embedding_bag_mean_padding", bag(mode="mean", padding_idx=0),
             tokens(4, padded=True), 4, ("EmbeddingBag",), limits=LIMIT_FORWARD_AD),
        Case("embedding_bag_max", bag(mode="max"), tokens(4), 4, ("EmbeddingBag",),
             limits=LIMIT_FORWARD_AD),
        Case("embedding_bag_weights",
             lambda: Keywords(WeightedBag(nn.EmbeddingBag(VOCAB, 4, mode="sum")), nn.Tanh(),
                              nn.Linear(4, 4)),
             keywords(tokens=tokens(4), weights=x(4)), 4, ("EmbeddingBag", "per_sample_weights"),
             limits=LIMIT_FORWARD_AD),
    ]


def _norms() -> list[Case]:
    tanh, flat = lazy(nn.Tanh), lazy(Flat)

    def tokens_through(*norm: Callable[[], nn.Module], seq_first: bool = False
                       ) -> Callable[[], nn.Module]:
        if seq_first:
            return seq(lazy(Transpose, 0, 1), lazy(nn.Linear, 4, 4), *norm, tanh, lazy(Mean, 0),
                       lazy(nn.Linear, 4, 4))
        return seq(lazy(nn.Linear, 4, 4), *norm, tanh, lazy(Mean, 1), lazy(nn.Linear, 4, 4))

    return [
        Case("layer_norm", tokens_through(lazy(nn.LayerNorm, 4)), x(4, 4), 4, ("LayerNorm",)),
        Case("layer_norm_seq_first", tokens_through(lazy(nn.LayerNorm, 4), seq_first=True),
             x(4, 4), 4, ("LayerNorm",)),
        Case("layer_norm_2d_no_bias", seq(lazy(nn.LayerNorm, (4, 4), bias=False), tanh, flat,
                                          lazy(nn.Linear, 16, 3)), x(4, 4), 3, ("LayerNorm",)),
        Case("layer_norm_no_affine",
             tokens_through(lazy(nn.LayerNorm, 4, elementwise_affine=False)), x(4, 4), 4,
             ("LayerNorm",)),
        Case("rms_norm", tokens_through(lazy(nn.RMSNorm, 4)), x(4, 4), 4, ("RMSNorm",)),
        Case("rms_norm_seq_first", tokens_through(lazy(nn.RMSNorm, 4), seq_first=True), x(4, 4), 4,
             ("RMSNorm",)),
        Case("group_norm", seq(lazy(nn.GroupNorm, 2, 4), tanh, flat, lazy(nn.Linear, 20, 3)),
             x(4, 5), 3, ("GroupNorm",)),
        Case("group_norm_no_affine", seq(lazy(nn.Conv1d, 4, 4, 1), lazy(nn.GroupNorm, 2, 4,
                                                                    affine=False),
                                         tanh, flat, lazy(nn.Linear, 20, 3)),
             x(4, 5), 3, ("GroupNorm",)),
        Case("instance_norm1d", seq(lazy(nn.InstanceNorm1d, 4, affine=True), tanh, flat,
                                    lazy(nn.Linear, 20, 3)), x(4, 5), 3, ("InstanceNorm1d",)),
        Case("instance_norm2d", seq(lazy(nn.InstanceNorm2d, 2, affine=True), tanh, flat,
                                    lazy(nn.Linear, 18, 3)), x(2, 3, 3), 3, ("InstanceNorm2d",)),
        Case("instance_norm3d", seq(lazy(nn.InstanceNorm3d, 2, affine=True), tanh, flat,
                                    lazy(nn.Linear, 36, 3)), x(2, 2, 3, 3), 3, ("InstanceNorm3d",)),
        Case("instance_norm_running_stats",
             seq(lazy(nn.InstanceNorm1d, 4, affine=True, track_running_stats=True), tanh, flat,
                 lazy(nn.Linear, 20, 3)), x(4, 5), 3, ("InstanceNorm1d",), prepare=running_stats),
    ]


def _batch_norms() -> list[Case]:
    """BatchNorm in eval mode (running statistics moved away from (0, 1)) and in train mode
    (no per-sample meaning); also PReLU and train-mode Dropout (eval policy)."""
    tanh, flat = lazy(nn.Tanh), lazy(Flat)
    bn_train = ("batch statistics couple the samples: a sample's output depends on the others "
                "in the batch")
    return [
        Case("batch_norm1d_eval", seq(lazy(nn.Linear, 4, 4), lazy(nn.BatchNorm1d, 4), tanh,
                                      lazy(nn.Linear, 4, 4)), x(4), 4, ("BatchNorm1d",),
             prepare=running_stats),
        Case("batch_norm2d_eval", seq(lazy(nn.BatchNorm2d, 2), tanh, flat, lazy(nn.Linear, 18, 3)),
             x(2, 3, 3), 3, ("BatchNorm2d",), prepare=running_stats),
        Case("batch_norm3d_eval", seq(lazy(nn.BatchNorm3d, 2), tanh, flat, lazy(nn.Linear, 16, 3)),
             x(2, 2, 2, 2), 3, ("BatchNorm3d",), prepare=running_stats),
        Case("sync_batch_norm_eval", seq(lazy(nn.SyncBatchNorm, 2), tanh, flat,
                                         lazy(nn.Linear, 18, 3)),
             x(2, 3, 3), 3, ("SyncBatchNorm",), prepare=running_stats),
        Case("batch_norm1d_train", seq(lazy(nn.Linear, 4, 4), lazy(nn.BatchNorm1d, 4), tanh,
                                       lazy(nn.Linear, 4, 4)), x(4), 4, ("BatchNorm1d",),
             training=True, refuse=bn_train, mode="train"),
        Case("batch_norm2d_train", seq(lazy(nn.BatchNorm2d, 2), tanh, flat, lazy(nn.Linear, 18, 3)),
             x(2, 3, 3), 3, ("BatchNorm2d",), training=True, refuse=bn_train, mode="train"),
        Case("prelu", seq(lazy(nn.Linear, 4, 4), lazy(nn.PReLU), lazy(nn.Linear, 4, 4)), x(4), 4,
             ("PReLU",)),
        Case("prelu_channels", seq(lazy(nn.PReLU, 4, init=0.1), flat, lazy(nn.Linear, 20, 3)),
             x(4, 5), 3, ("PReLU",)),
        Case("dropout_train", seq(lazy(nn.Linear, 4, 8), lazy(nn.Dropout, 0.5), tanh,
                                  lazy(nn.Linear, 8, 4)), x(4), 4, ("Dropout",), training=True),
    ]


#: every case of the zoo, by name
CASES: dict[str, Case] = {
    case.name: case
    for case in (*_linear(), *_conv(), *_embedding(), *_norms(), *_batch_norms(), *SEQUENCE_CASES)
}
