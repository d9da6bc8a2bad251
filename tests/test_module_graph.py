"""The device SDK's and the sync server's modules import each other without a circle, type-only
imports (``if TYPE_CHECKING:``) and imports inside functions included: each concept sits
above the ones it uses (issue 16: protocol.py once imported SyncClient for its types)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imports_of(path: Path, package: str) -> set[str]:
    """The modules of ``package`` that the file imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith(package + "."))
    return found


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules it imports), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", ["device_sdk", "sync_server"])
def test_no_module_imports_itself_through_others(package):
    modules = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts)
               for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts}
    known = set(modules.values())
    graph = {name.removesuffix(".__init__"): {m for m in imports_of(path, package) if m in known}
             for path, name in modules.items()}
    graph = {k: {m.removesuffix(".__init__") for m in v} - {k} for k, v in graph.items()}
    assert cycle(graph) is None, cycle(graph)


def test_the_cycle_finder_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
