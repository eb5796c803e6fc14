"""The optimisers' options: every signature and default pinned against a table written here,
their hyperparameters in ``param_groups[0]``, a misspelt keyword a ``TypeError``, every option
documented (the docstrings and the optimisers guide) from the one table of
``backends.torch.optim.options``.

The expected signatures below are written out by hand, independently of the code: a default
changed in one optimiser's signature, a keyword dropped or reordered, fails here.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import ngdref  # noqa: E402
from backends.torch.optim.kfac import EKFAC, IEKFAC, KFAC  # noqa: E402
from backends.torch.optim.methods import EF, IEF, NGD, SF  # noqa: E402
from backends.torch.optim.options import OPTIONS, SF_OPTIONS  # noqa: E402

GUIDE = Path(__file__).resolve().parents[4] / "docs" / "guide" / "optimisers.md"
REQUIRED = inspect.Parameter.empty

ROWS = [  # the per-sample rows and their provider, in signature order
    ("reduction", "sum"), ("per_sample", "auto"), ("chunk_size", None), ("mode", "eval"),
    ("certify", "first"), ("on_mismatch", "raise"), ("certify_samples", None),
    ("output_fn", None), ("distributed", None), ("process_group", None),
    ("per_sample_method", None),
]
GRAM = [("damping_mode", "absolute"), ("dedup_threshold", 0.99), ("dedup_rule", "all_pairs")]
KFAC_OWN = [
    ("update_interval", 1), ("running_average", 0.0), ("damped_inverse", "exact"),
    ("convention", "expand"), ("normalisation", "mean"), ("bias", "separate"),
    ("reduction", "sum"), ("output_fn", None), ("mode", "eval"), ("strict", False),
]
STEP = [("lr", REQUIRED), ("damping", REQUIRED)]

#: class -> its keywords in signature order with their defaults
SIGNATURES: dict[type, list[tuple[str, Any]]] = {
    IEF: [*STEP, ("damping_space", "sample"), *GRAM, *ROWS],
    EF: [*STEP, ("total_steps", REQUIRED), *GRAM, *ROWS],
    SF: [*STEP, ("total_steps", REQUIRED), ("num_samples", 1), ("seed", 0),
         ("damping_mode", "absolute"), *ROWS],
    NGD: [*STEP, ("cg_tol", None), ("cg_maxiter", None), *ROWS],
    EKFAC: [*STEP, *KFAC_OWN],
    IEKFAC: [*STEP, *KFAC_OWN],
    KFAC: [*STEP, ("kfac_fisher", "mc"), ("seed", 0), *KFAC_OWN],
}
#: the construction options (held by the optimiser); every other keyword is a hyperparameter
CONSTRUCTION = {name for name, _ in ROWS if name != "reduction"} | {"output_fn", "mode", "strict"}
#: what the required keywords get in these tests
GIVEN = {"lr": 0.1, "damping": 1e-3, "total_steps": 3}
IDS = [cls.__name__ for cls in SIGNATURES]


def _build(cls: type, **kwargs: Any) -> Any:
    model = nn.Sequential(nn.Linear(3, 2))
    required = {k: v for k, v in GIVEN.items() if (k, REQUIRED) in SIGNATURES[cls]}
    return cls(model, ngdref.SoftmaxCrossEntropy(), **{**required, **kwargs})


@pytest.mark.parametrize("cls", SIGNATURES, ids=IDS)
def test_signature_is_explicit_and_pinned(cls: type) -> None:
    """help() and editors read the real ``__init__``: nothing synthesised, no ``**options``."""
    assert "__signature__" not in vars(cls)
    params = inspect.signature(cls).parameters
    assert list(params)[:2] == ["model", "loss"]
    rest = list(params.values())[2:]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    assert [(p.name, p.default) for p in rest] == SIGNATURES[cls]


@pytest.mark.parametrize("cls", SIGNATURES, ids=IDS)
def test_hyperparameters_are_the_param_group(cls: type) -> None:
    opt = _build(cls)
    group = {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "param_names")}
    expected = {name: GIVEN.get(name, default) for name, default in SIGNATURES[cls]
                if name not in CONSTRUCTION}
    assert group == expected
    assert opt.state_dict()["state"] == {0: {"step": 0}}


@pytest.mark.parametrize("cls", SIGNATURES, ids=IDS)
def test_a_misspelt_keyword_is_a_type_error(cls: type) -> None:
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampnig'"):
        _build(cls, dampnig=1.0)


@pytest.mark.parametrize("cls", [IEF, KFAC], ids=["IEF", "KFAC"])
def test_lr_and_damping_are_required(cls: type) -> None:
    with pytest.raises(TypeError, match="'lr' and 'damping'"):
        cls(nn.Linear(3, 2), ngdref.SoftmaxCrossEntropy())


@pytest.mark.parametrize("cls", SIGNATURES, ids=IDS)
def test_every_keyword_is_documented_in_the_docstring(cls: type) -> None:
    """The Parameters section names every keyword with its type and default, in order."""
    doc = cls.__doc__
    section = doc[doc.index("Parameters\n----------\n"):]
    section = section[: re.search(r"\n\n\w+\n-+\n", section).start()]  # to the next section
    entries = re.findall(r"^(\w+) : (.+)$", section, re.M)
    names = [name for name, _ in entries]
    assert names == ["model", "loss", *(name for name, _ in SIGNATURES[cls])]
    table = {**OPTIONS, **(SF_OPTIONS if cls is SF else {})}
    for (name, line), (_, default) in zip(entries[2:], SIGNATURES[cls], strict=True):
        assert line.startswith(table[name].type), name
        if default is not REQUIRED:
            shown = f'"{default}"' if isinstance(default, str) else repr(default)
            assert line.endswith(f", default {shown}"), (name, line)
    assert "step(batch=" in doc and "closure" in doc  # the batch contract


def _guide_rows() -> dict[str, list[str]]:
    """The options table of the optimisers guide: option -> its cells."""
    rows = {}
    for line in GUIDE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_the_guide_lists_every_option_with_its_default_and_kind() -> None:
    rows = _guide_rows()
    keywords: dict[str, Any] = {}
    for signature in SIGNATURES.values():
        for name, default in signature:
            assert keywords.setdefault(name, default) == default, name  # one default each
    assert set(rows) == set(keywords)
    for name, default in keywords.items():
        shown = "required" if default is REQUIRED else (
            f'`"{default}"`' if isinstance(default, str) else f"`{default!r}`"
        )
        assert rows[name][0] == shown, name
        assert rows[name][1] == ("construction" if name in CONSTRUCTION else "per step"), name
        users = {cls.__name__ for cls, sig in SIGNATURES.items() if name in dict(sig)}
        assert set(rows[name][2].replace(",", " ").split()) == users, name


def test_every_option_has_one_table_entry() -> None:
    names = {name for signature in SIGNATURES.values() for name, _ in signature}
    assert names | {"model", "loss"} == set(OPTIONS)
    assert {n for n, o in OPTIONS.items() if not o.hyperparameter} == CONSTRUCTION | {
        "model", "loss"
    }


def test_a_users_subclass_with_keywords_of_its_own_works() -> None:
    """torch users subclass optimisers; an ``__init__`` of their own is not the table's."""

    class Scheduled(IEF):
        def __init__(self, model: nn.Module, loss: Any, warmup: int = 3, **kwargs: Any) -> None:
            super().__init__(model, loss, **kwargs)
            self.warmup = warmup

    opt = Scheduled(nn.Linear(3, 2), ngdref.SoftmaxCrossEntropy(), lr=0.1, damping=1e-3)
    assert opt.warmup == 3 and Scheduled._hyperparameters == IEF._hyperparameters
    assert opt.param_groups[0]["damping_space"] == "sample"
