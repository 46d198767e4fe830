"""Cost of ``lcpc convert`` against model size: wall time and peak memory, model by model.

Each conversion runs in a fresh Python process (``lcpc.pipeline.convert``, what
``lcpc convert`` runs), which reports its wall time, its peak resident memory (VmHWM)
and the resident memory right after importing lcpc (what any conversion starts from).
Models: the test zoo (32x32) and the 224x224 benchmark models (``benchmarks/models.py``).
Results go to ``benchmarks/results/convert_cost.{json,md}`` with the machine they ran on and its
load average before and after the run (the seconds depend on what else runs on the machine; the
peaks do not).

    python -m benchmarks.convert_cost [--model resnet50 ...] [--zoo] [--branches 4]
                                      [--python OTHER_VENV/bin/python --label before]

``--python`` runs the conversions with another interpreter (another lcpc installed there),
so two versions are compared on the same files in one run; ``--label`` names the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import models as zoo224
from examples.zoo import ZOO
from lcpc.runtime.bench import machine

RESULTS = ROOT / "benchmarks" / "results"

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent, which holds
# every model this script built (VGG-16 included), so ru_maxrss would report the parent's peak.
CHILD = """
import sys, time
from lcpc import pipeline
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
base = hwm()
start = time.perf_counter()
m = pipeline.convert(sys.argv[1], sys.argv[2], int(sys.argv[3]))
wall = time.perf_counter() - start
peak = hwm()
print(wall, base * 1024, peak * 1024, m["totals"]["original"]["params"], m["sync"]["partition_energy"]["kept"])
"""


def measure(path: Path, k: int, tmp: Path, python: str, label: str) -> dict:
    out = tmp / f"{path.stem}_k{k}_{label}"
    done = subprocess.run([python, "-c", CHILD, str(path), str(out), str(k)], capture_output=True,
                          text=True, cwd=tmp)
    if done.returncode:
        return {"model": path.stem, "K": k, "lcpc": label, "error": done.stderr.strip().splitlines()[-1]}
    wall, base, peak, params, kept = done.stdout.split()[-5:]
    size = path.stat().st_size
    return {"model": path.stem, "K": k, "lcpc": label, "file_bytes": size, "params": int(params), "seconds": float(wall),
            "baseline_rss_bytes": int(base), "peak_rss_bytes": int(peak), "peak_over_file": int(peak) / size,
            "peak_above_baseline_over_file": (int(peak) - int(base)) / size, "energy_kept": float(kept)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=sorted(zoo224.MODELS), default=None)
    ap.add_argument("--zoo", action="store_true", help="also the 32x32 test zoo")
    ap.add_argument("--branches", type=int, nargs="+", default=[4])
    ap.add_argument("--out", default="convert_cost")
    ap.add_argument("--python", action="append", default=None, help="interpreter(s) to convert with")
    ap.add_argument("--label", action="append", default=None, help="one name per --python")
    args = ap.parse_args()
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        if args.zoo:
            for name, build in ZOO.items():
                onnx.save(build(), tmp / f"{name}.onnx")
                paths.append(tmp / f"{name}.onnx")
        for name in args.model or list(zoo224.MODELS):
            onnx.save(zoo224.build(name), tmp / f"{name}_224.onnx")
            paths.append(tmp / f"{name}_224.onnx")
        pythons = args.python or [sys.executable]
        labels = args.label or ["this"] * len(pythons)
        for path in paths:
            for k, (python, label) in ((k, p) for k in args.branches for p in zip(pythons, labels)):
                rows.append(measure(path, k, tmp, python, label))
                r = rows[-1]
                print(r if "error" in r else f"{r['model']} K={k} ({label}): {r['params'] / 1e6:.2f}M params, "
                      f"{r['seconds']:.1f} s, peak {r['peak_rss_bytes'] / 2**20:.0f} MiB = "
                      f"{r['peak_over_file']:.2f}x the file", flush=True)
    setup = {"machine": machine(), "command": "python -m benchmarks.convert_cost " + " ".join(sys.argv[1:]),
             "load_average": {"before": load_before, "after": os.getloadavg()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = ["| model | K | lcpc | parameters | file MiB | convert s | peak RSS MiB | peak / file | "
             "(peak - RSS after import) / file | energy kept |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['K']} | {r['lcpc']} | error: {r['error']} |||||||")
            continue
        lines.append(f"| {r['model']} | {r['K']} | {r['lcpc']} | {r['params'] / 1e6:.2f}M | {r['file_bytes'] / 2**20:.1f} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} | {r['peak_over_file']:.2f}x | "
                     f"{r['peak_above_baseline_over_file']:.2f}x | {r['energy_kept']:.4f} |")
    m = setup["machine"]
    note = (f"\nOne fresh process per conversion (--sync none, --partition energy). Machine: {m['cpu']}, "
            f"{m['cores']} cores (shared), {m['system']}, onnxruntime {m['onnxruntime']}; load average "
            f"(1, 5, 15 min) {_loads(setup['load_average']['before'])} before the run, "
            f"{_loads(setup['load_average']['after'])} after it. From one run of `{setup['command']}`.\n")
    text = "\n".join(lines) + "\n" + note
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


def _loads(avg) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


if __name__ == "__main__":
    main()
