"""Configuration keys renamed since runs were first stored, and their migration.

A run's stored ``config.json`` (and a configuration file a user wrote) may use a key's old
name; :func:`renamed` moves its value to the new name before the file is checked or compared,
so a run resumes and a file loads as they did. Giving both names is refused: nothing says
which one the user meant.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

__all__ = ["RENAMED", "renamed"]

#: (section, old key) -> new key, with the same values
RENAMED: dict[tuple[str, str], str] = {
    # the optimisers' and TorchProvider's route option: the same routes under its new name
    ("train", "per_sample_method"): "per_sample",
}


def renamed(config: Mapping[str, Any], error: type[ValueError] = ValueError) -> dict[str, Any]:
    """A deep copy of ``config`` with every old key of :data:`RENAMED` under its new name.

    Raises
    ------
    ValueError
        (``error``, a subclass) A section holds a key under both its old and its new name.
    """
    out = copy.deepcopy(dict(config))
    for (section, old), new in RENAMED.items():
        node = out.get(section)
        if not isinstance(node, dict) or old not in node:
            continue
        if new in node:
            raise error(
                f"config: {section}.{old} is the old name of {section}.{new}; give only "
                f"{section}.{new}"
            )
        node[new] = node.pop(old)
    return out
