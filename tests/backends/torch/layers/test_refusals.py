"""Refusals: every layout or option a kind cannot make exact is named, with the module and why.

Each case runs one module under the Recorder with a declared batch axis (and mode); the
refusal must name the module (its class and options, as ``describe`` prints it) and the
reason, the module's parameters must get no parts (they take another route), and the
recorder must change nothing: the parameters end bitwise as a plain forward pass of a copy
leaves them (``max_norm`` renormalises rows in the forward pass itself).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from backends.torch.axes import BATCH_FIRST, BatchAxis  # noqa: E402
from backends.torch.layers import Recorder, kind_of, unregistered  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class OwnForward(nn.Linear):
    """A Linear subclass with a forward of its own: the Linear kind must not assume it."""

    def forward(self, x: Any) -> Any:
        return super().forward(x) * 2


@dataclass(frozen=True)
class Refusal:
    name: str
    build: Callable[[], nn.Module]
    args: Callable[[], tuple]
    axis: BatchAxis | None
    words: tuple[str, ...]
    mode: str = "eval"
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


def _ids(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randint(0, 5, shape),)


def _x(*shape: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(*shape),)


REFUSALS = [
    Refusal("embedding_scale_grad_by_freq", lambda: nn.Embedding(5, 3, scale_grad_by_freq=True),
            _ids(3, 4), BATCH_FIRST, ("Embedding(", "scale_grad_by_freq", "other samples")),
    Refusal("embedding_max_norm", lambda: nn.Embedding(5, 3, max_norm=1.0), _ids(3, 4),
            BATCH_FIRST, ("Embedding(", "max_norm", "in place")),
    Refusal("embedding_bag_scale_grad_by_freq",
            lambda: nn.EmbeddingBag(5, 3, scale_grad_by_freq=True), _ids(3, 4), BATCH_FIRST,
            ("EmbeddingBag(", "scale_grad_by_freq")),
    Refusal("embedding_bag_max_norm", lambda: nn.EmbeddingBag(5, 3, max_norm=2.0), _ids(3, 4),
            BATCH_FIRST, ("EmbeddingBag(", "max_norm")),
    Refusal("embedding_bag_samples_along_a_bag", lambda: nn.EmbeddingBag(5, 3), _ids(4, 3),
            BatchAxis(1), ("EmbeddingBag(", "axis 1", "a bag reduces")),
    Refusal("embedding_axis_beyond_indices", lambda: nn.Embedding(5, 3), _ids(3, 4),
            BatchAxis(2), ("Embedding(", "axis 2")),
    Refusal("linear_samples_on_features", lambda: nn.Linear(3, 2), _x(4, 3), BatchAxis(1),
            ("Linear(", "axis 1", "feature axis")),
    Refusal("linear_one_dimensional_input", lambda: nn.Linear(3, 2), _x(3), BATCH_FIRST,
            ("Linear(", "feature axis")),
    Refusal("conv_samples_on_channels", lambda: nn.Conv1d(3, 2, 2), _x(4, 3, 5), BatchAxis(1),
            ("Conv1d(", "channel or spatial")),
    Refusal("conv_unbatched", lambda: nn.Conv2d(3, 2, 2), _x(3, 4, 4), BATCH_FIRST,
            ("Conv2d(", "unbatched")),
    Refusal("conv_transpose_samples_on_space", lambda: nn.ConvTranspose1d(2, 2, 2),
            _x(4, 2, 3), BatchAxis(2), ("ConvTranspose1d(", "channel or spatial")),
    Refusal("conv_transpose_unbatched", lambda: nn.ConvTranspose2d(2, 2, 2), _x(2, 3, 3),
            BATCH_FIRST, ("ConvTranspose2d(", "unbatched")),
    Refusal("layer_norm_samples_normalised", lambda: nn.LayerNorm(3), _x(2, 3), BatchAxis(1),
            ("LayerNorm(", "normalised axes")),
    Refusal("rms_norm_two_axes", lambda: nn.RMSNorm((3, 2)), _x(4, 3, 2), BatchAxis(1),
            ("RMSNorm(", "normalised axes")),
    Refusal("group_norm_samples_on_channels", lambda: nn.GroupNorm(1, 3), _x(2, 3, 4),
            BatchAxis(1), ("GroupNorm(", "channel or spatial")),
    Refusal("instance_norm_unbatched", lambda: nn.InstanceNorm1d(3, affine=True), _x(3, 4),
            BATCH_FIRST, ("InstanceNorm1d(", "unbatched")),
    Refusal("batch_norm_train_mode", lambda: nn.BatchNorm1d(3), _x(4, 3), BATCH_FIRST,
            ("BatchNorm1d(", "train mode", "whole batch"), mode="train"),
    Refusal("batch_norm_without_running_stats",
            lambda: nn.BatchNorm2d(2, track_running_stats=False), _x(3, 2, 2, 2), BATCH_FIRST,
            ("BatchNorm2d(", "without running statistics")),
    Refusal("attention_dropout_train", lambda: nn.MultiheadAttention(4, 2, dropout=0.1),
            _x(3, 2, 4), BatchAxis(1), ("MultiheadAttention(", "dropout", "train mode"),
            mode="train"),
    Refusal("attention_unbatched", lambda: nn.MultiheadAttention(4, 2), _x(3, 4), BATCH_FIRST,
            ("MultiheadAttention(", "unbatched")),
    Refusal("attention_samples_on_sequence", lambda: nn.MultiheadAttention(4, 2), _x(3, 2, 4),
            BATCH_FIRST, ("MultiheadAttention(", "axis 0", "batch axis 1")),
    Refusal("subclass_with_own_forward", lambda: OwnForward(3, 2), _x(2, 3), BATCH_FIRST,
            ("OwnForward", "overrides forward", "nn.Linear")),
    Refusal("no_kind_registered", lambda: nn.Bilinear(2, 2, 1), lambda: (
        torch.randn(3, 2), torch.randn(3, 2)), BATCH_FIRST, ("Bilinear", "no layer kind")),
    Refusal("input_without_samples", lambda: nn.Linear(3, 2), _x(4, 3), None,
            ("Linear(", "without the batch axis")),
]


def _call(module: nn.Module, case: Refusal, args: tuple) -> Any:
    if isinstance(module, nn.MultiheadAttention):
        args = (args[0], args[0], args[0])
    return module(*args, **case.kwargs)


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_refusal_names_module_and_reason(case) -> None:
    torch.manual_seed(0)
    module = case.build()
    module.train(case.mode == "train")
    plain, args = copy.deepcopy(module), case.args()
    with torch.no_grad():
        _call(plain, case, args)
    recorder = Recorder(module, lambda m, a, k: case.axis, 3, mode=case.mode)
    with recorder.recording():
        out = _call(module, case, args)
    assert list(recorder.refused) == [module]
    message = recorder.refused[module]
    for word in case.words:
        assert word in message, f"{word!r} not in {message!r}"
    loss = (out[0] if isinstance(out, tuple) else out).sum()
    assert recorder.uses([loss], [torch.ones(())]) == {}
    for (name, p), q in zip(module.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} changed"


def test_refused_call_runs_the_modules_own_forward() -> None:
    """A decomposed kind that refuses a call leaves it to the module's own forward."""
    torch.manual_seed(0)
    module = nn.MultiheadAttention(4, 2)
    x = torch.randn(3, 4)
    recorder = Recorder(module, lambda m, a, k: BATCH_FIRST, 3)
    with recorder.recording():
        got = module(x, x, x)[0]
    assert torch.equal(got, module(x, x, x)[0])


def test_kind_of_takes_subclasses_keeping_forward_only() -> None:
    keeps = nn.modules.linear.NonDynamicallyQuantizableLinear(2, 2)
    assert kind_of(keeps) is kind_of(nn.Linear(2, 2)) is not None
    assert kind_of(OwnForward(2, 2)) is None
    assert "overrides forward" in unregistered(OwnForward(2, 2))
    assert kind_of(nn.Bilinear(2, 2, 1)) is None


def test_recorder_mode_must_be_known() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        Recorder(nn.Linear(2, 2), lambda m, a, k: BATCH_FIRST, 2, mode="training")
