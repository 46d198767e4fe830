"""``lcpc plan`` on two networks: the digits example on four equal devices over 100 Mbit/s, and a
ResNet-50 at 224 (benchmarks/models.py, random weights) on four boards a tenth as fast as this
machine's core over 100 Mbit/s. For the recommended plan, the folder is converted again and
``lcpc report --network`` predicts it in the same run (its stage times measured again), so the
two figures can be compared.

    python -m benchmarks.plan [--quick]    # --quick: digits only

Writes ``benchmarks/results/plan.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import onnx

from benchmarks import models
from lcpc import advise, pipeline
from lcpc.perf import devices, latency_report
from lcpc.runtime import manifest as mf
from lcpc.runtime.bench import machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def one(label: str, model: Path, network_file: Path, tmp: Path) -> dict:
    network = devices.load(network_file)
    advice = advise.advise(model, network, progress=lambda what: print(f"  {label}: {what}", flush=True))
    chosen = advice.chosen
    table = advise.render(advice, model.name, "markdown").replace(str(network_file), network_file.name)
    row = {"model": label, "network": network_file.name, "table": table,
           "recommended": chosen.label, "predicted_ms": 1e3 * chosen.latency,
           "speedup": advice.speedup(chosen), "candidates": [c.label for c in advice.candidates]}
    if chosen.k > 1:  # the same plan converted again, predicted by report --network
        folder = tmp / f"{label}-chosen"
        pipeline.convert(model, folder, chosen.k, chosen.sync or "none", devices=network.first(chosen.k),
                         input_wire=chosen.input_wire or "auto")
        measured = latency_report.measure(folder, mf.read(folder), network.first(chosen.k), None, pipeline.convert)
        row["report_network_ms"] = 1e3 * measured.compare()[1].latency
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the digits example only")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lcpc-plan-bench-") as tmp:
        rows.append(one("digits_cnn (example)", ROOT / "examples" / "digits" / "digits_cnn.onnx",
                        ROOT / "benchmarks" / "devices-100mbit.yaml", Path(tmp)))
        if not args.quick:
            resnet = Path(tmp) / "resnet50.onnx"
            onnx.save(models.build("resnet50"), resnet)
            rows.append(one("resnet50 at 224", resnet, ROOT / "benchmarks" / "devices-boards-100mbit.yaml",
                            Path(tmp)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    m = machine()
    (RESULTS / "plan.json").write_text(json.dumps({"rows": rows, "machine": m}, indent=1) + "\n")
    parts = []
    for r in rows:
        parts.append(f"### {r['model']} on {r['network']}\n\n{r['table'].split(chr(10), 2)[2]}")
        if "report_network_ms" in r:
            parts.append(f"`lcpc report --network` on the recommended plan, converted again and timed again in the "
                         f"same run: {r['report_network_ms']:.2f} ms (plan: {r['predicted_ms']:.2f} ms).\n")
    load = os.getloadavg()[0]
    note = (f"Stage times measured on this machine ({m['cpu']}, {m['cores']} cores, one thread per stage; load average "
            f"{load:.1f} at the end of the run), scaled by each device's speed; from one run of "
            f"`python -m benchmarks.plan`.\n")
    (RESULTS / "plan.md").write_text("\n".join(parts) + "\n" + note)
    print((RESULTS / "plan.md").read_text())


if __name__ == "__main__":
    main()
