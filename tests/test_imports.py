"""The package's modules import each other without a circle (module level or inside functions)."""

import ast
import pathlib

import paam_fast

ROOT = pathlib.Path(paam_fast.__file__).parent


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(["paam_fast", *parts])


def _edges() -> dict[str, set[str]]:
    mods = {_module(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names]
                hits = [n for n in names if n in mods] or ([target] if target in mods else [])
                edges[m].update(h for h in hits if h != m)
    return edges


def test_no_import_circle():
    edges = _edges()
    # the package __init__ re-exports everything: it is no part of a circle between modules
    for m in edges:
        edges[m].discard("paam_fast")
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, "import circle: " + " -> ".join(circles[0])
