"""Every hostile case of issue 25 as a user meets it: the ``lcpc`` command in a fresh process.

Runs each case of ``tests/corpus/cases.json``'s ``devices`` (through ``lcpc convert``, and the alias
bombs through ``lcpc run`` too), ``preprocess``, ``images`` (``lcpc verify --data FOLDER``) and
``options``, then the cases that need a real process and a large model: Ctrl-C and SIGTERM in the
middle of converting a ResNet-18 at half width (``benchmarks/models.py``), two such converts into
one ``-o`` started together, and ``--address`` pointing at a port that answers but is no Ray
cluster (a local HTTP server). For each it records the exit code, the wall time from start (from
the signal, for the signal cases), whether stderr is exactly one line ``error: ...`` (no
traceback, no warning) and whether any output folder or temporary sibling was left. The time
includes starting Python and importing lcpc, measured on its own as ``lcpc --version``.
Results: ``benchmarks/results/hostile.{json,md}``.

    python -m benchmarks.hostile [--only devices,images,...]
"""

from __future__ import annotations

import argparse
import glob
import http.server
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import onnx

from benchmarks import models
from lcpc import pipeline
from lcpc.images import Preprocessing
from lcpc.runtime import manifest as mf
from lcpc.runtime.bench import machine

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus"
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "digits" / "digits_cnn.onnx"
LCPC = str(Path(sys.executable).with_name("lcpc"))
BOUND_S = 5.0  # the bound per case


