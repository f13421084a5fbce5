"""The import graph of pretrain/, launch/ and tokenizer/, read from the source with `ast`.

A cycle between modules works until someone moves an import to module level, and then fails
only on the import order that one entry point happens to take; so no cycle is allowed, lazy
(function-level) imports included. `import_graph` is also for other rules about who may import
what (e.g. which layers may reach DeepSpeed): it keeps the external modules as edges too.

Edges: `import a.b` is an edge to `a.b`. `from a import b` reads names from the package `a`, so
it is an edge to `a`, and also to `a.b` when that is a module. Relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pretrain", "launch", "tokenizer")


def _module_files(root: Path, packages: Sequence[str]) -> Dict[str, Path]:
    """Dotted module name -> file, for every .py file under the given packages."""
    found = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST, name: str, is_package: bool, known: Set[str]) -> Iterator[str]:
    """The modules one file imports, anywhere in it (module level and inside functions)."""
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..a import b`
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            yield source
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    yield f"{source}.{alias.name}"


def import_graph(root: Path = REPO, packages: Sequence[str] = PACKAGES) -> Dict[str, Set[str]]:
    """Module -> the modules it imports (ours and external ones, e.g. "deepspeed.checkpoint")."""
    files = _module_files(root, packages)
    known = set(files)
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        graph[name] = set(_imports(tree, name, path.name == "__init__.py", known)) - {name}
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as [m0, m1, ..., m0], or None. Depth-first search with a colour per node."""
    state: Dict[str, int] = {}  # absent: not seen; 1: on the current path; 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue  # external: it imports nothing of ours
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Cycles until none is left, each found after cutting the edge that closed the one before
    (so every cycle of the graph runs through an edge of one of them)."""
    graph = {k: set(v) for k, v in graph.items()}
    found = []
    while (cycle := find_cycle(graph)) is not None:
        found.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return found


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_find_cycle_sees_lazy_and_relative_imports(tmp_path):
    """The checker itself: a cycle closed by a function-level relative import is found."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n")
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.b"] == {"pkg", "pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None
