"""The paper-shape workloads and the Opacus peers of the step bench (issue 18).

* The workloads have the parameter counts of the widths they claim: closed forms written here,
  checked first against the published totals of t5-small, t5-base, ViT-S/16 and ViT-B/16
  (built on the meta device: nothing is allocated).
* Each Opacus peer does the work it is timed for: its per-sample gradients (materialised), or
  per-sample gradient norms (ghost clipping), and the batch gradient it steps with, equal a
  Python loop of single-sample backward passes in float64, on a tiny version of every
  workload family whose sizes make the sample axis coincide with another axis (T5: N == input
  length; ViT: N == tokens; MLP: N == width). Where Opacus cannot run, the peer carries its
  error.
* The step bench (``python -m validation.bench.steps --quick``) shows both peers where they
  run and why not where they cannot. Nothing timed is asserted.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from tests.array_backends import tolerance
from validation.bench import paper_workloads, peers

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- parameter counts -----------------------------------------------------------------------
def t5_count(d: int, d_ff: int, heads: int, d_kv: int, vocab: int, layers: int) -> int:
    """T5 v1.0 (ReLU feed-forward, tied embeddings), ``layers`` encoder and decoder layers."""
    inner = heads * d_kv
    encoder_layer = 4 * d * inner + 2 * d * d_ff + 2 * d  # q,k,v,o; wi, wo; 2 layer norms
    decoder_layer = 8 * d * inner + 2 * d * d_ff + 3 * d  # self- and cross-attention
    relative_bias = 2 * 32 * heads  # 32 buckets, first layer of the encoder and the decoder
    return vocab * d + layers * (encoder_layer + decoder_layer) + relative_bias + 2 * d


def t5_lora_count(d: int, heads: int, d_kv: int, layers: int, r: int = 8) -> int:
    """LoRA on q, v: r (d + inner) per projection; 1 attention per encoder layer, 2 per decoder."""
    return r * (d + heads * d_kv) * 2 * 3 * layers


def vit_count(d: int, mlp: int, layers: int, image: int, classes: int, patch: int = 16) -> int:
    tokens = (image // patch) ** 2 + 1
    embeddings = 3 * patch * patch * d + d + d + tokens * d  # patch conv, [CLS], positions
    layer = 4 * (d * d + d) + 2 * 2 * d + 2 * d * mlp + mlp + d
    return embeddings + layers * layer + 2 * d + d * classes + classes


def vit_lora_count(d: int, layers: int, classes: int, r: int = 8) -> int:
    """LoRA on q_proj and v_proj (d -> d) plus the classifier head."""
    return r * 2 * d * 2 * layers + d * classes + classes


PUBLISHED = [  # (checkpoint, closed form, its published parameter count)
    ("t5-small", t5_count(512, 2048, 8, 64, 32128, 6), 60_506_624),
    ("t5-base", t5_count(768, 3072, 12, 64, 32128, 12), 222_903_552),
    ("ViT-S/16, 1000 classes", vit_count(384, 1536, 12, 224, 1000), 22_050_664),
    ("ViT-B/16, 1000 classes", vit_count(768, 3072, 12, 224, 1000), 86_567_656),
]


@pytest.mark.parametrize(("checkpoint", "formula", "published"), PUBLISHED,
                         ids=[c[0] for c in PUBLISHED])
def test_closed_forms_give_the_published_counts(checkpoint, formula, published):
    assert formula == published


SMALL, BASE = (512, 2048, 8, 64), (768, 3072, 12, 64)
COUNTS = [  # (workload, full_shapes, trainable parameters of the shapes it states)
    ("t5_small_full", False, t5_count(*SMALL, 32128, 2)),
    ("t5_small_full", True, t5_count(*SMALL, 32128, 6)),
    ("t5_base_full", False, t5_count(*BASE, 32128, 2)),
    ("t5_base_full", True, t5_count(*BASE, 32128, 12)),
    ("t5_small_lora", False, t5_lora_count(512, 8, 64, 2)),
    ("t5_small_lora", True, t5_lora_count(512, 8, 64, 6)),
    ("t5_base_lora", True, t5_lora_count(768, 12, 64, 12)),
    ("t5_small_prompt", False, 2 * 20 * 512),  # peft: encoder and decoder prompt rows
    ("t5_base_prompt", True, 2 * 20 * 768),
    ("vit_s16_full", False, vit_count(384, 1536, 4, 128, 100)),
    ("vit_s16_full", True, vit_count(384, 1536, 12, 224, 100)),
    ("vit_b16_full", False, vit_count(768, 3072, 2, 128, 100)),
    ("vit_b16_full", True, vit_count(768, 3072, 12, 224, 100)),
    ("vit_s16_lora", False, vit_lora_count(384, 4, 100)),
    ("vit_b16_lora", True, vit_lora_count(768, 12, 100)),
    ("mlp_paper", False, 785 * 1536 + 2 * 1537 * 1536 + 1537 * 10),
]


@pytest.mark.parametrize(("name", "full_shapes", "expected"), COUNTS,
                         ids=[f"{c[0]}-{'full' if c[1] else 'cpu'}" for c in COUNTS])
def test_workloads_have_the_stated_parameter_counts(name, full_shapes, expected):
    w = paper_workloads.build(name, full_shapes=full_shapes, device="meta")
    assert w.num_params == expected


def test_every_workload_is_counted():
    assert {c[0] for c in COUNTS} == set(paper_workloads.PAPER_WORKLOADS)


# ---- the peers against a loop of single-sample backward passes -------------------------------
@dataclass(frozen=True)
class PeerCase:
    workload: str
    refused: dict[str, str] = field(default_factory=dict)  # peer -> its reason's beginning
    ragged_labels: bool = False  # sample 0 keeps 1 of its 2 label tokens (-100 after it)


PEER_CASES = [
    PeerCase("t5_small_lora", ragged_labels=True),
    # peft embeds one row of prompt tokens and expands it: Opacus sees a batch of 1
    PeerCase("t5_small_prompt", {peers.PER_SAMPLE_STEP: "Opacus' grad_sample of",
                                 peers.GHOST_STEP: "Opacus' per-sample gradient norms"}),
    PeerCase("t5_small_full", {peers.PER_SAMPLE_STEP: "RuntimeError:",
                               peers.GHOST_STEP: "NotImplementedError:"}),
    PeerCase("vit_s16_lora"),
    PeerCase("vit_s16_full"),
    PeerCase("mlp_paper"),
]


def _sample_loss(w, n: int) -> torch.Tensor:
    """l_n from the model alone on sample n: Hugging Face's own loss, or the cross-entropy."""
    if isinstance(w.batch, dict):
        return w.model(**{k: v[n:n + 1] for k, v in w.batch.items()}).loss
    x, y = w.batch
    return nn.functional.cross_entropy(w.model(x[n:n + 1]), y[n:n + 1])


