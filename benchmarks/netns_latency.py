"""Measured end-to-end latency, Ray and MPI, on 4 network nodes over shaped links, against the network model.

Four network namespaces on this box (``netns_cluster``), one Ray node each (head in the first),
every link 100 Mbit/s with 1 ms one-way latency (tbf + the delaying switch ``netns_relay.py``:
this kernel has no netem). The driver runs in the head's namespace and runs each folder with
``--engine ray --address`` (``RayEngine``), one request at a time after a warm-up, in blocks
that alternate between the links shaped and unshaped (same cluster, same processes), so the
load other users put on this shared machine hits both alike. Then the same with ``--engine mpi``
on the same namespaces (``MpiEngine``, one MPI job: the relay and device 0 in the first namespace,
device d in namespace d, started through the cluster's launch agent, TCP over the shaped links:
``Cluster.mpi_launch``). Each driver also checks its outputs against the local engine's and the
bytes it moved against the manifest, transfer by transfer.

Prediction: ``network.predict`` (lcpc/perf/network.py) on the same manifest, stage times measured on this machine
(``lcpc.perf.measured``), and the engine's own cost per message (devices.yaml ``overhead``)
calibrated so that the model gives the latency measured with the shaping off. The
measured/predicted ratio then tests what the model says the network adds, on top of an engine
that costs several ms per message here. Both routes are reported: ``direct`` (each message
straight to its destination) and ``ray`` (values under 100 KiB pass inline through their
owner, the driver on the head's node, so such a message between two branches takes two
hops); ``direct`` is the one compared against the 25% bar, because it is the one the
measurements follow (see benchmarks/results/netns_latency.md). The MPI engine sends every
message straight to its destination, so its rows have ``direct`` only.

    python -m benchmarks.netns_latency [--blocks 8] [--requests 5] [--quick] [--engines ray,mpi]
                                       [--ray-mode compiled-graph]
    (root; ip netns; Ray; for mpi: lcpc[mpi] and unshare; results in netns_latency.md, or
    netns_latency_compiled-graph.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lcpc.runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "benchmarks" / "results"
PHOTOS = ROOT.parent / "shared" / "photos"


def driver(folder: str, block: int, warmup: int, engine_name: str = "ray", options: dict | None = None) -> None:
    """Inside the head's namespace: run ``folder`` on the cluster with ``engine_name`` (``options`` to its
    constructor); print how far its outputs are from the local engine's, then for every line read from
    stdin (the phase), run ``block`` requests and print their latencies as one JSON line."""
    from lcpc.runtime.engine import open_engine
    from lcpc.runtime.feeds import Stats

    engine = open_engine(folder, engine_name, timeout=120, **(options or {}))
    try:
        spec = engine.manifest.feeds[0]
        rng = np.random.default_rng(0)
        if engine.manifest.encoded:  # the image file itself: one photo (or a generated one) as read from disk
            from lcpc.images import Preprocessing
            from lcpc.perf.measured import synthetic_jpeg
            from lcpc.runtime.feeds import encoded

            photos = sorted(PHOTOS.glob("*.jpg"))
            prep = Preprocessing.from_dict(dict(engine.manifest.preprocessing or {}))
            x = encoded(photos[0].read_bytes() if photos else synthetic_jpeg(prep))
        else:
            x = rng.integers(0, 17, spec.shape).astype(spec.dtype) if spec.dtype == "uint8" else \
                rng.standard_normal(spec.shape).astype(spec.dtype)
        for _ in range(warmup):
            got = engine.run({spec.name: x})
        with open_engine(folder, "local") as local:
            want = local.run({spec.name: x})
        error = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        print(json.dumps({"ready": True, "mode": engine.describe, "max_abs_error_vs_local": error,
                          "pids": getattr(engine, "pids", [])}), flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            times, stats = [], Stats()
            for _ in range(block):
                start = time.perf_counter()
                engine.run({spec.name: x}, stats)
                times.append(time.perf_counter() - start)
            ok = all(stats.bytes_by_transfer[t.id] == block * (x.nbytes if t.encoded else t.bytes)
                     for t in engine.manifest.transfers)
            print(json.dumps({"phase": line.strip(), "times": times, "bytes_match_manifest": ok}), flush=True)
    finally:
        engine.close()


def json_line(proc: subprocess.Popen, timeout: float) -> dict:
    """The next JSON line of the driver, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(deadline - time.monotonic(), 0.01))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver ended: {proc.stderr.read()[-1500:]}")
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"the driver did not answer within {timeout:g} s")


