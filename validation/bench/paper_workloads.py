"""The step bench's workloads at the paper's layer widths (random weights, float32, eval mode).

T5 with the widths of t5-small (d_model 512, d_ff 2048, 8 heads of 64, vocabulary 32128) and
t5-base (768, 3072, 12 heads of 64), each with LoRA r=8 on q and v, with prompt tuning (20
virtual tokens) and with ALL parameters trainable; ViT-S/16 (width 384, 6 heads, MLP 1536) and
ViT-B/16 (768, 12 heads, 3072), 16 x 16 patches, with LoRA r=8 on q_proj and v_proj plus the
classifier head, and with ALL parameters; and the MLP 784-1536-1536-1536-10 with all
parameters. Only the depth, the batch and the image size are cut to what a 2-core CPU run
affords (:data:`CPU_SIZES`); ``full_shapes=True`` restores the real depths (T5 6+6 and 12+12,
ViT 12 layers, 224 x 224 images), for a GPU. ``quick=True`` keeps every model's structure at
tiny widths, for the tests and a smoke run; its sizes make two axes coincide on purpose (T5:
N == input length; ViT: N == tokens with [CLS]; MLP: N == width), so a per-sample engine
that confuses the sample axis with another one cannot pass by shape alone.

Each T5 sample is an input of 48 tokens (right padded to a random length of at least 24) and
two label tokens, a label word and EOS, as in the paper's T5 tasks; each ViT sample an image of
100 classes (CIFAR-100, the paper's ViT task). Dropout is 0 in every configuration, so that
train mode (which Opacus' hooks need) and eval mode (the paper's steps) compute the same
function. For a seq2seq model peft allocates prompt rows for the encoder and the decoder
(2 x 20 x d_model trainable parameters) but feeds only the encoder's 20: the decoder's rows get
no gradient, in every step alike.

Hugging Face offline: models are built from configurations only, with random weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

import ngdref
from validation.bench.workloads import Workload, _LogitsOf, _to
from validation.tiny_models import (
    T5_LORA_TARGETS,
    VIT_LORA_TARGETS,
    lora,
    prompt_tuning,
    tiny_t5_config,
    tiny_vit_config,
)

__all__ = [
    "CPU_SIZES",
    "PAPER_BUILDERS",
    "PAPER_FULL_PARAMETER",
    "PAPER_WORKLOADS",
    "T5_WIDTHS",
    "VIT_WIDTHS",
    "Sizes",
    "T5Widths",
    "ViTWidths",
    "build",
]

LORA_RANK = 8
PROMPT_TOKENS = 20
T5_VOCAB = 32128
VIT_CLASSES = 100
MLP_WIDTHS = (784, 1536, 1536, 1536, 10)


@dataclass(frozen=True)
class T5Widths:
    """The widths of a T5 checkpoint, and its depth (encoder layers = decoder layers)."""

    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    vocab_size: int
    num_layers: int


@dataclass(frozen=True)
class ViTWidths:
    """The widths of a ViT checkpoint (16 x 16 patches), and its depth."""

    hidden_size: int
    num_heads: int
    intermediate_size: int
    num_layers: int
    patch_size: int = 16


T5_WIDTHS = {
    "t5_small": T5Widths(512, 2048, 8, 64, T5_VOCAB, 6),
    "t5_base": T5Widths(768, 3072, 12, 64, T5_VOCAB, 12),
}
VIT_WIDTHS = {
    "vit_s16": ViTWidths(384, 6, 1536, 12),
    "vit_b16": ViTWidths(768, 12, 3072, 12),
}
#: the tiny stand-ins of ``quick=True``: the same structure, widths a test can afford
_QUICK_T5 = T5Widths(16, 32, 2, 8, 50, 1)
_QUICK_VIT = ViTWidths(8, 2, 16, 1, patch_size=8)


@dataclass(frozen=True)
class Sizes:
    """Depth, batch and input length of one workload family at one scale.

    ``layers`` is None for the checkpoint's own depth; ``tokens`` is the T5 input length or
    the ViT image side in pixels (its tokens: (side / patch)^2 + 1 for [CLS]).
    """

    layers: int | None
    num_samples: int
    tokens: int


#: what the 2-core CPU run affords (the issue's measured rows use these batches and lengths)
CPU_SIZES = {
    "t5_small": Sizes(2, 16, 48), "t5_base": Sizes(2, 16, 48),
    "vit_s16": Sizes(4, 32, 128), "vit_b16": Sizes(2, 16, 128),
}
_FULL_SIZES = {
    "t5_small": Sizes(None, 16, 48), "t5_base": Sizes(None, 16, 48),
    "vit_s16": Sizes(None, 32, 224), "vit_b16": Sizes(None, 32, 224),
}
_QUICK_SIZES = {"t5": Sizes(1, 6, 6), "vit": Sizes(1, 5, 16)}


def _sizes(family: str, quick: bool, full_shapes: bool) -> Sizes:
    if quick:
        return _QUICK_SIZES[family.split("_")[0]]
    return (_FULL_SIZES if full_shapes else CPU_SIZES)[family]


def _t5_batch(n: int, src: int, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Inputs (n, src) right padded to lengths in [src/2, src]; labels (n, 2): word + EOS."""
    ids = torch.randint(2, vocab, (n, src), generator=gen)
    lengths = torch.randint(src // 2, src + 1, (n,), generator=gen)
    mask = (torch.arange(src)[None, :] < lengths[:, None]).long()
    labels = torch.stack(
        [torch.randint(2, vocab, (n,), generator=gen), torch.ones(n, dtype=torch.long)], dim=1
    )
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}


