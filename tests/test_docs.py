"""The README's op table is generated from the registry (one source of truth)."""

from __future__ import annotations

import re

from conftest import ROOT

from lcpc.ops import RULES, markdown_table


def test_readme_ops_table_is_generated():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- ops-table:start[^\n]*-->\n(.*?)<!-- ops-table:end -->", readme, re.S)
    assert block, "README lost its generated ops table"
    assert block.group(1) == markdown_table(), "regenerate with: python -m lcpc.ops"


def test_every_registered_op_is_documented():
    table = markdown_table()
    for op, rule in RULES.items():
        assert op in table and (rule.__doc__ or "").strip(), op


def test_readme_result_tables_come_from_the_benchmarks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "benchmarks" / "readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.render(readme) == readme, "regenerate with: python benchmarks/readme.py"
