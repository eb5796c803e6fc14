"""Models of the paper's experiments: T5 + LoRA / prompt tuning, ViT + LoRA, an MLP.

Each builder takes the ``model`` and ``peft`` sections of a run configuration
(:mod:`validation.experiments.config.load`) and returns a ``torch.nn.Module`` whose trainable
parameters (``requires_grad=True``) are exactly the adapters the paper trains:

================  =============================================================  ==================
setup             model                                                          trainable (paper)
================  =============================================================  ==================
``t5-lora``       ``T5ForConditionalGeneration`` "t5-base" + LoRA r=8, alpha=8,  884,736
                  dropout 0.1 on ``q`` and ``v`` of every attention block
                  (encoder self, decoder self and cross attention)
``t5-prompt``     "t5-base" + 20 prompt-tuning virtual tokens on the encoder,    15,360
                  text-initialised; peft task type CAUSAL_LM as the authors
                  (``peft.task_type``), or SEQ_2_SEQ_LM
``vit-lora``      ``ViTForImageClassification`` "google/vit-base-patch16-224"    313,344
                  + LoRA r=8, alpha=8, dropout 0.1 on ``q_proj`` / ``v_proj``
                  (``query`` / ``value`` before transformers 5) and their
                  biases; the 1000-way ImageNet head frozen
``mlp``           ``Linear``-activation stack, trained from scratch              all
================  =============================================================  ==================

``model.name`` is a hub name, a local directory written by ``save_pretrained`` (both through
``from_pretrained``) or ``"tiny"``: a small random model built from the ``model.tiny`` section,
offline, for tests and CPU smoke runs (tiny T5 uses
:func:`validation.experiments.data.glue.tiny_t5_tokenizer`'s vocabulary). Every Hugging Face model
is loaded with ``attn_implementation="eager"``: forward-mode AD (the NGD optimiser, the evaluation
framework's Fisher-vector products) does not support PyTorch's fused attention, and ``vmap`` over
it falls back to a per-sample loop.

The LoRA dropout is configured as the paper's 0.1 but never active: every training step and
evaluation runs in eval mode (:ref:`conv-eval-mode`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from validation.experiments.hub import before_hub_access

__all__ = [
    "MLP",
    "build_mlp",
    "build_t5",
    "build_vit",
    "check_model_name",
    "count_trainable",
    "load_t5_tokenizer",
    "torch_dtype",
]

TINY = "tiny"


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"float64"`` -> the torch dtype."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if name not in table:
        raise ValueError(f"model.dtype must be 'float32' or 'float64'; got {name!r}")
    return table[name]


def count_trainable(model: nn.Module) -> int:
    """Number of trainable scalars (``requires_grad=True``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- tokenizer -------------------------------------------------------------------------------
def load_t5_tokenizer(model_cfg: Mapping[str, Any]) -> Any:
    """The T5 tokenizer of a run: the tiny offline one, or ``model.tokenizer`` / ``model.name``.

    Parameters
    ----------
    model_cfg : mapping
        The ``model`` section: ``name`` ("t5-base", a directory or "tiny") and ``tokenizer``
        (optional hub name or directory; default: ``name``).
    """
    from validation.experiments.data.glue import load_tokenizer, tiny_t5_tokenizer

    if model_cfg["name"] == TINY and model_cfg.get("tokenizer") in (None, TINY):
        return tiny_t5_tokenizer()
    key = "model.tokenizer" if model_cfg.get("tokenizer") else "model.name"
    name = model_cfg.get("tokenizer") or model_cfg["name"]
    check_model_name(key, name)
    if not _looks_like_path(name):
        before_hub_access(key, name)
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as exc:
        raise OSError(
            f"{key}={name!r}: cannot load its T5 tokenizer: {exc}. {_OFFLINE_CHOICES}"
        ) from exc


#: what to do when a hub model is not available (offline, or not in the cache)
_OFFLINE_CHOICES = (
    "Offline (HF_HUB_OFFLINE=1) a hub name loads only from the local cache: set model.name to "
    "a local directory written by save_pretrained (--set model.name=/path/to/t5-base), to "
    "'tiny' (a small random model for smoke tests, no download), or allow the network to "
    "download it once"
)


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else (absolute, ./, ~, a/b/c) is a path."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or os.path.exists(name)
    )


def check_model_name(key: str, name: str) -> None:
    """Refuse a ``model.name`` that is a path to no directory (before the hub is asked).

    Raises
    ------
    FileNotFoundError
        ``name`` looks like a path (absolute, ``./``, ``~``, more than one ``/``) and is not a
        directory; the message names ``key``.
    """
    if _looks_like_path(name) and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(
            f"{key}={name!r}: no such directory (a local model must be a directory written by "
            "save_pretrained; a hub name has the form 'name' or 'org/name')"
        )


