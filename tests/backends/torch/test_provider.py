"""TorchProvider (backends/torch/provider.py) against independent routes, in float64.

Expected values never come from the provider's own machinery (the cases and references are in
:mod:`tests.backends.torch.provider_cases`):

- per-sample gradients: a Python loop of single-sample forward passes through the
  model's ordinary ``__call__`` (2-D attention masks, Hugging Face's own
  ``labels -> decoder_input_ids``) and ``loss.backward()`` on a ``torch.nn`` loss
  with ``reduction="sum"``;
- Jacobians: ``torch.autograd.functional.jacobian`` (one reverse pass per output row,
  full batch, no ``vmap``);
- Jacobian-vector products: the verified Jacobian times v, and central differences;
- summed products: ``torch.autograd.grad`` of ``sum(z * u)`` on the full batch.

Bad input is in tests/backends/torch/test_provider_bad_input.py.
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.per_sample.routes import PER_SAMPLE  # noqa: E402
from backends.torch.provider import TorchProvider  # noqa: E402
from tests.backends.torch.provider_cases import (  # noqa: E402
    CASES,
    EXACT_FORWARD_MODE,
    F32,
    F64,
    VOCAB,
    Case,
    assert_close,
    case,
    ce_sum,
    logit_grads,
    loop_per_sample_grads,
    reference_jacobian,
    vit_case,
)


def dense(grads: Any) -> Any:
    """G as a tensor: ``vjp`` gives per_sample="ghost"'s rows as GhostRows (G not formed)."""
    return grads.materialise() if hasattr(grads, "materialise") else grads


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


@pytest.mark.parametrize("method", PER_SAMPLE)
@pytest.mark.parametrize("name", CASES)
def test_per_sample_grads_match_single_sample_backward_loop(name: str, method: str) -> None:
    c = case(name)
    provider = TorchProvider(c.model, c.inputs, per_sample=method)
    grads = dense(provider.vjp(logit_grads(c, provider)))
    assert grads.shape == (c.num_samples, provider.num_params)
    assert grads.dtype == torch.float64
    expected = loop_per_sample_grads(c)
    assert float(expected.abs().max()) > 0
    assert_close(grads, expected)


@pytest.mark.parametrize("name", CASES)
def test_hooks_equal_vmap(name: str) -> None:
    c = case(name)
    hooks = TorchProvider(c.model, c.inputs, per_sample="hooks")
    vmapped = TorchProvider(c.model, c.inputs, per_sample="vmap")
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
    for method in PER_SAMPLE:
        chunked = TorchProvider(c.model, c.inputs, chunk_size=3, per_sample=method)
        u = torch.randn_like(whole.logits())
        v = torch.randn(whole.num_params, dtype=torch.float64)
        assert_close(chunked.logits(), whole.logits())
        assert_close(dense(chunked.vjp(u)), dense(whole.vjp(u)))
        assert_close(chunked.vjp_sum(u), whole.vjp_sum(u))
        assert_close(chunked.jvp(v), whole.jvp(v))
        assert_close(chunked.jacobian(), whole.jacobian())


def test_padding_mask_is_honoured_under_vmap() -> None:
    """Sample 0 is padded to 3 tokens: its gradient equals the unpadded 3-token one."""
    c = case("t5_lora")
    provider = TorchProvider(c.model, c.inputs, per_sample="vmap")
    grads = provider.vjp(logit_grads(c, provider))
    ids, labels = c.inputs["input_ids"][:1, :3], c.inputs["labels"][:1]
    params = [p for _, p in c.trainable]
    loss = ce_sum(c.model(input_ids=ids, labels=labels).logits[0], labels[0])
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    assert_close(grads[0], expected)
    unmasked = {k: v for k, v in c.inputs.items() if k != "attention_mask"}
    other = TorchProvider(c.model, unmasked, per_sample="vmap")
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
        loss = ce_sum(c.model(**kwargs).logits[:, 0], first[n:n + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    assert_close(grads, torch.stack(rows))


def test_labels_become_targets_and_decoder_inputs() -> None:
    c = case("t5_lora")
    provider = TorchProvider(c.model, c.inputs)
    assert provider.targets is c.inputs["labels"]
    assert provider.num_outputs == c.targets.shape[1] * VOCAB


@pytest.mark.parametrize("name", CASES)
def test_auto_splits_every_parameter_by_its_layer(name: str) -> None:
    """"auto" gives every trainable parameter a layer route (factors or per-layer rows, the
    broadcast captures of T5 prompt tuning too) and falls back nowhere on these models."""
    c = case(name)
    provider = TorchProvider(c.model, c.inputs)
    provider.per_sample_rows(logit_grads(c, provider))
    assert set(provider.routes) == set(provider.param_names)
    assert set(provider.routes.values()) <= {"ghost", "materialised"}, provider.routes
    assert provider.fallbacks == ()


class _SharedWeight(nn.Module):
    """A Linear weight also used outside the layer's forward: no layer kind sees that term."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3, dtype=torch.float64)

    def forward(self, x: Any) -> Any:
        return self.lin(x) + torch.tanh(x @ self.lin.weight)


@pytest.mark.parametrize("method", ["auto", "ghost", "hooks"])
def test_a_weight_used_outside_its_layer_falls_through_to_vmap(method: str) -> None:
    torch.manual_seed(6)
    model = _SharedWeight()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    provider = TorchProvider(model, x, per_sample=method)
    grads = provider.vjp(ngdref.SoftmaxCrossEntropy().grad(provider.logits(), y))
    grads = dense(grads)
    assert provider.routes["lin.weight"] == "vmap"
    assert provider.routes["lin.bias"] == "materialised"
    assert provider.fallbacks == ("lin.weight: whole-model vmap (used where neither its layer "
                                  "kind nor a broadcast capture splits it)",)
    c = Case("shared", model, x, y, ngdref.SoftmaxCrossEntropy(),
             lambda n: ce_sum(model(x[n:n + 1]), y[n:n + 1]), lambda p: None, hookable=False)
    assert_close(grads, loop_per_sample_grads(c))


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
    for method in PER_SAMPLE:
        provider = TorchProvider(model, x, per_sample=method)
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
             lambda n: ce_sum(model(x[n:n + 1]), y[n:n + 1]), lambda p: None, hookable=True)
    expected = loop_per_sample_grads(c)
    for method in ("vmap", "hooks", "loop"):
        provider = TorchProvider(model, x, per_sample=method)
        grads = provider.vjp(logit_grads(c, provider))
        assert grads.dtype == torch.float32
        assert_close(grads, expected, F32)


def test_sdpa_attention_works_for_reverse_mode() -> None:
    c = vit_case("sdpa")
    provider = TorchProvider(c.model, c.inputs, per_sample="vmap")
    assert_close(provider.vjp(logit_grads(c, provider)), loop_per_sample_grads(c))

