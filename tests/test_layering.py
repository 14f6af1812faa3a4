"""The package's layers import only downward, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "crate_vis"

#: Lower numbers sit lower: a module may import from its own layer or below. Inside ``models`` the order is kept
#: by the registry <- checkpoint <- factory modules themselves (checked by the cycle test).
LAYERS = {
    "errors": 0, "io": 0,
    "data": 1, "groundtruth": 1,
    "models": 2,
    "hooks": 3,
    "segmentation": 4, "metrics": 4, "whitebox": 4,
    "viz": 5,
    "train": 6, "experiments": 6,
    "cli": 7, "__init__": 8, "__main__": 8,
}  # fmt: skip


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[1] if "." in module else "__init__"]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported crate_vis module, line) of every import in a file, relative ones resolved."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.startswith("crate_vis"):
                if name == "crate_vis" or name.count(".") == 0:
                    out += [(f"crate_vis.{a.name}", node.lineno) for a in node.names]
                else:
                    out.append((name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("crate_vis.")]
    return out


def test_every_layer_imports_only_downward():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if me.endswith(".__init__"):
            me = me[: -len(".__init__")]
        mine = _layer(me) if me != "crate_vis" else LAYERS["__init__"]
        for name, line in _imports(path):
            top = name.split(".")[1] if name.count(".") >= 1 else "__init__"
            if top not in LAYERS:
                continue  # a name re-exported at the top (crate_vis.CRATE)
            if LAYERS[top] > mine:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} (layer {top} above {me})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        me = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        graph[me] = {n for n, _ in _imports(path) if n != me}
    # keep edges between modules only (a package's __init__ re-exports its own modules: not a cycle of ideas)
    edges = {m: {n for n in deps if n in graph and n != m.rsplit(".", 1)[0]} for m, deps in graph.items()}
    for m in list(edges):
        if m.count(".") == 1 and (PACKAGE / m.split(".")[1] / "__init__.py").exists():
            edges[m] = set()  # package inits only gather names
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for n in edges.get(node, ()):
            visit(n)
        stack.pop()

    for node in edges:
        visit(node)
    assert not cycles, cycles[:5]
