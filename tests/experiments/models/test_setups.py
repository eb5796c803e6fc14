"""The experiments' set-ups (models, losses, sources) against the paper and the authors' code.

The trainable counts of the paper's models are compared with the paper's numbers (meta device,
no weights); prompt tuning with peft's own route; the padding side and SF's sampled positions
with losses and gradients computed here by hand or by autograd; missing sources must name the
key.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import ngdref
from tests.experiments.cases import (
    fixture_dirs,  # noqa: F401  (a fixture: pytest finds it here)
    require_hf_stack,
    tiny_overrides,
)

torch = require_hf_stack()

from validation.experiments.config.load import (  # noqa: E402
    default_config,
    load_config,
)
from validation.experiments.train.runner import build_setup  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- model and data sources: errors that name the key -------------------------------------
@pytest.mark.parametrize("setup", ["t5-lora", "t5-prompt", "vit-lora"])
@pytest.mark.parametrize("name", ["/nonexistent/path", "./no/such/dir", "~/no-such-model-dir"])
def test_model_name_that_is_a_missing_directory(setup: str, name: str) -> None:
    config = load_config(setup, [f"model.name={name}"])
    with pytest.raises(FileNotFoundError, match=rf"model\.name='{re.escape(name)}': no such "
                       "directory"):
        build_setup(config, "cpu")


def test_offline_tokenizer_failure_names_model_name_and_the_choices() -> None:
    """Offline, an uncached hub name gives a placeholder vocabulary (transformers 5) or an
    error; either way the message names the key and what to do instead."""
    config = load_config("t5-lora", ["task=rte", "model.name=ngdref-test/no-such-t5"])
    with pytest.raises(OSError, match=r"model\.name='ngdref-test/no-such-t5'.*"
                       r"local directory.*'tiny'"):
        build_setup(config, "cpu")
    config = load_config("t5-lora", ["model.tokenizer=ngdref-test/no-such-t5"])
    with pytest.raises(OSError, match=r"model\.tokenizer='ngdref-test/no-such-t5'"):
        build_setup(config, "cpu")


# ---- the paper's models: trainable parameter counts (meta device, no weights) -----------------
def test_paper_model_trainable_counts_and_module_names() -> None:
    """884,736 (T5 LoRA), 15,360 (prompt) and 313,344 (ViT LoRA incl. q/v biases), App. H."""
    from validation.experiments.models import builders as models

    t5 = {"d_model": 768, "d_ff": 3072, "num_layers": 12, "num_heads": 12, "d_kv": 64,
          "init_seed": 0}
    vit = {"image_size": 224, "patch_size": 16, "hidden_size": 768, "num_hidden_layers": 12,
           "num_attention_heads": 12, "intermediate_size": 3072, "num_labels": 1000,
           "init_seed": 0}

    class Vocab:  # t5-base's embedding size; the prompt text init is not exercised on meta
        def __len__(self) -> int:
            return 32128

    counts = {}
    with torch.device("meta"):
        for setup in ("t5-lora", "t5-prompt", "vit-lora"):
            cfg = default_config(setup)
            model_cfg = dict(cfg["model"], name="tiny", tiny=vit if setup == "vit-lora" else t5)
            if setup == "vit-lora":
                model = models.build_vit(model_cfg, cfg["peft"], seed=0)
            else:
                peft_cfg = dict(cfg["peft"], init="random") if setup == "t5-prompt" else cfg["peft"]
                model = models.build_t5(model_cfg, peft_cfg, Vocab(), seed=0)
            counts[setup] = models.count_trainable(model)
    assert counts == {"t5-lora": 884_736, "t5-prompt": 15_360, "vit-lora": 313_344}


def test_prompt_text_init_copies_the_init_text_embeddings(dirs: dict[str, Path]) -> None:
    config = load_config("t5-prompt", tiny_overrides("t5-prompt", dirs))
    assert config["peft"]["init_text"] == "Sentiment Classification Task: "
    setup = build_setup(config, "cpu")
    ids = setup.tokenizer("Sentiment Classification Task: ")["input_ids"]
    assert ids[-1] == setup.tokenizer.eos_token_id
    expected_ids = (ids * 20)[:20]
    table = setup.model.get_input_embeddings().weight
    prompt = setup.model.prompt_encoder["default"].embedding.weight
    assert prompt.shape == (20, 16)
    assert torch.equal(prompt.detach(), table[expected_ids].detach())


def test_vit_head_is_frozen_and_fine_labels_index_the_1000_way_head(
    dirs: dict[str, Path],
) -> None:
    config = load_config("vit-lora", tiny_overrides("vit-lora", dirs))
    assert config["data"]["label_set"] == "fine"
    setup = build_setup(config, "cpu")
    names = [n for n, _ in setup.trainable]
    assert not any("classifier" in n for n in names)
    assert any(n.endswith("q_proj.base_layer.bias") for n in names)
    batch = setup.train.make(np.arange(4))
    assert setup.model(**batch.model_inputs()).logits.shape == (4, 1000)
    coarse = build_setup(
        load_config("vit-lora", [*tiny_overrides("vit-lora", dirs), "data.label_set=coarse"]),
        "cpu",
    )
    assert int(coarse.train.labels.max()) < 20 <= int(setup.train.labels.max())


# ---- fidelity to the authors' code: prompt tuning, padding, SF's sampled positions -------------
def test_causal_prompt_tuning_is_pefts_own_label_prefixing(dirs: dict[str, Path]) -> None:
    """peft's CAUSAL_LM on T5 feeds the decoder labels prefixed with 20 x -100. The runner's
    batches carry those decoder inputs explicitly (per-sample gradients take the labels out);
    the expected loss comes from peft's own route (no decoder_input_ids given), and the logits
    left after cutting the 20 prompt positions reproduce it by a hand-written token-mean CE."""
    config = load_config("t5-prompt", tiny_overrides("t5-prompt", dirs))
    assert (config["peft"]["task_type"], config["model"]["padding_side"]) == ("causal_lm", "left")
    setup = build_setup(config, "cpu")
    batch = setup.train.make(np.arange(8))
    assert batch.inputs["decoder_input_ids"].shape == (8, 20 + batch.targets.shape[1])
    assert (batch.inputs["attention_mask"][:, 0] == 0).any()  # left padding
    with torch.no_grad():
        ours = setup.model(**batch.inputs)
        pefts = setup.model(**{k: v for k, v in batch.inputs.items() if k != "decoder_input_ids"})
    assert torch.equal(ours.loss, pefts.loss)
    assert ours.logits.shape == (*batch.targets.shape, setup.loss.vocab_size)
    kept = batch.targets != -100
    log_p = torch.log_softmax(ours.logits.double(), dim=-1)
    hand = -log_p[kept, batch.targets[kept]].mean()
    # float32 logits through log-softmax: |error| <~ a few eps32 * |log p| ~ 1e-6 relative
    assert float(ours.loss) == pytest.approx(float(hand), rel=1e-5)


@pytest.mark.parametrize(("setup", "differ"), [("t5-lora", False), ("t5-prompt", True)])
def test_left_and_right_padding_agree_for_lora_only(
    setup: str, differ: bool, dirs: dict[str, Path]
) -> None:
    """LoRA: T5's relative position bias depends on key minus query only and padded keys are
    masked, so the padding side changes the logits only by rounding (float32, norm-wise
    <= 1e-5). Prompt tuning: the prompt precedes the padding, so its distance to the text and
    hence the logits change (SEQ_2_SEQ_LM here, to isolate the padding from the task type)."""
    extra = ["peft.task_type=seq2seq_lm"] if setup == "t5-prompt" else []
    logits = {}
    for side in ("left", "right"):
        config = load_config(
            setup, [*tiny_overrides(setup, dirs), *extra, f"model.padding_side={side}"]
        )
        built = build_setup(config, "cpu")
        batch = built.train.make(np.arange(8))
        with torch.no_grad():
            logits[side] = built.model(**batch.inputs).logits.double()
    gap = float(torch.linalg.norm(logits["left"] - logits["right"]) /
                torch.linalg.norm(logits["right"]))
    # differ: well above the 1e-5 rounding bound (3e-3 on this tiny model)
    assert (gap > 1e-4) if differ else (gap <= 1e-5), gap


def test_sf_draws_only_the_label_word_by_default(dirs: dict[str, Path]) -> None:
    from validation.experiments.train.runner import LabelWordSampledCE, build_optimizer

    config = load_config("t5-lora", [*tiny_overrides("t5-lora", dirs), "optimizer=sf"])
    assert config["optimizers"]["sf"]["sample_positions"] == "label_word"
    setup = build_setup(config, "cpu")
    assert isinstance(build_optimizer(setup, 4)._loss, LabelWordSampledCE)
    every = build_setup(load_config("t5-lora", [*tiny_overrides("t5-lora", dirs),
                                                "optimizer=sf", "optim.sample_positions=all"]))
    assert type(build_optimizer(every, 4)._loss) is ngdref.SequenceSoftmaxCrossEntropy

    batch = setup.train.make(np.arange(8))
    targets = torch.cat([batch.targets, torch.full((8, 1), -100)], dim=1)  # an ignored column
    vocab = setup.loss.vocab_size
    # logits that put all mass on token 5 at the label position and on token 7 elsewhere
    logits = torch.full((8, targets.shape[1], vocab), -50.0, dtype=torch.float64)
    logits[:, 0, 5] = 50.0
    logits[:, 1:, 7] = 50.0
    drawn = LabelWordSampledCE(vocab).sample(
        logits.reshape(8, -1), 3, num_samples=4, targets=targets
    )
    assert drawn.shape == (4, *targets.shape)
    assert (drawn[:, :, 0] == 5).all()  # sampled from the model at the label word
    assert torch.equal(drawn[:, :, 1:], targets[None, :, 1:].expand(4, -1, -1))  # EOS, -100 kept
    plain = ngdref.SequenceSoftmaxCrossEntropy(vocab).sample(
        logits.reshape(8, -1), 3, num_samples=4, targets=targets
    )
    assert (plain[:, :, 1] == 7).all()  # the all-positions variant redraws EOS too
    with pytest.raises(ValueError, match="targets"):
        LabelWordSampledCE(vocab).sample(logits.reshape(8, -1), 3)


@pytest.mark.parametrize("positions", ["label_word", "all"])
def test_sf_rows_are_gradients_of_the_loss_on_the_drawn_labels(
    positions: str, dirs: dict[str, Path]
) -> None:
    """The authors' SF row of sample n: the gradient of the CE of sample n with labels[:, 0]
    replaced by a draw and the observed EOS kept, on the logits of the observed forward pass
    (decoder fed the observed labels, shifted right). Computed here per sample by autograd
    through the model's own loss; ngdref's rows (of any reduction factor: the convention is
    CORE's) must be parallel to it: cos = 1 within float64 rounding of two gradient routes
    (1e-10). With 'all' the EOS is redrawn too."""
    from backends import TorchProvider
    from validation.experiments.train.runner import LabelWordSampledCE

    config = load_config("t5-lora", [*tiny_overrides("t5-lora", dirs), "model.dtype=float64"])
    setup = build_setup(config, "cpu")
    batch = setup.train.make(np.arange(6))
    vocab = setup.loss.vocab_size
    loss = LabelWordSampledCE(vocab) if positions == "label_word" else setup.loss
    provider = TorchProvider(setup.model, batch.inputs)
    key = 11
    rows = ngdref.sampled_grads(provider, loss, batch.targets, key, reduction="sum")
    drawn = loss.sample(provider.logits(), key, targets=batch.targets)[0]
    # 'all' redraws EOS too: over a ~200-token vocabulary all 6 draws equal EOS by chance ~never
    kept = bool((drawn[:, 1:] == batch.targets[:, 1:]).all())
    assert kept == (positions == "label_word")
    params = [p for _, p in setup.trainable]
    for n in range(6):
        one = {k: v[n : n + 1] for k, v in batch.inputs.items()}
        observed = one["labels"]
        shifted = torch.cat([torch.zeros_like(observed[:, :1]), observed[:, :-1]], dim=1)
        one["decoder_input_ids"] = shifted.masked_fill(shifted == -100, 0)  # T5: pad = start = 0
        one["labels"] = drawn[n : n + 1]
        grads = torch.autograd.grad(setup.model(**one).loss, params)
        expected = torch.cat([g.reshape(-1) for g in grads])
        got = torch.as_tensor(rows[n])
        cos = float(got @ expected / (torch.linalg.norm(got) * torch.linalg.norm(expected)))
        assert cos == pytest.approx(1.0, abs=1e-10), (n, cos)