def measure(cluster, folder: Path, blocks: int, block: int, warmup: int = 5, timeout: float = 180,
            ray_mode: str = "actor-calls", engine: str = "ray") -> dict:
    """Shaped and unshaped requests interleaved in blocks (so the machine's changing load hits both alike).
    ``engine`` ``mpi``: one MPI job across the nodes, everything it started killed afterwards (also on failure),
    and how many of its processes were still there after the engine closed kept as ``mpi_left_behind``."""
    if engine == "mpi":
        hostfile, mpi_args = cluster.mpi_launch()
        prefix = cluster.mpi_prefix(0)
        options = {"hostfile": str(hostfile), "mpi_args": mpi_args}
    else:
        prefix, options = cluster.exec_prefix(0), {"address": cluster.head_address, "mode": ray_mode}
    proc = subprocess.Popen(prefix + [sys.executable, str(Path(__file__).resolve()), "--driver", str(folder),
                                      "--engine", engine, "--options", json.dumps(options), "--requests", str(block),
                                      "--warmup", str(warmup)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cluster.env)
    out = {"shaped": [], "unshaped": [], "bytes_match_manifest": True}
    try:
        ready = json_line(proc, timeout)
        out["mode"], out["max_abs_error_vs_local"] = ready["mode"], ready["max_abs_error_vs_local"]
        out["rank_nodes"] = [cluster.node_of(pid) for pid in ready["pids"]]  # MPI: device d's rank, node d
        sent = cluster.sent_bytes()
        for i in range(2 * blocks):
            phase = ("unshaped", "shaped")[i % 2]
            cluster.shape(phase == "shaped")
            proc.stdin.write(phase + "\n")
            proc.stdin.flush()
            got = json_line(proc, timeout)
            out[phase] += got["times"]
            out["bytes_match_manifest"] &= got["bytes_match_manifest"]
        out["link_bytes"] = cluster.sent_bytes() - sent  # the requests' (and whatever else crossed meanwhile)
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if engine == "mpi":
            out["mpi_left_behind"] = cluster.kill_mpi()
        cluster.shape(True)
    return out


def encoded_folders(tmp: Path) -> list[tuple[str, str, Path]]:
    """A ResNet-50 at a quarter width at 224 (benchmarks/models.py), K=4 pure LCP, fed the camera's JPEG:
    sent point to point, and down a binomial tree."""
    from benchmarks import models
    from lcpc.pipeline import convert

    model = models.build("resnet50", width=0.25).SerializeToString()
    out = []
    for broadcast in ("p2p", "tree"):
        folder = tmp / f"resnet50-encoded-{broadcast}"
        convert(model, folder, 4, "none", partition="contiguous", input_wire="encoded", broadcast=broadcast,
                preprocessing={"size": [224, 224], "mean": [127.0], "std": [128.0]})
        out.append((f"resnet50 x0.25 at 224, JPEG, {broadcast}", "none", folder))
    return out


def folders(tmp: Path, quick: bool) -> list[tuple[str, str, Path]]:
    from examples.zoo import resnet_basic
    from lcpc.pipeline import convert

    digits = ROOT / "examples" / "digits" / "digits_cnn.onnx"
    out = []
    models = [("digits_cnn (example)", digits), ("resnet_basic (zoo)", resnet_basic().SerializeToString())]
    for label, model in models[:1] if quick else models:
        for sync in ("none", "all"):
            folder = tmp / f"{label.split()[0]}-{sync}"
            convert(model, folder, 4, sync, partition="contiguous")
            out.append((label, sync, folder))
    return out


def predict_ms(manifest: Manifest, times: dict, mbit: float, latency_ms: float, route: str, overhead_s: float,
               image=None) -> float:
    from lcpc.perf import network

    net = network.Network(default_link=network.Link(mbit * 1e6 / 8, latency_ms / 1e3), overhead=overhead_s, route=route)
    return 1e3 * network.predict(manifest, times, net, image=image).latency


def calibrate_overhead(manifest: Manifest, times: dict, route: str, measured_ms: float, image=None) -> float:
    """The per-message engine cost (devices.yaml ``overhead``, seconds) at which the model predicts
    the latency measured with the shaping off: bisection (the prediction grows with it)."""
    lo, hi = 0.0, measured_ms / 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        if predict_ms(manifest, times, *UNSHAPED, route, mid, image) < measured_ms:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver")
    ap.add_argument("--engine", default="ray", help="(driver)")
    ap.add_argument("--options", default="{}", help="(driver) the engine's options as JSON")
    ap.add_argument("--requests", type=int, default=5, help="per block (driver)")
    ap.add_argument("--blocks", type=int, default=8, help="blocks of shaped and of unshaped requests")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="digits only")
    ap.add_argument("--engines", default="ray,mpi", help="comma-separated: ray, mpi")
    ap.add_argument("--ray-mode", default="actor-calls", choices=["actor-calls", "compiled-graph", "auto"])
    ap.add_argument("--encoded", action="store_true",
                    help="a ResNet-50 at a quarter width at 224 fed the camera's JPEG, point to point and down a tree "
                         "(writes netns_encoded.md)")
    ap.add_argument("--rewrite", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.rewrite:  # the Markdown again from a stored JSON result
        write(json.loads(args.rewrite.read_text()), args.out, args.rewrite.stem)
        return
    if args.driver:
        driver(args.driver, args.requests, args.warmup, args.engine, json.loads(args.options))
        return
    engines = tuple(e for e in args.engines.split(",") if e)
    if not set(engines) <= {"ray", "mpi"}:
        raise SystemExit(f"error: --engines {args.engines}: choose from ray, mpi")
    run_all(args.blocks, args.quick, args.out, block=args.requests, ray_mode=args.ray_mode, engines=engines,
            encoded=args.encoded)


SHAPED = (100.0, 1.0)        # Mbit/s, ms one way per link
UNSHAPED = (10000.0, 1e-6)   # the same namespaces and switch, shaping off (calibrates the engine's own cost)
ROUTES = {"ray": ("direct", "ray"), "mpi": ("direct",)}  # how each engine's messages may travel


def run_all(blocks: int, quick: bool, out_dir: Path | None, tolerance: float = 0.25, block: int = 5,
            ray_mode: str = "actor-calls", engines: tuple[str, ...] = ("ray", "mpi"), encoded: bool = False) -> dict:
    """Predict, measure (unshaped, then shaped) with each engine and compare; writes netns_latency.{md,json}
    to ``out_dir``. The engines share one cluster: Ray first, then MPI on the same namespaces."""
    from benchmarks import netns_cluster as nc

    why = nc.available() or (nc.mpi_available() if "mpi" in engines else None)
    if why:
        raise SystemExit(f"cannot run: {why}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="lcpc-netns-bench-") as tmp:
        tmp = Path(tmp)
        work = encoded_folders(tmp) if encoded else folders(tmp, quick)
        from lcpc.perf import measured as timing
        from lcpc.runtime import manifest as mf

        plans = {folder.name: mf.read(folder) for _, _, folder in work}
        images = {name: timing.image_cost(m, PHOTOS if sorted(PHOTOS.glob("*.jpg")) else None) if m.encoded else None
                  for name, m in plans.items()}
        times = {name: timing.stage_times(folder, plans[name]) for name, folder in
                 ((f.name, f) for _, _, f in work)}
        measured: dict[tuple[str, str], dict] = {}
        with nc.cluster(4, rate_mbit=SHAPED[0], latency_ms=SHAPED[1]) as c:
            rtt = {"shaped": c.rtt_ms}
            for engine in engines:
                for label, sync, folder in work:
                    got = measured[engine, folder.name] = measure(c, folder, blocks, block, ray_mode=ray_mode,
                                                                  engine=engine)
                    print(engine, label, sync, {k: f"{1e3 * np.median(got[k]):.2f} ms" for k in ("unshaped", "shaped")},
                          flush=True)
            c.shape(False)
            rtt["unshaped"] = nc.udp_rtt_ms(c.namespaces[0], c.namespaces[-1], c.addresses[-1])
            c.shape(True)
        for engine in engines:
            for label, sync, folder in work:
                got = measured[engine, folder.name]
                m, t = plans[folder.name], times[folder.name]
                row = {"engine": engine, "model": label, "sync": sync, "requests": len(got["shaped"]),
                       "mode": got["mode"], "bytes_per_inference": m.bytes_per_inference, "messages": len(m.transfers),
                       "bytes_match_manifest": bool(got["bytes_match_manifest"]), "link_bytes": got["link_bytes"],
                       "max_abs_error_vs_local": got["max_abs_error_vs_local"],
                       "unshaped_median_ms": 1e3 * float(np.median(got["unshaped"])),
                       "measured_median_ms": 1e3 * float(np.median(got["shaped"])),
                       "measured_p90_ms": 1e3 * float(np.percentile(got["shaped"], 90)),
                       "network_only_ms": predict_ms(m, t, *SHAPED, "direct", 0.0, images[folder.name])}
                if engine == "mpi":
                    row["rank_nodes"], row["mpi_left_behind"] = got["rank_nodes"], got["mpi_left_behind"]
                for route in ROUTES[engine]:
                    overhead = calibrate_overhead(m, t, route, row["unshaped_median_ms"], images[folder.name])
                    row[f"overhead_ms_{route}"] = 1e3 * overhead
                    row[f"predicted_ms_{route}"] = predict_ms(m, t, *SHAPED, route, overhead, images[folder.name])
                    row[f"ratio_{route}"] = row["measured_median_ms"] / row[f"predicted_ms_{route}"]
                rows.append(row)
    setup = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared)",
             "python": platform.python_version(), "ray": __import__("ray").__version__,
             "links": f"{SHAPED[0]:g} Mbit/s, {SHAPED[1]:g} ms one way (tc tbf + netns_relay.py delay)",
             "udp_rtt_ms": rtt, "requests": blocks * block, "block": block, "tolerance": tolerance}
    if "mpi" in engines:
        from mpi4py import MPI

        setup["mpi"] = MPI.Get_library_version().split(",")[0].strip()
    result = {"setup": setup, "rows": rows}
    if out_dir is not None:
        write(result, out_dir, "netns_encoded" if encoded else
              "netns_latency" if ray_mode == "actor-calls" else f"netns_latency_{ray_mode}")
    return result


