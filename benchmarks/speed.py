"""Speed of LCP plans relative to the original model, measured in one run on this machine.

Each device of a plan is simulated by timing its stage files one at a time with
onnxruntime on one thread (an edge board runs one stage at a time); the original model
is timed the same way, in the same run. The plan's latency is its critical path:

    sum over levels L of  max over devices d of  time(stage d at L)  +  network(L)

with network(L) = latency + (largest number of bytes any device receives after level L)
/ bandwidth (each device has its own link; the defaults model 100 Mbit/s Ethernet with
0.5 ms per message round, as in the paper's Raspberry Pi cluster); a second figure
leaves out the distribution of the input (a camera stream every device receives).
Bytes per inference include that input distribution. Only ratios measured
in this one run are reported: speed-up = original time / plan time.

    python -m benchmarks.speed [--model PATH] [--repeat 50] [--bandwidth-mbit 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from lcpc import pipeline
from lcpc.perf.measured import median_time
from lcpc.runtime.session import open_session

RESULTS = ROOT / "benchmarks" / "results"


def session(path_or_bytes):
    return open_session(path_or_bytes, "model")


def plan_time(folder: Path, manifest: dict, repeat: int, bandwidth: float, latency: float) -> dict:
    rng = np.random.default_rng(0)
    stage_time = {}
    for s in manifest["stages"]:
        feeds = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in s["inputs"]}
        stage_time[s["id"]] = median_time(session(str(folder / s["file"])), feeds, repeat)
    compute = defaultdict(float)
    for s in manifest["stages"]:
        compute[s["level"]] = max(compute[s["level"]], stage_time[s["id"]])
    received = defaultdict(lambda: defaultdict(int))
    for t in manifest["transfers"]:
        level = -1 if t["kind"] == "input" else t["level"]
        received[level][t["to"]["device"]] += t["bytes"]
    network = {lv: latency + max(per.values()) / bandwidth for lv, per in received.items()}
    return {"compute_s": sum(compute.values()), "network_s": sum(network.values()),
            "input_s": network.get(-1, 0.0), "busiest_stage_s": max(stage_time.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", default=None)
    ap.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--bandwidth-mbit", type=float, default=100.0)
    ap.add_argument("--latency-ms", type=float, default=0.5)
    args = ap.parse_args()
    models = args.model or [ROOT / "examples" / "digits" / "digits_cnn.onnx"]
    shared = ROOT.parent / "shared" / "models" / "efficientnet_lite0.onnx"
    if args.model is None and shared.is_file():
        models.append(shared)
    bandwidth, latency = args.bandwidth_mbit * 1e6 / 8, args.latency_ms / 1e3
    rows = []
    for model in models:
        original = session(str(model))
        feeds = {i.name: np.random.default_rng(0).standard_normal(
            [d if isinstance(d, int) else 1 for d in i.shape]).astype(np.float32) for i in original.get_inputs()}
        t_orig = median_time(original, feeds, args.repeat)
        for k in args.branches:
            for sync in ("none", "all"):
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "out"
                    manifest = pipeline.convert(model, out, k, sync)
                    t = plan_time(out, manifest, args.repeat, bandwidth, latency)
                total = t["compute_s"] + t["network_s"]
                local_input = total - t["input_s"]
                rows.append({"model": model.name, "K": k, "sync": sync,
                             "bytes_per_inference": manifest["totals"]["bytes_per_inference"],
                             "original_ms": 1e3 * t_orig, "compute_ms": 1e3 * t["compute_s"],
                             "network_ms": 1e3 * t["network_s"],
                             "compute_speedup": t_orig / t["compute_s"], "speedup": t_orig / total,
                             "speedup_input_on_devices": t_orig / local_input})
                r = rows[-1]
                print(f"{r['model']:24s} K={k} --sync {sync:4s} bytes {r['bytes_per_inference']:>10d}  "
                      f"compute x{r['compute_speedup']:.2f}  with network x{r['speedup']:.2f}  "
                      f"(input already on every device x{r['speedup_input_on_devices']:.2f})", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    setup = {"bandwidth_mbit": args.bandwidth_mbit, "latency_ms": args.latency_ms, "repeat": args.repeat,
             "threads_per_stage": 1}
    (RESULTS / "speed.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = ["| model | K | sync | bytes/inference | compute speed-up | incl. network | "
             "incl. network, input already on every device |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['K']} | {r['sync']} | {r['bytes_per_inference']} | "
              f"x{r['compute_speedup']:.2f} | x{r['speedup']:.2f} | x{r['speedup_input_on_devices']:.2f} |"
              for r in rows]
    note = (f"\nOne thread per device; network {args.bandwidth_mbit:g} Mbit/s per link, "
            f"{args.latency_ms:g} ms per exchange round. Ratios from one run of benchmarks/speed.py.\n")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)


if __name__ == "__main__":
    main()
