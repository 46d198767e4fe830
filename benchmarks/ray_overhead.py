"""Per-inference overhead of the Ray engine against the local engine, measured in one run.

Both engines run the same converted folder (K=4, pure LCP) on this machine, one request
after another (batch 1), after a warm-up; the figures are the median and p99 of the
end-to-end latency of each engine and their difference (what Ray's actor calls and
object store add per inference), and the same engine in compiled-graph mode (one Ray
Compiled Graph for the whole schedule). Ray runs locally (all actors on this node), started
by the engine; the call mode it reports is recorded.

    python -m benchmarks.ray_overhead [--requests 200] [--resnet-requests 40]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from examples.zoo import resnet50_like
from lcpc.pipeline import convert as convert_model
from lcpc.runtime.deployment import Deployment

RESULTS = ROOT / "benchmarks" / "results"


def compiled_latencies(folder: Path, x: np.ndarray, n: int, warmup: int = 5) -> tuple[list[float] | None, str]:
    """The Ray engine in compiled-graph mode (started by the engine, as above), or (None, why it failed)."""
    from lcpc.errors import LcpcError
    from lcpc.runtime.ray import RayEngine

    try:
        engine = RayEngine(folder, timeout=120, mode="compiled-graph")
    except LcpcError as exc:
        return None, str(exc)
    try:
        for _ in range(warmup):
            engine.run({"input": x})
        out = []
        for _ in range(n):
            start = time.perf_counter()
            engine.run({"input": x})
            out.append(time.perf_counter() - start)
        return out, engine.describe
    finally:
        engine.close()


def latencies(folder: Path, engine: str, x: np.ndarray, n: int, warmup: int = 5) -> tuple[list[float], str]:
    with Deployment(folder, engine, timeout=120) as dep:
        for _ in range(warmup):
            dep(x)
        out = []
        for _ in range(n):
            start = time.perf_counter()
            dep(x)
            out.append(time.perf_counter() - start)
        return out, dep.describe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--resnet-requests", type=int, default=40)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = [("digits_cnn (example)", ROOT / "examples" / "digits" / "digits_cnn.onnx", args.requests, "energy"),
                  ("resnet50_like (zoo)", resnet50_like().SerializeToString(), args.resnet_requests, "contiguous")]
        for label, model, n, partition in models:
            out = Path(tmp) / label.split()[0]
            manifest = convert_model(model, out, 4, "none", partition=partition)
            spec = manifest["source"]["inputs"][0]
            x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])
            local, _ = latencies(out, "local", x, n)
            remote, mode = latencies(out, "ray", x, n)
            row = {"model": label, "K": 4, "sync": "none", "requests": n, "ray_mode": mode,
                   "params": manifest["totals"]["original"]["params"],
                   "local_median_ms": 1e3 * float(np.median(local)), "local_p99_ms": 1e3 * float(np.percentile(local, 99)),
                   "ray_median_ms": 1e3 * float(np.median(remote)), "ray_p99_ms": 1e3 * float(np.percentile(remote, 99))}
            row["overhead_median_ms"] = row["ray_median_ms"] - row["local_median_ms"]
            row["overhead_p99_ms"] = row["ray_p99_ms"] - row["local_p99_ms"]
            compiled, note = compiled_latencies(out, x, n)
            row["compiled_graph"] = note
            if compiled is not None:
                row["compiled_median_ms"] = 1e3 * float(np.median(compiled))
                row["compiled_p99_ms"] = 1e3 * float(np.percentile(compiled, 99))
                row["compiled_overhead_median_ms"] = row["compiled_median_ms"] - row["local_median_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    setup = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores (shared)",
             "python": platform.python_version(), "ray": __import__("ray").__version__}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_overhead.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    lines = ["| model | params | engine mode | local median / p99 ms | ray median / p99 ms | "
             "overhead median / p99 ms | compiled graph median / p99 ms |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['params']} | {r['ray_mode']} | {r['local_median_ms']:.2f} / {r['local_p99_ms']:.2f} "
              f"| {r['ray_median_ms']:.2f} / {r['ray_p99_ms']:.2f} | {r['overhead_median_ms']:.2f} / "
              f"{r['overhead_p99_ms']:.2f} | "
              + (f"{r['compiled_median_ms']:.2f} / {r['compiled_p99_ms']:.2f}" if "compiled_median_ms" in r
                 else r["compiled_graph"]) + " |" for r in rows]
    lines += ["", f"K=4, pure LCP, batch 1, one request at a time; {setup['machine']}; Ray {setup['ray']} started "
                  f"locally by the engine; compiled graph: the same engine with --ray-mode compiled-graph (one Ray "
                  f"Compiled Graph for the whole schedule). From one run of benchmarks/ray_overhead.py."]
    (RESULTS / "ray_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
