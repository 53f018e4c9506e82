"""The package's import structure: no cycles, and no imports hidden inside functions.

Every module of ``heta_fast`` (and of ``kernels``, installed as ``heta_fast.kernels``) is read
with ``ast``, not imported, so a module that needs triton or a GPU is checked too.

- A cycle between modules (through any import, local ones included) means that neither module can be read
  without the other, and a function-local import is the usual way a cycle gets hidden.
- A function-local import is allowed only for an optional dependency (an extra, or triton,
  which only the triton backend needs), and for ``transformers`` submodules where a comment on
  the import, or on the line above it, says why.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"heta_fast": ROOT / "heta_fast", "heta_fast.kernels": ROOT / "kernels"}
OPTIONAL = {"captum", "ray", "pyarrow", "matplotlib", "tqdm", "rich", "triton", "gguf", "accelerate", "datasets"}


def module_files(packages: dict[str, Path] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under the packages."""
    found = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _absolute(node: ast.ImportFrom, module: str, files: dict[str, Path]) -> str:
    """The absolute module name an ``ImportFrom`` reads from (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module, files):
        base.pop()
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, files: dict[str, Path]) -> list[str]:
    """The modules an import statement loads: ``from a import b`` loads ``a.b`` when that is a module."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    source = _absolute(node, module, files)
    names = [f"{source}.{alias.name}" for alias in node.names]
    return [name if name in files else source for name in names]


def _walk(tree: ast.AST):
    """``(node, inside_function)`` for every node; ``if TYPE_CHECKING:`` blocks are skipped."""
    stack = [(tree, False)]
    while stack:
        node, inside = stack.pop()
        yield node, inside
        for child in ast.iter_child_nodes(node):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                continue
            nested = inside or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack.append((child, nested))


def scan(files: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """The import graph between the given modules and the forbidden local imports.

    Returns ``(edges, problems)``: ``edges[a]`` holds the modules of ``files`` that ``a`` imports,
    at module level or inside a function (a cycle through a local import is still a cycle);
    ``problems`` names each function-local import of a non-optional module as
    ``file:line: import``.
    """
    edges: dict[str, set[str]] = {name: set() for name in files}
    problems = []
    for module, path in files.items():
        lines = path.read_text().splitlines()
        for node, inside in _walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported_modules(node, module, files)
            edges[module].update(t for t in targets if t in files and t != module)
            if not inside:
                continue
            for target in targets:
                top = target.split(".")[0]
                if top in OPTIONAL:
                    continue
                if top == "transformers" and "." in target and _commented(lines, node):
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                problems.append(f"{where}: {lines[node.lineno - 1].strip()}")
    return edges, sorted(set(problems))


def _commented(lines: list[str], node: ast.stmt) -> bool:
    """A ``#`` comment on the import's own lines or on the line just above it."""
    above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
    return above.startswith("#") or any("#" in line for line in lines[node.lineno - 1:node.end_lineno])


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_the_walk_covers_both_packages():
    files = module_files()
    assert "heta_fast.api" in files and "heta_fast.kernels.linear_kl" in files
    assert "heta_fast.backends.triton_kernels" in files and "heta_fast.kernels" not in files  # no __init__.py
    edges, _ = scan(files)
    assert "heta_fast.config" in edges["heta_fast.api"]  # a real edge the scan must see


def test_no_import_cycles():
    cycle = find_cycle(scan(module_files())[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_local_imports_of_required_modules():
    _, problems = scan(module_files())
    assert not problems, "function-local imports (move them to the top, or name the optional extra):\n" + "\n".join(
        problems)


def _write(folder: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files({"pkg": folder})


@pytest.fixture
def root_at(monkeypatch, tmp_path: Path) -> Path:
    """Report paths relative to ``tmp_path`` (where the test writes its package)."""
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    return tmp_path


def test_scan_finds_a_cycle_hidden_behind_a_local_import(root_at: Path):
    # the shape of the old sensitivity.py: a dispatcher importing an estimator inside a function,
    # the estimator importing the dispatcher's helpers at module level
    files = _write(root_at / "pkg", {
        "__init__.py": "",
        "dispatch.py": "def run():\n    from pkg.estimator import go\n    return go()\n",
        "estimator.py": "from pkg.dispatch import run\n\ndef go():\n    return 1\n",
    })
    edges, problems = scan(files)
    assert edges == {"pkg": set(), "pkg.dispatch": {"pkg.estimator"}, "pkg.estimator": {"pkg.dispatch"}}
    assert problems == ["pkg/dispatch.py:2: from pkg.estimator import go"]
    assert find_cycle(edges) == ["pkg.dispatch", "pkg.estimator", "pkg.dispatch"]


def test_scan_reports_local_imports_and_allows_optional_and_explained_ones(root_at: Path):
    files = _write(root_at / "pkg", {
        "__init__.py": "from . import a\n",
        "a.py": ("import os\n\n"
                 "def f():\n"
                 "    import torch\n"
                 "    import matplotlib.pyplot as plt\n"
                 "    from transformers import AutoModel\n"
                 "    from transformers.utils import logging  # older versions lack it\n"
                 "    from transformers.cache_utils import Cache\n"
                 "    from .b import g\n"
                 "    return plt, torch, AutoModel, logging, Cache, g\n"),
        "b.py": "from pkg.a import f\n\ndef g():\n    return f\n",
    })
    edges, problems = scan(files)
    assert edges == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert problems == ["pkg/a.py:4: import torch", "pkg/a.py:6: from transformers import AutoModel",
                        "pkg/a.py:8: from transformers.cache_utils import Cache", "pkg/a.py:9: from .b import g"]
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.a"]


def test_find_cycle_names_the_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_package_folder_is_listed_for_installation():
    """A subpackage missing from pyproject's ``packages`` would be left out of a (non-editable) install."""
    listed = re.search(r"^packages = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), flags=re.MULTILINE)
    assert listed, "pyproject.toml has no [tool.setuptools] packages line"
    packages = set(re.findall(r'"([^"]+)"', listed.group(1)))
    files = module_files()
    folders = {name if _is_package(name, files) else name.rpartition(".")[0] for name in files}
    assert packages == folders  # heta_fast.kernels included: a folder of modules without __init__.py