def _loop_grads(w) -> list[torch.Tensor]:
    """Per trainable parameter, the stacked single-sample gradients (N, *shape)."""
    rows = []
    for n in range(w.num_samples):
        grads = torch.autograd.grad(_sample_loss(w, n), w.trainable, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g
                     for p, g in zip(w.trainable, grads, strict=True)])
    return [torch.stack(per_param) for per_param in zip(*rows, strict=True)]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Norm-wise: ||a - e|| <= rtol ||e|| + atol, float64's two-exact-routes tolerance."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = tolerance("float64")
    gap = float((actual - expected).norm())
    bound = tol["rtol"] * float(expected.norm()) + tol["atol"]
    assert gap <= bound, f"{what}: |actual - expected| = {gap:.3e} > {bound:.3e}"


@pytest.fixture(scope="module")
def float64_throughout():
    """Hugging Face computes T5LayerNorm's variance and eager attention's softmax in float32
    even in a float64 model: two exact routes then differ by float32 rounding (up to 1e-7
    relative, measured), which would hide a real gap. Patched, the tiny models are float64
    throughout and the routes agree to float64 rounding."""
    modeling_t5 = importlib.import_module("transformers.models.t5.modeling_t5")
    softmax = torch.nn.functional.softmax

    def layer_norm(self: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    def softmax_keeping_float64(input, dim=None, _stacklevel=3, dtype=None):
        return softmax(input, dim=dim, dtype=None if input.dtype == torch.float64 else dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling_t5.T5LayerNorm, "forward", layer_norm)
        patch.setattr(torch.nn.functional, "softmax", softmax_keeping_float64)
        yield


@pytest.fixture(params=PEER_CASES, ids=[c.workload for c in PEER_CASES], scope="module")
def case_and_peers(request, float64_throughout):
    pytest.importorskip("opacus")  # .ci/setup installs it with the other peers
    case: PeerCase = request.param
    w = paper_workloads.build(case.workload, quick=True, dtype=torch.float64)
    if case.ragged_labels:
        w.targets[0, 1] = -100  # w.batch["labels"] is w.targets
    return case, w, peers.opacus_peers(w, lr=0.0), _loop_grads(w)


def test_refused_peers_carry_opacus_error(case_and_peers):
    case, _, built, _ = case_and_peers
    for name, peer in built.items():
        if name in case.refused:
            assert peer.run is None
            assert peer.reason.startswith(case.refused[name]), peer.reason
        else:
            assert peer.run is not None, peer.reason


def test_per_sample_step_materialises_the_loop_gradients(case_and_peers):
    _, _, built, expected = case_and_peers
    peer = built[peers.PER_SAMPLE_STEP]
    if peer.run is None:
        pytest.skip(f"refused: {peer.reason}")
    peer.run()
    for (name, p), e in zip(peer.params.items(), expected, strict=True):
        _assert_close(p.grad_sample, e, f"grad_sample of {name}")
        _assert_close(p.grad, e.mean(0), f"grad of {name}")


def test_ghost_step_has_the_loop_norms_and_gradient(case_and_peers):
    _, _, built, expected = case_and_peers
    peer = built[peers.GHOST_STEP]
    if peer.run is None:
        pytest.skip(f"refused: {peer.reason}")
    peer.run()
    norms = torch.cat([e.flatten(1) for e in expected], 1).norm(dim=1)
    _assert_close(peer.module.per_sample_gradient_norms, norms, "per-sample gradient norms")
    for (name, p), e in zip(peer.params.items(), expected, strict=True):
        _assert_close(p.grad, e.mean(0), f"grad of {name}")


# ---- in the step bench -----------------------------------------------------------------------
def test_step_bench_shows_the_peers_or_why_not(capsys):
    pytest.importorskip("opacus")
    from validation.bench import steps

    names = "t5_small_full,vit_s16_lora,mlp_paper"
    assert steps.main(["--quick", "--threads", "1", "--workloads", names, "--routes", "auto",
                       "--repeats", "1", "--warmup", "0", "--no-memory"]) == 0
    out = capsys.readouterr().out
    for name in names.split(","):
        assert f"| {name} |" in out
    # the step table's last two columns are Opacus' steps: T5 with all parameters has neither
    t5_row = next(line for line in out.splitlines() if line.startswith("| t5_small_full |"))
    assert t5_row.endswith("| - | - |")
    vit_row = next(line for line in out.splitlines() if line.startswith("| vit_s16_lora |"))
    assert "-" not in [cell.strip() for cell in vit_row.split("|")[-3:-1]]
    assert "relative_attention_bias" in out


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="name must be one of"):
        paper_workloads.build("t5_large_lora")
