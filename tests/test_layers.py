"""The module graph: no import cycle among lcpc's modules, function-local imports included,
and the layers of DESIGN.md (targets are imported only by the CLI and the pipeline).

Reads the source files (ast), so it checks every ``import`` statement wherever it sits,
not just what happens to be imported at module load.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"lcpc": "lcpc", "passes": "lcpc.passes", "targets": "lcpc.targets"}
TOP = {"lcpc.cli", "lcpc.pipeline"}   # may import targets


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports(path: Path, package: str, known: set[str]) -> set[str]:
    """lcpc modules that ``path`` imports anywhere in its body."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name not in FOLDERS.values():  # the packages' own __init__ modules hold no code
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    edges = {}
    for name, path in mods.items():
        package = name if path.stem == "__init__" else name.rpartition(".")[0]
        edges[name] = imports(path, package, known) - {name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges = graph()
    assert len(edges) > 20 and "lcpc.weights" in edges["lcpc.lower"]  # the walk sees the real graph
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_cli_and_the_pipeline_import_targets():
    offenders = {m: sorted(t for t in deps if t.startswith("lcpc.targets"))
                 for m, deps in graph().items() if not m.startswith("lcpc.targets") and m not in TOP}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_passes_do_not_import_the_planner_or_the_pipeline():
    edges = graph()
    for m, deps in edges.items():
        if m.startswith("lcpc.passes."):
            assert not deps & {"lcpc.planner", "lcpc.pipeline", "lcpc.cli"}, m
