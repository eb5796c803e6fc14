"""Which ``torch.nn`` classes hold trainable parameters, and which of them the zoo leaves out.

Every public ``nn.Module`` subclass defined under ``torch.nn.modules`` is built once (with
:data:`CONSTRUCTORS` where the required arguments are not plain sizes, else with every
required argument 2 and every option that adds parameters, such as ``affine``, switched on);
a class is trainable when that instance has parameters. Out of scope, because they are not
under ``torch.nn.modules``: ``torch.nn.parallel`` wrappers (their module's parameters are the
module's) and the quantized / QAT modules of ``torch.ao`` (integer weights, no float64).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Callable, Iterable

from torch import nn
from torch.nn.utils import parametrize

#: classes whose required arguments are not sizes: how to build one
CONSTRUCTORS: dict[str, Callable[[], nn.Module]] = {
    "AdaptiveLogSoftmaxWithLoss": lambda: nn.AdaptiveLogSoftmaxWithLoss(4, 6, [2, 4]),
    "Unflatten": lambda: nn.Unflatten(1, (2, 2)),
    "FractionalMaxPool2d": lambda: nn.FractionalMaxPool2d(2, output_size=2),
    "FractionalMaxPool3d": lambda: nn.FractionalMaxPool3d(2, output_size=2),
    "RNN": lambda: nn.RNN(2, 2),
    "GRU": lambda: nn.GRU(2, 2),
    "LSTM": lambda: nn.LSTM(2, 2),
    "RNNBase": lambda: nn.RNNBase("RNN_TANH", 2, 2),
    "TransformerEncoder": lambda: nn.TransformerEncoder(
        nn.TransformerEncoderLayer(4, 2), 1, enable_nested_tensor=False),
    "TransformerDecoder": lambda: nn.TransformerDecoder(nn.TransformerDecoderLayer(4, 2), 1),
}

#: options that add parameters when switched on
_PARAMETER_OPTIONS = ("affine", "elementwise_affine")

_LAZY = ("materialises into its eager twin at the first forward pass (the instance's class "
         "becomes {}), which the zoo covers; before that it has no values to differentiate")

#: trainable classes the zoo does not build, and why
EXCLUDED: dict[str, str] = {
    **{f"Lazy{twin}": _LAZY.format(twin) for twin in (
        "Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
        "ConvTranspose3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "InstanceNorm1d",
        "InstanceNorm2d", "InstanceNorm3d")},
    "RNNBase": "the base class of RNN, GRU and LSTM (the mode string picks one), all in the zoo",
    "RNNCellBase": "the base class of RNNCell, GRUCell and LSTMCell, all in the zoo",
    "LinearCrossEntropyLoss": "fuses a classifier with the loss and returns the loss, not "
                              "logits; its parameters are an nn.Linear's (self.linear), which "
                              "the zoo covers",
}


def torch_nn_classes() -> list[type[nn.Module]]:
    """Every public nn.Module subclass defined in a module of ``torch.nn.modules``."""
    found = set()
    for info in pkgutil.iter_modules(nn.modules.__path__):
        module = importlib.import_module(f"torch.nn.modules.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, nn.Module)
                    and obj.__module__ == module.__name__ and not obj.__name__.startswith("_")):
                found.add(obj)
    return sorted(found, key=lambda c: (c.__module__, c.__name__))


def build(cls: type[nn.Module]) -> nn.Module:
    """One instance of ``cls``: its constructor from :data:`CONSTRUCTORS`, or sizes 2."""
    with warnings.catch_warnings():  # lazy modules are "experimental", empty inits "no-ops"
        warnings.simplefilter("ignore")
        if cls.__name__ in CONSTRUCTORS:
            return CONSTRUCTORS[cls.__name__]()
        signature = inspect.signature(cls.__init__)
        params = list(signature.parameters.values())[1:]
        args = [2 for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        options = {name: True for name in _PARAMETER_OPTIONS if name in signature.parameters}
        return cls(*args, **options)


def trainable_classes() -> list[type[nn.Module]]:
    """The classes of :func:`torch_nn_classes` whose instance has parameters."""
    return [cls for cls in torch_nn_classes() if any(True for _ in build(cls).parameters())]


def classes_in(models: Iterable[nn.Module]) -> set[str]:
    """Names of the classes of every submodule (a parametrized module counts as its original
    class, e.g. weight_norm's ParametrizedLinear as Linear)."""
    names = set()
    for model in models:
        for m in model.modules():
            cls = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
            names.add(cls.__name__)
    return names

