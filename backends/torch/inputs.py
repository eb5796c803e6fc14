r"""The batch a :class:`backends.TorchProvider` evaluates: its inputs sorted into batched
tensors, static values and targets, and the Hugging Face pieces around them.

Labels
    A ``"labels"`` entry of dict inputs is taken out of the model inputs (so the model never
    computes its mean-reduced loss) and kept as the targets. For an encoder-decoder Hugging
    Face model without ``decoder_input_ids`` they are derived from the labels with the
    model's own ``prepare_decoder_input_ids_from_labels`` (shift right, -100 -> pad), exactly
    as the model does when it gets ``labels``.
Attention masks under ``vmap``
    ``vmap`` over a 2-D ``attention_mask`` fails in transformers 5 (its mask builder branches
    on ``mask.all()``), while a 4-D additive float mask (0 where attended,
    ``finfo(dtype).min`` where masked, shape (1, 1, 1, S) per sample) is used as given.
    :func:`vmap_masks` therefore converts a 2-D ``attention_mask`` to that 4-D form in a
    forward pre-hook on the outermost Hugging Face model, i.e. after wrappers such as peft
    prompt tuning have prepended the virtual tokens' mask. This is done for encoder and
    encoder-decoder models (bidirectional masks); the masks of decoder-only causal LMs and
    ``decoder_attention_mask`` are left as they are (they ``vmap`` fine).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ngdref.checks import EMPTY_BATCH

#: the key of a tensor passed positionally, ``model(inputs)``
POSITIONAL = "<input>"


def hf_models(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> list[nn.Module]:
    """The Hugging Face ``PreTrainedModel`` submodules, outermost first ([] without HF);
    ``modules``: ``model.modules()`` if the caller has them already.

    A model built from transformers has imported it already; importing it here for a plain
    torch model would cost seconds, so an unimported transformers means no HF submodule.
    """
    if "transformers" not in sys.modules:
        return []
    from transformers import PreTrainedModel

    return [m for m in (model.modules() if modules is None else modules)
            if isinstance(m, PreTrainedModel)]


@dataclass(frozen=True)
class ModelInputs:
    """One batch of N samples: ``batched`` tensors (N first), ``static`` values, targets."""

    positional: bool
    batched: dict[str, torch.Tensor]
    static: dict[str, Any]
    targets: torch.Tensor | None
    num_samples: int


def _sort(inputs: Any) -> tuple[bool, dict[str, torch.Tensor], dict[str, Any], Any]:
    """(positional, batched tensors, static values, labels) of a tensor or a mapping."""
    if isinstance(inputs, torch.Tensor):
        return True, {POSITIONAL: inputs}, {}, None
    if not isinstance(inputs, Mapping):
        raise TypeError(
            f"inputs must be a torch.Tensor or a mapping of str to tensors, "
            f"got {type(inputs).__name__}"
        )
    batched, static = {}, {}
    for key, value in inputs.items():
        if not isinstance(key, str):
            raise TypeError(f"inputs: keys must be str, got {key!r}")
        if isinstance(value, torch.Tensor):
            batched[key] = value
        else:
            static[key] = value
    return False, batched, static, batched.pop("labels", None)


def _check_sizes(
    batched: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype | None = None
) -> tuple[str, int]:
    """The first key and N, after checking that every tensor has N samples on ``device`` and
    that floating tensors other than masks (which models convert themselves) are ``dtype``."""
    if device.type == "meta":
        raise ValueError(
            "model: its trainable parameters are on the meta device (shapes without values); "
            "materialise them first, e.g. model.to_empty(device='cpu') and load its weights"
        )
    if not batched:
        raise ValueError("inputs holds no tensor: at least one batched tensor is needed")
    sizes = {key: (t.shape[0] if t.ndim else None) for key, t in batched.items()}
    first_key = next(iter(sizes))
    n = sizes[first_key]
    for key, size in sizes.items():
        label = "inputs" if key == POSITIONAL else f"inputs[{key!r}]"
        if size is None:
            raise ValueError(f"{label} is a 0-d tensor; the batch must be its first axis")
        if size != n:
            raise ValueError(
                f"{label} has {size} samples (first axis) but inputs[{first_key!r}] has {n}"
            )
        if batched[key].device != device:
            raise TypeError(
                f"{label} is on device {batched[key].device} but the model's trainable "
                f"parameters are on {device}"
            )
        value = batched[key]
        if dtype is not None and value.is_floating_point() and "mask" not in key.lower() and (
            value.dtype != dtype
        ):
            raise TypeError(
                f"{label} has dtype {value.dtype} but the model's trainable parameters are "
                f"{dtype}: cast the inputs (or the model) so that they agree"
            )
    if n == 0:
        raise ValueError(f"inputs is {EMPTY_BATCH}")
    assert n is not None
    return first_key, n


def split_inputs(
    hf: list[nn.Module], inputs: Any, device: torch.device, dtype: torch.dtype | None = None
) -> ModelInputs:
    """Sort inputs into batched tensors, static values and the targets (checked).

    ``hf``: the model's :func:`hf_models` (walked once by the caller, which keeps them).
    ``dtype``: the trainable parameters'; floating inputs other than masks must match it,
    unless the model is a Hugging Face one (they cast their float inputs themselves).
    """
    positional, batched, static, targets = _sort(inputs)
    first_key, n = _check_sizes(batched, device, None if hf else dtype)
    if targets is not None and (targets.ndim == 0 or targets.shape[0] != n):
        raise ValueError(
            f"inputs['labels'] has shape {tuple(targets.shape)} but "
            f"inputs[{first_key!r}] has {n} samples"
        )
    if (
        targets is not None
        and "decoder_input_ids" not in batched
        and "decoder_inputs_embeds" not in batched
    ):
        prepare = _decoder_input_preparer(hf)
        if prepare is not None:
            batched["decoder_input_ids"] = prepare(labels=targets)
    return ModelInputs(positional, batched, static, targets, int(n))


def _decoder_input_preparer(hf: list[nn.Module]) -> Callable[..., torch.Tensor] | None:
    if not hf or not getattr(hf[0].config, "is_encoder_decoder", False):
        return None
    return getattr(hf[0], "prepare_decoder_input_ids_from_labels", None)


@contextlib.contextmanager
def vmap_masks(hf: list[nn.Module]) -> Iterator[None]:
    """Convert 2-D attention masks to 4-D additive ones on the outermost HF model of ``hf``."""
    if not hf:
        yield
        return
    outer = hf[0]
    config = outer.config
    causal = not getattr(config, "is_encoder_decoder", False) and outer.can_generate()
    if causal:
        yield
        return

    def to_additive(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            dtype = outer.dtype
            keep = mask.to(dtype)
            kwargs["attention_mask"] = (1.0 - keep)[:, None, None, :] * torch.finfo(dtype).min
        return args, kwargs

    handle = outer.register_forward_pre_hook(to_additive, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def default_output_fn(output: Any) -> torch.Tensor:
    """The model output if it is a tensor, else its ``.logits`` (Hugging Face outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"output_fn: the model returned {type(output).__name__}, which is neither a tensor "
        "nor has a .logits tensor; pass output_fn=... mapping it to logits of shape (N, ...)"
    )


def check_forward_ad(hf: list[nn.Module]) -> None:
    """Refuse forward-mode AD for Hugging Face models whose attention has no forward rule.

    Raises
    ------
    ValueError
        An ``attn_implementation`` other than "eager" (e.g. "sdpa"), named.
    """
    for model in hf:
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in (None, "eager"):
            raise ValueError(
                f"jvp uses forward-mode AD, which attn_implementation={impl!r} of "
                f"{type(model).__name__} does not support; load the model with "
                "attn_implementation='eager'"
            )
