"""TorchProvider refuses bad input with an error naming the argument."""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from backends.torch.provider import TorchProvider  # noqa: E402
from tests.backends.torch.provider_cases import case, vit_case  # noqa: E402


def test_jvp_with_sdpa_attention_names_attn_implementation() -> None:
    c = vit_case("sdpa")
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
        ({"per_sample_method": "loops"}, ValueError, "per_sample_method must be one of"),
        ({"per_sample": "loops"}, ValueError, "per_sample must be one of"),
        ({"per_sample": "vmap", "per_sample_method": "vmap"}, ValueError, "give per_sample alone"),
        ({"mode": "inference"}, ValueError, "mode must be one of"),
        ({"certify": "sometimes"}, ValueError, "certify must be one of"),
        ({"on_mismatch": "ignore"}, ValueError, "on_mismatch must be one of"),
        ({"certify_samples": 0}, ValueError, "certify_samples"),
        ({"certify_seed": -1}, ValueError, "certify_seed"),
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
