"""The import graph of the project's packages: no cycles, and no import up the layers.

Pure AST (nothing here imports the packages, torch or anything heavy): every module of `workbench`,
`workbench_eval` and `workbench_cli` (when it exists) is parsed, and every import it makes is an edge.

What counts as an import:

- every `import` and `from ... import`, at module level AND inside functions and methods: an import in a
  function runs when the function is called, and a cycle through it is a cycle of the design (hiding an
  import in a function is not a way to break one). Lazy imports of heavy third-party packages (torch,
  transformers, ...) are fine: only edges between project modules are checked;
- except those under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`), which never run; they are still checked
  for the layer rule, since they name a dependency all the same;
- `from a.b import c` is an import of the submodule `a.b.c` when that module exists, else of `a.b` (a name
  its `__init__` defines); relative imports are resolved against the importing module's package;
- importing `a.b.c` also executes the package `__init__`s `a` and `a.b`: those are edges too, except the
  importing module's own packages (which are already being imported when it runs). A module that imports a
  name from its own package's `__init__` depends on it, and that is a cycle only if the `__init__` imports
  the module back, possibly through others;
- imports by string (`importlib.import_module(...)`, e.g. the method registry's `BUILTIN`) are not seen.

Layers: the library `workbench` never imports `workbench_eval` or `workbench_cli`; the evaluator
`workbench_eval` never imports `workbench_cli`.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("workbench", "workbench_eval", "workbench_cli")
# package -> the project packages it must not import (the layers: cli > eval > library)
FORBIDDEN = {"workbench": ("workbench_eval", "workbench_cli"), "workbench_eval": ("workbench_cli",)}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a project module)
    line: int
    runtime: bool  # False under `if TYPE_CHECKING:`
    implicit: bool = False  # a package __init__ executed on the way to `target`
    file: str = ""  # the importing file, relative to the root

    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Graph:
    modules: dict[str, Path] = field(default_factory=dict)
    imports: list[Import] = field(default_factory=list)

    def edges(self) -> dict[str, dict[str, Import]]:
        """Runtime edges between distinct modules, with the first import that makes each."""
        out: dict[str, dict[str, Import]] = {m: {} for m in self.modules}
        for imp in self.imports:
            if imp.runtime and imp.source != imp.target:
                out[imp.source].setdefault(imp.target, imp)
        return out


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST, runtime: bool = True):
    """(node, runtime) for every Import/ImportFrom anywhere in `tree`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _import_nodes_in(child, False)
            for child in node.orelse:
                yield from _import_nodes_in(child, runtime)
            continue
        yield from _import_nodes_in(node, runtime)