def run(args: list[str], cwd: Path, out: Path | None) -> dict:
    start = time.perf_counter()
    done = subprocess.run([LCPC, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)
    return verdict(done.returncode, done.stderr, time.perf_counter() - start, out)


def verdict(code: int, stderr: str, seconds: float, out: Path | None) -> dict:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    left = []
    if out is not None:
        left = [p for p in glob.glob(f"{out}*") + glob.glob(str(out.parent / f".{out.name}.*"))
                + glob.glob(str(out.parent / ".lcpc-*"))]
    return {"exit": code, "seconds": round(seconds, 3), "one_line": len(lines) == 1 and lines[0].startswith("error: "),
            "message": lines[0] if len(lines) == 1 else " / ".join(lines)[:400], "left": [Path(p).name for p in left]}


def corpus_cases(work: Path, only: set[str]) -> list[dict]:
    cases = json.loads((CORPUS / "cases.json").read_text())
    good = work / "good"
    pipeline.convert(CORPUS / "models" / "good.onnx", good, 2)
    images = work / "images"
    pipeline.convert(CORPUS / "models" / "good.onnx", images, 2,
                     preprocessing=Preprocessing(size=(8, 8), mean=(127.0,), std=(128.0,)).to_dict())
    cut = work / "cut"
    pipeline.convert(EXAMPLE, cut, 4)
    out = work / "out"
    rows = []

    def add(kind: str, name: str, args: list, expect, out_path: Path | None = out) -> None:
        row = {"kind": kind, "case": name, "expected": "refused" if expect else "accepted",
               **run(args, work, out_path)}
        rows.append(row)
        print(f"{kind:10} {name:38} exit {row['exit']} {row['seconds']:5.2f}s {row['message'][:90]}", flush=True)
        subprocess.run(["rm", "-rf", str(out)])

    if "devices" in only:
        for c in cases["devices"]:
            spec = CORPUS / "devices" / c["file"]
            add("devices", c["file"], ["convert", CORPUS / "models" / "good.onnx", "-k", 2, "-o", out, "--devices",
                                       spec], c["expect"])
            if c["file"].startswith("bomb_"):
                add("devices", f"{c['file']} (run)", ["run", good, "-i", CORPUS / "inputs" / "good.npy",
                                                      "--devices", spec], c["expect"], None)
    if "preprocess" in only:
        for c in cases["preprocess"]:
            add("preprocess", c["spec"][:38], ["convert", CORPUS / "models" / "good.onnx", "-k", 2, "-o", out,
                                               "--preprocess", c["spec"]], c["expect"])
    if "images" in only:
        for c in cases["images"]:
            folder = work / f"imgs-{c['file']}"
            folder.mkdir()
            (folder / "a_good.png").write_bytes((CORPUS / "images" / "good.png").read_bytes())
            (folder / c["file"]).write_bytes((CORPUS / "images" / c["file"]).read_bytes())
            add("images", c["file"], ["verify", images, "--data", folder], c["expect"], None)
    if "options" in only:
        places = {"cut": cut, "good": good, "model": EXAMPLE, "input": CORPUS / "inputs" / "good.npy", "out": out,
                  "options": CORPUS / "options"}
        for c in cases["options"]:
            add("options", c["name"], [a.format(**places) for a in c["args"]], c["expect"])
    return rows


def signal_cases(work: Path, model: Path) -> list[dict]:
    rows = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = work / f"sig-{sig.name}"
        child = subprocess.Popen([LCPC, "convert", str(model), "-k", "4", "-o", str(out)], cwd=work,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not glob.glob(str(work / f".{out.name}.tmp-*")) and child.poll() is None:
            time.sleep(0.01)
        sent = time.perf_counter()
        child.send_signal(sig)
        _, err = child.communicate(timeout=120)
        row = {"kind": "signals", "case": f"{sig.name} while writing", "expected": "refused",
               **verdict(child.returncode, err, time.perf_counter() - sent, out)}
        rows.append(row)
        print(row, flush=True)
    out = work / "both"
    start = time.perf_counter()
    children = [subprocess.Popen([LCPC, "convert", str(model), "-k", str(k), "-o", str(out)], cwd=work,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in (4, 2)]
    results = [(c.wait(timeout=300), c.stderr.read()) for c in children]
    seconds = time.perf_counter() - start
    won = [k for k, (code, _) in zip((4, 2), results) if code == 0]
    lost = [verdict(code, err, seconds, None) for code, err in results if code != 0]
    whole = mf.read(out).branches if out.is_dir() else None
    row = {"kind": "signals", "case": "two converts (K=4, K=2) into one -o", "expected": "one wins whole",
           "exit": [code for code, _ in results], "seconds": round(seconds, 3),
           "one_line": all(v["one_line"] for v in lost), "message": " / ".join(v["message"] for v in lost),
           "left": sorted(p.name for p in work.iterdir() if p.name.startswith((".both.", ".lcpc-"))),
           "won": won, "folder_branches": whole}
    rows.append(row)
    print(row, flush=True)
    return rows


def address_case(work: Path) -> list[dict]:
    """--address at a port that accepts connections but speaks HTTP, not Ray."""
    server = http.server.HTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)  # as Ray binds
    threading.Thread(target=server.serve_forever, daemon=True).start()
    good = work / "good-addr"
    pipeline.convert(CORPUS / "models" / "good.onnx", good, 2)
    try:
        row = run(["run", good, "-i", CORPUS / "inputs" / "good.npy", "--engine", "ray", "--address",
                   f"127.0.0.1:{server.server_port}"], work, None)
    finally:
        server.shutdown()
    row = {"kind": "options", "case": "run_address_not_ray", "expected": "refused", **row}
    print(row, flush=True)
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="devices,preprocess,images,options,signals,address")
    args = ap.parse_args()
    only = set(args.only.split(","))
    load_before = os.getloadavg()
    startup = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([LCPC, "--version"], capture_output=True, check=True)
        startup.append(time.perf_counter() - start)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows += corpus_cases(work, only)
        if "signals" in only:
            model = work / "resnet18_half.onnx"
            onnx.save(models.build("resnet18", width=0.5), model)
            rows += signal_cases(work, model)
        if "address" in only:
            rows += address_case(work)
    setup = {"machine": machine(), "command": "python -m benchmarks.hostile " + " ".join(sys.argv[1:]),
             "startup_seconds": round(statistics.median(startup), 3),
             "load_average": {"before": load_before, "after": os.getloadavg()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1))
    (RESULTS / "hostile.md").write_text(render(setup, rows))
    print(render(setup, rows))


def render(setup: dict, rows: list[dict]) -> str:
    refused = [r for r in rows if r["expected"] == "refused"]
    good = [r for r in refused if r["exit"] != 0 and r["one_line"] and not r["left"]]
    accepted = [r for r in rows if r["expected"] == "accepted"]
    slow = [r for r in rows if r["seconds"] > BOUND_S]
    lines = [f"{len(good)} of {len(refused)} cases that must be refused end in exit code != 0, one line `error: ...` "
             f"on stderr (no traceback, no warning) and no output folder; "
             f"{sum(r['exit'] == 0 for r in accepted)} of {len(accepted)} that must be accepted run; "
             f"{len(rows) - len(slow)} of {len(rows)} cases end within {BOUND_S:g} s "
             f"(slowest {max(r['seconds'] for r in rows):.2f} s). Starting Python and importing lcpc alone "
             f"(`lcpc --version`, median of 3): {setup['startup_seconds']:.2f} s.", "",
             "| kind | case | expected | exit | seconds | one line | left behind | message |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        message = r["message"].replace("|", "\\|")[:140]
        if r["expected"] == "accepted":  # ran: its output is what it should leave
            one_line, left = "n/a", "(its output)" if r["left"] else "-"
        else:
            one_line, left = "yes" if r["one_line"] else "no", ", ".join(r["left"]) or "-"
        lines.append(f"| {r['kind']} | {r['case'].replace('|', '/')} | {r['expected']} | {r['exit']} | "
                     f"{r['seconds']:.2f} | {one_line} | {left} | {message} |")
    m = setup["machine"]
    lines += ["", f"Each case is one `lcpc` command in a fresh process; seconds from its start (signal cases: from the "
                  f"signal; two converts: from starting both). Machine: {m['cpu']}, {m['cores']} cores (shared), "
                  f"{m['system']}, Python {m['python']}; load average (1, 5, 15 min) "
                  f"{'/'.join(f'{x:.1f}' for x in setup['load_average']['before'])} before, "
                  f"{'/'.join(f'{x:.1f}' for x in setup['load_average']['after'])} after. "
                  f"From one run of `{setup['command']}`."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
