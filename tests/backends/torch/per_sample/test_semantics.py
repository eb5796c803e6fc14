"""Refusals of semantics without per-sample rows, and the mode policy.

Each refusal is checked twice: the module is refused by name under the policy that breaks it
(and accepted under the one that does not), and the premise of the refusal is shown on the
module itself with plain torch (the batch gradient is not the sum of single-sample gradients,
one sample's output depends on another, the weight changes in a forward pass, two passes
differ). A premise that stopped holding in a later torch would fail here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from backends.torch.per_sample.semantics import (  # noqa: E402
    PerSampleSemanticsError,
    RandomOps,
    applied_mode,
    refusals,
    refuse_semantics,
    semantic_refusal,
)

pytestmark = pytest.mark.filterwarnings("ignore:Lazy modules are a new feature")

MODULES: list[tuple[str, Callable[[], nn.Module], str | None, str | None]] = [
    # (name, builder, reason fragment in "eval", in "train"); None: accepted
    ("linear", lambda: nn.Linear(3, 2), None, None),
    ("batchnorm1d", lambda: nn.BatchNorm1d(3), None, "statistics of the batch"),
    ("batchnorm2d", lambda: nn.BatchNorm2d(3), None, "statistics of the batch"),
    ("batchnorm3d", lambda: nn.BatchNorm3d(3), None, "statistics of the batch"),
    ("syncbatchnorm", lambda: nn.SyncBatchNorm(3), None, "statistics of the batch"),
    ("batchnorm-no-running-stats", lambda: nn.BatchNorm1d(3, track_running_stats=False),
     "statistics of the batch", "statistics of the batch"),
    ("lazybatchnorm", lambda: nn.LazyBatchNorm1d(), "lazy module", "lazy module"),
    ("lazylinear", lambda: nn.LazyLinear(2), "lazy module", "lazy module"),
    ("instancenorm-running", lambda: nn.InstanceNorm2d(3, track_running_stats=True), None,
     "running statistics"),
    ("instancenorm", lambda: nn.InstanceNorm2d(3, affine=True), None, None),
    ("groupnorm", lambda: nn.GroupNorm(1, 3), None, None),
    ("embedding-freq", lambda: nn.Embedding(5, 2, scale_grad_by_freq=True),
     "scale_grad_by_freq", "scale_grad_by_freq"),
    ("embeddingbag-freq", lambda: nn.EmbeddingBag(5, 2, scale_grad_by_freq=True),
     "scale_grad_by_freq", "scale_grad_by_freq"),
    ("embedding-max-norm", lambda: nn.Embedding(5, 2, max_norm=1.0), "max_norm", "max_norm"),
    ("embeddingbag-max-norm", lambda: nn.EmbeddingBag(5, 2, max_norm=1.0), "max_norm",
     "max_norm"),
    ("embedding-sparse", lambda: nn.Embedding(5, 2, sparse=True), None, None),
    ("dropout", lambda: nn.Dropout(0.1), None, "random masks"),
    ("dropout-p0", lambda: nn.Dropout(0.0), None, None),
    ("dropout2d", lambda: nn.Dropout2d(0.1), None, "random masks"),
    ("alphadropout", lambda: nn.AlphaDropout(0.1), None, "random masks"),
    ("mha-dropout", lambda: nn.MultiheadAttention(4, 2, dropout=0.1), None, "attention dropout"),
    ("mha", lambda: nn.MultiheadAttention(4, 2), None, None),
    ("gru-dropout", lambda: nn.GRU(3, 4, num_layers=2, dropout=0.2), None, "inter-layer"),
    ("rrelu", lambda: nn.RReLU(), None, "random slopes"),
]


@pytest.mark.parametrize(("name", "build", "in_eval", "in_train"), MODULES,
                         ids=[m[0] for m in MODULES])
def test_module_refusals_follow_the_mode_policy(name: str, build: Callable, in_eval: Any,
                                                in_train: Any) -> None:
    module = build()
    for mode, expected in (("eval", in_eval), ("train", in_train)):
        for flag in (False, True):  # judged under the policy, whatever the module's own flag
            module.train(flag)
            reason = semantic_refusal(module, mode)
            if expected is None:
                assert reason is None, (mode, reason)
            else:
                assert reason is not None and expected in reason, (mode, reason)


def test_random_masks_allow_dropout_only() -> None:
    assert semantic_refusal(nn.Dropout(0.1), "train", random_masks=True) is None
    assert semantic_refusal(nn.BatchNorm1d(3), "train", random_masks=True) is not None


# ---- the premises: why each refused module has no per-sample rows --------------------------------
def _grads(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).square().sum(), params)
    return torch.cat([g.to_dense().reshape(-1) for g in grads])


def _batch_is_not_sum_of_samples(model: nn.Module, x: torch.Tensor) -> bool:
    whole = _grads(model, x)
    alone = sum(_grads(model, x[n:n + 1]) for n in range(x.shape[0]))
    return not torch.allclose(whole, alone, rtol=1e-10, atol=1e-12)


def _sample_depends_on_others(model: nn.Module, x: torch.Tensor) -> bool:
    other = x.clone()
    other[1:] *= 2  # the other samples only
    return not torch.allclose(model(x)[0], model(other)[0], rtol=1e-10, atol=0)


def _weight_changes(model: nn.Module, x: torch.Tensor) -> bool:
    before = model.weight.detach().clone()
    model(x)
    return not torch.equal(before, model.weight)


def _passes_differ(model: nn.Module, x: torch.Tensor) -> bool:
    return not torch.equal(model(x), model(x))


PREMISES = [  # (name, model in the refused state, input, premise)
    ("batchnorm-train", lambda: nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train(),
     lambda: torch.randn(4, 3), _sample_depends_on_others),
    ("embedding-freq", lambda: nn.Embedding(5, 2, scale_grad_by_freq=True),
     lambda: torch.tensor([[1, 1], [1, 2], [3, 1]]), _batch_is_not_sum_of_samples),
    ("embedding-max-norm", lambda: nn.Embedding(5, 2, max_norm=0.1),
     lambda: torch.tensor([[1, 2]]), _weight_changes),
    ("dropout-train", lambda: nn.Dropout(0.5).train(), lambda: torch.ones(4, 8), _passes_differ),
]


@pytest.mark.parametrize(("name", "build", "inputs", "premise"), PREMISES,
                         ids=[p[0] for p in PREMISES])
def test_the_premise_of_each_refusal(name: str, build: Callable, inputs: Callable,
                                     premise: Callable) -> None:
    torch.manual_seed(0)
    model = build().double()
    x = inputs()
    assert premise(model, x.double() if torch.is_floating_point(x) else x)


# ---- refusals of a model -------------------------------------------------------------------------
def _nested() -> nn.Module:
    return nn.Sequential(
        nn.Linear(3, 4),
        nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.2)),
        nn.Embedding(5, 4, scale_grad_by_freq=True),
    )


def test_every_refused_module_is_named_by_path_before_anything_changes() -> None:
    model = _nested().train()
    model[1][0].eval()  # the user's flags: kept as they are
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    with pytest.raises(PerSampleSemanticsError) as info:
        refuse_semantics(model, "train")
    message = str(info.value)
    assert "mode='train'" in message
    assert "model.1.0 (BatchNorm1d)" in message and "model.1.1 (Dropout)" in message
    assert "model.2 (Embedding)" in message
    assert [r.path for r in info.value.refusals] == ["1.0", "1.1", "2"]
    assert isinstance(info.value, ValueError)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(PerSampleSemanticsError) as info:  # eval: only scale_grad_by_freq
        refuse_semantics(model)
    assert [r.path for r in info.value.refusals] == ["2"]


def test_extra_rules_are_asked_after_the_semantics() -> None:
    """A layer registry's refuse(module, mode) composes: asked where the semantics accept."""
    asked = []

    def registry(module: nn.Module, mode: str) -> str | None:
        asked.append(type(module).__name__)
        return "no exact rule for circular padding" if isinstance(module, nn.Conv1d) else None

    model = nn.Sequential(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular"),
                          nn.Embedding(4, 2, max_norm=1.0))
    found = refusals(model, "eval", rules=[registry])
    assert [(r.path, r.module) for r in found] == [("0", "Conv1d"), ("1", "Embedding")]
    assert "circular" in found[0].reason and "max_norm" in found[1].reason
    assert "Embedding" not in asked  # refused by the semantics first


