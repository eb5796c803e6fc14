"""The figures' shared look: a colour and a name per method, the Agg figure, its files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]

#: one colour per method, the same in every figure
OPTIMIZER_COLORS: dict[str, str] = {
    "sgd": "tab:blue",
    "adam": "tab:orange",
    "adamw": "tab:orange",
    "adafactor": "tab:orange",
    "ief": "tab:green",
    "ngd": "tab:purple",
    "ef": "tab:red",
    "sf": "tab:brown",
    "gn": "tab:green",
}
#: display names
_NAMES = {
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "adafactor": "Adafactor",
    "ief": "iEF",
    "ngd": "NGD",
    "ef": "EF",
    "sf": "SF",
    "gn": "GN",
}
#: ratio key of evaluation.json / sweep.json -> axis label
RATIO_LABELS: dict[str, str] = {
    "ef/sgd": r"$\gamma_{EF}/\gamma_{SGD}$",
    "ief/sgd": r"$\gamma_{iEF}/\gamma_{SGD}$",
    "sf/ief": r"$\gamma_{SF}/\gamma_{iEF}$",
    "sf/ef": r"$\gamma_{SF}/\gamma_{EF}$",
}
_RATIO_COLORS = {"ef/sgd": "tab:red", "ief/sgd": "tab:green", "sf/ief": "tab:brown",
                 "sf/ef": "tab:gray"}


def _name(method: str) -> str:
    return _NAMES.get(method, method)


# ---- output -----------------------------------------------------------------------------------
def _figure(ncols: int, nrows: int = 1, *, width: float = 4.0, height: float = 3.4) -> Any:
    """A Figure on an Agg canvas (no pyplot: no global state, no display) and its axes grid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig: Any, out: PathLike, title: str | None = None) -> list[Path]:
    """Title ``fig`` (if ``title``), write ``out.png`` (150 dpi) and ``out.pdf``; both paths."""
    if title:
        fig.suptitle(title, fontsize=10)
    base = Path(out)
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, extra in ((".png", {"dpi": 150}), (".pdf", {"metadata": {"CreationDate": None}})):
        path = base.with_name(base.name + suffix)
        fig.savefig(path, **extra)
        paths.append(path)
    return paths
