"""The docs and the module docstrings point only at what exists: relative links and their
anchors, file paths, and dotted ``lcpc.`` names (a module, or an attribute of one)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest
from conftest import ROOT

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
SOURCES = sorted(p for top in ("lcpc", "passes", "targets") for p in (ROOT / top).rglob("*.py"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./-])((?:lcpc|passes|targets|benchmarks|tests|examples|docs)/[\w./-]*\w\.(?:py|md|json|yaml|png))")
DOTTED = re.compile(r"(?<![\w.])(lcpc(?:\.\w+)+)")
GENERATED = re.compile(r"<!-- ([a-z0-9-]+):start.*?<!-- \1:end -->", re.DOTALL)
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def _prose(path: Path) -> str:
    """The text a person wrote: generated blocks (copied from elsewhere) left out."""
    return GENERATED.sub("", path.read_text())


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_anchors_exist(doc):
    for target in LINK.findall(FENCE.sub("", _prose(doc))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        assert path.exists(), f"{doc.name}: link to missing {target}"
        assert ROOT in path.parents or path == ROOT, f"{doc.name}: link leaves the repository: {target}"
        if anchor:
            assert anchor in _anchors(path), f"{doc.name}: no heading for #{anchor} in {path.name}"


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def _docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    return "\n".join(ast.get_docstring(n) or "" for n in nodes)


def _paths(text: str) -> list[str]:
    """File paths named in ``text``, placeholders such as ``benchmarks/NAME.py`` left out."""
    return [p for p in PATH.findall(text) if not re.search(r"\b[A-Z]{2,}\b", p)]


def test_docs_name_files_and_modules_that_exist():
    missing = []
    for doc in DOCS:
        text = _prose(doc)
        missing += [f"{doc.name}: {p}" for p in _paths(text) if not (ROOT / p).exists()]
        missing += [f"{doc.name}: {d}" for d in DOTTED.findall(text) if not _resolves(d)]
    assert not missing, missing


def test_docstrings_name_files_and_modules_that_exist():
    missing = []
    for source in SOURCES:
        text = _docstrings(source)
        where = source.relative_to(ROOT)
        missing += [f"{where}: {p}" for p in _paths(text) if not (ROOT / p).exists()]
        missing += [f"{where}: {d}" for d in DOTTED.findall(text) if not _resolves(d)]
        missing += [f"{where}: cites the README" for _ in re.finditer(r"README's", text)]
    assert not missing, missing
