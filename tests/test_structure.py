"""The package structure docs/architecture.md describes: each package's ``__init__`` is its public face,
no package imports another's ``_`` module, and no import circle between packages or modules.

Every ``import`` in ``ferrytune/`` counts, also those inside functions (a lazy import still ties
the two packages together: a circle of them is a design knot, only hidden from the interpreter).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ferrytune"


def _package_of(module: str) -> str:
    """``ferrytune.engine._zo`` -> ``engine``; top-level modules (``ferrytune.config``) stand alone."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ferrytune"


def _is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, file:line) for every ferrytune import in ferrytune/."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from ferrytune.kernels import _cpu`` imports the submodule, not the package face
                targets = [f"{node.module}.{a.name}" if _is_module(f"{node.module}.{a.name}") else node.module
                           for a in node.names]
            for t in targets:
                if t.startswith("ferrytune"):
                    out.append((module, t, f"{path.relative_to(ROOT.parent)}:{node.lineno}"))
    return out


def _package_graph() -> dict[str, dict[str, str]]:
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for src, dst, where in _imports():
        a, b = _package_of(src), _package_of(dst)
        if a != b:
            graph[a].setdefault(b, where)
    return graph


def _cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, {}):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in list(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_walk_sees_the_imports():
    graph = _package_graph()
    assert "offload" in graph["engine"] and "engine" in graph["service"]  # known edges: the walk works


def test_no_package_imports_another_packages_private_module():
    bad = [f"{where}: {dst}" for src, dst, where in _imports()
           if _package_of(src) != _package_of(dst) and any(p.startswith("_") for p in dst.split(".")[1:])]
    assert not bad, "import the package's public face instead:\n" + "\n".join(bad)


def test_every_package_has_a_public_face():
    for init in sorted(ROOT.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        names = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]
        assert ast.get_docstring(tree) and names, f"{init.relative_to(ROOT.parent)}: a docstring and __all__"


def test_no_import_circle_between_packages():
    graph = _package_graph()
    cycle = _cycle(graph)
    if cycle:
        edges = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        raise AssertionError("import circle: " + "; ".join(edges))


def test_no_import_circle_between_modules():
    """Inside a package too (launch/ had cli -> _commands -> train -> cli)."""
    graph: dict[str, dict[str, str]] = defaultdict(dict)
    for src, dst, where in _imports():
        if src != dst:
            graph[src].setdefault(dst, where)
    cycle = _cycle(graph)
    if cycle:
        raise AssertionError("import circle: " + "; ".join(f"{a} -> {b} ({graph[a][b]})"
                                                         for a, b in zip(cycle, cycle[1:])))


def test_the_cycle_check_finds_a_circle():
    assert _cycle({"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": "x"}, "b": {}}) is None
