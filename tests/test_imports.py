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


# The loop, its callbacks and the run recipe know the step module's interface only; everything
# DeepSpeed (its imports, its private attributes) lives in pretrain/step/ (and the process groups,
# resharding, export and weights-only loading, which are about DeepSpeed's files and groups).
LOOP_LAYER = ("pretrain.trainer", "pretrain.run", "pretrain.builders", "pretrain.callbacks")


def _in_loop_layer(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in LOOP_LAYER)


def test_the_loop_callbacks_and_run_recipe_import_no_deepspeed():
    graph = import_graph()
    layer = sorted(m for m in graph if _in_loop_layer(m))
    assert "pretrain.callbacks.metrics" in layer and "pretrain.trainer" in layer
    direct = {m: sorted(e for e in graph[m] if e.split(".")[0] == "deepspeed") for m in layer}
    assert not any(direct.values()), f"imports of DeepSpeed: {direct}"
    # Nor through what they import at module level: importing them loads no DeepSpeed.
    code = ("import sys, " + ", ".join(layer) +
            "; print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:]


def test_the_loop_layer_touches_no_private_attribute_of_another_object():
    """`x._name` only for x = self (its own state): no reaching into an engine, an optimizer or
    another component's internals from the loop, the callbacks or the run recipe. (os._exit is
    the standard library's public way to end a process without clean-up.)"""
    files = _module_files(REPO, ["pretrain"])
    found = []
    for name, path in files.items():
        if not _in_loop_layer(name):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name)
                             and (node.value.id in ("self", "cls")
                                  or (node.value.id, node.attr) == ("os", "_exit")))):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: .{node.attr}")
    assert not found, "private attributes reached from the loop layer:\n" + "\n".join(found)
