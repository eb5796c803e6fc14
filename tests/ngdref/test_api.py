"""The public API's conventions (ngdref module docstring), checked over every exported name.

A new public function that puts ``grad`` before its rows, takes an option positionally or
is missing from an ``__all__`` fails here, not in a user's code. (gamma's "exactly one way
of giving F" is a bad-input case in tests/ngdref/test_bad_input.py.)
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

import ngdref

MODULES = [
    importlib.import_module(f"ngdref.{m.name}") for m in pkgutil.iter_modules(ngdref.__path__)
]


def _public_callables() -> Iterator[tuple[str, Callable[..., Any]]]:
    """(name, function) for every exported function and every public method of a class."""
    for name in ngdref.__all__:
        obj = getattr(ngdref, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and not dataclasses.is_dataclass(obj):
            for attr, fn in vars(obj).items():
                if inspect.isfunction(fn) and (attr == "__init__" or not attr.startswith("_")):
                    yield f"{name}.{attr}", fn


CALLABLES = list(_public_callables())


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_public_definition_is_in_its_modules_all(module):
    defined = {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and (inspect.isfunction(obj) or inspect.isclass(obj))
        and obj.__module__ == module.__name__
    }
    assert defined <= set(module.__all__), sorted(defined - set(module.__all__))
    assert all(hasattr(module, name) for name in module.__all__)


def test_every_top_level_name_is_exported_from_its_module():
    public = {n for n in vars(ngdref) if not n.startswith("_")}
    submodules = {m.__name__.rpartition(".")[2] for m in MODULES}
    assert public - submodules - {"annotations"} <= set(ngdref.__all__)
    for name in ngdref.__all__:
        obj = getattr(ngdref, name)
        home = getattr(obj, "__module__", None)
        if inspect.ismodule(obj) or home is None or not home.startswith("ngdref."):
            continue
        assert name in importlib.import_module(home).__all__, (name, home)


@pytest.mark.parametrize("name, fn", CALLABLES, ids=[n for n, _ in CALLABLES])
def test_options_are_keyword_only_and_grad_comes_after_the_rows(name, fn):
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert not [p.name for p in positional if p.default is not p.empty], name
    names = [p.name for p in positional]
    if "grad" in names:
        assert names[-1] == "grad", f"{name}{names}: grad must be the last positional argument"
    assert "key_or_uniforms" not in [p.name for p in params]


def test_scalar_diagnostics_are_python_floats():
    """One return convention: Python floats, equal across the three ways of giving F.

    F = diag(1, 2, 3), d = g = 1: gamma = sqrt(6) / 3 by hand.
    """
    f = np.diag([1.0, 2.0, 3.0])
    d = np.ones(3)
    values = [
        ngdref.gamma(d, d, fisher=f),
        ngdref.gamma(d, d, fisher_vp=lambda v: f @ v),
        ngdref.gamma(d, d, quadratic_form=lambda v: v @ f @ v),
        ngdref.gamma_ratio(d, d, fisher=f),
        ngdref.grad_norm_imbalance(np.eye(3)),
    ]
    assert all(type(v) is float for v in values)
    assert values[:3] == pytest.approx([np.sqrt(6.0) / 3.0] * 3, rel=4 * np.finfo(float).eps)
    assert values[3:] == [1.0, 1.0]


# (validator, value, exception or None, message fragment naming the argument)
CHECKS = [
    (lambda v: ngdref.checks.check_int(v, "count"), 3, None, ""),
    (lambda v: ngdref.checks.check_int(v, "count"), True, ValueError, "count must be an int >= 1"),
    (lambda v: ngdref.checks.check_int(v, "count"), 2.0, ValueError, "count must be an int >= 1"),
    (lambda v: ngdref.checks.check_int(v, "step", minimum=0), -1, ValueError, "step must be"),
    (lambda v: ngdref.checks.check_int(v, "size", optional=True), None, None, ""),
    (lambda v: ngdref.checks.check_int(v, "size", optional=True), 0, ValueError,
     "size must be None or an int >= 1"),
    (lambda v: ngdref.checks.check_real(v, "lr"), 0, None, ""),
    (lambda v: ngdref.checks.check_real(v, "lr"), "0.1", TypeError, "lr must be a real number"),
    (lambda v: ngdref.checks.check_real(v, "lr"), float("nan"), ValueError, "lr must be finite"),
    (lambda v: ngdref.checks.check_real(v, "tol", positive=True), 0.0, ValueError, "tol must be"),
    (lambda v: ngdref.checks.check_choice(v, "mode", ("a", "b")), "b", None, ""),
    (lambda v: ngdref.checks.check_choice(v, "mode", ("a", "b")), "c", ValueError,
     "mode must be one of"),
]


@pytest.mark.parametrize("check, value, error, message", CHECKS)
def test_option_validators(check, value, error, message):
    """Accepted values come back unchanged in value; rejected ones name the argument."""
    if error is None:
        assert check(value) == value
    else:
        with pytest.raises(error, match=message):
            check(value)
