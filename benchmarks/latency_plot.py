"""Predicted latency per inference of four setups against link bandwidth, for docs/results.md.

Converts the digits example (K=4, pure LCP), times its stage files, the original model
and the --sync all plan on this machine (``lcpc.perf.latency_report.measure``), and writes
``results/latency.png`` (the plot of ``lcpc report --network --plot``) and
``results/latency.md`` (the table at the bandwidth of ``devices-100mbit.yaml``).

    python -m benchmarks.latency_plot [--devices benchmarks/devices-100mbit.yaml]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from lcpc.perf import devices, latency_report
from lcpc.pipeline import convert as convert_model
from lcpc.runtime import manifest as mf

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=Path, default=ROOT / "benchmarks" / "devices-100mbit.yaml")
    args = ap.parse_args()
    net = devices.load(args.devices)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "digits"
        convert_model(ROOT / "examples" / "digits" / "digits_cnn.onnx", folder, 4, "none")
        manifest = mf.read(folder)
        measured = latency_report.measure(folder, manifest, net, None, convert_model)
    table = latency_report.render(measured.compare(), net, manifest, "markdown")
    table = table.replace(str(args.devices), args.devices.name)
    (RESULTS / "latency.md").write_text(table + "\nDigits example, K=4, --sync none; stage times measured on this "
                                        "machine (one thread); from one run of benchmarks/latency_plot.py.\n")
    latency_report.plot(measured.sweep(), measured.compare()[1], RESULTS / "latency.png")
    print(table)


if __name__ == "__main__":
    main()