def _t5(
    family: str, variant: str, quick: bool, device: torch.device, *, full_shapes: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Workload:
    import transformers

    widths = _QUICK_T5 if quick else T5_WIDTHS[family]
    sizes = _sizes(family, quick, full_shapes)
    layers = sizes.layers or widths.num_layers
    torch.manual_seed(0)
    config = tiny_t5_config(
        vocab_size=widths.vocab_size, d_model=widths.d_model, d_ff=widths.d_ff,
        num_layers=layers, num_heads=widths.num_heads, d_kv=widths.d_kv, dropout_rate=0.0,
    )
    adapters = {
        "lora": lambda m: lora(m, r=LORA_RANK, targets=T5_LORA_TARGETS),
        "prompt": lambda m: prompt_tuning(m, num_virtual_tokens=PROMPT_TOKENS),
        "full": lambda m: m,
    }
    with device:  # built in place: .to("meta") afterwards would untie the embeddings
        base = transformers.T5ForConditionalGeneration(config)
        model = adapters[variant](base).to(dtype=dtype).eval()
    batch = _to(_t5_batch(sizes.num_samples, sizes.tokens, widths.vocab_size,
                          torch.Generator().manual_seed(1)), device)
    x = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
         "decoder_input_ids": base.prepare_decoder_input_ids_from_labels(labels=batch["labels"])}
    what = {"lora": f"LoRA r={LORA_RANK} on q,v", "prompt": f"prompt tuning, {PROMPT_TOKENS} "
            "virtual tokens", "full": "all parameters"}[variant]
    return Workload(
        f"{family}_{variant}",
        f"T5 ({family.replace('_', '-')} widths{', quick' if quick else ''}: d_model "
        f"{widths.d_model}, d_ff {widths.d_ff}, {widths.num_heads} heads), {what}: "
        f"{layers}+{layers} layers, vocab {widths.vocab_size}, input {sizes.tokens}, "
        f"labels 2, N={sizes.num_samples}",
        model, batch, batch, batch["labels"], ngdref.SequenceSoftmaxCrossEntropy(
            widths.vocab_size), lambda: model(**batch).loss,
        (_LogitsOf(model), nn.CrossEntropyLoss(reduction="sum"), x,
         batch["labels"].reshape(-1), lambda inputs: inputs["input_ids"].shape[0]),
        curvlinops_note="curvlinops' EF flattens (N*T, V): per-token EF, ngdref's is per-sequence",
        num_samples=sizes.num_samples,
    )


