"""The docs' generated parts equal what their one source gives today (the op registry, the
benchmark results, the manifest schema, the click commands), and the docs point only at
files, anchors and modules that exist."""

from __future__ import annotations

import importlib.util
import re

from conftest import ROOT

from lcpc.ops import RULES, markdown_table

REGENERATE = "regenerate with: python -m benchmarks.readme"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generator", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _block(text: str, marker: str) -> str | None:
    found = re.search(rf"<!-- {marker}:start[^\n]*-->\n(.*?)<!-- {marker}:end -->", text, re.DOTALL)
    return found.group(1) if found else None


def test_ops_table_is_generated_from_the_registry():
    block = _block((ROOT / "docs" / "how-it-works.md").read_text(), "ops-table")
    assert block is not None, "docs/how-it-works.md lost its generated ops table"
    assert block == markdown_table(), REGENERATE


def test_every_registered_op_is_documented():
    table = markdown_table()
    for op, rule in RULES.items():
        assert op in table and (rule.__doc__ or "").strip(), op


def test_result_tables_come_from_the_benchmarks():
    module = _generator()
    results = (ROOT / "docs" / "results.md").read_text()
    for marker in module.TABLES:
        assert _block(results, marker) is not None, f"docs/results.md lost its {marker} markers"
    assert module.render(results, tuple(module.TABLES), "docs/results.md") == results, REGENERATE
    readme = (ROOT / "README.md").read_text()
    assert module.render(readme) == readme, REGENERATE


def test_cli_reference_is_generated_from_the_click_commands():
    from lcpc.cli import main

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == _generator().cli_reference(), REGENERATE
    for name, command in main.commands.items():
        assert f"## lcpc {name}\n" in committed, name
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("-"):
                    assert f"`{opt}`" in committed, (name, opt)


def test_every_generated_part_is_current():
    stale = [name for name, (now, new) in _generator().generated().items() if now != new]
    assert not stale, f"out of date: {', '.join(stale)}; {REGENERATE}"


def test_readme_stays_short_and_links_into_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    for page in ("how-it-works", "cli", "manifest", "results", "deployment", "architecture"):
        assert f"(docs/{page}.md)" in readme, page
