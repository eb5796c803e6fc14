"""The layer registry's test cases as data: every kind and option, in every layout its math allows.

N = 3 samples throughout, with deliberate coincidences: sequence length, width or channels
equal to N, so that a route that guessed the batch axis from a shape would pick the wrong
one. Layouts: batch first (BatchAxis(0)), sequence first (BatchAxis(1)), the samples merged
with the positions in front ((T N, d): outer) or behind ((N T, d): inner).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backends.torch.axes import BATCH_FIRST, BatchAxis

from .harness import Case

N = 3
SEQ = BatchAxis(1)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def single(x: Any, **kwargs: Any) -> Any:
    """batch(): one positional tensor argument."""
    return lambda: ((x(),), kwargs)


class Twice(nn.Module):
    """One Linear applied twice: a weight used twice per forward (concatenated along T)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: Any) -> Any:
        return self.lin(torch.tanh(self.lin(x)))


class TiedLinears(nn.Module):
    """Two Linears sharing one weight, biases of their own (one block for the weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight

    def forward(self, x: Any) -> Any:
        return self.b(torch.tanh(self.a(x)))


class TiedEmbeddings(nn.Module):
    """Two Embeddings sharing one weight (the K-FAC capture's KeyError: 'b.weight' today)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Embedding(7, 3, padding_idx=0)
        self.b = nn.Embedding(7, 3)
        self.b.weight = self.a.weight

    def forward(self, ids: Any) -> Any:
        return torch.tanh(self.a(ids)) * self.b(ids.flip(-1))


class TiedHead(nn.Module):
    """An Embedding tied to the output Linear: uses of two forms, materialised and summed."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Any) -> Any:
        return self.head(torch.tanh(self.emb(ids)))


def _lora() -> nn.Module:
    from peft import LoraConfig, get_peft_model

    base = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: no gradient would reach A
            nn.init.normal_(p)
    return model


def _have_peft() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


LINEAR = [
    Case("linear_batch_first_width_n", lambda: nn.Linear(N, 4), single(lambda: randn(N, N))),
    Case("linear_tokens_t_eq_n", lambda: nn.Linear(5, 4), single(lambda: randn(N, N, 5))),
    Case("linear_sequence_first_t_eq_n_eq_d", lambda: nn.Linear(N, 2),
         single(lambda: randn(N, N, N)), axes=(SEQ,)),
    Case("linear_merged_outer", lambda: nn.Linear(4, 2),
         single(lambda: randn(2 * N, 4)), axes=(BatchAxis(0, outer=2),)),
    Case("linear_merged_inner", lambda: nn.Linear(4, 2),
         single(lambda: randn(N * 2, 4)), axes=(BatchAxis(0, inner=2),)),
    Case("linear_many_leading_axes", lambda: nn.Linear(4, 2),
         single(lambda: randn(2, N, 2, 4)), axes=(SEQ,)),
    Case("linear_no_bias", lambda: nn.Linear(4, 3, bias=False), single(lambda: randn(N, 2, 4))),
    Case("linear_subclass_keeping_forward",
         lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(4, 3),
         single(lambda: randn(N, 4))),
    Case("linear_used_twice", Twice, single(lambda: randn(N, 2, 3))),
    Case("linear_tied_weight", TiedLinears, single(lambda: randn(2, N, 4)), axes=(SEQ,)),
    *([Case("peft_lora", _lora, single(lambda: randn(N, 4)))] if _have_peft() else []),
]


def _conv(cls: type, *args: Any, **kwargs: Any) -> Any:
    return lambda: cls(*args, **kwargs)


CONVOLUTION = [
    Case("conv1d_plain_channels_n", _conv(nn.Conv1d, 2, N, 3), single(lambda: randn(N, 2, 7))),
    Case("conv1d_stride_pad_dilation_groups_reflect",
         _conv(nn.Conv1d, 4, 2, 3, stride=2, padding=2, dilation=2, groups=2,
               padding_mode="reflect"), single(lambda: randn(N, 4, 9))),
    Case("conv1d_same_even_kernel_replicate",
         _conv(nn.Conv1d, N, 2, 4, padding="same", padding_mode="replicate"),
         single(lambda: randn(N, N, 6))),
    Case("conv1d_same_zeros_dilated", _conv(nn.Conv1d, 2, 2, 3, padding="same", dilation=2),
         single(lambda: randn(N, 2, 7))),
    Case("conv1d_valid_circular_merged_inner",
         _conv(nn.Conv1d, 2, 4, 2, padding="valid", padding_mode="circular", bias=False),
         single(lambda: randn(N * 2, 2, 5)), axes=(BatchAxis(0, inner=2),)),
    Case("conv2d_everything_groups_3",
         _conv(nn.Conv2d, N, 6, (2, 3), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
               groups=3), single(lambda: randn(N, N, 5, 6))),
    Case("conv2d_same_reflect", _conv(nn.Conv2d, 2, 3, 3, padding="same",
                                      padding_mode="reflect"), single(lambda: randn(N, 2, 4, 5))),
    Case("conv2d_circular_tuple_merged_outer",
         _conv(nn.Conv2d, 2, 2, (3, 2), padding=(1, 1), padding_mode="circular"),
         single(lambda: randn(2 * N, 2, 4, 4)), axes=(BatchAxis(0, outer=2),)),
    Case("conv2d_depthwise", _conv(nn.Conv2d, 4, 4, 2, groups=4),
         single(lambda: randn(N, 4, 3, 3))),
    Case("conv3d_groups_replicate",
         _conv(nn.Conv3d, 2, 4, 2, stride=(1, 2, 1), padding=1, groups=2,
               padding_mode="replicate"), single(lambda: randn(N, 2, 3, 4, 3))),
    Case("conv3d_same_dilated", _conv(nn.Conv3d, 1, 2, 3, padding="same", dilation=(1, 2, 1)),
         single(lambda: randn(N, 1, 3, 5, 3))),
]

TRANSPOSED = [
    Case("conv_transpose1d_stride_padding_output_padding",
         _conv(nn.ConvTranspose1d, 2, N, 3, stride=2, padding=1, output_padding=1),
         single(lambda: randn(N, 2, 4))),
    Case("conv_transpose1d_groups_dilation",
         _conv(nn.ConvTranspose1d, 4, 2, 3, stride=3, dilation=2, groups=2, padding=2),
         single(lambda: randn(N, 4, 3))),
    Case("conv_transpose1d_output_size", _conv(nn.ConvTranspose1d, 2, 2, 3, stride=3),
         lambda: ((randn(N, 2, 3),), {"output_size": [11]})),
    Case("conv_transpose2d_everything",
         _conv(nn.ConvTranspose2d, N, 2, (2, 3), stride=(2, 1), padding=(1, 0),
               output_padding=(1, 0), dilation=(1, 2)), single(lambda: randn(N, N, 3, 3))),
    Case("conv_transpose2d_groups_merged_inner",
         _conv(nn.ConvTranspose2d, 2, 4, 2, stride=2, groups=2, bias=False),
         single(lambda: randn(N * 2, 2, 2, 3)), axes=(BatchAxis(0, inner=2),)),
    Case("conv_transpose3d",
         _conv(nn.ConvTranspose3d, 2, 2, 2, stride=(2, 1, 1), padding=(0, 1, 0)),
         single(lambda: randn(N, 2, 2, 3, 2))),
]


def _ids(*shape: int, vocab: int = 7, pad: int | None = 0) -> Any:
    def make() -> torch.Tensor:
        ids = torch.randint(1 if pad == 0 else 0, vocab, shape)
        if pad is not None:
            ids.view(-1)[::4] = pad
        return ids

    return make


EMBEDDING = [
    Case("embedding_padding_idx", _conv(nn.Embedding, 7, 3, padding_idx=0),
         single(_ids(N, 4))),
    Case("embedding_sequence_first_t_eq_n_eq_d", _conv(nn.Embedding, 7, N),
         single(_ids(N, N, pad=None)), axes=(SEQ,)),
    Case("embedding_merged_inner_negative_padding_idx", _conv(nn.Embedding, 7, 2, padding_idx=-1),
         single(_ids(N * 4, pad=6)), axes=(BatchAxis(0, inner=4),)),
    Case("embedding_sparse", _conv(nn.Embedding, 6, 2, sparse=True), single(_ids(N, 2, vocab=6))),
    Case("embedding_tied", TiedEmbeddings, single(_ids(N, 4))),
    Case("embedding_tied_to_linear_head", TiedHead, single(_ids(N, 2, vocab=5, pad=None))),
]


def _bag(mode: str, **kwargs: Any) -> Any:
    return lambda: nn.EmbeddingBag(8, 3, mode=mode, **kwargs)


#: 1-D input with offsets: bags of lengths 3, 0, 4 (one bag per sample, an empty one)
_FLAT = ((0, 3), (3, 3), (3, 7))


def _flat_batch(weights: bool = False, last: bool = False) -> Any:
    def make() -> tuple[tuple, dict]:
        ids = torch.tensor([1, 4, 4, 2, 0, 7, 5])
        offsets = torch.tensor([0, 3, 3] + ([7] if last else []))
        kw = {"per_sample_weights": randn(7)} if weights else {}
        return (ids, offsets), kw

    return make


def _flat_sample(last: bool = False) -> Any:
    def sample(i: int, args: tuple, kw: dict) -> tuple[tuple, dict]:
        ids, lo, hi = args[0], *_FLAT[i]
        offsets = torch.tensor([0] + ([hi - lo] if last else []))
        return (ids[lo:hi], offsets), {k: v[lo:hi] for k, v in kw.items()}

    return sample


EMBEDDING_BAG = [
    Case("bag_sum_2d_length_n", _bag("sum"), single(_ids(N, N, vocab=8, pad=None))),
    Case("bag_mean_2d_padding_idx", _bag("mean", padding_idx=0), single(_ids(N, 4, vocab=8))),
    Case("bag_sum_per_sample_weights", _bag("sum"),
         lambda: ((_ids(N, 3, vocab=8, pad=None)(),), {"per_sample_weights": randn(N, 3)}),
         kwaxes={"per_sample_weights": BATCH_FIRST}),
    Case("bag_max_2d", _bag("max"), single(_ids(N, 4, vocab=8, pad=None))),
    Case("bag_mean_two_bags_per_sample", _bag("mean"), single(_ids(N * 2, 3, vocab=8, pad=None)),
         axes=(BatchAxis(0, inner=2),)),
    Case("bag_sum_1d_offsets_ragged", _bag("sum"), _flat_batch(), sample=_flat_sample()),
    Case("bag_mean_1d_include_last_offset", _bag("mean", include_last_offset=True),
         _flat_batch(last=True), sample=_flat_sample(last=True)),
    Case("bag_sum_1d_weights_padding_idx", _bag("sum", padding_idx=4), _flat_batch(weights=True),
         sample=_flat_sample()),
    Case("bag_max_1d_offsets", _bag("max"), _flat_batch(), sample=_flat_sample()),
]


def _norm(cls: type, *args: Any, stats: bool = False, **kwargs: Any) -> Any:
    def build() -> nn.Module:
        m = cls(*args, **kwargs)
        for p in m.parameters():  # away from the initial ones and zeros
            nn.init.normal_(p)
        if stats:
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
        return m

    return build


NORMS = [
    Case("layer_norm_tokens", _norm(nn.LayerNorm, 4), single(lambda: randn(N, 2, 4))),
    Case("layer_norm_sequence_first_d_eq_n", _norm(nn.LayerNorm, N),
         single(lambda: randn(N, N, N)), axes=(SEQ,)),
    Case("layer_norm_two_axes_no_bias", _norm(nn.LayerNorm, (N, 2), bias=False),
         single(lambda: randn(N, N, 2))),
    Case("rms_norm_merged_outer", _norm(nn.RMSNorm, 4), single(lambda: randn(2 * N, 4)),
         axes=(BatchAxis(0, outer=2),)),
    Case("rms_norm_eps", _norm(nn.RMSNorm, [2, 2], eps=1e-3), single(lambda: randn(N, 2, 2))),
    Case("group_norm_1d", _norm(nn.GroupNorm, 2, 4), single(lambda: randn(N, 4, 5))),
    Case("group_norm_2d_merged_inner", _norm(nn.GroupNorm, N, N), single(
        lambda: randn(N * 2, N, 2, 2)), axes=(BatchAxis(0, inner=2),)),
    Case("instance_norm_1d_affine", _norm(nn.InstanceNorm1d, N, affine=True),
         single(lambda: randn(N, N, 4))),
    Case("instance_norm_2d_running_stats_train",
         _norm(nn.InstanceNorm2d, 2, affine=True, track_running_stats=True),
         single(lambda: randn(N, 2, 3, 3)), train=True),
    Case("instance_norm_3d_running_stats_eval",
         _norm(nn.InstanceNorm3d, 2, affine=True, track_running_stats=True, stats=True),
         single(lambda: randn(N, 2, 2, 2, 3))),
    Case("batch_norm_1d_eval", _norm(nn.BatchNorm1d, 4, stats=True), single(lambda: randn(N, 4))),
    Case("batch_norm_2d_eval", _norm(nn.BatchNorm2d, N, stats=True),
         single(lambda: randn(N, N, 2, 3))),
]


def _attention(**kwargs: Any) -> Any:
    def build() -> nn.Module:
        m = nn.MultiheadAttention(**{"embed_dim": 4, "num_heads": 2, **kwargs})
        for p in m.parameters():  # torch starts the in- and out-projection biases at zero
            nn.init.normal_(p, std=0.5)
        return m

    return build


def _self(shape: tuple[int, ...], **kwargs: Any) -> Any:
    def make() -> tuple[tuple, dict]:
        x = randn(*shape)
        return (x, x, x), {k: v() if callable(v) else v for k, v in kwargs.items()}

    return make


def _outs(y: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t for t in y if t is not None)


def _mha(name: str, build: Any, batch: Any, first: bool, weights: bool = False,
         **extra: Any) -> Case:
    ax = BATCH_FIRST if first else SEQ
    return Case(name, build, batch, axes=(ax,) * 3, outputs=_outs,
                out_axes=(ax, BATCH_FIRST) if weights else (ax,), **extra)


def _cross(q: tuple[int, ...], kv: tuple[int, ...], vdim: int | None = None,
           **kwargs: Any) -> Any:
    def make() -> tuple[tuple, dict]:
        key = randn(*kv)
        value = key if vdim is None else randn(*kv[:-1], vdim)
        return (randn(*q), key, value), {k: v() if callable(v) else v for k, v in kwargs.items()}

    return make


def _padding_mask(s: int) -> Any:
    def make() -> torch.Tensor:
        mask = torch.zeros(N, s, dtype=torch.bool)
        mask[0, -1] = mask[2, 0] = True
        return mask

    return make


ATTENTION = [
    _mha("attention_self_batch_first", _attention(batch_first=True),
         _self((N, N, 4), need_weights=False), True),
    _mha("attention_self_sequence_first_t_eq_n_weights_per_head", _attention(),
         _self((N, N, 4), average_attn_weights=False), False, weights=True),
    _mha("attention_cross_key_padding_mask", _attention(batch_first=True),
         _cross((N, 2, 4), (N, N, 4), key_padding_mask=_padding_mask(N)), True,
         kwaxes={"key_padding_mask": BATCH_FIRST}, weights=True),
    _mha("attention_kdim_vdim_float_mask", _attention(kdim=3, vdim=5),
         _cross((2, N, 4), (N, N, 3), vdim=5, attn_mask=lambda: randn(2, N)), False,
         weights=True),
    _mha("attention_bias_kv_zero_attn_masks", _attention(add_bias_kv=True, add_zero_attn=True,
                                                         batch_first=True),
         _cross((N, 2, 4), (N, 3, 4), vdim=4, key_padding_mask=_padding_mask(3),
                attn_mask=lambda: torch.rand(N * 2, 2, 3) < 0.3, need_weights=False), True,
         kwaxes={"key_padding_mask": BATCH_FIRST, "attn_mask": BatchAxis(0, inner=2)}),
    _mha("attention_causal_no_bias", _attention(bias=False),
         _self((N, N, 4), attn_mask=lambda: nn.Transformer.generate_square_subsequent_mask(
             N, dtype=torch.float64), is_causal=True, need_weights=False), False),
    Case("attention_two_sequences_per_sample", _attention(batch_first=True),
         _self((N * 2, 2, 4), need_weights=False), axes=(BatchAxis(0, inner=2),) * 3,
         outputs=_outs),
]


CASES = [*LINEAR, *CONVOLUTION, *TRANSPOSED, *EMBEDDING, *EMBEDDING_BAG, *NORMS, *ATTENTION]
