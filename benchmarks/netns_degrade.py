"""A lost device mid-stream: Ray nodes in network namespaces, one node's processes killed while
``lcpc serve`` answers a stream with a deadline.

The digits example, pure LCP over K devices (one Ray node each, 100 Mbit/s and 1 ms links), is
served from the head's namespace with ``Deployment(..., deadline=...)``. After ``kill_after``
answers, every process of the last node is killed (its raylet and its actor). Every request must
still be answered: those after the kill from the branches that are left (degraded, the lost device
named), none failed; the head keeps trying to rebuild the lost actor in the background (it cannot
place it while the node is gone). The counts and latencies are kept in
``benchmarks/results/netns_degrade.{md,json}``.

    python -m benchmarks.netns_degrade [--nodes 4] [--requests 40] [--kill-after 10] [--deadline-ms 500]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.netns_latency import json_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "digits"


def driver(folder: str, address: str, requests: int, deadline_ms: float) -> None:
    """Inside the head's namespace: serve ``requests`` test images one at a time, one JSON line per
    answer (id, devices it was made without, ms), then the serve report as JSON."""
    from lcpc.runtime.deployment import Deployment, Request
    from lcpc.runtime.serving import render

    x = np.load(EXAMPLE / "test.npy")[:requests]
    with Deployment(folder, "ray", address=address, timeout=120, deadline=deadline_ms / 1e3) as dep:
        dep(x[:1])  # warm: actors placed and sessions built before the stream
        print(json.dumps({"ready": True}), flush=True)

        def answered(rid, outputs, result) -> None:
            line = {"request": rid, "failed": outputs is None,
                    "without": list(dep.stats.degraded.get(rid, ())),
                    "ms": None if outputs is None else 1e3 * result}
            print(json.dumps(line), flush=True)
            time.sleep(0.05)  # a stream, not a burst: the kill lands between requests

        report = dep.serve((Request(i, {"input": x[i:i + 1]}) for i in range(requests)), on_result=answered)
        print(json.dumps({"report": json.loads(render(report, dep.describe, "json"))}), flush=True)


def stream(cluster, folder: Path, requests: int, kill_after: int, deadline_ms: float,
           timeout: float = 120) -> dict:
    """Serve from node 0 and kill the last node's processes after ``kill_after`` answers."""
    proc = subprocess.Popen(cluster.exec_prefix(0) + [sys.executable, "-m", "benchmarks.netns_degrade", "--driver",
                                                      str(folder), "--address", cluster.head_address,
                                                      "--requests", str(requests), "--deadline-ms", str(deadline_ms)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env, cwd=ROOT)
    lines = []
    killed = None
    try:
        json_line(proc, timeout)  # ready
        while True:
            got = json_line(proc, timeout)
            if "report" in got:
                report = got["report"]
                break
            lines.append({**got, "after_kill": killed is not None})
            if killed is None and len(lines) == kill_after:
                killed = cluster.namespaces[-1]
                cluster.kill(len(cluster.namespaces) - 1)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    return {"requests": lines, "report": report, "killed_node": killed}


def probe(cluster, out: Path, timeout: float = 180) -> dict:
    """``lcpc probe`` from the head's namespace: the devices.yaml it writes, read back, as plain figures."""
    from lcpc.perf import devices

    done = cluster.run_in(0, [sys.executable, "-c", "from lcpc.cli import main; main()", "probe", "--address",
                              cluster.head_address, "-o", str(out), "--timeout", "60"], timeout=timeout)
    if done.returncode:
        raise RuntimeError(f"lcpc probe failed: {(done.stderr or done.stdout).strip()[-800:]}")
    net = devices.load(out)
    return {"links": {n: {"mbit_s": 8 * link.bandwidth / 1e6, "latency_ms": 1e3 * link.latency}
                      for n, link in sorted(net.links.items())},
            "speeds": {n: d.speed for n, d in sorted(net.devices.items())}, "overhead_ms": 1e3 * net.overhead}


def summarise(result: dict, k: int, deadline_ms: float) -> dict:
    after = [r for r in result["requests"] if r["after_kill"]]
    before = [r for r in result["requests"] if not r["after_kill"]]
    lost = f"dev{k - 1}"
    return {"devices": k, "deadline_ms": deadline_ms, "requests": len(result["requests"]),
            "answered": result["report"]["answered"], "failed": len(result["report"]["failures"]),
            "before_kill": {"requests": len(before), "degraded": sum(bool(r["without"]) for r in before)},
            "after_kill": {"requests": len(after), "degraded_without_lost": sum(r["without"] == [lost] for r in after),
                           "exact": sum(not r["without"] for r in after),
                           "median_ms": float(np.median([r["ms"] for r in after])) if after else None,
                           "max_ms": max((r["ms"] for r in after), default=None)},
            "median_ms_before": float(np.median([r["ms"] for r in before])) if before else None,
            "rebuilt": result["report"]["rebuilt"]}


def run(nodes: int = 4, requests: int = 40, kill_after: int = 10, deadline_ms: float = 500,
        out_dir: Path | None = RESULTS) -> dict:
    from benchmarks import netns_cluster as nc
    from lcpc.pipeline import convert

    why = nc.available()
    if why:
        raise SystemExit(f"cannot run: {why}")
    with tempfile.TemporaryDirectory(prefix="lcpc-netns-degrade-") as tmp:
        folder = Path(tmp) / "digits"
        convert(EXAMPLE / "digits_cnn.onnx", folder, nodes, "none")
        with nc.cluster(nodes) as c:
            probed = probe(c, Path(tmp) / "devices.yaml")
            result = stream(c, folder, requests, kill_after, deadline_ms)
    summary = {**summarise(result, nodes, deadline_ms), "probe": probed}
    if out_dir is not None:
        (out_dir / "netns_degrade.json").write_text(json.dumps({"summary": summary, **result}, indent=1) + "\n")
        (out_dir / "netns_degrade.md").write_text(markdown(summary))
    return {"summary": summary, **result}


def markdown(s: dict) -> str:
    a = s["after_kill"]
    rows = [("devices (Ray nodes)", s["devices"]), ("deadline", f"{s['deadline_ms']:g} ms"),
            ("requests", s["requests"]), ("answered", s["answered"]), ("failed", s["failed"]),
            ("before the kill: requests / degraded",
             f"{s['before_kill']['requests']} / {s['before_kill']['degraded']}"),
            ("after the kill: requests", a["requests"]),
            (f"after the kill: answered without dev{s['devices'] - 1}", a["degraded_without_lost"]),
            ("after the kill: exact", a["exact"]),
            ("median latency before / after the kill",
             f"{s['median_ms_before']:.1f} ms / {a['median_ms']:.1f} ms" if a["median_ms"] else "-"),
            ("slowest answer after the kill", f"{a['max_ms']:.0f} ms" if a["max_ms"] else "-")]
    probed = s.get("probe", {}).get("links", {})
    rows += [(f"probed link of {n}", f"{v['mbit_s']:.1f} Mbit/s, {v['latency_ms']:.2f} ms (shaped: 100 Mbit/s, 1 ms)")
             for n, v in probed.items()]
    if "probe" in s:
        rows.append(("probed engine cost per message", f"{s['probe']['overhead_ms']:.2f} ms"))
    body = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return ("| serve stream, last node killed mid-stream | |\n|---|---|\n" + body + "\n\n"
            f"Digits example, pure LCP over {s['devices']} Ray nodes in network namespaces (100 Mbit/s, 1 ms "
            f"links), served from the head's namespace with `--deadline {s['deadline_ms']:g}`; every process of "
            f"the last node killed after {s['before_kill']['requests']} answers. From one run of "
            f"`python -m benchmarks.netns_degrade`.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--driver", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--kill-after", type=int, default=10)
    ap.add_argument("--deadline-ms", type=float, default=500)
    args = ap.parse_args()
    if args.driver:
        driver(args.driver, args.address, args.requests, args.deadline_ms)
        return
    result = run(args.nodes, args.requests, args.kill_after, args.deadline_ms)
    print(markdown(result["summary"]))


if __name__ == "__main__":
    main()
