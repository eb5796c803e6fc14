"""Sphinx configuration of the ngdref documentation (built with warnings as errors by .ci/run).

Build: ``.venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# the checkout's packages (ngdref, backends, validation), as README's examples import them
sys.path[:0] = [str(ROOT), str(DOCS / "_ext")]
# the gallery's tiny Hugging Face models come from configs: never reach for the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import api_pages  # noqa: E402  (needs the path above)

api_pages.write_pages(DOCS / "api")

project = "ngdref"
author = "the ngdref developers"
copyright = "the ngdref developers"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "examples/README.rst"]
templates_path = ["_templates"]

# ---- MyST: the prose pages --------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# ---- API reference -----------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_typehints = "none"  # the numpydoc sections state types and shapes in words
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
# numpydoc renders the docstrings' sections; the member tables come from autosummary's class
# template (numpydoc's own would ask for a stub page per method)
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks: set[str] = set()

#: Docstrings that reStructuredText misreads, repaired at render time rather than in the code
#: (modules are moving into packages; the docstrings are edited after the move). Each entry:
#: the object's ``__qualname__`` (which survives the move of modules, and catches the
#: docstring wherever it is documented, inherited ones included), the exact text and its
#: escaped form. A repair whose docstring no longer holds the text fails the build
#: (_check_repairs), so this list shrinks as the docstrings are fixed.
DOCSTRING_REPAIRS: dict[str, tuple[str, str]] = {
    # "|cos|" is read as a substitution reference (an undefined one: an error)
    "ef_update": ("(|cos| above it)", r"(\|cos\| above it)"),
    # "*targets_shape" opens an emphasis that never closes
    "LogitLoss.sample": ("(K, *targets_shape)", r"(K, \*targets_shape)"),
}
_SEEN: set[str] = set()
_REPAIRED: set[str] = set()


def _repair_docstrings(app, what, name, obj, options, lines):
    key = getattr(obj, "__qualname__", None)
    if key not in DOCSTRING_REPAIRS:
        return
    _SEEN.add(key)
    old, new = DOCSTRING_REPAIRS[key]
    for i, line in enumerate(lines):
        if old in line:
            lines[i] = line.replace(old, new)
            _REPAIRED.add(key)


def _check_repairs(app, exception):
    stale = sorted(_SEEN - _REPAIRED)  # read this build, and nothing left to repair
    if exception is None and stale:
        raise RuntimeError(f"docs/conf.py DOCSTRING_REPAIRS no longer match: {stale}")


def setup(app):
    # before numpydoc (priority 500) reshapes the sections
    app.connect("autodoc-process-docstring", _repair_docstrings, priority=400)
    app.connect("build-finished", _check_repairs)


# ---- gallery: executed at every build, at sizes of a few seconds ------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "show_memory": False,
    "backreferences_dir": None,
}
# matplotlib must not look for a display while the examples run
os.environ.setdefault("MPLBACKEND", "Agg")
warnings.filterwarnings("ignore", message="Matplotlib is currently using agg")

# ---- HTML ---------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = "ngdref"
html_static_path: list[str] = []
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False
