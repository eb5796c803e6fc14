"""The batch axis by provenance: expected layouts of a table of forward passes, and every claim
the tracker makes on them checked by the independent dependency probes of
:mod:`tests.backends.torch.per_sample.provenance_probe`."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backends.torch.axes import BatchAxis  # noqa: E402
from backends.torch.per_sample.provenance import NotPerSample  # noqa: E402

from .provenance_cases import CASES, Case  # noqa: E402
from .provenance_ops import OPS, Op  # noqa: E402
from .provenance_probe import downstream_violations, matches, run, upstream_violations  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("torch_one_thread"),
    # peft's prompt tuning asks transformers 5 a deprecated question; not ours to answer
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]
IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_named_tensors_have_their_known_layout(case: Case) -> None:
    built = case.build()
    r = run(built, {k: spec.value for k, spec in built.inputs.items()},
            [t.detach().clone() for t in built.free])
    got = {name: r.recorder.axis_of(r.named[name]) for name in case.expected}
    wrong = {k: got[k] for k, want in case.expected.items() if not matches(got[k], want)}
    assert not wrong, f"expected {case.expected}, got {got}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_rule_fails_or_misfits_on_the_table(case: Case) -> None:
    # a rule that raises or claims an axis of the wrong length is refused (safe), but on these
    # forwards it is a gap in the rules to fix, not a refusal to accept
    built = case.build()
    r = run(built, {k: spec.value for k, spec in built.inputs.items()},
            [t.detach().clone() for t in built.free])
    bad = {e.state.reason for e in r.recorder.log if type(e.state) is NotPerSample and (
        "could not read" in e.state.reason or "gap in the rules" in e.state.reason)}
    assert not bad


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_claim_survives_perturbing_one_sample(case: Case) -> None:
    built = case.build()
    assert upstream_violations(built) == []


@pytest.mark.parametrize(
    "case", [c for c in CASES if type(c.expected["logits"]) is BatchAxis],
    ids=[c.name for c in CASES if type(c.expected["logits"]) is BatchAxis])
def test_one_samples_loss_reaches_only_its_own_slices(case: Case) -> None:
    built = case.build()
    found, reached = downstream_violations(built, case.expected["logits"])
    assert found == []
    assert reached > 0  # the probe looked at something


def test_the_probe_catches_a_wrong_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # softmax over the batch axis claimed to keep it (as if it were elementwise): both probes
    # must object, or they could not catch a wrong rule either
    from backends.torch.per_sample import provenance
    from backends.torch.per_sample.provenance_rules import first_only

    from .provenance_probe import Built, Input

    lin = torch.nn.Linear(3, 2).double()
    built = Built(lambda v: {"logits": lin(v["x"]).softmax(0)},
                  {"x": Input(torch.randn(4, 3, dtype=torch.float64), BatchAxis(0))},
                  list(lin.parameters()), 4)
    assert upstream_violations(built) == []  # the true rule refuses: nothing to contradict
    monkeypatch.setitem(provenance.RULES, "softmax", first_only)
    assert any("softmax" in v for v in upstream_violations(built))
    found, _ = downstream_violations(built, BatchAxis(0))
    assert found  # on softmax's input: every sample's loss now reaches every row of it


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # x.new_tensor(x)
@pytest.mark.parametrize("op", OPS, ids=[o.name for o in OPS])
def test_each_rule_on_one_operation(op: Op) -> None:
    built = op.build()
    r = run(built, {k: spec.value for k, spec in built.inputs.items()},
            [t.detach().clone() for t in built.free])
    got = r.recorder.axis_of(r.named["logits"])
    assert matches(got, op.expected), f"expected {op.expected}, got {got}"
    assert upstream_violations(built) == []
    if type(op.expected) is BatchAxis:
        assert downstream_violations(built, op.expected)[0] == []