def _from_pretrained(cls: Any, name: str) -> nn.Module:
    """``cls.from_pretrained(name, attn_implementation="eager")`` with errors naming model.name."""
    check_model_name("model.name", name)
    if not _looks_like_path(name):
        before_hub_access("model.name", name)
    try:
        return cls.from_pretrained(os.path.expanduser(name), attn_implementation="eager")
    except (OSError, ValueError) as exc:
        raise OSError(
            f"model.name={name!r}: cannot load the model: {exc}. {_OFFLINE_CHOICES}"
        ) from exc


def _lora_config(peft_cfg: Mapping[str, Any], **extra: Any) -> Any:
    """``peft.LoraConfig`` from the config's ``peft`` section (r, alpha, dropout, targets, bias)."""
    import peft

    return peft.LoraConfig(
        r=peft_cfg["r"],
        lora_alpha=peft_cfg["alpha"],
        lora_dropout=peft_cfg["dropout"],
        target_modules=list(peft_cfg["target_modules"]),
        bias=peft_cfg["bias"],
        **extra,
    )


# ---- T5 --------------------------------------------------------------------------------------
def _tiny_t5(tiny: Mapping[str, Any], vocab_size: int) -> nn.Module:
    import transformers

    from validation.tiny_models import tiny_t5_config

    config = tiny_t5_config(
        vocab_size=vocab_size, d_model=tiny["d_model"], d_ff=tiny["d_ff"],
        num_layers=tiny["num_layers"], num_heads=tiny["num_heads"], d_kv=tiny["d_kv"],
        eos_token_id=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny["init_seed"])
        return transformers.T5ForConditionalGeneration(config)


