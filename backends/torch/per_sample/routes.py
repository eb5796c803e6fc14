"""The per-sample routes by name, and the earlier keywords that named them.

``per_sample`` (of :class:`backends.TorchProvider` and the optimisers):

=========  ================================================================================
route      per-sample rows of each trainable parameter
=========  ================================================================================
"auto"     one hooked forward and backward pass; ghost factors or materialised rows per
           parameter by the layer registry's cost model; a parameter the pass cannot split
           falls through to the per-module vmap, the whole-model vmap, the loop
"ghost"    the same, factors wherever the layer kind allows
"hooks"    the same, materialised per-layer rows everywhere
"vmap"     ``torch.func.vmap`` over the samples (dense), the loop where torch cannot run it
"loop"     one forward and one backward pass per sample alone (dense)
=========  ================================================================================

Before, ``TorchProvider`` took ``per_sample_method`` ("auto", "vmap", "hooks", "ghost") and,
for "ghost", ``layer_route`` ("auto", "ghost", "materialise"); :func:`resolve_per_sample`
maps them to ``per_sample`` with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings

from ngdref.checks import check_choice

__all__ = ["LAYER_ROUTES", "PER_SAMPLE", "resolve_per_sample"]

PER_SAMPLE = ("auto", "ghost", "hooks", "vmap", "loop")
#: the routes through the layer pass -> its per-parameter choice
LAYER_ROUTES = {"auto": "auto", "ghost": "ghost", "hooks": "materialise"}
_METHODS = ("auto", "vmap", "hooks", "ghost", "loop")
_GHOST = {"auto": "auto", "ghost": "ghost", "materialise": "hooks"}


def resolve_per_sample(per_sample: str, per_sample_method: str | None,
                       layer_route: str | None) -> tuple[str, bool]:
    """``per_sample`` (checked), and whether the deprecated keywords gave it.

    Raises
    ------
    ValueError
        An unknown route, or ``per_sample`` given with a deprecated keyword.
    """
    if per_sample_method is None and layer_route is None:
        return check_choice(per_sample, "per_sample", PER_SAMPLE), False
    if per_sample != "auto":
        raise ValueError(
            "per_sample_method and layer_route are the deprecated spellings of per_sample: "
            "give per_sample alone")
    method = check_choice("auto" if per_sample_method is None else per_sample_method,
                          "per_sample_method", _METHODS)
    route = check_choice("auto" if layer_route is None else layer_route, "layer_route",
                         tuple(_GHOST))
    chosen = _GHOST[route] if method == "ghost" else method
    old = ", ".join(f"{k}={v!r}" for k, v in (("per_sample_method", per_sample_method),
                                               ("layer_route", layer_route)) if v is not None)
    warnings.warn(f"TorchProvider({old}) is deprecated: use per_sample={chosen!r}",
                  DeprecationWarning, stacklevel=3)
    return chosen, True
