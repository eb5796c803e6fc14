"""Sphinx configuration of the ngdref documentation (built with warnings as errors by .ci/run).

Build: ``.venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html``.
"""

from __future__ import annotations

import functools
import logging
import os
import re
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

ALIASES = api_pages.write_pages(DOCS / "api")

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

#: Text that reStructuredText misreads in docstrings this site cannot edit (modules under
#: concurrent rewrite), repaired at render time in every docstring: a pattern and its escaped
#: form. A pattern that no longer occurs anywhere does nothing, so a fix in the code needs no
#: edit here; remove the entry once it is fixed. Docstrings that can be edited are fixed there.
DOCSTRING_REPAIRS: list[tuple[re.Pattern[str], str]] = [
    # "|cos|" is read as a substitution reference (an undefined one: an error)
    (re.compile(r"(?<![`\\])\|cos\|(?!`)"), r"\|cos\|"),
]


def _repair_docstrings(app, what, name, obj, options, lines):
    for i, line in enumerate(lines):
        for pattern, escaped in DOCSTRING_REPAIRS:
            line = pattern.sub(lambda _, e=escaped: e, line)
        lines[i] = line


#: Files whose docstrings others are rewriting now (the torch backend, TEAM.md wave 2): their
#: reStructuredText problems are listed at the end of the build instead of failing it. Empty
#: this tuple once the rewrite has landed, so that -W holds them to the standard of the rest.
TOLERATED_DOCSTRINGS: tuple[str, ...] = ()
_TOLERATED: list[str] = []


class _TolerateDocstrings(logging.Filter):
    """Keep the markup problems of :data:`TOLERATED_DOCSTRINGS` from counting as warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        where = str(getattr(record, "location", "") or "")
        if (getattr(record, "type", "") == "docutils" and ":docstring of " in where
                and any(path in where for path in TOLERATED_DOCSTRINGS)):
            _TOLERATED.append(f"{where}: {record.getMessage().splitlines()[0]}")
            return False
        return True


def _report_tolerated(app, exception):
    if _TOLERATED:
        print(f"docs: {len(_TOLERATED)} reStructuredText problems in docstrings under "
              f"{', '.join(TOLERATED_DOCSTRINGS)} (tolerated for now, see docs/conf.py):",
              *sorted(set(_TOLERATED)), sep="\n  ", file=sys.stderr)


def _no_signature(app, what, name, obj, options, signature, return_annotation):
    """Keep an object without a signature (a type alias such as ``tuple[Outer | Rows, ...]``)
    without one. Sphinx 9 applies the first non-None answer of this event to its first
    signature, which such an object lacks (an IndexError), and numpydoc answers for some; an
    empty tuple, answered first, is taken as the answer and applies nothing."""
    return () if signature is None else None


def setup(app):
    # before numpydoc (priority 500) reshapes the sections
    app.connect("autodoc-process-docstring", _repair_docstrings, priority=400)
    app.connect("autodoc-process-signature", _no_signature, priority=400)
    # a docstring's reference by another path than the object's home (api_pages.aliases)
    app.connect("missing-reference", functools.partial(api_pages.resolve_alias, ALIASES))
    # Sphinx counts a warning in its handler's filters: this one goes first
    for handler in logging.getLogger("sphinx").handlers:
        if type(handler).__name__ == "WarningStreamHandler":
            handler.filters.insert(0, _TolerateDocstrings())
    app.connect("build-finished", _report_tolerated)


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
