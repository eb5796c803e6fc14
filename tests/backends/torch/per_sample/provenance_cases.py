"""Forward passes with known batch layouts, as data: a builder and the expected state of named
tensors, written from how each model lays out its tensors (not from the tracker).

Expected states are a BatchAxis, SAMPLE_FREE, or a word that the refusal's reason contains.
Deliberate coincidences: sequence length == N, width == N, channels == N, a constant table of
length N. float64 throughout, N = 4 unless a case says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backends.torch.axes import BatchAxis
from backends.torch.per_sample.provenance import SAMPLE_FREE, Provenance, held_tensors

from .provenance_probe import Built, Input

N = 4
B0, B1 = BatchAxis(0), BatchAxis(1)
DT = torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], Built]
    expected: dict[str, Provenance | str]


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT)


def _free(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in held_tensors(m)]


@contextmanager
def _outputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, Any]]:
    """The outputs of the named submodules (the first item of a tuple output) while inside."""
    got: dict[str, Any] = {}
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            got[name] = output[0] if isinstance(output, tuple) else output
        return keep

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def _functional(forward: Callable, inputs: dict[str, Input], *modules: nn.Module, n: int = N,
                ) -> Built:
    return Built(forward, inputs, _free(*modules), n)


# ---- plain layouts ------------------------------------------------------------------------------
def _mlp_width_n() -> Built:
    torch.manual_seed(0)
    a, b = nn.Linear(N, N).double(), nn.Linear(N, 3).double()

    def forward(v):
        hidden = a(v["x"])
        return {"hidden": hidden, "logits": b(torch.tanh(hidden))}

    return _functional(forward, {"x": Input(_randn(N, N), B0)}, a, b)


def _sequence_first() -> Built:
    torch.manual_seed(1)
    lin = nn.Linear(5, N).double()  # T == N and C == N

    def forward(v):
        y = lin(v["x"])
        return {"y": y, "time_mean": y.mean(0), "batch_mean": y.mean(1),
                "logits": y.transpose(0, 1)}

    return _functional(forward, {"x": Input(_randn(N, N, 5), B1)}, lin)


def _merge_front() -> Built:
    torch.manual_seed(2)
    lin = nn.Linear(2, 3).double()

    def forward(v):
        flat = v["x"].reshape(-1, 2)  # (T N, d)
        h = lin(flat)
        back = h.reshape(3, N, -1)
        return {"flat": flat, "h": h, "back": back, "logits": back.permute(1, 0, 2)}

    return _functional(forward, {"x": Input(_randn(3, N, 2), B1)}, lin)


def _merge_behind() -> Built:
    torch.manual_seed(3)
    lin = nn.Linear(2, 3).double()

    def forward(v):
        flat = v["x"].reshape(N * 3, 2)  # (N T, d)
        h = lin(flat)
        pairs = v["y"].reshape(-1, 2)  # (N, 6) -> (3 N, 2): three rows per sample
        split = v["y"].reshape(6, -1)  # (N, 6) -> (6, N): samples cut across rows
        return {"flat": flat, "pairs": pairs, "split": split,
                "logits": h.reshape(N, -1) + pairs.reshape(N, 6).sum(1, keepdim=True)}

    return _functional(forward, {"x": Input(_randn(N, 3, 2), B0),
                                 "y": Input(_randn(N, 6), B0)}, lin)


def _transposes() -> Built:
    torch.manual_seed(4)
    lin = nn.Linear(3 * 2 * 5, 2).double()

    def forward(v):
        x = v["x"]  # (N, 3, 2, 5)
        a = x.permute(2, 0, 3, 1)
        return {"a": a, "b": a.movedim(1, -1), "c": x.transpose(0, 3), "d": x.mT,
                "e": x.flatten(1).T, "f": x.unsqueeze(2).squeeze(2).flatten(1),
                "logits": lin(a.permute(1, 0, 2, 3).reshape(N, -1))}

    return _functional(forward, {"x": Input(_randn(N, 3, 2, 5), B0)}, lin)


# ---- attention ----------------------------------------------------------------------------------
def _attention_batch_first() -> Built:
    torch.manual_seed(5)
    qkv, out = nn.Linear(8, 24).double(), nn.Linear(8, 3).double()

    def forward(v):
        x, keep = v["x"], v["mask"]  # (N, T = N, 8), (N, T) 0/1
        q, k, w = qkv(x).view(N, N, 3, 2, 4).permute(2, 0, 3, 1, 4)  # 3 x (N, H, T, d)
        bias = (1.0 - keep[:, None, None, :].to(DT)) * -1e9
        heads = F.scaled_dot_product_attention(q, k, w, attn_mask=bias)
        causal = F.scaled_dot_product_attention(q, k, w, is_causal=True)
        merged = (heads + causal).transpose(1, 2).reshape(N, N, 8)
        return {"q": q, "heads": heads, "merged": merged, "logits": out(merged)}

    mask = torch.ones(N, N, dtype=torch.long)
    mask[1, 2:] = 0
    return _functional(forward, {"x": Input(_randn(N, N, 8), B0), "mask": Input(mask, B0, 2)},
                       qkv, out)


def _attention_sequence_first() -> Built:
    torch.manual_seed(6)
    qkv, out = nn.Linear(8, 24).double(), nn.Linear(8, 3).double()

    def forward(v):
        x = v["x"]  # (T = N, N, 8)
        q, k, w = qkv(x).view(N, N, 3, 2, 4).unbind(2)  # (T, N, H, d)
        scores = torch.einsum("tnhd,snhd->nhts", q, k) / 2.0
        attn = scores.softmax(-1)
        mixed = torch.einsum("nhts,snhd->tnhd", attn, w).reshape(N, N, 8)
        return {"scores": scores, "mixed": mixed, "logits": out(mixed)}

    return _functional(forward, {"x": Input(_randn(N, N, 8), B1)}, qkv, out)


def _encoder_layer(batch_first: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(7)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        layer = layer.double().eval()

        def forward(v):
            with _outputs(layer, ["linear1", "self_attn", "norm1"]) as got:
                y = layer(v["x"])
            return {**got, "logits": y}

        where = B0 if batch_first else B1
        return Built(forward, {"x": Input(_randn(N, N, 8), where)}, _free(layer), N)

    return build


def _mha(batch_first: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(8)
        mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double()

        def forward(v):
            out, weights = mha(v["x"], v["x"], v["x"], key_padding_mask=v["pad"])
            return {"weights": weights, "logits": out}

        pad = torch.zeros(N, N, dtype=torch.bool)
        pad[2, 3:] = True
        return Built(forward, {"x": Input(_randn(N, N, 8), B0 if batch_first else B1),
                               "pad": Input(pad, B0)}, _free(mha), N)

    return build


# ---- Hugging Face tiny models -------------------------------------------------------------------
T5_NAMES = ["encoder.block.0.layer.0.SelfAttention.q",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
            "decoder.block.0.layer.1.EncDecAttention.k", "encoder.final_layer_norm", "lm_head"]


def _t5(n: int) -> Callable[[], Built]:
    def build() -> Built:
        transformers = pytest.importorskip("transformers")
        from validation.tiny_models import tiny_t5_batch, tiny_t5_config

        torch.manual_seed(9)
        model = transformers.T5ForConditionalGeneration(tiny_t5_config(
            vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)).double().eval()
        if n == 4:
            batch = tiny_t5_batch(40, seed=3)
        else:  # N == S == 6: the (S, S) relative position table has N rows
            g = torch.Generator().manual_seed(3)
            mask = torch.ones(n, n, dtype=torch.long)
            # two padded samples: changing one sample's mask leaves the batch's mask not all
            # ones, so HF takes the same branch (it skips an all-ones mask) in every probe run
            mask[1, 4:] = mask[4, 2:] = 0
            batch = {"input_ids": torch.randint(1, 40, (n, n), generator=g),
                     "attention_mask": mask, "labels": torch.randint(1, 40, (n, 3), generator=g)}

        def forward(v):
            with _outputs(model, T5_NAMES) as got:
                out = model(**v)
            return {**got, "logits": out.logits}

        highs = {"input_ids": 40, "attention_mask": 2, "labels": 40}
        return Built(forward, {k: Input(t, B0, highs[k]) for k, t in batch.items()},
                     _free(model), n)

    return build


def _t5_adapter(adapter: str) -> Callable[[], Built]:
    def build() -> Built:
        transformers = pytest.importorskip("transformers")
        pytest.importorskip("peft")
        from validation.tiny_models import t5_adapter, tiny_t5_batch, tiny_t5_config

        torch.manual_seed(2)
        base = transformers.T5ForConditionalGeneration(tiny_t5_config(
            vocab_size=40, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
        model = t5_adapter(base, adapter).double().eval()
        batch = tiny_t5_batch(40, seed=3)
        names = ["prompt_encoder.default"] if adapter == "prompt" else [
            "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.default"]

        def forward(v):
            with _outputs(model, names) as got:
                out = model(**v)
            return {**got, "logits": out.logits}

        highs = {"input_ids": 40, "attention_mask": 2, "labels": 40}
        return Built(forward, {k: Input(t, B0, highs[k]) for k, t in batch.items()},
                     _free(model), 4)

    return build


VIT_NAMES = ["vit.embeddings.patch_embeddings.projection", "vit.embeddings",
             "vit.layers.0.attention.q_proj", "vit.layernorm"]


def _vit() -> Built:
    transformers = pytest.importorskip("transformers")
    from validation.tiny_models import tiny_vit_config

    torch.manual_seed(10)
    model = transformers.ViTForImageClassification(tiny_vit_config(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5)).double().eval()
    n = 5  # 4 patches + the class token: 5 tokens for 5 samples

    def forward(v):
        with _outputs(model, VIT_NAMES) as got:
            out = model(pixel_values=v["pixels"])
        return {**got, "logits": out.logits}

    return Built(forward, {"pixels": Input(_randn(n, 3, 8, 8), B0)}, _free(model), n)


# ---- embeddings, constants, broadcast parameters ------------------------------------------------
def _embedding_tied() -> Built:
    torch.manual_seed(11)
    emb = nn.Embedding(7, N).double()  # width == N

    def forward(v):
        h = emb(v["ids"])  # (N, T = N, N)
        return {"h": h, "logits": h @ emb.weight.T}

    return _functional(forward, {"ids": Input(torch.randint(0, 7, (N, N)), B0, 7)}, emb)


def _constant_table() -> Built:
    torch.manual_seed(12)
    pos, lin = nn.Embedding(N, 3).double(), nn.Linear(3, 2).double()

    def forward(v):
        positions = torch.arange(v["x"].shape[1])  # length T == N
        table = pos(positions)  # (T, 3): one row per position, not per sample
        scale = torch.linspace(0, 1, N, dtype=DT)[:, None]
        h = v["x"] + table * scale
        return {"positions": positions, "table": table, "h": h, "logits": lin(h)}

    return _functional(forward, {"x": Input(_randn(N, N, 3), B0)}, pos, lin)


def _parameter_expanded() -> Built:
    torch.manual_seed(13)
    cls = nn.Parameter(_randn(1, 1, 3))
    lin = nn.Linear(3, 2).double()

    def forward(v):
        tokens = cls.expand(N, -1, -1)  # sample free, whatever its leading length
        h = torch.cat([tokens, v["x"]], dim=1)
        return {"tokens": tokens, "h": h, "logits": lin(h)[:, 0] + lin(h)[:, 1:].sum(1)}

    built = _functional(forward, {"x": Input(_randn(N, N - 1, 3), B0)}, lin)
    built.free.append(cls)
    return built


# ---- recurrent layers ---------------------------------------------------------------------------
def _gru_sequence_first() -> Built:
    torch.manual_seed(14)
    gru, lin = nn.GRU(3, 5, num_layers=2).double(), nn.Linear(5, 2).double()

    def forward(v):
        out, h = gru(v["x"])  # (T = N, N, 5), (2, N, 5)
        return {"out": out, "h": h, "logits": lin(out[-1]) + lin(h[0])}

    return _functional(forward, {"x": Input(_randn(N, N, 3), B1)}, gru, lin)


def _lstm_batch_first() -> Built:
    torch.manual_seed(15)
    lstm, lin = nn.LSTM(3, 5, batch_first=True).double(), nn.Linear(5, 2).double()

    def forward(v):
        h0 = torch.zeros(1, N, 5, dtype=DT)
        out, (h, c) = lstm(v["x"], (h0, v["c0"]))
        return {"out": out, "h": h, "c": c, "logits": lin(out[:, -1]) + lin(c[0])}

    return _functional(forward, {"x": Input(_randn(N, 3, 3), B0),
                                 "c0": Input(_randn(1, N, 5), B1)}, lstm, lin)


def _gru_packed() -> Built:
    torch.manual_seed(16)
    gru = nn.GRU(3, 2).double()

    def forward(v):
        packed = nn.utils.rnn.pack_padded_sequence(v["x"], [3, 3, 2, 1])
        _, h = gru(packed)
        return {"logits": h[0]}

    return _functional(forward, {"x": Input(_randn(3, N, 3), B1)}, gru)


# ---- coupling and batch statistics --------------------------------------------------------------
def _sum_over_batch() -> Built:
    torch.manual_seed(17)
    lin = nn.Linear(3, 2).double()

    def forward(v):
        h = lin(v["x"])
        pooled = h.sum(0)
        return {"h": h, "pooled": pooled, "logits": h + pooled}

    return _functional(forward, {"x": Input(_randn(N, 3), B0)}, lin)


def _batch_norm(train: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(18)
        bn, lin = nn.BatchNorm1d(N).double().train(train), nn.Linear(N, 2).double()  # C == N

        def forward(v):
            h = bn(v["x"])
            return {"h": h, "running_mean": bn.running_mean, "logits": lin(h)}

        return _functional(forward, {"x": Input(_randn(N, N), B0)}, bn, lin)

    return build


def _conv() -> Built:
    torch.manual_seed(19)
    conv, lin = nn.Conv1d(N, 3, 3, padding=1).double(), nn.Linear(3 * 3, 2).double()

    def forward(v):
        h = conv(v["x"])  # (N, C = N, L = 6) -> (N, 3, 6)
        pooled = F.max_pool1d(h, 2)
        return {"h": h, "pooled": pooled, "logits": lin(pooled.flatten(1))}

    return _functional(forward, {"x": Input(_randn(N, N, 6), B0)}, conv, lin)


# ---- in-place writes, indexing, joining ---------------------------------------------------------
def _in_place() -> Built:
    torch.manual_seed(20)
    lin = nn.Linear(3, 3).double()

    def forward(v):
        buf = v["x"].new_zeros(N, 3)
        alias = buf.view(-1)  # sample free now, written through buf below
        buf += lin(v["x"])
        h = buf.clone()
        h[:, 0] = 0.0
        g = torch.zeros(3, N, 3, dtype=DT)
        g[1] = h  # a sample-free tensor takes the samples along axis 1
        return {"buf": buf, "alias": alias, "h": h, "g": g, "logits": g.sum(0).relu_()}

    return _functional(forward, {"x": Input(_randn(N, 3), B0)}, lin)


def _indexing() -> Built:
    torch.manual_seed(21)

    def forward(v):
        x = v["x"]  # (N, T = 5, d = 3)
        picks = x[:, torch.tensor([4, 0, 0])]
        rows = x[torch.tensor([1, 0, 2, 3])]
        top = x.gather(1, x.argmax(1, keepdim=True))
        masked = x.masked_fill(v["keep"][..., None] == 0, 0.0)
        return {"first": x[:, 0], "last": x[..., -1, :], "picks": picks, "rows": rows,
                "one": x[0], "top": top, "masked": masked,
                "logits": x[:, 0] + x[..., -1, :] + picks.sum(1) + top[:, 0] + masked.sum(1)}

    keep = torch.ones(N, 5, dtype=torch.long)
    keep[0, 3:] = 0
    return _functional(forward, {"x": Input(_randn(N, 5, 3), B0), "keep": Input(keep, B0, 2)})


def _joins() -> Built:
    def forward(v):
        x = v["x"]  # (N, 3)
        tiles = torch.cat([x, 2 * x], 0)  # two periods of the samples
        a, b = tiles.chunk(2, 0)
        uneven = tiles.split([3, 5], 0)[0]
        stacked = torch.stack([a, b], 0)
        return {"tiles": tiles, "a": a, "uneven": uneven, "stacked": stacked,
                "repeated": x.repeat(2, 1), "logits": a * b + stacked.sum(0)}

    return _functional(forward, {"x": Input(_randn(N, 3), B0)})


CASES = [
    Case("mlp_width_n", _mlp_width_n, {"hidden": B0, "logits": B0}),
    Case("sequence_first", _sequence_first,
         {"y": B1, "time_mean": B0, "batch_mean": "reduces over the batch", "logits": B0}),
    Case("merge_time_in_front", _merge_front,
         {"flat": BatchAxis(0, outer=3), "h": BatchAxis(0, outer=3), "back": B1, "logits": B0}),
    Case("merge_time_behind", _merge_behind,
         {"flat": BatchAxis(0, inner=3), "pairs": BatchAxis(0, inner=3), "split": "splits",
          "logits": B0}),
    Case("transposes", _transposes,
         {"a": B1, "b": BatchAxis(3), "c": BatchAxis(3), "d": B0, "e": B1, "f": B0,
          "logits": B0}),
    Case("attention_batch_first", _attention_batch_first,
         {"q": B0, "heads": B0, "merged": B0, "logits": B0}),
    Case("attention_sequence_first", _attention_sequence_first,
         {"scores": B0, "mixed": B1, "logits": B1}),
    Case("encoder_layer_sequence_first", _encoder_layer(False),
         {"linear1": B1, "self_attn": B1, "norm1": B1, "logits": B1}),
    Case("encoder_layer_batch_first", _encoder_layer(True),
         {"linear1": B0, "self_attn": B0, "norm1": B0, "logits": B0}),
    Case("mha_sequence_first", _mha(False), {"weights": B0, "logits": B1}),
    Case("mha_batch_first", _mha(True), {"weights": B0, "logits": B0}),
    Case("t5", _t5(4), {T5_NAMES[0]: B0, T5_NAMES[1]: SAMPLE_FREE, T5_NAMES[2]: B0,
                        T5_NAMES[3]: B0, T5_NAMES[4]: B0, "logits": B0}),
    Case("t5_n_equals_length", _t5(6),
         {T5_NAMES[0]: B0, T5_NAMES[1]: SAMPLE_FREE, T5_NAMES[2]: B0, "logits": B0}),
    # peft: LoRA's A and B; prompt tuning's virtual tokens (a one-sample call expanded over
    # the batch: sample free), held in a plain dict on the model, not as a buffer
    Case("t5_lora", _t5_adapter("lora"),
         {"base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.default": B0,
          "logits": B0}),
    Case("t5_prompt_tuning", _t5_adapter("prompt"),
         {"prompt_encoder.default": SAMPLE_FREE, "logits": B0}),
    Case("vit", _vit, {VIT_NAMES[0]: B0, VIT_NAMES[1]: B0, VIT_NAMES[2]: B0, VIT_NAMES[3]: B0,
                       "logits": B0}),
    Case("embedding_tied", _embedding_tied, {"h": B0, "logits": B0}),
    Case("constant_table", _constant_table,
         {"positions": SAMPLE_FREE, "table": SAMPLE_FREE, "h": B0, "logits": B0}),
    Case("parameter_expanded", _parameter_expanded,
         {"tokens": SAMPLE_FREE, "h": B0, "logits": B0}),
    Case("gru_sequence_first", _gru_sequence_first, {"out": B1, "h": B1, "logits": B0}),
    Case("lstm_batch_first", _lstm_batch_first, {"out": B0, "h": B1, "c": B1, "logits": B0}),
    Case("gru_packed", _gru_packed, {"logits": "packed"}),
    Case("sum_over_batch", _sum_over_batch,
         {"h": B0, "pooled": "reduces over the batch", "logits": "reduces over the batch"}),
    Case("batch_norm_train", _batch_norm(True),
         {"h": "batch's statistics", "running_mean": "running statistics",
          "logits": "batch's statistics"}),
    Case("batch_norm_eval", _batch_norm(False),
         {"h": B0, "running_mean": SAMPLE_FREE, "logits": B0}),
    Case("conv_channels_n", _conv, {"h": B0, "pooled": B0, "logits": B0}),
    Case("in_place", _in_place,
         {"buf": B0, "alias": "shares memory", "h": B0, "g": B1, "logits": B0}),
    Case("indexing", _indexing,
         {"first": B0, "last": B0, "picks": B0, "rows": "indexes across", "one": "one index",
          "top": B0, "masked": B0, "logits": B0}),
    Case("joins", _joins,
         {"tiles": BatchAxis(0, outer=2), "a": B0, "uneven": "whole periods",
          "stacked": B1, "repeated": BatchAxis(0, outer=2), "logits": B0}),
]
