"""Copy the benchmark result tables into the README (between its generated-table markers).

    python -m benchmarks.readme          # rewrite README.md from benchmarks/results/*.md
    python -m benchmarks.readme --check  # exit 1 when the README differs from the results

The README's recovery and Pareto numbers come only from here, so they are always the
numbers the scripts last printed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = {"recovery-table": "recovery.md", "recovery-shapes-table": "recovery_shapes.md",
          "recovery-curve-table": "recovery_curve.md", "pareto-table": "pareto.md",
          "pareto-refit-table": "pareto_refit.md", "pareto-lite0-table": "pareto_lite0.md"}


def render(readme: str) -> str:
    for marker, name in TABLES.items():
        results = ROOT / "benchmarks" / "results" / name
        if not results.is_file():
            continue
        table = results.read_text().strip() + "\n"
        pattern = re.compile(rf"(<!-- {marker}:start[^\n]*-->\n)(.*?)(<!-- {marker}:end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no {marker} markers")
        readme = pattern.sub(lambda m: m.group(1) + table + m.group(3), readme)
    return readme


def main() -> None:
    path = ROOT / "README.md"
    now = path.read_text()
    new = render(now)
    if "--check" in sys.argv[1:]:
        sys.exit(0 if new == now else 1)
    path.write_text(new)


if __name__ == "__main__":
    main()
