"""What ``lcpc serve`` shows: a rich progress bar while requests stream, then a summary.

Guarantees: the summary carries the same figures in every format (text, markdown,
json: ``ServeReport.as_dict``), the degraded answers counted by the devices they were
made without; every failed request is listed by id with its one-line
reason; the progress bar writes to stderr only when it is a terminal.
"""

from __future__ import annotations

import json
import sys

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lcpc.runtime.deployment import Failure, ServeReport
from lcpc.safety import printable


class ServeProgress:
    """``on_result`` callback for ``Deployment.serve`` that drives a progress bar."""

    def __init__(self, total: int) -> None:
        self.bar = Progress(TextColumn("serving"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("last {task.fields[last]}  failed {task.fields[failed]}"),
                            TimeElapsedColumn(), disable=not sys.stderr.isatty(),
                            console=None)
        self.total = total
        self.failed = 0

    def __enter__(self) -> ServeProgress:
        self.bar.__enter__()
        self.task = self.bar.add_task("serve", total=self.total, last="-", failed=0)
        return self

    def __call__(self, request, outputs, result) -> None:
        if isinstance(result, Failure):
            self.failed += 1
            self.bar.console.print(f"request {printable(str(request), 100)} failed: {printable(result.message, 400)}")
            last = "failed"
        else:
            last = f"{1e3 * result:.2f} ms"
        self.bar.update(self.task, advance=1, last=last, failed=self.failed)

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


def render(report: ServeReport, engine: str, fmt: str = "text") -> str:
    data = {"engine": engine, **report.as_dict()}
    if fmt == "json":
        return json.dumps(data, indent=1)
    without: dict[tuple[str, ...], int] = {}
    for devices in report.degraded.values():
        without[devices] = without.get(devices, 0) + 1
    degraded = ", ".join(f"{n} without {'+'.join(d)}" for d, n in without.items())
    rows = [("engine", engine), ("answered", str(report.answered)),
            ("degraded", f"{len(report.degraded)}" + (f" ({degraded})" if degraded else "")),
            ("failed", str(len(report.failures))),
            ("latency p50", f"{data['p50_ms']:.3f} ms"), ("latency p90", f"{data['p90_ms']:.3f} ms"),
            ("latency p99", f"{data['p99_ms']:.3f} ms"), ("throughput", f"{report.throughput:.1f} requests/s")]
    if report.rebuilt:
        rows.append(("rebuilt", ", ".join(report.rebuilt)))
    if report.interrupted:
        rows.append(("interrupted", "yes (Ctrl-C): Ray shut down"))
    failed = [f"request {printable(str(f.request), 100)}: {printable(f.message, 400)}"
              + (f" (rebuilt {', '.join(f.rebuilt)})" if f.rebuilt else "") for f in report.failures]
    if fmt == "markdown":
        return ("| metric | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows) + "\n"
                + "".join(f"\n- {line}" for line in failed))
    width = max(len(k) for k, _ in rows)
    return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + failed)