def _import_nodes_in(node: ast.AST, runtime: bool):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, runtime
    else:
        yield from _import_nodes(node, runtime)


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build_graph(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> Graph:
    graph = Graph()
    for package in packages:
        if (root / package / "__init__.py").is_file():
            for path in sorted((root / package).rglob("*.py")):
                graph.modules[module_name(path, root)] = path
    for module, path in graph.modules.items():
        is_package = path.name == "__init__.py"
        own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1 + is_package)}
        tree = ast.parse(path.read_text(), filename=str(path))
        file = path.relative_to(root).as_posix()
        for node, runtime in _import_nodes(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_from(module, is_package, node)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in graph.modules else base
                           for alias in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    implicit = i < len(parts)
                    if name not in graph.modules or (implicit and name in own_packages):
                        continue
                    graph.imports.append(Import(module, name, node.lineno, runtime, implicit, file))
    return graph


def strongly_connected(edges: dict[str, dict[str, object]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the strongly connected components, each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def cycle_path(edges: dict[str, dict[str, object]], component: list[str]) -> list[str]:
    """A shortest cycle through the first module of `component`, as [a, b, ..., a]."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges.get(node, {})):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start] if node != start else [start, start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {component}")


def find_cycles(edges: dict[str, dict[str, object]]) -> list[list[str]]:
    """One cycle path per strongly connected component of more than one module."""
    return [cycle_path(edges, c) for c in strongly_connected(edges) if len(c) > 1]


def describe_cycle(graph: Graph, path: list[str]) -> str:
    """The cycle as `a -> b -> a`, each step with the import that makes it, and every module of its strongly
    connected component when there are more than the path shows."""
    edges = graph.edges()
    steps = []
    for a, b in zip(path, path[1:], strict=False):
        imp = edges[a][b]
        how = " (its package __init__, executed on the way)" if imp.implicit else ""
        steps.append(f"      {a} -> {b}  at {imp.where()}{how}")
    component = next(c for c in strongly_connected(edges) if path[0] in c)
    more = f"\n      (all in one cycle: {', '.join(component)})" if len(component) > len(path) - 1 else ""
    return f"  {' -> '.join(path)}\n" + "\n".join(steps) + more


def layer_violations(graph: Graph) -> list[Import]:
    out = []
    for imp in graph.imports:
        top, target_top = imp.source.partition(".")[0], imp.target.partition(".")[0]
        if target_top in FORBIDDEN.get(top, ()) and not imp.implicit:
            out.append(imp)
    return out


# ---------------------------------------------------------------------------------------------------------------


def test_no_import_cycles():
    graph = build_graph()
    assert len(graph.modules) > 50, "the packages were not found"
    cycles = find_cycles(graph.edges())
    assert not cycles, (
        f"{len(cycles)} import cycle(s) between project modules (imports inside functions count; move the shared "
        "code to where it belongs rather than hiding the import):\n" + "\n".join(describe_cycle(graph, c) for c in cycles)
    )


def test_no_imports_up_the_layers():
    graph = build_graph()
    bad = layer_violations(graph)
    assert not bad, "imports up the layers (workbench must not import workbench_eval or workbench_cli; workbench_eval " \
        "must not import workbench_cli):\n" + "\n".join(f"  {i.where()}: {i.source} imports {i.target}" for i in bad)


def test_cycle_finder_on_a_synthetic_graph():
    edges = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"f": 1}, "f": {"e": 1},
             "g": {"g": 1}, "h": {"a": 1}}
    assert strongly_connected(edges) == [["a", "b", "c"], ["d"], ["e", "f"], ["g"], ["h"]]
    assert find_cycles(edges) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_graph_models_package_inits_functions_and_type_checking(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.sub import thing\n",
        "pkg/sub/__init__.py": "from .leaf import thing\n",
        "pkg/sub/leaf.py": "from pkg.sub import other\nthing = 1\n",  # own package: an edge only to pkg.sub
        "pkg/sub/other.py": "from ..config import X\n",
        "pkg/config.py": "X = 1\ndef f():\n    from pkg.sub import thing\n",  # a name of pkg.sub's __init__
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.config import X\n",
        "up/__init__.py": "",
        "up/cli.py": "",
        "pkg/bad.py": "import up.cli\n",
    })
    graph = build_graph(tmp_path, ("pkg", "up"))
    edges = graph.edges()
    assert set(edges["pkg.sub.leaf"]) == {"pkg.sub.other"}
    assert set(edges["pkg.sub.other"]) == {"pkg.config"}  # `pkg`, its own package, is already running
    assert set(edges["pkg.config"]) == {"pkg.sub"}
    assert set(edges["pkg.bad"]) == {"up", "up.cli"}  # `up` runs on the way to up.cli
    assert edges["pkg.typed"] == {}
    assert [i.target for i in graph.imports if i.source == "pkg.typed"] == ["pkg.config"]
    # pkg.config -> pkg.sub (its __init__) -> pkg.sub.leaf -> pkg.sub.other -> pkg.config
    cycles = find_cycles(edges)
    assert cycles == [["pkg.config", "pkg.sub", "pkg.sub.leaf", "pkg.sub.other", "pkg.config"]]
    message = describe_cycle(graph, cycles[0])
    assert "pkg.sub.other -> pkg.config  at pkg/sub/other.py:1" in message
    assert "pkg.config -> pkg.sub  at pkg/config.py:3" in message

    global FORBIDDEN
    saved = FORBIDDEN
    FORBIDDEN = {"pkg": ("up",)}
    try:
        assert [(i.source, i.target) for i in layer_violations(graph)] == [("pkg.bad", "up.cli")]
    finally:
        FORBIDDEN = saved


@pytest.mark.parametrize("code, expected", [
    ("from . import leaf", "pkg.sub.leaf"),
    ("from .leaf import x", "pkg.sub.leaf"),
    ("from .. import config", "pkg.config"),
    ("from ..sub import missing_name", "pkg.sub"),
])
def test_relative_imports_resolve(tmp_path, code, expected):
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/config.py": "", "pkg/sub/__init__.py": "",
                      "pkg/sub/leaf.py": "", "pkg/sub/mod.py": code + "\n"})
    graph = build_graph(tmp_path, ("pkg",))
    assert expected in graph.edges()["pkg.sub.mod"]