def _vit(
    family: str, variant: str, quick: bool, device: torch.device, *, full_shapes: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Workload:
    import transformers

    widths = _QUICK_VIT if quick else VIT_WIDTHS[family]
    sizes = _sizes(family, quick, full_shapes)
    layers = sizes.layers or widths.num_layers
    classes = 3 if quick else VIT_CLASSES
    torch.manual_seed(2)
    config = tiny_vit_config(
        image_size=sizes.tokens, patch_size=widths.patch_size, hidden_size=widths.hidden_size,
        num_hidden_layers=layers, num_attention_heads=widths.num_heads,
        intermediate_size=widths.intermediate_size, num_labels=classes,
    )
    with device:
        model: nn.Module = transformers.ViTForImageClassification(config)
        if variant == "lora":
            model = lora(model, r=LORA_RANK, targets=VIT_LORA_TARGETS)
            # the head is trained with the adapters, as in the paper (a new task's classes)
            model.get_submodule("base_model.model.classifier").requires_grad_(True)
    model = model.to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(3)
    side = sizes.tokens
    pixels = torch.randn(sizes.num_samples, 3, side, side, generator=gen).to(device, dtype)
    labels = torch.randint(0, classes, (sizes.num_samples,), generator=gen).to(device)
    batch = {"pixel_values": pixels, "labels": labels}
    what = (f"LoRA r={LORA_RANK} on q_proj,v_proj + head" if variant == "lora"
            else "all parameters")
    tokens = (side // widths.patch_size) ** 2
    return Workload(
        f"{family}_{variant}",
        f"ViT ({family.replace('_', '-')[:-2]}/16 widths{', quick' if quick else ''}: "
        f"width {widths.hidden_size}, {widths.num_heads} heads, MLP {widths.intermediate_size}"
        f"), {what}: {layers} layers, image {side} ({tokens} patches + [CLS]), "
        f"{classes} classes, N={sizes.num_samples}",
        model, batch, batch, labels, ngdref.SoftmaxCrossEntropy(), lambda: model(**batch).loss,
        (_LogitsOf(model), nn.CrossEntropyLoss(reduction="sum"), pixels, labels, None),
        num_samples=sizes.num_samples,
    )


def _mlp(
    quick: bool, device: torch.device, *, full_shapes: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Workload:
    """The paper's MLP (its shape is already the real one: ``full_shapes`` changes nothing)."""
    widths, n = ((12, 8, 8, 8, 3), 8) if quick else (MLP_WIDTHS, 64)
    torch.manual_seed(4)
    blocks: list[nn.Module] = []
    with device:
        for fan_in, fan_out in itertools.pairwise(widths[:-1]):
            blocks += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        model = nn.Sequential(*blocks, nn.Linear(widths[-2], widths[-1]))
    model = model.to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, widths[0], generator=gen).to(device, dtype)
    y = torch.randint(0, widths[-1], (n,), generator=gen).to(device)
    criterion = nn.CrossEntropyLoss()
    return Workload(
        "mlp_paper",
        f"MLP {'-'.join(map(str, widths))}, ReLU, all parameters{', quick' if quick else ''}, "
        f"N={n}",
        model, (x, y), x, y, ngdref.SoftmaxCrossEntropy(), lambda: criterion(model(x), y),
        (model, nn.CrossEntropyLoss(reduction="sum"), x, y, None),
        num_samples=n,
    )


#: name -> ``builder(quick, device, *, full_shapes=False, dtype=torch.float32)``; the first two
#: arguments are those of ``BUILDERS`` of :mod:`validation.bench.workloads`
PAPER_BUILDERS: dict[str, Callable[..., Workload]] = {
    **{f"{family}_{variant}": partial(_t5, family, variant)
       for family in T5_WIDTHS for variant in ("lora", "prompt", "full")},
    **{f"{family}_{variant}": partial(_vit, family, variant)
       for family in VIT_WIDTHS for variant in ("lora", "full")},
    "mlp_paper": _mlp,
}
PAPER_WORKLOADS = tuple(PAPER_BUILDERS)
#: the workloads whose every parameter is trainable (the peak-memory target applies to them)
PAPER_FULL_PARAMETER = tuple(k for k in PAPER_WORKLOADS if k.endswith(("_full", "mlp_paper")))


def build(
    name: str, *, quick: bool = False, full_shapes: bool = False,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> Workload:
    """The workload ``name`` (one of :data:`PAPER_WORKLOADS`).

    Parameters
    ----------
    name : str
        ``{t5_small,t5_base}_{lora,prompt,full}``, ``{vit_s16,vit_b16}_{lora,full}`` or
        ``mlp_paper``.
    quick : bool
        Tiny widths, same structure (tests, smoke runs).
    full_shapes : bool
        The checkpoints' own depths and ViT's 224 x 224 images (for a GPU).
    device : torch.device or str
        Where the model and batch live ("meta" builds without allocating).
    dtype : torch.dtype
        The floating-point type of the parameters and images (tests use float64).
    """
    if name not in PAPER_BUILDERS:
        raise ValueError(f"name must be one of {list(PAPER_WORKLOADS)}; got {name!r}")
    return PAPER_BUILDERS[name](quick, torch.device(device), full_shapes=full_shapes, dtype=dtype)