def test_an_accepted_model_passes() -> None:
    refuse_semantics(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Dropout(0.5)))


@pytest.mark.parametrize(("args", "error", "message"), [
    ((nn.Linear(2, 2), "inference"), ValueError, "mode must be one of"),
    ((nn.Linear(2, 2), None), ValueError, "mode must be one of"),
    ((object(),), TypeError, "model must be a torch.nn.Module"),
])
def test_bad_input_is_refused_by_name(args: tuple, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        refuse_semantics(*args)


# ---- the mode policy -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_applied_mode_sets_every_flag_and_restores_each(mode: str) -> None:
    model = _nested().train()
    model[1].eval()  # mixed: the container in eval, its children as left
    model[1][1].train()
    flags = [m.training for m in model.modules()]
    with applied_mode(model, mode):
        assert all(m.training == (mode == "train") for m in model.modules())
    assert [m.training for m in model.modules()] == flags
    with pytest.raises(RuntimeError, match="boom"), applied_mode(model, mode):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == flags


def test_applied_mode_refuses_an_unknown_mode_before_changing_flags() -> None:
    model = nn.Sequential(nn.Dropout(0.1)).train()
    with pytest.raises(ValueError, match="mode must be one of"), applied_mode(model, "test"):
        pass
    assert model[0].training


# ---- random functions in a forward ---------------------------------------------------------------
class _FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.linear(x), 0.3, self.training)


class _Noise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.randn_like(x)


@pytest.mark.parametrize(("model", "mode", "found"), [
    (_FunctionalDropout(), "train", ["dropout"]),
    (_FunctionalDropout(), "eval", []),
    (nn.Dropout(0.0), "train", []),
    (nn.AlphaDropout(0.2), "train", ["alpha_dropout"]),
    (_Noise(), "eval", ["randn_like"]),
    (nn.Linear(3, 3), "train", []),
])
def test_random_ops_are_found_in_a_pass(model: nn.Module, mode: str, found: list) -> None:
    x = torch.randn(4, 3)
    with applied_mode(model, mode), RandomOps() as watch:
        model(x)
    assert list(watch.found) == found
    if found:
        with pytest.raises(PerSampleSemanticsError, match=f"calls torch.{found[0]}"):
            watch.check(mode)
    else:
        watch.check(mode)
