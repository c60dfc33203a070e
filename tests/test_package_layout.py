"""The package's layout rules, read from the source files (nothing is imported):

* no module of ``histomap`` is longer than :data:`MAX_MODULE_LINES` lines;
* the modules of ``histomap`` import each other without a cycle (module-level and function-level
  imports alike: a lazy import hides a cycle, it does not remove it; imports under
  ``if TYPE_CHECKING:`` are annotations, never run, and do not count);
* no file of the repository edits ``sys.path`` (the package is installed, ``pip install -e .``);
* ``os.replace`` appears only in ``histomap/outputs.py``: every output is written through
  :func:`histomap.outputs.atomic_output`.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
PACKAGE = SCRIPTS / "histomap"
MAX_MODULE_LINES = 600
SKIP_DIRS = {".venv", ".git"}
ATOMIC_HELPER = PACKAGE / "outputs.py"


def package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (``__init__.py`` is
    the package itself)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SCRIPTS).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to, or its nearest enclosing module of the package."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` (never executed: an
    annotation-only import is no import)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def imported_modules(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (any nesting level; not
    the annotation-only imports under ``if TYPE_CHECKING:``).

    ``from a.b import c`` names module ``a.b.c`` when that is a module, else ``a.b`` (c is a
    name defined there); relative imports are resolved against the module's package.
    """
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(module, path)
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "histomap" or target.startswith("histomap."):
                resolved = _known(target, modules)
                if resolved is not None and resolved != module:
                    found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected
    component of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest import path from the component's first module back to itself."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")


def repository_files():
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            yield Path(folder) / name


# ----------------------------------------------------------------------------------- the tests

def test_no_module_is_longer_than_the_limit():
    long = {str(path.relative_to(SCRIPTS)): n for path in package_modules().values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, (f"modules over {MAX_MODULE_LINES} lines (split them into modules of one "
                      f"job each): {long}")


def test_package_has_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (move the shared piece down):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_reads_lazy_and_relative_imports(tmp_path):
    modules = {"histomap.tasks": PACKAGE / "tasks" / "__init__.py",
               "histomap.tasks.a": PACKAGE / "tasks" / "a.py",
               "histomap.tasks.b": PACKAGE / "tasks" / "b.py",
               "histomap.train": PACKAGE / "train.py"}
    source = tmp_path / "a.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from . import b\n"
                      "if TYPE_CHECKING:\n    from histomap.data import slide\n"
                      "def f():\n    from histomap.train import fit\n    import histomap.tasks\n")
    assert imported_modules("histomap.tasks.a", source, modules) == {
        "histomap.tasks.b", "histomap.train", "histomap.tasks"}


def test_no_file_edits_sys_path():
    needle = ("sys.path" + ".insert").encode()  # split: this file does not match itself
    offenders = sorted(str(path.relative_to(REPO)) for path in repository_files()
                       if needle in path.read_bytes())
    assert not offenders, (f"files that edit sys.path (the package is installed with "
                           f"`pip install -e .`; import it): {offenders}")


def test_os_replace_only_in_the_atomic_output_helper():
    offenders = []
    for path in package_modules().values():
        if path == ATOMIC_HELPER:
            continue
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, filename=str(path))
        from_os = any(isinstance(node, ast.ImportFrom) and node.module == "os"
                      and any(alias.name == "replace" for alias in node.names)
                      for node in ast.walk(tree))
        if "os.replace" in source or from_os:
            offenders.append(str(path.relative_to(SCRIPTS)))
    assert not offenders, ("os.replace outside histomap/outputs.py (write through "
                           f"histomap.outputs.atomic_output): {offenders}")
