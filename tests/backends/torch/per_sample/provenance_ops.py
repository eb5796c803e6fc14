"""One operation at a time, as data: inputs with their batch axes, the operation, and the
state of its result, written from the operation's definition (N = 3; coincidences: axes of
length N that are not the samples' axis).

Constants are made inside the operation (``const``), from a generator seeded there: sample
free, and the same in every probe run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.torch.axes import BatchAxis
from backends.torch.per_sample.provenance import SAMPLE_FREE, Provenance

from .provenance_probe import Built, Input

N = 3
B0, B1, B2 = BatchAxis(0), BatchAxis(1), BatchAxis(2)
DT = torch.float64


def const(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=DT)


def ids(*shape: int, high: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(8))


@dataclass(frozen=True)
class Op:
    name: str
    inputs: tuple[tuple[tuple[int, ...], BatchAxis] | Input, ...]
    fn: Callable[..., torch.Tensor]
    expected: Provenance | str
    modules: tuple[torch.nn.Module, ...] = ()  # their parameters are declared sample free

    def build(self) -> Built:
        torch.manual_seed(3)
        specs = {f"x{j}": s if isinstance(s, Input) else Input(torch.randn(*s[0], dtype=DT), s[1])
                 for j, s in enumerate(self.inputs)}
        free = [p for m in self.modules for p in m.parameters()]
        return Built(lambda v: {"logits": self.fn(*v.values())}, specs, free, N)


S = ((2, N, 4), B1)  # sequence first, T = 2, d = 4
Q = ((N, N), B0)  # square: both axes of length N
BATCH = ((N, 2, 4), B0)
IMAGE = ((N, N, 4, 4), B0)  # channels == N
TOKENS = Input(ids(N, 5, high=6), B0, 6)

OPS = [
    # elementwise and broadcasting
    Op("add_free_row_of_length_n", (Q,), lambda x: x + torch.arange(N), B0),
    Op("mul_sequence_first", (S,), lambda x: x * const(4), B1),
    Op("two_operands_same_axis", (S, S), lambda x, y: torch.where(x > 0, x, y * 2), B1),
    Op("two_operands_other_axes", (Q, ((N, N), B1)), lambda x, y: x + y, "different axes"),
    Op("clamp_with_tensor_bounds", (S,), lambda x: x.clamp(min=const(4), max=const(2, 1, 4)), B1),
    Op("masked_fill_free_mask", (S,), lambda x: x.masked_fill(const(4) > 0, 0.0), B1),
    Op("in_place_add", (S,), lambda x: x.clone().add_(const(N, 4)), B1),
    Op("copy_into_free", (S,), lambda x: torch.zeros(2, N, 4, dtype=DT).copy_(x), B1),
    Op("zeros_like_is_free", (S,), lambda x: torch.zeros_like(x), SAMPLE_FREE),
    Op("free_table_of_length_n", (S,), lambda x: torch.arange(N) * 2.0, SAMPLE_FREE),
    # reductions
    Op("sum_time", (S,), lambda x: x.sum(0), B0),
    Op("sum_features_keepdim", (S,), lambda x: x.sum(-1, keepdim=True), B1),
    Op("sum_two_axes", (S,), lambda x: x.sum((0, 2)), B0),
    Op("mean_all", (S,), lambda x: x.mean(), "reduces over the batch"),
    Op("max_over_batch", (S,), lambda x: x.max(1).values, "reduces over the batch"),
    Op("max_over_features", (S,), lambda x: x.max(2).values, B1),
    Op("maximum_of_two", (S,), lambda x: torch.max(x, x.flip(0)), B1),
    Op("std_time", (S,), lambda x: x.std(0), B0),
    Op("logsumexp", (S,), lambda x: x.logsumexp(2), B1),
    Op("norm_dim", (S,), lambda x: x.norm(dim=2), B1),
    Op("amax_two_axes", (S,), lambda x: x.amax((0, 2)), B0),
    Op("var_over_batch", (S,), lambda x: x.var(1), "reduces over the batch"),
    Op("kthvalue_default_last", (S,), lambda x: x.kthvalue(2).values, B1),
    # scans
    Op("cumsum_features", (S,), lambda x: x.cumsum(2), B1),
    Op("cumsum_batch", (S,), lambda x: x.cumsum(1), "mixes the entries along"),
    Op("softmax_time", (S,), lambda x: x.softmax(0), B1),
    Op("sort_features", (S,), lambda x: x.sort(2).values, B1),
    Op("topk_batch", (S,), lambda x: x.topk(2, dim=1).values, "mixes the entries along"),
    # views and reshapes
    Op("view_merge_in_front", (S,), lambda x: x.view(2 * N, 4), BatchAxis(0, outer=2)),
    Op("reshape_merge_behind", (S,), lambda x: x.reshape(2, N * 4), BatchAxis(1, inner=4)),
    Op("flatten_all", (S,), lambda x: x.flatten(), BatchAxis(0, outer=2, inner=4)),
    Op("unflatten_features", (S,), lambda x: x.unflatten(2, (2, 2)), B1),
    Op("unsqueeze_front", (S,), lambda x: x.unsqueeze(0), B2),
    Op("reshape_cutting_samples", (S,), lambda x: x.reshape(N, 8), "splits"),
    Op("merged_back_to_its_axis", (S,), lambda x: x.reshape(2 * N, 4).reshape(2, N, 4), B1),
    Op("view_dtype", (S,), lambda x: x.view(torch.int64), B1),
    # axis permutations
    Op("transpose", (S,), lambda x: x.transpose(0, 1), B0),
    Op("permute", (S,), lambda x: x.permute(2, 0, 1), B2),
    Op("movedim_pairs", (S,), lambda x: x.movedim((0, 1), (2, 0)), B0),
    Op("matrix_transpose", (S,), lambda x: x.mT, B2),
    # expand, repeat, flip
    Op("expand_front", (((N, 1, 4), B0),), lambda x: x.expand(2, N, 3, 4), B1),
    Op("repeat_other_axis", (S,), lambda x: x.repeat(2, 1, 1), B1),
    Op("repeat_batch_axis", (S,), lambda x: x.repeat(1, 2, 1), BatchAxis(1, outer=2)),
    Op("tile_new_axis", (S,), lambda x: x.tile(2, 1, 1, 1), B2),
    Op("repeat_interleave_batch", (S,), lambda x: x.repeat_interleave(2, dim=1),
       BatchAxis(1, inner=2)),
    Op("flip_batch", (S,), lambda x: x.flip(1), "moves entries along"),
    Op("roll_features", (S,), lambda x: x.roll(1, 2), B1),
    Op("rot90_other_axes", (S,), lambda x: x.rot90(1, (0, 2)), B1),
    Op("diagonal_other_axes", (((4, N, 4), B1),), lambda x: x.diagonal(0, 0, 2), B0),
    Op("diagonal_with_batch", (Q,), lambda x: x.diagonal(), "diagonal"),
    Op("tril_square", (Q,), lambda x: x.tril(), B0),
    # indexing
    Op("int_index_time", (S,), lambda x: x[1], B0),
    Op("slice_part_of_batch", (S,), lambda x: x[:, 1:], "whole periods"),
    Op("step_slice_features", (S,), lambda x: x[..., ::2], B1),
    Op("none_in_front", (S,), lambda x: x[None], B2),
    Op("none_and_int", (S,), lambda x: x[:, :, None, 1], B1),
    Op("list_index_time", (S,), lambda x: x[[0, 1, 1]], B1),
    Op("identity_index_on_batch", (S,), lambda x: x[:, torch.arange(N)], B1),
    Op("permuting_index_on_batch", (S,), lambda x: x[:, torch.arange(N).flip(0)],
       "indexes across"),
    Op("advanced_apart_go_first", (S,),
       lambda x: x[torch.tensor([0, 1])[:, None], :, torch.tensor([1, 2])], B2),
    Op("per_sample_positions", (BATCH, Input(ids(N, high=2), B0, 2)),
       lambda x, p: x[torch.arange(N), p], B0),
    Op("table_at_tokens", (TOKENS,), lambda t: const(6, 2)[t], B0),
    Op("bool_mask_free", (S,), lambda x: x[:, :, const(4) > 0], B1),
    Op("index_select_features", (S,), lambda x: x.index_select(2, torch.tensor([3, 0])), B1),
    Op("index_select_batch", (S,), lambda x: x.index_select(1, torch.tensor([0, 2])),
       "picks entries"),
    Op("gather_features", (S,), lambda x: x.gather(2, x.argsort(2)[..., :2]), B1),
    Op("narrow_features", (S,), lambda x: x.narrow(2, 1, 2), B1),
    Op("narrow_batch_part", (S,), lambda x: x.narrow(1, 1, 2), "whole periods"),
    # joining and splitting
    Op("cat_features", (S,), lambda x: torch.cat([x, torch.zeros(2, N, 1, dtype=DT)], 2), B1),
    Op("cat_batch_tiles", (S,), lambda x: torch.cat([x, x], 1), BatchAxis(1, outer=2)),
    Op("cat_batch_free_period", (S,), lambda x: torch.cat([x, const(2, N, 4)], 1),
       BatchAxis(1, outer=2)),
    Op("cat_batch_free_part", (S,), lambda x: torch.cat([x, const(2, 1, 4)], 1),
       "whole periods"),
    Op("stack", (S,), lambda x: torch.stack([x, x], 1), B2),
    Op("split_features", (S,), lambda x: x.split(2, 2)[1], B1),
    Op("chunk_tiles", (S,), lambda x: torch.cat([x, 2 * x], 1).chunk(2, 1)[1], B1),
    Op("unbind_time", (S,), lambda x: x.unbind(0)[1], B0),
    Op("pad_features", (S,), lambda x: F.pad(x, (1, 1)), B1),
    Op("pad_batch", (S,), lambda x: F.pad(x, (0, 0, 1, 0)), "pads"),
    # contractions
    Op("matmul_weight", (S,), lambda x: x @ const(4, 5), B1),
    Op("matmul_gram_over_rows", (S,), lambda x: x @ x.mT, "different axes"),
    Op("matmul_contracting_batch", (S,), lambda x: x.mT @ x, "contracts"),
    Op("matmul_vector", (S,), lambda x: x @ const(4), B1),
    Op("vector_matmul", (((4, N), B1),), lambda x: const(4) @ x, B0),
    Op("matmul_free_left", (((N, 4), B0),), lambda x: const(5, N) @ x, "contracts"),
    Op("bmm_free_batch_of_n", (BATCH,), lambda x: torch.bmm(x, const(N, 4, 3)), B0),
    Op("einsum_project", (S,), lambda x: torch.einsum("bnd,de->bne", x, const(4, 5)), B1),
    Op("einsum_ellipsis", (S,), lambda x: torch.einsum("...d,de->...e", x, const(4, 5)), B1),
    Op("einsum_sum_time", (S,), lambda x: torch.einsum("bnd->nd", x), B0),
    Op("einsum_sum_batch", (S,), lambda x: torch.einsum("bnd->bd", x), "sums over"),
    Op("einsum_pairs_of_samples", (S,), lambda x: torch.einsum("bnd,bmd->bnm", x, x),
       "different axes"),
    Op("einsum_implicit_alphabetical", (S,), lambda x: torch.einsum("bnd,de", x, const(4, 5)),
       B2),  # the implicit result is "ben"
    Op("outer", (((N,), B0),), lambda v: torch.outer(v, const(5)), B0),
    Op("addmm", (((N, 4), B0),), lambda x: torch.addmm(const(5), x, const(4, 5)), B0),
    Op("inner", (((N, 4), B0),), lambda x: torch.inner(x, const(5, 4)), B0),
    # layers
    Op("linear_sequence_first", (S,), lambda x: F.linear(x, const(5, 4), const(5)), B1),
    Op("linear_over_samples", (((4, N), B1),), lambda x: F.linear(x, const(5, N)), "contracts"),
    Op("bilinear_sequence_first", (S, ((2, N, 3), B1)),
       lambda x, y: F.bilinear(x, y, const(5, 4, 3), const(5)), B1),
    Op("bilinear_one_free_input", (S,), lambda x: F.bilinear(x, const(2, N, 3), const(5, 4, 3)),
       B1),
    Op("bilinear_over_samples", (((4, N), B1), ((4, N), B1)),
       lambda x, y: F.bilinear(x, y, const(5, N, N)), "contracts"),
    Op("conv2d", (IMAGE,), lambda x: F.conv2d(x, const(2, N, 3, 3), padding=1), B0),
    Op("conv2d_samples_on_channels", (((2, N, 4, 4), B1),),
       lambda x: F.conv2d(x, const(2, N, 3, 3)), "mixes"),
    Op("conv1d_unbatched", (((N, 5), B0),), lambda x: F.conv1d(x, const(2, N, 3)), "mixes"),
    Op("avg_pool_samples_on_channels", (((2, N, 4, 4), B1),), lambda x: F.avg_pool2d(x, 2), B1),
    Op("max_pool_with_indices", (IMAGE,),
       lambda x: F.max_pool2d(x, 2, return_indices=True)[1], B0),
    Op("interpolate", (IMAGE,), lambda x: F.interpolate(x, scale_factor=2.0), B0),
    Op("unfold_patches", (IMAGE,), lambda x: F.unfold(x, 2), B0),
    Op("unfold_windows", (S,), lambda x: x.unfold(2, 2, 1), B1),
    Op("pixel_shuffle", (((N, 4, 2, 2), B0),), lambda x: F.pixel_shuffle(x, 2), B0),
    Op("layer_norm_sequence_first", (S,), lambda x: F.layer_norm(x, (4,), const(4)), B1),
    Op("layer_norm_over_batch", (S,), lambda x: F.layer_norm(x, (N, 4)), "normalises over"),
    Op("rms_norm", (S,), lambda x: F.rms_norm(x, (4,)), B1),
    Op("group_norm", (IMAGE,), lambda x: F.group_norm(x, 1, const(N)), B0),
    Op("group_norm_samples_on_channels", (((2, N, 4), B1),), lambda x: F.group_norm(x, 1),
       "normalises over"),
    Op("instance_norm", (IMAGE,), lambda x: F.instance_norm(x), B0),
    Op("instance_norm_samples_in_space", (((2, 2, N), BatchAxis(2)),),
       lambda x: F.instance_norm(x), "normalises over"),
    Op("batch_norm_eval_samples_on_channels", (((2, N, 4), B1),),
       lambda x: F.batch_norm(x, torch.zeros(N, dtype=DT), torch.ones(N, dtype=DT)), B1),
    Op("normalize", (S,), lambda x: F.normalize(x, dim=2), B1),
    Op("normalize_over_batch", (S,), lambda x: F.normalize(x, dim=1), "normalises over"),
    Op("embedding", (TOKENS,), lambda t: F.embedding(t, const(6, 2)), B0),
    Op("one_hot", (TOKENS,), lambda t: F.one_hot(t, 6).to(DT), B0),
    Op("sdpa_heads", (((N, 2, 5, 4), B0),), lambda x: F.scaled_dot_product_attention(x, x, x),
       B0),
    Op("sdpa_samples_as_positions", (((2, N, 4), B1),),
       lambda x: F.scaled_dot_product_attention(x, x, x), "attends over"),
    Op("gru_cell", (((N, 4), B0),), lambda x: torch.gru_cell(
        x, const(N, 2), const(6, 4), const(6, 2), const(6), const(6)), B0),
    Op("lstm_cell", (((N, 4), B0),), lambda x: torch.lstm_cell(
        x, (const(N, 2), const(N, 2)), const(8, 4), const(8, 2), const(8), const(8))[1], B0),
    Op("cross_entropy_none", (((N, 5), B0), Input(ids(N, high=5), B0, 5)),
       lambda z, y: F.cross_entropy(z, y, reduction="none"), B0),
    Op("cross_entropy_sequence", (((N, 5, 2), B0), Input(ids(N, 2, high=5), B0, 5)),
       lambda z, y: F.cross_entropy(z, y, reduction="none"), B0),
    Op("cross_entropy_mean", (((N, 5), B0), Input(ids(N, high=5), B0, 5)),
       lambda z, y: F.cross_entropy(z, y), "sums over the batch"),
    Op("mse_none", (S, S), lambda a, b: F.mse_loss(a, b, reduction="none"), B1),
    # operations the rules do not know
    Op("unknown_operation", (((N, 4), B0),), lambda x: torch.cdist(x, x), "do not know"),
]

OPS += [
    Op("quantile_vector_q", (((N, 4), B0),), lambda x: x.quantile(torch.tensor([0.2, 0.8],
                                                                               dtype=DT), 1),
       B1),  # the q axis goes in front
    Op("quantile_scalar_q", (((N, 4), B0),), lambda x: x.quantile(0.5, 1), B0),
    Op("diff_with_sample_free_prepend", (S,), lambda x: x.diff(dim=2, prepend=const(2, N, 1)),
       B1),
    Op("new_tensor_copies_its_data", (S,), lambda x: x.new_tensor(x), B1),
    Op("as_tensor_keeps_the_tensor", (S,), lambda x: torch.as_tensor(x) * 2, B1),
    Op("slice_bound_from_the_batch", (S,), lambda x: x[..., :x.argmax() * 0 + 2], "slice"),
    Op("slice_bound_free_tensor", (S,), lambda x: x[..., :torch.tensor(2)], B1),
]


torch.manual_seed(0)
MHA = torch.nn.MultiheadAttention(4, 2).double()
RNN = torch.nn.RNN(4, 3, nonlinearity="relu").double()


HEADS_MASK = Input(torch.zeros(N * 2, 2, 2, dtype=DT).normal_(generator=torch.Generator()
                                                              .manual_seed(9)),
                   BatchAxis(0, inner=2))  # (N H, T, T): row n H + h belongs to sample n

OPS += [
    Op("conv_transpose1d", (((N, N, 5), B0),), lambda x: F.conv_transpose1d(x, const(N, 2, 3)),
       B0),
    Op("adaptive_avg_pool1d", (((2, N, 6), B1),), lambda x: F.adaptive_avg_pool1d(x, 2), B1),
    Op("fold", (((N, 4, 4), B0),), lambda x: F.fold(x, (3, 3), 2), B0),
    Op("embedding_max_norm_writes_its_table", (TOKENS,),
       lambda t: (lambda w: (F.embedding(t, w, max_norm=1.0), w * 1)[1])(const(6, 2) * 3),
       "renormalised"),
    Op("mha_with_per_sample_head_masks", (((2, N, 4), B1), HEADS_MASK),
       lambda x, mask: MHA(x, x, x, attn_mask=mask)[0], B1, (MHA,)),
    Op("mha_samples_on_time", (((N, 2, 4), B0),), lambda x: MHA(x, x, x)[0],
       "not along its batch axis", (MHA,)),
    Op("sdpa_grouped_heads", (((N, 4, 3, 2), B0),),
       lambda q: F.scaled_dot_product_attention(q, q[:, :2], q[:, :2], enable_gqa=True), B0),
    Op("sdpa_grouped_samples_as_heads", (((2, N, 3, 2), B1),),
       lambda q: F.scaled_dot_product_attention(q, const(2, 1, 3, 2), const(2, 1, 3, 2),
                                                enable_gqa=True), "groups the heads"),
    Op("rnn_relu_sequence_first", (((3, N, 4), B1),), lambda x: RNN(x)[0], B1, (RNN,)),
    Op("addr", (((N,), B0),), lambda v: torch.addr(const(N, 5), v, const(5)), B0),
    Op("baddbmm", (BATCH,), lambda x: torch.baddbmm(const(1, 2, 3), x, const(N, 4, 3)), B0),
    Op("rmatmul", (S,), lambda x: x.mT.__rmatmul__(const(5, 4)), B2),
    Op("fliplr_batch", (S,), lambda x: x.fliplr(), "moves entries along"),
    Op("flipud_time", (S,), lambda x: x.flipud(), B1),
    Op("prelu_samples_on_channels", (S,), lambda x: F.prelu(x, const(N)), B1),
    Op("where_positions", (S,), lambda x: torch.where(x.abs() >= 0)[0], "positions"),
    Op("repeat_interleave_counts", (S,), lambda x: x.repeat_interleave(torch.tensor([1, 2, 1]),
                                                                       dim=1), "different number"),
    Op("cross_entropy_class_weights", (((N, 5), B0), Input(ids(N, high=5), B0, 5)),
       lambda z, y: F.cross_entropy(z, y, const(5).abs(), reduction="none"), B0),
    Op("instance_norm_running_stats", (IMAGE,), lambda x: F.instance_norm(
        x, torch.zeros(N, dtype=DT), torch.ones(N, dtype=DT), use_input_stats=True), B0),
    Op("instance_norm_writes_running_stats", (IMAGE,), lambda x: (lambda m: (F.instance_norm(
        x, m, torch.ones(N, dtype=DT), use_input_stats=True), m * 1)[1])(torch.zeros(N, dtype=DT)),
       "running statistics"),
    Op("select_time", (S,), lambda x: x.select(0, 1), B0),
    Op("select_batch", (S,), lambda x: x.select(1, 0), "one index"),
    Op("data_property", (S,), lambda x: x.data * 2, B1),
    Op("to_like_other", (S,), lambda x: x.to(const(1)), B1),
]
