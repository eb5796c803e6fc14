"""The tiny random models of the tests, the validation suite and the benchmarks.

One home for the small Hugging Face configurations (T5, ViT), their adapters (LoRA, prompt
tuning), the tiny T5 batch and the tiny CNN, so that every caller writes only the sizes that
differ. The transformers are left to the caller to build and seed (globally, or in a forked
RNG), because the random state after building the model is part of what its tests compare.

torch, transformers and peft are imported inside the functions: importing this module costs
nothing and needs none of them.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import transformers

__all__ = [
    "T5_LORA_TARGETS",
    "VIT_LORA_TARGETS",
    "lora",
    "prompt_tuning",
    "t5_adapter",
    "tiny_cnn_batch",
    "tiny_t5_batch",
    "tiny_t5_config",
    "tiny_vit_config",
]

#: LoRA targets of T5: the query and value projections of every attention block
T5_LORA_TARGETS = ("q", "v")
#: LoRA targets of ViT (transformers 5 names its attention projections q_proj / v_proj)
VIT_LORA_TARGETS = ("q_proj", "v_proj")


def tiny_t5_config(
    *, vocab_size: int, d_model: int, d_ff: int, num_layers: int, num_heads: int, d_kv: int,
    **overrides: Any,
) -> transformers.T5Config:
    """A small T5 configuration: ``num_layers`` encoder and as many decoder layers.

    Always eager attention (forward-mode AD, which NGD's Fisher-vector products use, does not
    support PyTorch's fused attention) and ``decoder_start_token_id = pad_token_id = 0``
    (transformers 5 no longer defaults these; labels -> decoder inputs needs them).

    Parameters
    ----------
    vocab_size, d_model, d_ff, num_layers, num_heads, d_kv : int
        The sizes, as in ``transformers.T5Config``.
    **overrides
        Further ``T5Config`` fields (``feed_forward_proj``, ``dropout_rate``, ``eos_token_id``).
    """
    import transformers

    return transformers.T5Config(
        vocab_size=vocab_size, d_model=d_model, d_ff=d_ff, num_layers=num_layers,
        num_decoder_layers=num_layers, num_heads=num_heads, d_kv=d_kv,
        attn_implementation="eager", decoder_start_token_id=0, pad_token_id=0, **overrides,
    )


def tiny_vit_config(
    *, image_size: int, patch_size: int, hidden_size: int, num_hidden_layers: int,
    num_attention_heads: int, intermediate_size: int, num_labels: int,
    attn_implementation: str = "eager",
) -> transformers.ViTConfig:
    """A small ViT classifier configuration (eager attention unless told otherwise).

    Parameters
    ----------
    image_size, patch_size, hidden_size, num_hidden_layers, num_attention_heads,
    intermediate_size, num_labels : int
        The sizes, as in ``transformers.ViTConfig``.
    attn_implementation : str
        "eager" (forward-mode AD needs it) or "sdpa" (the tests of its refusal).
    """
    import transformers

    return transformers.ViTConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size, num_labels=num_labels,
        attn_implementation=attn_implementation,
    )


def lora(model: torch.nn.Module, *, r: int, targets: tuple[str, ...]) -> torch.nn.Module:
    """``model`` with peft LoRA of rank ``r`` on the modules named ``targets``.

    ``init_lora_weights=False``: B is random (not peft's zeros), so the gradients of A are not
    all zero and every adapter parameter is live. Draws from torch's global generator.
    """
    import peft

    config = peft.LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False)
    with warnings.catch_warnings():  # transformers 5 deprecations inside peft, not ours
        warnings.simplefilter("ignore", FutureWarning)
        return peft.get_peft_model(model, config)


def prompt_tuning(model: torch.nn.Module, *, num_virtual_tokens: int) -> torch.nn.Module:
    """``model`` (a seq2seq T5) with peft prompt tuning of ``num_virtual_tokens`` tokens."""
    import peft

    config = peft.PromptTuningConfig(
        task_type=peft.TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=num_virtual_tokens
    )
    return peft.get_peft_model(model, config)


def t5_adapter(model: torch.nn.Module, adapter: str) -> torch.nn.Module:
    """The tiny T5 cases' adapters: "lora" (r=2 on q, v) or "prompt" (3 virtual tokens)."""
    if adapter == "lora":
        return lora(model, r=2, targets=T5_LORA_TARGETS)
    if adapter == "prompt":
        return prompt_tuning(model, num_virtual_tokens=3)
    raise ValueError(f"adapter must be 'lora' or 'prompt'; got {adapter!r}")


def tiny_t5_batch(
    vocab_size: int, *, seed: int, ignore_index: int = -100
) -> dict[str, torch.Tensor]:
    """A padded T5 batch: N = 4 inputs of S = 6 tokens, T = 3 labels per sample.

    Token ids are drawn from 1 .. vocab_size - 1 by a generator seeded with ``seed``. Inputs 0
    and 2 are right-padded (id 0, attention mask 0) to 3 and 5 tokens; labels 1 and 3 keep
    2 and 1 tokens (label word + EOS), the rest ``ignore_index``.

    Returns
    -------
    dict
        ``input_ids`` (4, 6), ``attention_mask`` (4, 6), ``labels`` (4, 3).
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    n, s, t = 4, 6, 3
    ids = torch.randint(1, vocab_size, (n, s), generator=generator)
    mask = torch.ones(n, s, dtype=torch.long)
    mask[0, 3:] = 0  # right padding of the encoder input
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    labels = torch.randint(1, vocab_size, (n, t), generator=generator)
    labels[1, 2:] = ignore_index  # label word + EOS, padded with -100
    labels[3, 1:] = ignore_index
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_cnn_batch(
    *, seed: int, num_samples: int
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 CNN in eval mode on ``num_samples`` random 1 x 6 x 6 images of 3 classes.

    ``Conv2d(1, 2, 3) -> Tanh -> Flatten -> Linear(2 * 4 * 4, 3)``; the model, the images x
    (N, 1, 6, 6) and the labels y (N,) are drawn in that order after ``torch.manual_seed(seed)``.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)
    ).double().eval()
    x = torch.randn(num_samples, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (num_samples,))
    return model, x, y
