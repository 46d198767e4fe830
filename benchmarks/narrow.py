"""How close lcpc's devices come to the limit: the same network built directly at width 1/K.

For every model and K, in one process and one interleaved timing loop (lcpc.runtime.bench's
session options, warm-up, median of the runs):
- the original model;
- every stage of the lcpc conversion (``--sync none``) for two networks: the default
  100 Mbit/s links, where the merge pass gathers pooled features at the head (the fewest
  bytes; the head then runs the whole classifier), and ``devices-10gbit.yaml``, where it
  sums partial logits instead (each branch runs a classifier 1/K as wide); a device's time
  is the sum of its stages, the slowest device is the plan's compute latency;
- the network built directly at width 1/K (``benchmarks/models.py``), the limit;
- optionally (``--engine-threads T``) the local engine's wall clock with all branches on
  this machine (T threads in all) against the original with T threads.

Reported: speed-up of the slowest device and of the 1/K network over the original, their
ratio ("share of the limit"), the FLOP ratios, and the head merge: the time of the head's
stages at levels where no other device has a stage (the classifier, merged on the head),
with the share the slowest device would reach without it. Only ratios measured in this one run.
Results go to ``benchmarks/results/narrow.{json,md}`` with the machine they ran on.

    python -m benchmarks.narrow [--model resnet50 ...] [--branches 2 4 8 16] [--runs 10]
                                [--threads 1] [--engine-threads 2] [--out NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import models as zoo224
from lcpc.pipeline import convert as convert_model
from lcpc.runtime import bench
from lcpc.runtime import manifest as mf
from lcpc.runtime.feeds import random_feeds
from lcpc.runtime.local import LocalEngine
from lcpc.runtime.manifest import Tensor
from lcpc.runtime.session import open_session

RESULTS = ROOT / "benchmarks" / "results"
LINKS = {"100mbit": None, "10gbit": ROOT / "benchmarks" / "devices-10gbit.yaml"}  # None: the default network


def flops_of(model: onnx.ModelProto) -> int:
    """Multiply-accumulate FLOPs of a model lcpc can load (the same count the manifest uses)."""
    from lcpc import frontend
    from lcpc.analysis import analyse

    graph, _ = frontend.load(model.SerializeToString())
    return int(sum(analyse(graph).flops.values()))


def session_runner(data, threads: int):
    sess = open_session(data, "model", threads)
    return lambda feeds: sess.run(None, feeds)


def one_model(name: str, ks: list[int], args, tmp: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    original = zoo224.build(name)
    path = tmp / f"{name}.onnx"
    onnx.save(original, path)
    feeds = random_feeds([Tensor("input", (1, 3, 224, 224), "float32")], rng)
    items = [("original", session_runner(str(path), args.threads), feeds)]
    plans, direct_flops, converts = {}, {}, {}
    for k in ks:
        for link, devices in LINKS.items():
            out = tmp / f"{name}_k{k}_{link}"
            start = time.perf_counter()
            manifest = convert_model(path, out, k, devices=devices)
            if link != "100mbit" and manifest["plan"]["merges"] == plans[k, "100mbit"]["plan"]["merges"]:
                continue  # the same plan: timed once
            converts[k, link] = time.perf_counter() - start
            plans[k, link] = manifest
            for s in mf.read(out).stages:
                items.append((f"k{k}{link}/{s.id}", session_runner(mf.read_stage(out, s), args.threads),
                              random_feeds(s.inputs, rng)))
        narrow = zoo224.build(name, 1.0 / k)
        direct_flops[k] = flops_of(narrow)
        items.append((f"k{k}/direct", session_runner(narrow.SerializeToString(), args.threads), feeds))
        print(f"{name} K={k}: converted in {converts[k, '100mbit']:.1f} s", flush=True)
    engines = {}
    if args.engine_threads:
        items.append(("original@engine", session_runner(str(path), args.engine_threads), feeds))
        for k in ks:
            engine = LocalEngine(tmp / f"{name}_k{k}_100mbit", threads=args.engine_threads)
            engines[k] = engine
            items.append((f"k{k}/engine", engine.run, feeds))
    times = bench.time_interleaved(items, args.runs, args.warmup, np.random.default_rng(0))
    for engine in engines.values():
        engine.close()
    rows = []
    original_flops = plans[ks[0], "100mbit"]["totals"]["original"]["flops"]
    for (k, link), plan in plans.items():
        merge = "/".join(sorted(set(plan["plan"]["merges"].values())))
        row = {"model": name, "K": k, "link": link, "merge": merge, "convert_s": converts[k, link],
               "bytes_per_inference": plan["totals"]["bytes_per_inference"]}
        for stat, suffix in ((np.median, ""), (np.min, "_min")):
            t = {n: float(stat(v)) for n, v in times.items()}
            row.update({f"{key}{suffix}": value for key, value in
                        figures(plan, k, link, t, original_flops, direct_flops[k],
                                args.engine_threads if link == "100mbit" else 0).items()})
        rows.append(row)
        print(f"{name} K={k} {link} ({merge}): slowest device x{row['speedup']:.2f}, "
              f"1/K network x{row['direct_speedup']:.2f}, "
              f"share {100 * row['share_of_limit']:.0f}% (min of runs: {100 * row['share_of_limit_min']:.0f}%), "
              f"head merge {row['head_merge_ms']:.2f} ms"
              + (f"; engine ({args.engine_threads} threads) x{row['engine_speedup']:.2f}" if "engine_speedup" in row
                 else ""),
              flush=True)
    return rows


def figures(m: dict, k: int, link: str, t: dict[str, float], original_flops: int, direct_flops: int,
            engine_threads: int) -> dict:
    """Speed-ups of one plan from the item times ``t`` (seconds, one statistic)."""
    device_s = {d["id"]: sum(t[f"k{k}{link}/{s['id']}"] for s in m["stages"] if s["device"] == d["id"])
                for d in m["devices"]}
    device_flops = {d["id"]: sum(s["flops"] for s in m["stages"] if s["device"] == d["id"]) for d in m["devices"]}
    shared = {s["level"] for s in m["stages"] if s["device"] != 0}  # levels where other devices work too
    merge = [s for s in m["stages"] if s["device"] == 0 and s["level"] not in shared]  # the head's own
    merge_s = sum(t[f"k{k}{link}/{s['id']}"] for s in merge)
    slowest = max(device_s, key=device_s.get)
    without_merge = max(v - (merge_s if d == 0 else 0.0) for d, v in device_s.items())
    row = {"original_ms": 1e3 * t["original"], "slowest_device": slowest,
           "slowest_device_ms": 1e3 * device_s[slowest], "device_ms": [1e3 * device_s[d] for d in sorted(device_s)],
           "stage_ms": {s["id"]: 1e3 * t[f"k{k}{link}/{s['id']}"] for s in m["stages"]},
           "head_merge_ms": 1e3 * merge_s, "head_merge_flops": int(sum(s["flops"] for s in merge)),
           "direct_ms": 1e3 * t[f"k{k}/direct"],
           "speedup": t["original"] / device_s[slowest], "direct_speedup": t["original"] / t[f"k{k}/direct"],
           "flop_ratio": original_flops / max(device_flops.values()), "direct_flop_ratio": original_flops / direct_flops}
    row["share_of_limit"] = row["speedup"] / row["direct_speedup"]
    row["share_without_head_merge"] = t[f"k{k}/direct"] / without_merge
    if engine_threads:
        row["engine_threads"] = engine_threads
        row["engine_ms"] = 1e3 * t[f"k{k}/engine"]
        row["original_at_engine_threads_ms"] = 1e3 * t["original@engine"]
        row["engine_speedup"] = t["original@engine"] / t[f"k{k}/engine"]
    return row


def markdown(rows: list[dict], setup: dict) -> str:
    engine = any("engine_ms" in r for r in rows)
    head = ["model", "K", "merge (link)", "bytes/inference", "original ms", "slowest device ms", "1/K network ms", "device speed-up",
            "1/K network speed-up", "share of the limit", "share, min of runs", "head merge ms",
            "share without the head merge", "FLOP ratio (device / 1/K net)"]
    if engine:
        head += [f"local engine speed-up ({setup['engine_threads']} threads)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["K"], f"{r['merge']} ({r['link']})", r["bytes_per_inference"], f"{r['original_ms']:.1f}", f"{r['slowest_device_ms']:.2f}", f"{r['direct_ms']:.2f}",
                 f"x{r['speedup']:.2f}", f"x{r['direct_speedup']:.2f}", f"{100 * r['share_of_limit']:.0f}%",
                 f"{100 * r['share_of_limit_min']:.0f}%", f"{r['head_merge_ms']:.2f}",
                 f"{100 * r['share_without_head_merge']:.0f}%",
                 f"x{r['flop_ratio']:.1f} / x{r['direct_flop_ratio']:.1f}"]
        if engine:
            cells.append(f"x{r['engine_speedup']:.2f}" if "engine_speedup" in r else "")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    m = setup["machine"]
    note = (f"\n{setup['threads']} onnxruntime thread(s) per session, {setup['runs']} interleaved runs after "
            f"{setup['warmup']} warm-up, medians (one column: minimum over the runs); --sync none; the local engine "
            f"runs all branches on this machine with {setup['engine_threads']} threads in all, against the original "
            f"on as many. Machine: {m['cpu']}, {m['cores']} cores, "
            f"{m['system']}, onnxruntime {m['onnxruntime']}. From one run of `{setup['command']}`.\n")
    return "\n".join(lines) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=sorted(zoo224.MODELS), default=None)
    ap.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--engine-threads", type=int, default=0)
    ap.add_argument("--out", default="narrow", help="results file stem under benchmarks/results")
    args = ap.parse_args()
    names = args.model or list(zoo224.MODELS)
    rows = []
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            rows += one_model(name, args.branches, args, Path(tmp))
    setup = {"threads": args.threads, "runs": args.runs, "warmup": args.warmup, "engine_threads": args.engine_threads,
             "machine": bench.machine(), "command": "python -m benchmarks.narrow " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    text = markdown(rows, setup)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
