"""The keyword defaults of every optimiser of :mod:`backends`, as data.

The optimisers take their shared options as typed ``**options`` (``backends.torch.optim.common.
StepOptions`` and ``backends.torch.optim.base.RowOptions`` / ``GramOptions``), with the defaults in
one base ``__init__``; this table pins what a user gets when passing only the required
keywords, that a misspelt keyword is refused as by an explicit signature, and that
``inspect.signature`` (``help()``, editors) spells every keyword out with its default.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402

GRAM = {"damping_mode": "absolute", "dedup_threshold": 0.99, "dedup_rule": "all_pairs"}
KFAC_FAMILY = {
    "update_interval": 1, "running_average": 0.0, "damped_inverse": "exact",
    "convention": "expand", "normalisation": "mean", "bias": "separate",
}
# (optimiser, required keywords beyond lr and damping, the parameter group's defaults)
DEFAULTS = [
    (IEF, {}, {**GRAM, "damping_space": "sample"}),
    (EF, {"total_steps": 3}, GRAM),
    (SF, {"total_steps": 3}, {"num_samples": 1, "seed": 0, "damping_mode": "absolute"}),
    (NGD, {}, {"cg_tol": None, "cg_maxiter": None}),  # cg_tol: by dtype (test_ngd_defaults)
    (EKFAC, {}, KFAC_FAMILY),
    (IEKFAC, {}, KFAC_FAMILY),
    (KFAC, {}, {**KFAC_FAMILY, "kfac_fisher": "mc", "seed": 0}),
]
IDS = [cls.__name__ for cls, _, _ in DEFAULTS]


def _build(cls: type, **kwargs: Any) -> Any:
    model = nn.Sequential(nn.Linear(3, 2))
    return cls(model, ngdref.SoftmaxCrossEntropy(), lr=0.1, damping=1e-3, **kwargs)


@pytest.mark.parametrize(("cls", "required", "defaults"), DEFAULTS, ids=IDS)
def test_defaults(cls: type, required: dict, defaults: dict) -> None:
    opt = _build(cls, **required)
    group = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "param_names")}
    assert group == {"lr": 0.1, "damping": 1e-3, "reduction": "sum", **required, **defaults}
    if cls in (IEF, EF, SF, NGD):
        assert opt.per_sample == "auto"
        assert opt._provider_options["output_fn"] is None
        assert opt._provider_options["chunk_size"] is None
        assert not opt._comm.sharded  # distributed=None without torch.distributed: local


@pytest.mark.parametrize(("cls", "required", "defaults"), DEFAULTS, ids=IDS)
def test_an_unknown_keyword_is_a_type_error(cls: type, required: dict, defaults: dict) -> None:
    """(The K-FAC family used to keep a misspelt keyword in its parameter group, unused.)"""
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampnig'"):
        _build(cls, dampnig=1.0, **required)


@pytest.mark.parametrize("cls", [IEF, KFAC], ids=["IEF", "KFAC"])
def test_lr_and_damping_are_required(cls: type) -> None:
    with pytest.raises(TypeError, match="'lr' and 'damping'"):
        cls(nn.Linear(3, 2), ngdref.SoftmaxCrossEntropy())


#: the keywords every optimiser takes, and those of the four with per-sample rows
STEP = {"lr": inspect.Parameter.empty, "damping": inspect.Parameter.empty, "reduction": "sum",
        "output_fn": None}
ROWS = {"per_sample": "auto", "per_sample_method": None, "chunk_size": None,
        "distributed": None, "process_group": None}


@pytest.mark.parametrize(("cls", "required", "defaults"), DEFAULTS, ids=IDS)
def test_signature_spells_out_every_keyword(cls: type, required: dict, defaults: dict) -> None:
    signature = inspect.signature(cls)
    params = signature.parameters
    assert list(params)[:2] == ["model", "loss"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in list(params.values())[2:])
    expected = {**STEP, **dict.fromkeys(required, inspect.Parameter.empty), **defaults}
    if cls in (IEF, EF, SF, NGD):
        expected |= ROWS
    else:
        expected["strict"] = False
    assert {name: p.default for name, p in list(params.items())[2:]} == expected
    with pytest.raises(TypeError, match="dampnig"):
        signature.bind(None, None, lr=0.1, damping=1e-3, dampnig=1.0, **required)
