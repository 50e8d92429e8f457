"""The folder layout is the architecture: every import in ``src/daamkit`` goes down the floors (or
sideways without a circle), and the library never imports the test fixtures.

Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted; imports inside functions
are, since they run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# floor of each part, ground first; a module's floor is that of its longest matching prefix
FLOORS = {
    "daamkit.errors": 0, "daamkit._version": 0, "daamkit.capture": 0, "daamkit.aggregate": 0,
    "daamkit.tokens": 0, "daamkit.metrics": 0, "daamkit.stats": 0, "daamkit.heatmap": 0, "daamkit.plot": 0,
    "daamkit.frames": 0, "daamkit.video": 0, "daamkit.relation": 0,
    "daamkit.testing": 1, "daamkit.world": 1,
    "daamkit.methods": 2, "daamkit.trace": 2, "daamkit.intervene": 2, "daamkit.faithfulness": 0,
    "daamkit.io": 3,
    "daamkit.jobs": 4, "daamkit": 4,
    "daamkit.evaluate": 5, "daamkit.analysis": 5,
    "daamkit.cli": 6, "daamkit.ui": 6, "daamkit.__main__": 6,
}
FIXTURES = ("daamkit.testing", "daamkit.world.train")


def _floor(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in FLOORS:
            return FLOORS[key]
    raise AssertionError(f"{module} is on no floor: add its package to FLOORS")


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, package: str) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("daamkit"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("daamkit"):
                # `from daamkit.x import y` names a submodule y, or a name defined in daamkit.x
                for a in node.names:
                    sub = SRC / Path(*f"{mod}.{a.name}".split("."))
                    if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                        found.add(f"{mod}.{a.name}")
                    else:
                        found.add(mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((SRC / "daamkit").rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _imports(ast.parse(path.read_text()), package) if m != name}
    return graph


GRAPH = _graph()


def test_the_graph_was_read():
    assert len(GRAPH) > 40
    assert "daamkit.capture.base" in GRAPH["daamkit.aggregate"]
    assert "daamkit.jobs.generate" in GRAPH["daamkit.cli.common"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_floors(module):
    up = sorted(m for m in GRAPH[module] if _floor(m) > _floor(module))
    assert not up, f"{module} (floor {_floor(module)}) imports a higher floor: {up}"


def test_the_library_never_imports_the_fixtures():
    for module, targets in GRAPH.items():
        if module.startswith(FIXTURES):
            continue
        bad = sorted(t for t in targets if t.startswith("daamkit.testing"))
        assert not bad, f"{module} imports test fixtures {bad}"


def test_no_import_circles():
    # modules only: a package's __init__ that re-exports its own submodules is not a circle
    graph = {m: {t for t in ts if t in GRAPH and not m.startswith(t + ".")} for m, ts in GRAPH.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                walk(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