def _prompt_init_ids(tokenizer: Any, text: str, num_tokens: int) -> list[int]:
    """peft's PromptTuningInit.TEXT token ids: the text's ids (with EOS), repeated, truncated."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"peft.init_text {text!r} tokenizes to nothing")
    return (ids * math.ceil(num_tokens / len(ids)))[:num_tokens]


#: peft task types of prompt tuning: the authors' CAUSAL_LM on the seq2seq model, or SEQ_2_SEQ_LM
_PROMPT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM"}


def _drop_prompt_positions(num_virtual_tokens: int) -> Any:
    """A forward hook cutting the decoder logits of the prompt positions: (N, n+T, V) -> (N, T, V).

    peft's CAUSAL_LM prompt tuning prefixes the labels with n ignored (-100) positions, so the
    T5 decoder runs n + T steps and its logits have n extra leading positions (the released
    code cuts them in its evaluator, ``greedy_pred[:, PE_num:]``). Cutting them here gives the
    same (N, T, V) layout as every other set-up; the loss, computed inside the model on the
    prefixed labels, is unchanged (the ignored positions do not count).
    """

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        logits = getattr(output, "logits", None)
        if logits is not None and logits.ndim == 3:
            output.logits = logits[:, num_virtual_tokens:]
        return output

    return hook


def build_t5(
    model_cfg: Mapping[str, Any], peft_cfg: Mapping[str, Any], tokenizer: Any, *, seed: int
) -> nn.Module:
    """T5 with LoRA or prompt tuning, in ``model.dtype``; only the adapters are trainable.

    Parameters
    ----------
    model_cfg : mapping
        ``name``: "t5-base", a local directory or "tiny" (``tiny``: d_model, d_ff, num_layers,
        num_heads, d_kv, init_seed); ``dtype``.
    peft_cfg : mapping
        ``type`` "lora" (r, alpha, dropout, target_modules, bias) or "prompt"
        (num_virtual_tokens, init "text" | "random", init_text).
    tokenizer : T5 tokenizer
        For the tiny model's vocabulary size and the prompt's text initialisation.
    seed : int
        Seeds the adapters' initialisation (LoRA A, random prompts); the base model's weights
        come from the checkpoint or, for "tiny", from ``tiny.init_seed``.

    Notes
    -----
    The prompt is ``num_virtual_tokens`` embeddings prepended to the encoder input
    (``num_transformer_submodules=1``: 20 x 768 = 15,360 parameters in t5-base, the paper's
    count; peft's seq2seq default of 2 would add 20 decoder tokens that it never uses). Text
    initialisation copies the word embeddings of ``init_text``'s token ids (EOS included),
    repeated and truncated to ``num_virtual_tokens``: peft's PromptTuningInit.TEXT, done here
    so that any tokenizer object works (peft reloads it by name).
    """
    import peft
    import transformers

    if model_cfg["name"] == TINY:
        base = _tiny_t5(model_cfg["tiny"], len(tokenizer))
    else:
        base = _from_pretrained(transformers.T5ForConditionalGeneration, model_cfg["name"])
    torch.manual_seed(seed)
    kind = peft_cfg["type"]
    if kind == "lora":
        model = peft.get_peft_model(
            base, _lora_config(peft_cfg, task_type=peft.TaskType.SEQ_2_SEQ_LM)
        )
    elif kind == "prompt":
        if peft_cfg["init"] not in ("text", "random"):
            raise ValueError(f"peft.init must be 'text' or 'random'; got {peft_cfg['init']!r}")
        task_type = peft_cfg.get("task_type", "causal_lm")
        if task_type not in _PROMPT_TASK_TYPES:
            raise ValueError(
                f"peft.task_type must be one of {sorted(_PROMPT_TASK_TYPES)}; got {task_type!r}"
            )
        n = peft_cfg["num_virtual_tokens"]
        config = peft.PromptTuningConfig(
            task_type=_PROMPT_TASK_TYPES[task_type],
            num_virtual_tokens=n,
            num_transformer_submodules=1,
            prompt_tuning_init=peft.PromptTuningInit.RANDOM,
        )
        model = peft.get_peft_model(base, config)
        if task_type == "causal_lm":
            model.register_forward_hook(_drop_prompt_positions(n))
        if peft_cfg["init"] == "text":
            ids = torch.tensor(_prompt_init_ids(tokenizer, peft_cfg["init_text"], n))
            embedding = model.prompt_encoder["default"].embedding
            with torch.no_grad():
                embedding.weight.copy_(base.get_input_embeddings().weight[ids])
    else:
        raise ValueError(f"peft.type must be 'lora' or 'prompt' for T5; got {kind!r}")
    return model.to(torch_dtype(model_cfg["dtype"])).eval()


# ---- ViT -------------------------------------------------------------------------------------
def _tiny_vit(tiny: Mapping[str, Any]) -> nn.Module:
    import transformers

    from validation.tiny_models import tiny_vit_config

    config = tiny_vit_config(
        **{key: tiny[key] for key in (
            "image_size", "patch_size", "hidden_size", "num_hidden_layers",
            "num_attention_heads", "intermediate_size", "num_labels",
        )}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny["init_seed"])
        return transformers.ViTForImageClassification(config)


def build_vit(model_cfg: Mapping[str, Any], peft_cfg: Mapping[str, Any], *, seed: int) -> nn.Module:
    """ViT with LoRA on the query/value projections; the classification head stays frozen.

    Parameters
    ----------
    model_cfg : mapping
        ``name``: "google/vit-base-patch16-224", a local directory or "tiny"; ``dtype``.
    peft_cfg : mapping
        ``type`` "lora", r, alpha, dropout, target_modules (transformers 5: "q_proj",
        "v_proj"), bias ("lora_only" trains the biases of the adapted projections too, which
        gives the paper's 313,344 trainable parameters).
    seed : int
        Seeds LoRA's initialisation.

    Notes
    -----
    The model keeps its 1000-way ImageNet head (not in peft's ``modules_to_save``, so frozen).
    Its ``image_size`` (224, or ``tiny.image_size``) is what the CIFAR transforms resize to.
    """
    import peft
    import transformers

    if peft_cfg["type"] != "lora":
        raise ValueError(f"peft.type must be 'lora' for ViT; got {peft_cfg['type']!r}")
    if model_cfg["name"] == TINY:
        base = _tiny_vit(model_cfg["tiny"])
    else:
        base = _from_pretrained(transformers.ViTForImageClassification, model_cfg["name"])
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [m for m in peft_cfg["target_modules"] if m not in names]
    if missing:
        raise ValueError(
            f"peft.target_modules {missing} are not modules of {model_cfg['name']!r} (transformers "
            "5 names ViT's attention projections q_proj, k_proj, v_proj)"
        )
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, _lora_config(peft_cfg))
    return model.to(torch_dtype(model_cfg["dtype"])).eval()


# ---- MLP -------------------------------------------------------------------------------------
_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    r"""A fully connected network, logits z = W_L a_{L-1} + b_L, a_k = act(W_k a_{k-1} + b_k).

    Parameters
    ----------
    input_dim : int
        64 for digits, 3072 for CIFAR-10.
    hidden_sizes : sequence of int
        The paper: (2048, 2048).
    num_classes : int
    activation : {"relu", "tanh", "gelu"}

    Notes
    -----
    ``forward(x)`` takes x of shape (N, input_dim) (trailing axes are flattened) and returns
    (N, num_classes). Every parameter is an ``nn.Linear`` weight or bias, so
    :class:`backends.TorchProvider` takes per-sample gradients by hooks.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_sizes: Sequence[int],
        num_classes: int,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"model.activation must be one of {sorted(_ACTIVATIONS)}; got {activation!r}"
            )
        layers: list[nn.Module] = []
        width = input_dim
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of inputs (N, ...)."""
        return self.net(x.reshape(x.shape[0], -1))


def build_mlp(model_cfg: Mapping[str, Any], *, seed: int) -> nn.Module:
    """The MLP of ``model_cfg``, initialised by torch's default with ``init_seed`` or ``seed``."""
    init_seed = model_cfg.get("init_seed")
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = MLP(
        model_cfg["input_dim"],
        model_cfg["hidden_sizes"],
        model_cfg["num_classes"],
        model_cfg["activation"],
    )
    return model.to(torch_dtype(model_cfg["dtype"])).eval()
