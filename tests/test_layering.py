"""The layering of hire/, workers/ and cluster/, checked over the import graph read from the sources with `ast`.

Every import counts, at the top of a module or inside a function, except those under `if TYPE_CHECKING:` (they never
run). `from a import b` is an edge to a.b where that is a module (a package's __init__ being empty or not), else to a.
Rules: no import cycle; hire/ (but its command line, hire/cli.py) imports nothing of workers/ or cluster/; workers/
nothing of cluster/; loading a checkpoint (all that hire.checkpoint reaches) imports no calibration or training code.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hire", "cluster", "workers")
CLI = "hire.cli"
NOT_ON_LOAD_PATH = ("hire.calibrate", "hire.recall", "hire.window", "hire.evaluate",  # calibration, evaluation
                    "hire.train", "hire.train_checkpoint", "hire.train_config", "hire.train_tandem", "hire.data",
                    "hire.bpe")  # training


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or \
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in `tree` but those under `if TYPE_CHECKING:` (their `else:` counts)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        children = node.orelse if _type_checking(node) else ast.iter_child_nodes(node)
        todo.extend(children)
    return sorted(found, key=lambda node: node.lineno)


def _known(name: str) -> str | None:
    """The module of ours that importing `name` (a module or a name in one) runs last, or None for another package."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, source: str, is_package: bool = False) -> dict[str, int]:
    """The modules of ours that module `name` (its `source`) imports, each with the line of its first import."""
    package = name if is_package else name.rpartition(".")[0]
    edges: dict[str, int] = {}
    for node in _imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([node.module] if node.module else [])])
            targets = [base, *(f"{base}.{a.name}" for a in node.names)]
        for target in filter(None, map(_known, targets)):
            if target != name:
                edges.setdefault(target, node.lineno)
    return edges


GRAPH = {name: imports_of(name, path.read_text(), path.name == "__init__.py") for name, path in MODULES.items()}


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def closure(graph: dict[str, dict[str, int]], start: str) -> dict[str, str]:
    """Every module `start` imports, directly or not, each with the module that imports it first on the way."""
    via, todo = {start: ""}, [start]
    while todo:
        v = todo.pop(0)
        for w in graph[v]:
            if w not in via:
                via[w] = v
                todo.append(w)
    return via


def _path(via: dict[str, str], module: str) -> str:
    chain = [module]
    while via[chain[-1]]:
        chain.append(via[chain[-1]])
    return " -> ".join(reversed(chain))


def _edges(graph: dict[str, dict[str, int]], modules: list[str]) -> str:
    return "; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in modules for b in graph[a] if b in modules)


def test_the_graph_is_read():
    """The scan sees the imports it is meant to (a check of the checker)."""
    source = ("from typing import TYPE_CHECKING\nimport numpy\nimport hire.config\nif TYPE_CHECKING:\n"
              "    from hire import engine\nelse:\n    from hire import model\n"
              "def f():\n    from hire.formats import CheckpointError, native\n    from . import sampling\n")
    assert imports_of("hire.x", source) == {"hire.config": 3, "hire": 7, "hire.model": 7, "hire.formats": 9,
                                            "hire.formats.native": 9, "hire.sampling": 10}
    assert imports_of("hire.formats", "from . import gguf", is_package=True) == {"hire.formats.gguf": 1}
    assert {"hire.checkpoint", "hire.formats.native", "workers.shard", "cluster.serve_app"} <= MODULES.keys()
    assert "hire.formats.native" in GRAPH["hire.checkpoint"]  # imported inside a function
    assert cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert closure({"a": {"b": 1}, "b": {"c": 1}, "c": {}}, "a") == {"a": "", "b": "a", "c": "b"}


def test_no_import_cycle():
    found = cycles(GRAPH)
    assert not found, "import cycles: " + " | ".join(f"{c}: {_edges(GRAPH, c)}" for c in found)


@pytest.mark.parametrize("package, forbidden", [("hire", ("cluster", "workers")), ("workers", ("cluster",))])
def test_lower_packages_do_not_import_higher_ones(package, forbidden):
    wrong = [f"{a} -> {b} (line {line})" for a, edges in GRAPH.items() if a.split(".")[0] == package and a != CLI
             for b, line in edges.items() if b.split(".")[0] in forbidden]
    assert not wrong, f"{package}/ imports {'/'.join(forbidden)}/: " + "; ".join(wrong)


def test_loading_a_checkpoint_imports_no_calibration_or_training_code():
    assert set(NOT_ON_LOAD_PATH) <= MODULES.keys()
    via = closure(GRAPH, "hire.checkpoint")
    wrong = [_path(via, m) for m in NOT_ON_LOAD_PATH if m in via]
    assert not wrong, "hire.checkpoint reaches: " + "; ".join(wrong)
