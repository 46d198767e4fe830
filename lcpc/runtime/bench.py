"""Target ``bench``: time an lcpc output folder against its original model, in one process.

Guarantees:
- reads the folder through ``manifest.read`` (schema, sha256 of every stage) and the
  original model from the manifest's source path or ``model``; the original's sha256 must
  equal the manifest's, so the comparison is with the model that was converted. Nothing
  is written, the plan and folder are never changed;
- every session, the original's and each stage's, is opened by ``runtime.session`` with
  ``threads`` intra-op threads (the same options for all), so the ratios compare like
  with like; stages are opened by ``session.open_stage`` (checked bytes and signature), as
  the engines open them;
- timing is interleaved: each round runs the original once and every stage once, in an
  order shuffled per round (seeded), after ``warmup`` untimed rounds; every item reports
  the median, min, max and interquartile range over ``runs`` rounds;
- a stage runs on random inputs of its declared shapes and dtypes (CNN compute does not
  depend on the values);
- a device's time is the sum of its stages' medians; the critical path is the sum over
  levels of the slowest stage of that level (no network: compute only); the speed-up is
  the original's median over the slowest device's time; the FLOP ratio is the original's
  FLOPs over the busiest device's; ``share`` is speed-up / FLOP ratio (1.0: the device
  runs its FLOPs as fast as the original runs its own);
- the result holds one entry per manifest stage and one per manifest device, and says
  which machine and library versions produced it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lcpc.errors import LcpcError
from lcpc.runtime import manifest as mf
from lcpc.runtime.feeds import random_feeds
from lcpc.runtime.manifest import Manifest
from lcpc.runtime.session import open_session, open_stage
from lcpc.safety import first_line, printable


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "onnxruntime": ort.__version__, "numpy": np.__version__}


def _stats(times: list[float]) -> dict[str, float]:
    t = 1e3 * np.asarray(times)
    q1, med, q3 = np.percentile(t, [25, 50, 75])
    return {"median_ms": float(med), "min_ms": float(t.min()), "max_ms": float(t.max()), "iqr_ms": float(q3 - q1)}


def original_model(manifest: Manifest, model: str | Path | None) -> bytes:
    """The converted model's bytes (``manifest.read_original``); a ``model`` given must match the
    recorded sha256 too, so the comparison is with the model that was converted."""
    data, where = mf.read_original(manifest, model)
    if hashlib.sha256(data).hexdigest() != manifest.json["source"]["sha256"]:
        raise LcpcError(f"{printable(where)}: not the model this folder was converted from (sha256 differs from "
                        f"the manifest's); pass the original with --model")
    return data


def bench(folder: str | Path, model: str | Path | None = None, threads: int = 1, runs: int = 20,
          warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Time the original and every stage of ``folder``; see the module docstring."""
    if threads < 1 or runs < 1 or warmup < 0:
        raise LcpcError(f"bench: --threads and --runs must be at least 1 and --warmup at least 0 "
                        f"(got {threads}, {runs}, {warmup})")
    folder = Path(folder)
    manifest = mf.read(folder)
    rng = np.random.default_rng(seed)
    sessions = [("original", open_session(original_model(manifest, model), "the original model", threads),
                 random_feeds(manifest.inputs, rng))]
    for s in manifest.stages:
        sessions.append((s.id, open_stage(mf.read_stage(folder, s), s, folder / s.file, threads),
                         random_feeds(s.inputs, rng)))
    times = time_interleaved([(name, functools.partial(sess.run, None), feeds) for name, sess, feeds in sessions],
                             runs, warmup, rng)
    return summarise(manifest, {name: _stats(t) for name, t in times.items()},
                     {"folder": str(folder), "threads": threads, "runs": runs, "warmup": warmup, "machine": machine()})