def write(result: dict, out_dir: Path, name: str = "netns_latency") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for r in result["rows"]:
        r.setdefault("engine", "ray")  # results from before the MPI rows
        r["within_tolerance"] = abs(r["ratio_direct"] - 1) <= result["setup"]["tolerance"]
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    s = result["setup"]
    lines = ["| engine | model | sync | bytes (messages) | unshaped ms | engine cost per message ms | predicted ms | "
             "measured ms (p90) | measured / predicted | route: ray (relay via the head): predicted ms, ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        via_ray = f"{r['predicted_ms_ray']:.1f}, {r['ratio_ray']:.2f}" if "ratio_ray" in r else "-"
        lines.append(f"| {r['engine']} | {r['model']} | {r['sync']} | {r['bytes_per_inference']} ({r['messages']}) | "
                     f"{r['unshaped_median_ms']:.1f} | {r['overhead_ms_direct']:.2f} | "
                     f"{r['predicted_ms_direct']:.1f} | "
                     f"{r['measured_median_ms']:.1f} ({r['measured_p90_ms']:.1f}) | {r['ratio_direct']:.2f} | "
                     f"{via_ray} |")
    modes = list(dict.fromkeys(r["mode"] for r in result["rows"]))
    mpi = [r for r in result["rows"] if r["engine"] == "mpi"]
    lines += ["", f"K=4, 4 Ray nodes in network namespaces on one box ({s['machine']}), one per device, head and "
                  f"driver in the first; links {s['links']}; UDP round trip between two nodes "
                  f"{s['udp_rtt_ms']['shaped']:.2f} ms shaped, {s['udp_rtt_ms']['unshaped']:.2f} ms unshaped; "
                  f"Ray {s['ray']}, engines {'; '.join(modes)}; median of {s['requests']} requests each, "
                  f"shaped and unshaped interleaved in blocks of {s['block']} on the same cluster, after 5 warm-up. "
                  f"Predicted: lcpc/perf/network.py (route: direct, stage times measured on this box) on the "
                  f"shaped links, with the engine cost per message (devices.yaml overhead) calibrated so that the "
                  f"model gives the latency measured on the same namespaces with the shaping off (per route)."
                  + (f" MPI rows: {s.get('mpi', 'Open MPI')}, one MPI job on the same namespaces (the relay and "
                     f"device 0 in the first, device d in namespace d: "
                     f"{sum(r.get('rank_nodes') == list(range(len(r['rank_nodes']))) for r in mpi)} of {len(mpi)} "
                     f"runs found each device's rank there), TCP between namespaces over the shaped "
                     f"links; outputs equal the local engine's (largest difference "
                     f"{max(r['max_abs_error_vs_local'] for r in mpi):.1e}) and bytes the manifest's, transfer by "
                     f"transfer, in {sum(r['bytes_match_manifest'] for r in mpi)} of {len(mpi)} runs." if mpi else "")
                  + " From one run of benchmarks/netns_latency.py."]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
