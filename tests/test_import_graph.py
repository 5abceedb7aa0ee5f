"""The import graph of dcustom has no cycle.

Every module of the package is parsed (ast, nothing is imported) and every import it makes counts as an
edge, wherever it stands: at the top, inside a function (the lazy imports that keep `dcustom --help`
instant), `__import__("dcustom....")` calls, and the "dcustom.module:attribute" strings the registry and
the lazy re-exports resolve with importlib. `from dcustom.adapters import files` is an edge to the module
`dcustom.adapters.files` when such a module exists, else to the package. A package's own `__init__` is
not counted as a dependency of its submodules (Python runs it first either way).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dcustom"
TARGET_STRING = re.compile(r"^(dcustom(?:\.\w+)*):\w+$")


def modules() -> dict[str, tuple[Path, bool]]:
    """dotted name -> (file, is_package) for every .py file under dcustom/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_package)
    return out


def resolve(name: str, known) -> str | None:
    """The longest prefix of dotted `name` that is a module of the package."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, is_package: bool, known) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            targets = [node.args[0].value]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and TARGET_STRING.match(node.value):
            targets = [TARGET_STRING.match(node.value).group(1)]
        for target in targets:
            if target == "dcustom" or target.startswith("dcustom."):
                resolved = resolve(target, known)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, is_package, known) for name, (path, is_package) in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # name -> 1 on the current path, 2 done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert len(graph) > 100 and "dcustom.toyworld.train_base" in graph  # every module, toyworld included
    assert "dcustom.trainers.loop" in graph["dcustom.trainers.adapter.trainer"]  # top-level import
    assert "dcustom.models" in graph["dcustom.trainers.loop"]  # import inside a function
    assert "dcustom.commands.adapters" in graph["dcustom.cli"]  # __import__("...")
    assert "dcustom.trainers.adapter.trainer" in graph["dcustom.registry"]  # "module:function" strings
    assert "dcustom.adapters.files" in graph["dcustom.trainers.peft_adapters"]  # `from package import module`


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_dcustom_imports_have_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
