"""GhostRows (backends/torch/per_sample/rows.py, backends/torch/per_sample/layer_pass.py) against
single-sample backward passes.

The expected per-sample gradients come from a Python loop of single-sample forward passes
through the model's ordinary ``__call__`` and ``torch.autograd.grad`` (no hooks, no vmap):
row n = J_n^T u_n for the cotangents u. Every layer kind the ghost route knows is a case,
each under the three per-layer routes ("auto" by the cost model, "ghost" wherever possible,
"materialise" everywhere).

Tolerance (float64): every entry of a Gram matrix is an inner product of two rows, each row
computed by either route with a backward error of a few eps times its norm for these shallow
models, so |K_nm - K_ref,nm| <= c eps ||g_n|| ||g_m|| and, norm-wise,
||K - K_ref||_F <= c eps (sum_n ||g_n||)^2. With c eps <= 1e-12 (c up to ~4500: P + T^2 terms
per entry here are below 5000) the check is ``<= 1e-12 (sum_n ||g_n||)^2``; likewise
||G^T w - ref|| <= 1e-12 sum_n |w_n| ||g_n|| and ||G v - ref|| <= 1e-12 ||v|| sqrt(sum ||g_n||^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.layers import PartShape, factor_cost  # noqa: E402
from backends.torch.per_sample.layer_pass import ROUTES  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402

BOUND = 1e-12
IGNORE = -100
#: the layer pass's per-parameter choice -> the provider's per_sample route that makes it
PER_SAMPLE = {"auto": "auto", "ghost": "ghost", "materialise": "hooks"}
pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- models with every layer kind --------------------------------------------------------------
class Scale(nn.Module):
    """A module kind the hooks do not know, its weight broadcast over the batch: captured."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, h: Any) -> Any:
        return h * self.gain


class Mix(nn.Module):
    """A module kind the hooks do not know, its weight not broadcast: per-module vmap."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(width))
        self.unread = nn.Parameter(torch.randn(2))  # never read: zero rows, no fallback

    def forward(self, h: Any) -> Any:
        return h @ torch.diag(self.gain)  # a sample-free tensor meeting the batch in a matmul


class Tagger(nn.Module):
    """Embedding (padding_idx), Linear (no bias), frozen Linear, norms, Linear twice, head."""

    def __init__(self, vocab: int = 11, width: int = 6, tie: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=0)
        self.inner = nn.Linear(width, width, bias=False)
        self.frozen = nn.Linear(width, width).requires_grad_(False)
        self.ln = nn.LayerNorm(width)
        self.rms = nn.RMSNorm(width)
        self.scale = Scale(width)
        self.mix = Mix(width)
        self.twice = nn.Linear(width, width)  # used twice per forward: tied along t
        self.head = nn.Linear(width, vocab)
        if tie:  # the output layer shares the embedding matrix (mixed kinds)
            self.head.weight = self.emb.weight

    def forward(self, ids: Any) -> Any:
        h = self.emb(ids)
        h = h + h.mean(dim=1, keepdim=True)  # mixes positions: padding positions get gradients
        h = torch.tanh(self.inner(h))
        h = self.mix(self.scale(self.rms(self.ln(self.frozen(h)))))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(h)


class OutsideUse(nn.Module):
    """A Linear weight also used outside its layer's forward: the hooks miss that term."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:
        h = torch.tanh(self.a(x)) + x @ self.a.weight.T
        return self.b(h)


class InPlace(nn.Module):
    """A Linear output changed in place afterwards: its recorded output is no longer it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:
        h = self.a(x)
        h.mul_(torch.tanh(h.detach()) + 1.5)
        return self.b(torch.tanh(h))


class Gate(nn.Module):
    """A module kind the hooks do not know (per-module vmap), gated by a second argument."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, h: Any, level: Any) -> Any:
        return torch.where(level > 0, h @ torch.diag(self.gain), h)


class ArgumentChanged(nn.Module):
    """The gate's level (per sample, not saved by autograd) changed in place after the call:
    the per-module vmap would read the new values."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.head = Gate(), nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:
        level = x.detach().clone()
        h = self.gate(x, level)
        level.neg_()
        return self.head(torch.tanh(h) + level)


class Prompted(nn.Module):
    """Virtual tokens embedded for one sample and repeated over the batch (peft's way)."""

    def __init__(self, also_used: bool) -> None:
        super().__init__()
        self.prompt = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)
        # the one-sample output also added to every sample (a broadcast capture of its mean)
        self.also_used = also_used

    def forward(self, x: Any) -> Any:
        p = self.prompt(torch.arange(3)[None, :])  # (1, 3, 4)
        h = torch.cat([p.repeat(x.shape[0], 1, 1), x], dim=1)
        if self.also_used:
            h = h + p.mean()
        return self.head(torch.tanh(h)).mean(dim=1)


