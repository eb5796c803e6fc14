"""The small models and batches of ``python -m validation.bench.steps`` (float32, eval mode).

LoRA workloads (a small T5 with LoRA on q and v, a small ViT with LoRA on q_proj and v_proj)
and full-parameter ones (a small MLP, an MLP of a few million parameters, and the same T5 and
ViT with ALL parameters trainable). ``quick`` shrinks every model for CI-scale runs. Dropout
is 0 (ViT's and LoRA's default; set for T5), so the train mode that Opacus' hooks need
computes the same function as the eval mode of the other steps. The paper-shape workloads
are in :mod:`validation.bench.paper_workloads`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import ngdref
from backends import default_output_fn
from validation.tiny_models import (
    T5_LORA_TARGETS,
    VIT_LORA_TARGETS,
    lora,
    tiny_t5_config,
    tiny_vit_config,
)

#: workloads whose every parameter is trainable (the peak-memory target applies to them)
FULL_PARAMETER = ("mlp", "mlp_big", "t5_full", "vit_full")


@dataclass
class Workload:
    """A model on one batch, with everything each measured thing needs."""

    name: str
    description: str
    model: nn.Module
    batch: Any  # what the optimisers' closure returns: HF dict with labels, or (x, y)
    provider_inputs: Any  # what TorchProvider gets
    targets: torch.Tensor
    loss: ngdref.LogitLoss
    plain_loss: Callable[[], torch.Tensor]  # the model's own mean loss, for fwd+bwd / AdamW
    curvlinops_args: tuple[nn.Module, nn.Module, Any, torch.Tensor, Any] | None
    curvlinops_note: str = ""
    num_samples: int = 0

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.trainable)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


class _LogitsOf(nn.Module):
    """model(X) -> logits, for curvlinops: a dict X is passed as keywords; (N, T, V) -> (N*T, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> torch.Tensor:
        out = self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs)
        logits = default_output_fn(out)
        return logits.reshape(-1, logits.shape[-1])


def _trainable(
    base: nn.Module, full: bool, targets: tuple[str, ...], device: torch.device
) -> nn.Module:
    """float32, eval mode, on ``device``: ``base`` itself (full) or with LoRA r=8 on ``targets``."""
    model = base if full else lora(base, r=8, targets=targets)
    return model.float().eval().to(device)


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def _t5(quick: bool, full: bool, device: torch.device) -> Workload:
    import transformers

    n, src, vocab, d_model = (8, 16, 128, 32) if quick else (32, 32, 1000, 128)
    heads = 4
    torch.manual_seed(0)
    config = tiny_t5_config(
        vocab_size=vocab, d_model=d_model, d_ff=2 * d_model, num_layers=2, num_heads=heads,
        d_kv=d_model // heads, dropout_rate=0.0,  # train mode (the peers') = eval mode
    )
    base = transformers.T5ForConditionalGeneration(config)
    model = _trainable(base, full, T5_LORA_TARGETS, device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, vocab, (n, src), generator=gen)
    lengths = torch.randint(src // 2, src + 1, (n,), generator=gen)
    mask = (torch.arange(src)[None, :] < lengths[:, None]).long()  # right padding
    ids = ids * mask
    labels = torch.stack(  # label word + EOS (id 1), as in the paper's T5 tasks
        [torch.randint(2, vocab, (n,), generator=gen), torch.ones(n, dtype=torch.long)], dim=1
    )
    batch = _to({"input_ids": ids, "attention_mask": mask, "labels": labels}, device)
    decoder_ids = base.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
         "decoder_input_ids": decoder_ids}
    what = "all parameters trainable" if full else "LoRA r=8 on q,v"
    return Workload(
        "t5_full" if full else "t5", f"T5, {what}: d_model {d_model}, 2+2 layers, vocab {vocab}, "
        f"input {src}, labels 2, N={n}",
        model, batch, batch, batch["labels"], ngdref.SequenceSoftmaxCrossEntropy(vocab),
        lambda: model(**batch).loss,
        (_LogitsOf(model), nn.CrossEntropyLoss(reduction="sum", ignore_index=-100), x,
         batch["labels"].reshape(-1), lambda inputs: inputs["input_ids"].shape[0]),
        curvlinops_note="curvlinops' EF flattens (N*T, V): per-token EF, ngdref's is per-sequence",
        num_samples=n,
    )


def _vit(quick: bool, full: bool, device: torch.device) -> Workload:
    import transformers

    n, image, patch, hidden = (8, 16, 8, 32) if quick else (32, 32, 8, 64)
    torch.manual_seed(2)
    config = tiny_vit_config(
        image_size=image, patch_size=patch, hidden_size=hidden, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=2 * hidden, num_labels=10,
    )
    base = transformers.ViTForImageClassification(config)
    model = _trainable(base, full, VIT_LORA_TARGETS, device)
    gen = torch.Generator().manual_seed(3)
    pixels = torch.randn(n, 3, image, image, generator=gen).to(device)
    labels = torch.randint(0, 10, (n,), generator=gen).to(device)
    batch = {"pixel_values": pixels, "labels": labels}
    what = "all parameters trainable" if full else "LoRA r=8 on q_proj,v_proj"
    return Workload(
        "vit_full" if full else "vit", f"ViT, {what}: image {image}, patch {patch}, "
        f"hidden {hidden}, 2 layers, 10 classes, N={n}",
        model, batch, batch, labels, ngdref.SoftmaxCrossEntropy(),
        lambda: model(**batch).loss,
        (_LogitsOf(model), nn.CrossEntropyLoss(reduction="sum"), pixels, labels, None),
        num_samples=n,
    )


def _mlp(quick: bool, big: bool, device: torch.device) -> Workload:
    if big:  # 3 x 1024^2 + ... = 3.2 million parameters (quick: 0.2 million)
        n, width, layers = (8, 256, 3) if quick else (32, 1024, 3)
    else:
        n, width, layers = (8, 64, 2) if quick else (32, 256, 2)
    torch.manual_seed(4)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*blocks, nn.Linear(width, 10)).eval().to(device)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, width, generator=gen).to(device)
    y = torch.randint(0, 10, (n,), generator=gen).to(device)
    criterion = nn.CrossEntropyLoss()
    return Workload(
        "mlp_big" if big else "mlp",
        f"MLP {'-'.join([str(width)] * (layers + 1))}-10, ReLU, all parameters trainable, N={n}",
        model, (x, y), x, y, ngdref.SoftmaxCrossEntropy(),
        lambda: criterion(model(x), y),
        (model, nn.CrossEntropyLoss(reduction="sum"), x, y, None),
        num_samples=n,
    )


BUILDERS: dict[str, Callable[[bool, torch.device], Workload]] = {
    "t5": lambda q, d: _t5(q, False, d),
    "vit": lambda q, d: _vit(q, False, d),
    "mlp": lambda q, d: _mlp(q, False, d),
    "mlp_big": lambda q, d: _mlp(q, True, d),
    "t5_full": lambda q, d: _t5(q, True, d),
    "vit_full": lambda q, d: _vit(q, True, d),
}
WORKLOADS = tuple(BUILDERS)
