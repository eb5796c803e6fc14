"""
iEF fine-tuning of a peft model
===============================

LoRA adapters on a tiny, randomly initialised T5 (built from a configuration, so nothing is
downloaded), trained on a toy sequence-to-sequence task with the exact iEF optimiser,
``backends.IEF``, beside AdamW. The loop is a torch loop: the closure returns the batch, the
optimiser does its own forward and backward passes.

The paper's T5-LoRA settings are mean-convention numbers (iEF ``lr=100``, ``damping=1e-7``);
``reduction="mean"`` passes them as they are (:doc:`/conventions`, damping under a reduction).
"""

import copy
import warnings

import matplotlib.pyplot as plt
import peft
import torch
import transformers

import ngdref
from backends import IEF

torch.manual_seed(0)
config = transformers.T5Config(
    vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
    d_kv=8, attn_implementation="eager", decoder_start_token_id=0, pad_token_id=0,
    eos_token_id=1,
)
base = transformers.T5ForConditionalGeneration(config)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations inside peft
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q", "v"]))
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
print(f"trainable (LoRA) parameters: {trainable}")

# %%
# A toy task
# ----------
# Eight random tokens in; the label word says whether the first token is even or odd,
# followed by EOS (id 1), as T5's targets are.


def batch(n, generator):
    ids = torch.randint(3, 32, (n, 8), generator=generator)
    labels = torch.stack([2 + ids[:, 0] % 2, torch.ones(n, dtype=torch.long)], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


generator = torch.Generator().manual_seed(0)
batches = [batch(16, generator) for _ in range(30)]
loss = ngdref.SequenceSoftmaxCrossEntropy(vocab_size=32)

# %%
# Every per-sample route gives the same step
# ------------------------------------------
# ``per_sample="auto"`` never forms the per-sample gradients (per layer it keeps factors or
# materialised rows, whichever costs less); ``"vmap"`` forms them densely. One step of each
# from the same parameters, in float64 so that the comparison is not lost in float32 rounding
# of the parameters:

steps = {}
for route in ("auto", "vmap"):
    twin = copy.deepcopy(model).double()
    before = torch.cat([p.detach().reshape(-1) for p in twin.parameters() if p.requires_grad])
    opt = IEF(twin, loss, lr=1.0, damping=1e-7, reduction="mean", per_sample=route)
    opt.step(lambda: batches[0])
    after = torch.cat([p.detach().reshape(-1) for p in twin.parameters() if p.requires_grad])
    steps[route] = before - after
difference = torch.linalg.norm(steps["auto"] - steps["vmap"]) / torch.linalg.norm(steps["vmap"])
print(f"|step(auto) - step(vmap)| / |step(vmap)| = {float(difference):.1e}")
assert difference < 1e-10

# %%
# Training: iEF beside AdamW
# --------------------------


def train(make_optimizer, model):
    opt = make_optimizer(model)
    losses = []
    for b in batches:
        if isinstance(opt, IEF):
            losses.append(opt.step(lambda b=b: b))  # the loss before the update
        else:
            opt.zero_grad()
            out = model(**b)
            out.loss.backward()  # Hugging Face's token mean
            opt.step()
            losses.append(float(out.loss.detach()))
    return opt, losses


ief, ief_losses = train(
    lambda m: IEF(m, loss, lr=100.0, damping=1e-7, reduction="mean"), copy.deepcopy(model))
_, adamw_losses = train(
    lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2),
    copy.deepcopy(model))
# Hugging Face's loss is a mean over the label tokens (2 per sequence here), ngdref's a mean
# over the sequences of their summed token loss: twice Hugging Face's.
adamw_losses = [2 * value for value in adamw_losses]
print(f"loss per sequence after 30 steps: iEF {ief_losses[-1]:.3f}, "
      f"AdamW {adamw_losses[-1]:.3f}")
print({k: ief.diagnostics[k] for k in ("grad_norm_imbalance", "kept", "fallbacks")})

# %%
# ``diagnostics["kept"]`` is the number of rows the near-duplicate filter kept (the optimiser
# filters at :math:`|\cos| > 0.99` by default), ``fallbacks`` the parameters whose per-sample
# gradients needed ``torch.func.vmap``: none for LoRA.

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.semilogy(ief_losses, label="iEF (lr 100, damping 1e-7, mean)")
ax.semilogy(adamw_losses, label="AdamW (lr 1e-2)")
ax.set_xlabel("step")
ax.set_ylabel("training loss per sequence")
ax.legend()
fig.tight_layout()