def time_interleaved(items: list[tuple[str, Callable, dict]], runs: int, warmup: int,
                     rng: np.random.Generator) -> dict[str, list[float]]:
    """Seconds per item over ``runs`` interleaved rounds in a shuffled order (after ``warmup``);
    each item is (name, run, feeds) and is timed as ``run(feeds)``."""
    times: dict[str, list[float]] = {name: [] for name, _, _ in items}
    order = np.arange(len(items))
    for r in range(warmup + runs):
        rng.shuffle(order)
        for i in order:
            name, run, feeds = items[i]
            start = time.perf_counter()
            try:
                run(feeds)
            except Exception as exc:
                raise LcpcError(f"bench: {name} failed in onnxruntime: {first_line(exc)}") from None
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def summarise(manifest: Manifest, stats: dict[str, dict[str, float]], setup: dict[str, Any]) -> dict[str, Any]:
    """Per-stage, per-device and whole-plan figures from the stage timings (``stats[stage id]``)."""
    original: dict[str, Any] = dict(stats["original"], flops=int(manifest.json["totals"]["original"]["flops"]))
    stages: list[dict[str, Any]] = [dict(stats[s.id], id=s.id, device=s.device, level=s.level, flops=int(s.flops))
                                    for s in manifest.stages]
    devices: list[dict[str, Any]] = []
    for d in manifest.devices:
        mine = [s for s in stages if s["device"] == d.id]
        ms, flops = sum(s["median_ms"] for s in mine), sum(s["flops"] for s in mine)
        devices.append({"device": d.id, "name": d.name, "role": d.role, "stages": [s["id"] for s in mine],
                        "ms": ms, "flops": flops, "speedup": original["median_ms"] / ms if ms else None,
                        "flop_ratio": original["flops"] / flops if flops else None})
    for row in devices:
        row["share"] = row["speedup"] / row["flop_ratio"] if row["speedup"] and row["flop_ratio"] else None
    levels = sorted({s["level"] for s in stages})
    critical = sum(max(s["median_ms"] for s in stages if s["level"] == lv) for lv in levels)
    slowest = max(devices, key=lambda d: d["ms"])
    busiest = max(d["flops"] for d in devices)
    speedup = original["median_ms"] / slowest["ms"]
    flop_ratio = original["flops"] / busiest if busiest else None
    return {**setup, "branches": manifest.branches, "sync": manifest.sync_policy, "original": original,
            "stages": stages, "devices": devices, "critical_path_ms": critical,
            "slowest_device": slowest["device"], "slowest_device_ms": slowest["ms"], "speedup": speedup,
            "speedup_critical_path": original["median_ms"] / critical, "flop_ratio": flop_ratio,
            "share": speedup / flop_ratio if flop_ratio else None}


def render(result: dict[str, Any], fmt: str = "text") -> str:
    """The result as JSON, a Markdown table or plain text (the same rows)."""
    if fmt == "json":
        return json.dumps(result, indent=1)

    def ratio(x):
        return "-" if x is None else f"x{x:.2f}"

    rows = [("original", f"{result['original']['median_ms']:.2f}", f"±{result['original']['iqr_ms']:.2f}", "x1.00",
             "x1.00", "")]
    for d in result["devices"]:
        rows.append((f"device {d['device']} ({d['role']}, {len(d['stages'])} stages)", f"{d['ms']:.2f}", "",
                     ratio(d["speedup"]), ratio(d["flop_ratio"]),
                     "-" if d["share"] is None else f"{100 * d['share']:.0f}%"))
    head = ("", "ms (median)", "IQR", "speed-up", "FLOP ratio", "share of FLOP ratio")
    m = result["machine"]
    share = "-" if result["share"] is None else f"{100 * result['share']:.0f}%"
    tail = (f"critical path {result['critical_path_ms']:.2f} ms (x{result['speedup_critical_path']:.2f}); "
            f"slowest device {result['slowest_device']}: x{result['speedup']:.2f} of a FLOP ratio "
            f"{ratio(result['flop_ratio'])} ({share})\n"
            f"K={result['branches']}, --sync {result['sync']}, {result['threads']} thread(s) per session, "
            f"{result['runs']} interleaved runs after {result['warmup']} warm-up; {m['cpu']}, {m['cores']} cores, "
            f"onnxruntime {m['onnxruntime']}")
    if fmt == "markdown":
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        return "\n".join(lines) + "\n\n" + tail + "\n"
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    return "\n".join(lines) + "\n" + tail
