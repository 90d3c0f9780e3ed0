"""The import structure of `src/sparsecraft`: no circle, nothing that runs back up the layers, no borrowed
private names. Read from the source with `ast` (every import counts, function-level and TYPE_CHECKING ones too),
so the check fails the moment someone adds an arrow the wrong way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsecraft"

# Bottom to top: a unit (top-level module or package) may import units of a lower rank, and itself.
RANKS = {
    "errors": 0, "version": 0,
    "atomic": 1, "config": 1, "yaml_settings": 1, "hub": 1, "hardware": 1, "nf4": 1, "sources": 2,
    "data": 2,
    "moe": 3, "generation": 3,
    "surgery": 4,
    "methods": 5,
    "craft": 6, "memory": 6,
    "checkpoint": 7, "report": 7, "scale": 8,
    "loading": 8,
    "auto": 9, "train": 9, "serve": 9,
    "evaluate": 10, "upit": 10, "bench": 10, "integrations": 10,
    "cli": 11,
    "__main__": 12, "__init__": 12,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imports_of(path: Path) -> list[tuple[str, list[str], int]]:
    """`(imported module, names taken from it, line)` for every import of a sparsecraft module in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if is_package(path) else here.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "sparsecraft"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sparsecraft":
                continue
            names = [a.name for a in node.names]
            # `from . import x` / `from .pkg import mod` import modules: count them as edges to those modules
            paths = {n: SRC.parent / f"{target}.{n}".replace(".", "/") for n in names}
            submodules = [f"{target}.{n}" for n in names
                          if paths[n].with_suffix(".py").is_file() or paths[n].is_dir()]
            out.append((target, [n for n in names if f"{target}.{n}" not in submodules], node.lineno))
            out += [(m, [], node.lineno) for m in submodules]
    return out


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


FILES = sorted(SRC.rglob("*.py"))
GRAPH = {module_name(f): {t for t, _, _ in imports_of(f)} - {module_name(f)} for f in FILES}


def test_every_unit_has_a_rank():
    units = {unit_of(module_name(f)) for f in FILES}
    assert units - set(RANKS) == set(), "add new top-level modules/packages to RANKS"


def test_no_import_circle():
    """Depth-first search over module -> imported module; any back edge is a circle."""
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in GRAPH:
                continue
            if state.get(nxt) == 1:
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node, [])
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_no_import_runs_back_up():
    upward = []
    for f in FILES:
        here = module_name(f)
        for target, _, line in imports_of(f):
            a, b = unit_of(here), unit_of(target)
            if a != b and RANKS[b] >= RANKS[a]:
                upward.append(f"{f.relative_to(SRC.parent)}:{line} {here} -> {target}")
    assert upward == []


def test_no_private_name_taken_from_another_module():
    borrowed = []
    for f in FILES:
        here = module_name(f)
        for target, names, line in imports_of(f):
            if target == here:
                continue
            borrowed += [f"{f.relative_to(SRC.parent)}:{line} {n} from {target}"
                         for n in names if n.startswith("_") and not n.startswith("__")]
    assert borrowed == []


def test_the_check_sees_a_circle(tmp_path, monkeypatch):
    """The checker itself: a planted two-module circle is reported."""
    graph = {"sparsecraft.a": {"sparsecraft.b"}, "sparsecraft.b": {"sparsecraft.a"}}
    monkeypatch.setattr(__import__(__name__), "GRAPH", graph, raising=False)
    with pytest.raises(AssertionError, match="sparsecraft.a -> sparsecraft.b -> sparsecraft.a"):
        test_no_import_circle()


def test_modules_stay_small():
    big = {str(f.relative_to(SRC.parent)): n for f in FILES if (n := len(f.read_text().splitlines())) > 400}
    assert big == {}