class Filled(nn.Module):
    """A buffer created in the forward pass and filled from the batch in place: per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Any) -> Any:
        h = torch.zeros(x.shape[0], 2, 4, dtype=x.dtype)
        h[:, 0] = x
        h[:, 1] = 2 * x
        return self.lin(torch.tanh(h)).sum(dim=1)


@dataclass
class Case:
    name: str
    build: Callable[[], tuple[nn.Module, Any, Any, ngdref.LogitLoss]]
    #: fallback notes expected to mention these substrings
    fallbacks: tuple[str, ...] = ()


def _mlp(n: int) -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7, bias=False), nn.Tanh(), nn.Linear(7, 7),
        nn.Tanh(), nn.Linear(7, 3),
    ).double()
    model[4].requires_grad_(False)  # a frozen layer between trainable ones
    return model, torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,)), (
        ngdref.SoftmaxCrossEntropy())


def _cnn() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 4),
    ).double()
    return model, torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (4,)), (
        ngdref.SoftmaxCrossEntropy())


def _tagger(tie: bool) -> Callable[[], tuple[nn.Module, Any, Any, ngdref.LogitLoss]]:
    def build() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
        torch.manual_seed(2)
        model = Tagger(tie=tie).double()
        ids = torch.randint(1, 11, (4, 5))
        ids[1, 3:] = 0  # padding tokens (the embedding's padding_idx)
        labels = torch.randint(0, 11, (4, 5))
        labels[1, 3:] = IGNORE  # ignored positions
        labels[3, 0] = IGNORE
        return model, ids, labels, ngdref.SequenceSoftmaxCrossEntropy(11)

    return build


def _outside() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    torch.manual_seed(3)
    return OutsideUse().double(), torch.randn(4, 4, dtype=torch.float64), torch.randint(
        0, 3, (4,)), ngdref.SoftmaxCrossEntropy()


def _in_place() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    torch.manual_seed(4)
    return InPlace().double(), torch.randn(4, 4, dtype=torch.float64), torch.randint(
        0, 3, (4,)), ngdref.SoftmaxCrossEntropy()


def _prompted(also_used: bool) -> Callable[[], tuple[nn.Module, Any, Any, ngdref.LogitLoss]]:
    def build() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
        torch.manual_seed(5)
        return Prompted(also_used).double(), torch.randn(4, 2, 4, dtype=torch.float64), (
            torch.randint(0, 3, (4,))), ngdref.SoftmaxCrossEntropy()

    return build


CASES = [
    Case("mlp_frozen_middle", lambda: _mlp(4)),
    Case("mlp_batch_of_one", lambda: _mlp(1)),
    Case("cnn", _cnn),
    Case("sequence_tagger", _tagger(False), ("Mix (mix.gain): per-module vmap",)),
    Case("tied_embedding_head", _tagger(True), ("Mix (mix.gain): per-module vmap",)),
    Case("weight_used_outside_its_layer", _outside, ("a.weight: whole-model vmap",)),
    Case("output_changed_in_place", _in_place, ("changed in place",)),
    Case("argument_changed_in_place", lambda: (
        ArgumentChanged().double(), torch.randn(4, 4, dtype=torch.float64),
        torch.randint(0, 3, (4,)), ngdref.SoftmaxCrossEntropy()),
        ("gate.gain: whole-model vmap (Gate's input was changed in place",)),
    Case("one_sample_call_repeated", _prompted(False)),
    Case("tensor_created_then_filled_from_the_batch", lambda: (
        Filled().double(), torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)),
        ngdref.SoftmaxCrossEntropy())),
    Case("one_sample_output_used_twice", _prompted(True)),
]


def _hf(name: str) -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    from tests.backends.torch.provider_cases import case

    c = case(name)
    return c.model, c.inputs, c.targets, c.loss


HF_CASES = [
    Case("t5_lora", lambda: _hf("t5_lora")),
    # peft embeds the virtual tokens for one sample and repeats them over the batch
    Case("t5_prompt_tuning", lambda: _hf("t5_prompt")),
    Case("vit_lora", lambda: _hf("vit_lora")),
]


def _t5_full() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    transformers = pytest.importorskip("transformers")
    from tests.backends.torch.provider_cases import VOCAB, t5_batch, t5_config

    torch.manual_seed(6)
    model = transformers.T5ForConditionalGeneration(t5_config()).double()
    batch = t5_batch()
    return model, batch, batch["labels"], ngdref.SequenceSoftmaxCrossEntropy(VOCAB)


def _t5_full_square() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    """N = 6 sequences of 6 tokens: T5's (6, 6) relative positions are not 6 samples."""
    model, _, _, loss = _t5_full()
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 40, (6, 6), generator=generator)
    labels = torch.randint(1, 40, (6, 3), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, batch, labels, loss


def _vit_full() -> tuple[nn.Module, Any, Any, ngdref.LogitLoss]:
    """ViT with every parameter trainable: the class token is expanded over the batch and
    the position embeddings added to it, both inside ViTEmbeddings' own forward."""
    transformers = pytest.importorskip("transformers")
    from validation.tiny_models import tiny_vit_config

    torch.manual_seed(8)
    model = transformers.ViTForImageClassification(tiny_vit_config(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5,
    )).double()
    generator = torch.Generator().manual_seed(9)
    pixels = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator)
    return model, {"pixel_values": pixels}, torch.randint(0, 5, (4,), generator=generator), (
        ngdref.SoftmaxCrossEntropy())


