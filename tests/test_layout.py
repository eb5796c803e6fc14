"""The layout rules of the source tree, read from the files themselves with ``ast``.

- No file imports another that imports it back, directly or through others: every import
  counts, at module level, under ``TYPE_CHECKING`` and inside functions (a cycle that only a
  function-level or type-only import closes still ties the two files together). The checker
  is shown to find the cycles of small packages written to a temporary directory.
- Modules are at most :data:`MAX_MODULE_LINES` lines and functions at most
  :data:`MAX_FUNCTION_CODE_LINES` lines of code (lines holding code: blank lines, comment lines
  and the docstring do not count; a nested function's lines count for the outer one too).
- Every package of ``ngdref/`` and ``backends/`` is listed in pyproject's
  ``[tool.setuptools] packages``, or the wheel would leave it out.

The layering between packages (validation -> backends -> ngdref, no array library in ngdref,
independent sibling backends, the experiments' layers) is import-linter's, in pyproject.toml.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ngdref", "backends", "validation")
MAX_MODULE_LINES = 500
MAX_FUNCTION_CODE_LINES = 60


# ---- the import graph ----------------------------------------------------------------------
def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``root/<package>``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the tree (None: outside it)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, modules: Mapping[str, Path]) -> set[str]:
    """The modules of the tree that module ``name`` imports anywhere in its file."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: up level - 1 packages from this file's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # ``from pkg import mod`` imports the submodule; ``from mod import name`` the module
            found.update(_known(f"{origin}.{alias.name}", modules) for alias in node.names)
    return {m for m in found if m is not None and m != name}


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, set[str]]:
    """Module -> the modules of the tree it imports."""
    modules = module_files(root, packages)
    return {name: imports_of(name, modules) for name in modules}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of the graph, or None (depth-first, in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_file_imports_one_that_imports_it_back() -> None:
    cycle = find_cycle(import_graph(ROOT, PACKAGES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


#: synthetic packages: files, and the modules of the cycle the checker must report (None: none)
SYNTHETIC = {
    "function-level and type-only": (
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "def f():\n    from .b import g\n    return g\n",
            "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from pkg.a import f\n",
        },
        {"pkg.a", "pkg.b"},
    ),
    "submodule by from-import, two levels up": (
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.sub import c\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/c.py": "import os\nfrom .. import a\n",
        },
        {"pkg.a", "pkg.sub.c"},
    ),
    "through a third file": (
        {
            "pkg/__init__.py": "from .a import x\n",
            "pkg/a.py": "import pkg.b\nx = 1\n",
            "pkg/b.py": "from .c import y\n",
            "pkg/c.py": "def y():\n    from pkg.a import x\n    return x\n",
        },
        {"pkg.a", "pkg.b", "pkg.c"},
    ),
    "one way only": (
        {
            "pkg/__init__.py": "from .a import x\n",
            "pkg/a.py": "from .b import y as x\n",
            "pkg/b.py": "import json\ny = 1\n",
        },
        None,
    ),
}


@pytest.mark.parametrize("case", SYNTHETIC, ids=str)
def test_the_cycle_check_finds_the_cycles_of_a_small_package(tmp_path: Path, case: str) -> None:
    files, expected = SYNTHETIC[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    cycle = find_cycle(import_graph(tmp_path, ["pkg"]))
    if expected is None:
        assert cycle is None, cycle
    else:
        assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == expected, cycle


# ---- sizes ---------------------------------------------------------------------------------
def _code_lines(source: str) -> set[int]:
    """The line numbers that hold a token other than a comment."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return lines


def function_code_lines(source: str) -> dict[str, int]:
    """``name:line`` -> lines of code of every function of ``source`` (its docstring left out)."""
    code = _code_lines(source)
    out = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = {n for n in code if node.lineno <= n <= (node.end_lineno or node.lineno)}
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines -= set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
            out[f"{node.name}:{node.lineno}"] = len(lines)
    return out


def test_function_code_lines_count_code_only() -> None:
    source = (
        "def f(x):\n"
        '    """Doc\n\n    string."""\n'
        "    # a comment\n"
        "\n"
        "    y = (x +\n"
        "         1)\n"
        "    def g():\n"
        "        return y\n"
        "    return g\n"
    )
    assert function_code_lines(source) == {"f:1": 6, "g:9": 2}


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for name, path in module_files(ROOT, PACKAGES).items():
        source = path.read_text(encoding="utf-8")
        if (n := len(source.splitlines())) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {n} lines")
        too_long += [f"{name}.{function}: {n} lines of code"
                     for function, n in function_code_lines(source).items()
                     if n > MAX_FUNCTION_CODE_LINES]
    assert not too_long, "\n".join(too_long)


# ---- the wheel -----------------------------------------------------------------------------
def test_every_package_of_ngdref_and_backends_is_in_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    needed = set()
    for installed, folder in (("ngdref", "ngdref"), ("ngdref.backends", "backends")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.parent.relative_to(ROOT / folder).parts
            needed.add(".".join((installed, *parts)))
    assert needed <= listed, f"add to [tool.setuptools] packages: {sorted(needed - listed)}"
