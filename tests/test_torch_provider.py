"""TorchProvider (backends/torch_provider.py) against independent routes, in float64.

Expected values never come from the provider's own machinery:

- per-sample gradients: a Python loop of single-sample forward passes through the
  model's ordinary ``__call__`` (2-D attention masks, Hugging Face's own
  ``labels -> decoder_input_ids``) and ``loss.backward()`` on a ``torch.nn`` loss
  with ``reduction="sum"``;
- Jacobians: ``torch.autograd.functional.jacobian`` (one reverse pass per output row,
  full batch, no ``vmap``);
- Jacobian-vector products: the verified Jacobian times v, and central differences;
- summed products: ``torch.autograd.grad`` of ``sum(z * u)`` on the full batch.

Cases are data (:data:`CASES`): a name and a builder of the model, its inputs, the
ngdref loss paired with the provider and the single-sample reference loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch_provider import TorchProvider  # noqa: E402
from tests.backends import tolerance  # noqa: E402

F64 = tolerance("float64")
F32 = tolerance("float32")
IGNORE = -100
VOCAB = 40


# ---- cases -------------------------------------------------------------------------------------
@dataclass
class Case:
    """A model on one batch with everything a test needs to check the provider."""

    name: str
    model: nn.Module
    inputs: Any  # what TorchProvider gets
    targets: Any  # the ngdref loss's targets
    loss: ngdref.LogitLoss
    sample_loss: Callable[[int], Any]  # n -> l_n through the model's ordinary forward
    batch_logits: Callable[[dict[str, Any]], Any]  # {name: param} -> (N, C), ordinary forward
    hookable: bool  # all trainable parameters live in nn.Linear layers
    exact_forward_mode: bool = True  # False: the model computes part of its forward in float32

    @property
    def trainable(self) -> list[tuple[str, Any]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def num_samples(self) -> int:
        return int(self.targets.shape[0])


def _reference_call(model: nn.Module, params: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    return torch.func.functional_call(model, params, args, kwargs)


def _ce_sum(logits: Any, labels: Any) -> Any:
    return nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE)(logits, labels)


def _mlp(loss_kind: str) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    model[0].bias.requires_grad_(False)  # a frozen parameter: not part of theta
    x = torch.randn(5, 4, dtype=torch.float64)
    if loss_kind == "ce":
        y = torch.randint(0, 3, (5,))
        loss: ngdref.LogitLoss = ngdref.SoftmaxCrossEntropy()

        def sample_loss(n: int) -> Any:
            return _ce_sum(model(x[n:n + 1]), y[n:n + 1])
    else:
        y = torch.randn(5, 3, dtype=torch.float64)
        loss = ngdref.SquaredError()

        def sample_loss(n: int) -> Any:
            return 0.5 * nn.MSELoss(reduction="sum")(model(x[n:n + 1]), y[n:n + 1])

    return Case(
        f"mlp_{loss_kind}", model, x, y, loss, sample_loss,
        lambda p: _reference_call(model, p, x), hookable=True,
    )


def _cnn() -> Case:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double().eval()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    return Case(
        "cnn", model, x, y, ngdref.SoftmaxCrossEntropy(),
        lambda n: _ce_sum(model(x[n:n + 1]), y[n:n + 1]),
        lambda p: _reference_call(model, p, x), hookable=False,
    )


def _t5_config() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, d_kv=8, attn_implementation="eager",
        decoder_start_token_id=0, pad_token_id=0,
    )


def _t5_batch() -> dict[str, Any]:
    generator = torch.Generator().manual_seed(3)
    n, s, t = 4, 6, 3
    ids = torch.randint(1, VOCAB, (n, s), generator=generator)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[0, 3:] = 0  # right padding of the encoder input
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(1, VOCAB, (n, t), generator=generator)
    labels[1, 2:] = IGNORE  # label word + EOS, padded with -100
    labels[3, 1:] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _t5(adapter: str) -> Case:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(2)
    base = transformers.T5ForConditionalGeneration(_t5_config())
    if adapter == "lora":
        # init_lora_weights=False: B is random, so the gradients of A are not all zero
        config = peft.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights=False)
    else:
        config = peft.PromptTuningConfig(
            task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3
        )
    model = peft.get_peft_model(base, config).double().eval()
    batch = _t5_batch()
    labels = batch["labels"]

    def forward(params: dict[str, Any] | None, rows: slice) -> Any:
        kwargs = {k: v[rows] for k, v in batch.items()}
        out = model(**kwargs) if params is None else _reference_call(model, params, **kwargs)
        return out.logits  # HF derives decoder_input_ids from labels itself

    return Case(
        f"t5_{adapter}", model, batch, labels, ngdref.SequenceSoftmaxCrossEntropy(VOCAB),
        lambda n: _ce_sum(forward(None, slice(n, n + 1))[0], labels[n]),
        lambda p: forward(p, slice(None)).reshape(labels.shape[0], -1),
        hookable=adapter == "lora",
        # T5LayerNorm computes its variance in float32 even in a float64 model
        exact_forward_mode=False,
    )


def _vit_model(attn_implementation: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(4)
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5, attn_implementation=attn_implementation,
    )
    model = transformers.ViTForImageClassification(config)
    # transformers 5 names ViT's attention projections q_proj / v_proj
    lora = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, lora).double().eval()


def _vit(attn_implementation: str = "eager") -> Case:
    model = _vit_model(attn_implementation)
    generator = torch.Generator().manual_seed(5)
    pixels = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 5, (4,), generator=generator)
    inputs = {"pixel_values": pixels, "labels": labels}
    return Case(
        f"vit_lora_{attn_implementation}", model, inputs, labels, ngdref.SoftmaxCrossEntropy(),
        lambda n: _ce_sum(model(pixel_values=pixels[n:n + 1]).logits, labels[n:n + 1]),
        lambda p: _reference_call(model, p, pixel_values=pixels).logits, hookable=True,
        # HF's eager ViT attention takes its softmax in float32 even in a float64 model
        exact_forward_mode=False,
    )


BUILDERS: dict[str, Callable[[], Case]] = {
    "mlp_ce": lambda: _mlp("ce"),
    "mlp_squared_error": lambda: _mlp("se"),
    "cnn": _cnn,
    "t5_lora": lambda: _t5("lora"),
    "t5_prompt": lambda: _t5("prompt"),
    "vit_lora": _vit,
}
CASES = list(BUILDERS)
HOOKABLE = ["mlp_ce", "mlp_squared_error", "t5_lora", "vit_lora"]
EXACT_FORWARD_MODE = ["mlp_ce", "mlp_squared_error", "cnn"]


@functools.cache
def case(name: str) -> Case:
    return BUILDERS[name]()


# ---- independent references -------------------------------------------------------------------
def loop_per_sample_grads(c: Case) -> Any:
    """Rows grad_theta l_n from N single-sample ``loss.backward()`` calls."""
    params = [p for _, p in c.trainable]
    rows = []
    for n in range(c.num_samples):
        for p in params:
            p.grad = None
        c.sample_loss(n).backward()
        rows.append(torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
        ]))
    for p in params:
        p.grad = None
    return torch.stack(rows)


def reference_jacobian(c: Case) -> Any:
    names = [n for n, _ in c.trainable]
    shapes = [p.shape for _, p in c.trainable]
    sizes = [p.numel() for _, p in c.trainable]
    theta = torch.cat([p.detach().reshape(-1) for _, p in c.trainable])

    def fn(flat: Any) -> Any:
        pieces = torch.split(flat, sizes)
        return c.batch_logits(
            {n: x.reshape(s) for n, x, s in zip(names, pieces, shapes, strict=True)}
        )

    jac = torch.autograd.functional.jacobian(fn, theta)
    return jac.reshape(c.num_samples, -1, theta.shape[0])


def assert_close(actual: Any, expected: Any, tol: dict[str, float] = F64, scale: bool = True):
    """assert_close with atol relative to the size of the expected values."""
    atol = tol["atol"] * (max(1.0, float(expected.abs().max())) if scale else 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol)


def logit_grads(c: Case, provider: TorchProvider) -> Any:
    return c.loss.grad(provider.logits(), c.targets)


# ---- the identities ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_logits_match_ordinary_forward(name: str) -> None:
    c = case(name)
    provider = TorchProvider(c.model, c.inputs)
    with torch.no_grad():
        expected = c.batch_logits({n: p for n, p in c.trainable})
    assert provider.logits().shape == (c.num_samples, provider.num_outputs)
    assert_close(provider.logits(), expected.reshape(c.num_samples, -1))
    assert provider.num_params == sum(p.numel() for _, p in c.trainable)


@pytest.mark.parametrize(
    ("name", "method"),
    [(n, "vmap") for n in CASES] + [(n, "hooks") for n in HOOKABLE],
)
def test_per_sample_grads_match_single_sample_backward_loop(name: str, method: str) -> None:
    c = case(name)
    provider = TorchProvider(c.model, c.inputs, per_sample_method=method)
    grads = provider.vjp(logit_grads(c, provider))
    assert grads.shape == (c.num_samples, provider.num_params)
    assert grads.dtype == torch.float64
    expected = loop_per_sample_grads(c)
    assert float(expected.abs().max()) > 0
    assert_close(grads, expected)


@pytest.mark.parametrize("name", HOOKABLE)
def test_hooks_equal_vmap(name: str) -> None:
    c = case(name)
    hooks = TorchProvider(c.model, c.inputs, per_sample_method="hooks")
    vmapped = TorchProvider(c.model, c.inputs, per_sample_method="vmap")
    u = torch.randn_like(hooks.logits())
    assert_close(hooks.vjp(u), vmapped.vjp(u))


@pytest.mark.parametrize("name", CASES)
def test_vjp_sum_equals_sum_of_vjp_and_autograd(name: str) -> None:
    c = case(name)
    provider = TorchProvider(c.model, c.inputs)
    u = torch.randn_like(provider.logits())
    params = [p for _, p in c.trainable]
    z = c.batch_logits({n: p for n, p in c.trainable}).reshape(u.shape)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad((z * u).sum(), params)])
    assert_close(provider.vjp_sum(u), expected)
    assert_close(provider.vjp(u).sum(0), expected)


@pytest.mark.parametrize("name", CASES)
def test_jacobian_matches_autograd_functional_jacobian(name: str) -> None:
    c = case(name)
    provider = TorchProvider(c.model, c.inputs)
    jac = provider.jacobian()
    assert jac.shape == (c.num_samples, provider.num_outputs, provider.num_params)
    assert_close(jac, reference_jacobian(c))


@pytest.mark.parametrize("name", CASES)
def test_jvp_matches_jacobian_times_vector(name: str) -> None:
    c = case(name)
    provider = TorchProvider(c.model, c.inputs)
    v = torch.randn(provider.num_params, dtype=torch.float64)
    expected = reference_jacobian(c) @ v
    # T5LayerNorm (variance) and ViT's eager attention (softmax) compute in float32: the
    # forward-mode tangents carry float32 rounding (~1e-7 relative) that the reverse-mode
    # reference does not share. test_jvp_exact_for_t5_with_float64_layer_norm is the tight check.
    tol = F64 if c.exact_forward_mode else {"rtol": 1e-5, "atol": 1e-5}
    assert_close(provider.jvp(v), expected, tol)


@pytest.mark.parametrize("name", EXACT_FORWARD_MODE)
def test_jvp_matches_central_differences(name: str) -> None:
    """Central differences with step 1e-5: truncation O(1e-10), rounding O(1e-11).

    The HF models are left out: their float32 pieces make the forward noisy at 1e-7.
    """
    c = case(name)
    provider = TorchProvider(c.model, c.inputs)
    theta = provider.params_vector()
    v = torch.randn(provider.num_params, dtype=torch.float64)
    step = 1e-5
    plus = TorchProvider(c.model, c.inputs, params=theta + step * v).logits()
    minus = TorchProvider(c.model, c.inputs, params=theta - step * v).logits()
    assert_close(provider.jvp(v), (plus - minus) / (2 * step), {"rtol": 1e-6, "atol": 1e-8})


def test_jvp_exact_for_t5_with_float64_layer_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """With T5LayerNorm's float32 variance replaced by float64, T5 is float64 throughout
    and forward mode (jvp, 2-D masks) must agree with reverse mode to float64 rounding."""
    modeling_t5 = pytest.importorskip("transformers.models.t5.modeling_t5")

    def layer_norm(self: nn.Module, hidden: Any) -> Any:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(modeling_t5.T5LayerNorm, "forward", layer_norm)
    for name in ("t5_lora", "t5_prompt"):
        c = case(name)
        provider = TorchProvider(c.model, c.inputs)
        v = torch.randn(provider.num_params, dtype=torch.float64)
        assert_close(provider.jvp(v), reference_jacobian(c) @ v)


def test_chunking_changes_nothing() -> None:
    c = case("t5_lora")
    whole = TorchProvider(c.model, c.inputs)
    for method in ("vmap", "hooks"):
        chunked = TorchProvider(c.model, c.inputs, chunk_size=3, per_sample_method=method)
        u = torch.randn_like(whole.logits())
        v = torch.randn(whole.num_params, dtype=torch.float64)
        assert_close(chunked.logits(), whole.logits())
        assert_close(chunked.vjp(u), whole.vjp(u))
        assert_close(chunked.vjp_sum(u), whole.vjp_sum(u))
        assert_close(chunked.jvp(v), whole.jvp(v))
        assert_close(chunked.jacobian(), whole.jacobian())


def test_padding_mask_is_honoured_under_vmap() -> None:
    """Sample 0 is padded to 3 tokens: its gradient equals the unpadded 3-token one."""
    c = case("t5_lora")
    provider = TorchProvider(c.model, c.inputs, per_sample_method="vmap")
    grads = provider.vjp(logit_grads(c, provider))
    ids, labels = c.inputs["input_ids"][:1, :3], c.inputs["labels"][:1]
    params = [p for _, p in c.trainable]
    loss = _ce_sum(c.model(input_ids=ids, labels=labels).logits[0], labels[0])
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    assert_close(grads[0], expected)
    unmasked = {k: v for k, v in c.inputs.items() if k != "attention_mask"}
    other = TorchProvider(c.model, unmasked, per_sample_method="vmap")
    assert not torch.allclose(other.vjp(logit_grads(c, other))[0], grads[0])


def test_first_label_token_output_fn() -> None:
    """The evaluation framework's T5 logits: only the first label position, C = V."""
    c = case("t5_lora")
    provider = TorchProvider(c.model, c.inputs, output_fn=lambda out: out.logits[:, 0])
    assert provider.logits().shape == (c.num_samples, VOCAB)
    first = c.targets[:, 0]
    grads = provider.vjp(ngdref.SoftmaxCrossEntropy().grad(provider.logits(), first))
    params = [p for _, p in c.trainable]
    rows = []
    for n in range(c.num_samples):
        kwargs = {k: v[n:n + 1] for k, v in c.inputs.items()}
        loss = _ce_sum(c.model(**kwargs).logits[:, 0], first[n:n + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    assert_close(grads, torch.stack(rows))


def test_labels_become_targets_and_decoder_inputs() -> None:
    c = case("t5_lora")
    provider = TorchProvider(c.model, c.inputs)
    assert provider.targets is c.inputs["labels"]
    assert provider.num_outputs == c.targets.shape[1] * VOCAB


@pytest.mark.parametrize(
    ("name", "expected"),
    [("mlp_ce", "hooks"), ("cnn", "vmap"), ("t5_lora", "hooks"), ("t5_prompt", "vmap"),
     ("vit_lora", "hooks")],
)
def test_auto_picks_hooks_only_for_linear_parameters(name: str, expected: str) -> None:
    c = case(name)
    assert TorchProvider(c.model, c.inputs).per_sample_method == expected


class _SharedWeight(nn.Module):
    """A Linear weight also used outside the layer's forward: hooks miss that term."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x: Any) -> Any:
        return self.lin(x) + torch.tanh(x @ self.lin.weight)


def test_auto_falls_back_to_vmap_when_hooks_miss_a_use() -> None:
    torch.manual_seed(6)
    model = _SharedWeight()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    provider = TorchProvider(model, x)
    assert provider.per_sample_method == "hooks"
    grads = provider.vjp(ngdref.SoftmaxCrossEntropy().grad(provider.logits(), y))
    assert provider.per_sample_method == "vmap"
    c = Case("shared", model, x, y, ngdref.SoftmaxCrossEntropy(),
             lambda n: _ce_sum(model(x[n:n + 1]), y[n:n + 1]), lambda p: None, hookable=False)
    assert_close(grads, loop_per_sample_grads(c))
    forced = TorchProvider(model, x, per_sample_method="hooks")
    with pytest.raises(RuntimeError, match="per_sample_method"):
        forced.vjp(torch.ones_like(forced.logits()))


def test_flatten_unflatten_and_params_vector() -> None:
    c = case("t5_lora")
    provider = TorchProvider(c.model, c.inputs)
    assert provider.param_names == tuple(n for n, _ in c.trainable)
    theta = provider.params_vector()
    assert_close(theta, torch.cat([p.detach().reshape(-1) for _, p in c.trainable]))
    parts = provider.unflatten(theta)
    assert {n: tuple(t.shape) for n, t in parts.items()} == {
        n: tuple(p.shape) for n, p in c.trainable
    }
    assert torch.equal(provider.flatten(parts), theta)
    theta.zero_()  # a copy: the provider is unaffected
    assert float(provider.params_vector().abs().max()) > 0


def test_params_argument_evaluates_the_model_there() -> None:
    c = case("vit_lora")
    provider = TorchProvider(c.model, c.inputs)
    new = provider.params_vector() + 0.1 * torch.randn(provider.num_params, dtype=torch.float64)
    moved = TorchProvider(c.model, c.inputs, params=new)
    with torch.no_grad():
        expected = c.batch_logits(provider.unflatten(new))
    assert_close(moved.logits(), expected)
    assert not torch.allclose(moved.logits(), provider.logits())


def test_eval_mode_used_and_model_mode_restored() -> None:
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)
    ).double()
    model.train()
    model[3].eval()  # a mixed mode must come back as it was
    x = torch.randn(6, 4, dtype=torch.float64)
    for method in ("vmap", "hooks"):
        provider = TorchProvider(model, x, per_sample_method=method)
        u = torch.randn_like(provider.logits())
        provider.vjp(u)
        provider.vjp_sum(u)
        provider.jvp(torch.ones(provider.num_params, dtype=torch.float64))
        provider.jacobian()
        assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.train()
    model[3].eval()
    assert_close(provider.logits(), expected)


def test_float32_model() -> None:
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    c = Case("mlp32", model, x, y, ngdref.SoftmaxCrossEntropy(),
             lambda n: _ce_sum(model(x[n:n + 1]), y[n:n + 1]), lambda p: None, hookable=True)
    expected = loop_per_sample_grads(c)
    for method in ("vmap", "hooks"):
        provider = TorchProvider(model, x, per_sample_method=method)
        grads = provider.vjp(logit_grads(c, provider))
        assert grads.dtype == torch.float32
        assert_close(grads, expected, F32)


def test_sdpa_attention_works_for_reverse_mode() -> None:
    c = _vit("sdpa")
    provider = TorchProvider(c.model, c.inputs, per_sample_method="vmap")
    assert_close(provider.vjp(logit_grads(c, provider)), loop_per_sample_grads(c))


# ---- bad input ----------------------------------------------------------------------------------
def test_jvp_with_sdpa_attention_names_attn_implementation() -> None:
    c = _vit("sdpa")
    provider = TorchProvider(c.model, c.inputs)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        provider.jvp(torch.zeros(provider.num_params, dtype=torch.float64))


def test_model_without_trainable_parameters() -> None:
    model = nn.Linear(3, 2).double().requires_grad_(False)
    with pytest.raises(ValueError, match="model has no trainable parameters"):
        TorchProvider(model, torch.zeros(2, 3, dtype=torch.float64))


def test_mixed_parameter_dtypes() -> None:
    model = nn.Sequential(nn.Linear(3, 2).double(), nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"model: trainable parameter 1\.weight"):
        TorchProvider(model, torch.zeros(2, 3, dtype=torch.float64))


def test_non_finite_logits() -> None:
    model = nn.Linear(3, 2).double()
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="logits"):
        TorchProvider(model, x)


@pytest.fixture
def mlp_provider() -> TorchProvider:
    c = case("mlp_ce")
    return TorchProvider(c.model, c.inputs)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda p: torch.zeros(p.num_params, dtype=torch.float32), TypeError, "vector has dtype"),
        (lambda p: torch.zeros(p.num_params, dtype=torch.float64, device="meta"), TypeError,
         "vector is on device meta"),
        (lambda p: torch.zeros(p.num_params + 1, dtype=torch.float64), ValueError, "vector has"),
        (lambda p: torch.zeros(1, p.num_params, dtype=torch.float64), ValueError, "vector must"),
    ],
)
def test_bad_vector(mlp_provider: TorchProvider, make: Callable, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        mlp_provider.jvp(make(mlp_provider))


@pytest.mark.parametrize("method", ["vjp", "vjp_sum"])
@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda z: z.float(), TypeError, "cotangents has dtype"),
        (lambda z: torch.zeros(z.shape, dtype=z.dtype, device="meta"), TypeError,
         "cotangents is on device meta"),
        (lambda z: z[:-1], ValueError, "cotangents must have the logits' shape"),
    ],
)
def test_bad_cotangents(
    mlp_provider: TorchProvider, method: str, make: Callable, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        getattr(mlp_provider, method)(make(mlp_provider.logits()))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"per_sample_method": "loop"}, ValueError, "per_sample_method must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"params": torch.zeros(3, dtype=torch.float64)}, ValueError, r"params must have shape"),
        ({"params": torch.zeros(45, dtype=torch.float32)}, TypeError, "params has dtype"),
        ({"output_fn": lambda out: out[0]}, ValueError, "output_fn returned shape"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    c = case("mlp_ce")
    assert sum(p.numel() for _, p in c.trainable) == 45
    with pytest.raises(error, match=match):
        TorchProvider(c.model, c.inputs, **kwargs)


def test_hooks_refused_for_non_linear_parameters() -> None:
    c = case("cnn")
    with pytest.raises(ValueError, match="per_sample_method='hooks'"):
        TorchProvider(c.model, c.inputs, per_sample_method="hooks")


def test_bad_inputs() -> None:
    c = case("t5_lora")
    short = dict(c.inputs, attention_mask=c.inputs["attention_mask"][:2])
    with pytest.raises(ValueError, match=r"inputs\['attention_mask'\] has 2 samples"):
        TorchProvider(c.model, short)
    short_labels = dict(c.inputs, labels=c.inputs["labels"][:3])
    with pytest.raises(ValueError, match=r"inputs\['labels'\] has shape \(3, 3\)"):
        TorchProvider(c.model, short_labels)
    with pytest.raises(TypeError, match=r"inputs must be a torch\.Tensor or a mapping"):
        TorchProvider(c.model, [c.inputs["input_ids"]])