ALL_CASES = {c.name: c for c in [
    # T5's relative position bias (an embedding of a constant bucket table, added to every
    # sample's attention scores) and T5LayerNorm's weight * hidden are broadcast captures
    *CASES, *HF_CASES, Case("t5_all_parameters", _t5_full),
    Case("t5_all_parameters_batch_as_long_as_input", _t5_full_square),
    Case("vit_all_parameters", _vit_full),
]}


# ---- the independent reference ----------------------------------------------------------------
def _sample(inputs: Any, n: int) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs[n:n + 1]
    return {k: v[n:n + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def loop_rows(model: nn.Module, inputs: Any, cotangents: Any) -> Any:
    """Row n = J_n^T u_n by a single-sample forward through ``model.__call__`` and autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(cotangents.shape[0]):
        x = _sample(inputs, n)
        out = model(x) if isinstance(x, torch.Tensor) else model(**x)
        z = getattr(out, "logits", out).reshape(1, -1)
        grads = torch.autograd.grad(z, params, grad_outputs=cotangents[n:n + 1],
                                    allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]))
    return torch.stack(rows)


def _scale(rows: Any) -> float:
    return float(torch.linalg.vector_norm(rows, dim=1).sum())


# ---- the identities ---------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(ALL_CASES))
def test_gram_cross_gram_and_products_equal_the_loop(name: str, route: str) -> None:
    check_against_the_loop(ALL_CASES[name], route)


def check_against_the_loop(case: Case, route: str) -> None:
    """Gram, cross Gram, G^T w, G v, the gradient and the fallback notes of one case."""
    model, inputs, targets, loss = case.build()
    model.eval()
    provider = TorchProvider(model, inputs, per_sample=PER_SAMPLE[route], certify="never")
    logits = provider.logits()
    u = loss.grad(logits, targets)  # zero at ignored positions
    u2 = torch.randn(logits.shape, dtype=logits.dtype, generator=torch.Generator().manual_seed(9))
    rows = provider.per_sample_rows(u, keep_graph=True)
    other = provider.per_sample_rows(u2, keep_graph=False)
    g, h = loop_rows(model, inputs, u), loop_rows(model, inputs, u2)
    assert rows.shape == tuple(g.shape) and rows.dtype == torch.float64
    assert float(g.abs().max()) > 0
    sg, sh = _scale(g), _scale(h)
    assert float(torch.linalg.norm(rows.gram() - g @ g.T)) <= BOUND * sg**2
    assert float(torch.linalg.norm(rows.cross_gram(other) - g @ h.T)) <= BOUND * sg * sh
    w = torch.linspace(-1.0, 2.0, g.shape[0], dtype=torch.float64)
    assert float(torch.linalg.norm(rows.rmatvec(w) - w @ g)) <= BOUND * float(
        (w.abs() * torch.linalg.vector_norm(g, dim=1)).sum())
    v = torch.randn(g.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert float(torch.linalg.norm(rows.matvec(v) - g @ v)) <= BOUND * float(
        torch.linalg.norm(v) * torch.linalg.norm(g))
    assert float(torch.linalg.norm(rows.grad - g.sum(0))) <= BOUND * sg
    # exactly the expected fallbacks: a hooked layer computed wrongly would fail the sum check
    # and fall back silently correct, so an unexpected note is a bug too
    expected = case.fallbacks
    assert all(any(e in note for note in rows.fallbacks) for e in expected), rows.fallbacks
    assert all(any(e in note for e in expected) for note in rows.fallbacks), rows.fallbacks


@pytest.mark.parametrize("name", ["mlp_frozen_middle", "cnn", "sequence_tagger", "t5_lora"])
def test_routes_hold_weights_as_factors_or_rows_as_chosen(name: str) -> None:
    """"ghost" keeps factors for every linear, conv and embedding weight; "materialise" none."""
    model, inputs, _, _ = ALL_CASES[name].build()
    held = {}
    for route in ROUTES:
        provider = TorchProvider(model, inputs, per_sample=PER_SAMPLE[route])
        u = torch.ones_like(provider.logits())
        rows = provider.per_sample_rows(u)
        held[route] = sum(f.size for f in rows.factors)
    assert held["materialise"] == 0 < held["ghost"]
    assert held["auto"] <= held["ghost"]


def test_cost_model_prefers_ghost_for_short_sequences_and_rows_for_long_ones() -> None:
    # PartShape(T, d_u, d_v): u the output gradients (d_out), v the inputs (d_in)
    # an MLP layer (T = 1): the ghost Gram is always cheaper
    assert factor_cost(64, [PartShape(1, 1024, 1024)]).ghost_cheaper()
    # a LoRA A matrix (d_out = r = 8) at T = 512 positions: materialising is cheaper
    assert not factor_cost(8, [PartShape(512, 8, 768)]).ghost_cheaper()
    # a vocabulary embedding looked up 100 times: ghost (the rows would be N V d)
    assert factor_cost(16, [PartShape(100, 32128, 512, lookup=True)]).ghost_cheaper()


def test_float32_rows_agree_with_float64_to_float32_rounding() -> None:
    """float32 ghost Gram vs the float64 loop: relative error <= 1e-5 (eps32 * depth * T)."""
    model, x, y, loss = _mlp(6)
    model32 = model.float().eval()
    provider = TorchProvider(model32, x.float(), per_sample="ghost")
    u = loss.grad(provider.logits(), y)
    rows = provider.per_sample_rows(u)
    ref = loop_rows(model32.double(), x, u.double())
    k = ref @ ref.T
    assert rows.gram().dtype == torch.float64 and rows.rmatvec(u[:, 0]).dtype == torch.float32
    assert float(torch.linalg.norm(rows.gram() - k)) <= 1e-5 * float(torch.linalg.norm(k))


# ---- hooks: the user's stay, ours go ------------------------------------------------------------
def _hook_counts(model: nn.Module) -> list[int]:
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]


def test_user_hooks_are_respected_and_ours_removed() -> None:
    model, x, y, loss = _mlp(4)
    model.eval()
    # a user's hook that changes the output of a trainable layer: the rows must include it
    handle = model[2].register_forward_hook(lambda m, a, out: 2.0 * out)
    before = _hook_counts(model)
    provider = TorchProvider(model, x, per_sample="ghost")
    u = loss.grad(provider.logits(), y)
    rows = provider.per_sample_rows(u)
    assert _hook_counts(model) == before
    g = loop_rows(model, x, u)  # through __call__: the user's hook is in the reference too
    assert float(torch.linalg.norm(rows.gram() - g @ g.T)) <= BOUND * _scale(g) ** 2
    handle.remove()


def test_our_hooks_are_removed_after_an_exception() -> None:
    model, x, _, _ = _mlp(4)

    def fail(module: nn.Module, args: Any, out: Any) -> Any:
        raise RuntimeError("user hook failed")

    handle = model[6].register_forward_hook(fail)
    before = _hook_counts(model)
    with pytest.raises(RuntimeError, match="user hook failed"):
        TorchProvider(model, x, per_sample="ghost")
    assert _hook_counts(model) == before
    handle.remove()


@pytest.mark.parametrize("route", ROUTES)
def test_chunks_take_a_pass_each_and_stack_their_rows(route: str) -> None:
    """chunk_size: one hooked forward and backward pass per chunk (5 samples in chunks of
    2), the chunks' rows stacked, equal to the loop's."""
    model, x, y, loss = _mlp(5)
    model.eval()
    provider = TorchProvider(model, x, per_sample=PER_SAMPLE[route], chunk_size=2)
    u = loss.grad(provider.logits(), y)
    rows = provider.per_sample_rows(u)
    g = loop_rows(model, x, u)
    assert rows.shape == tuple(g.shape)
    assert float(torch.linalg.norm(rows.gram() - g @ g.T)) <= BOUND * _scale(g) ** 2


def test_unknown_routes_are_refused_by_name() -> None:
    model, x, _, _ = _mlp(2)
    with pytest.raises(ValueError, match="per_sample must be one of"):
        TorchProvider(model, x, per_sample="fast")
    with pytest.raises(ValueError, match="layer_route must be one of"):
        TorchProvider(model, x, per_sample_method="ghost", layer_route="fast")
