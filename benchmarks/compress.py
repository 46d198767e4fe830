"""Speed of pruned and quantized LCP plans, measured in one run on this machine.

For each model: plan K branches (--sync none), then four variants of the same plan —
LCP, LCP+prune (--prune R), LCP+quant (--quantize int8: each stage measured, float kept
where int8 is slower), LCP+prune+quant, and that last one with --wire int8. Every stage of every variant and the original
model are timed with onnxruntime on one thread, interleaved in one loop (so load on
the machine hits all of them alike); a device runs its stages one after the other, so
its latency is the sum of its stages' times (the fastest of the interleaved runs: the one
least disturbed by other load on a shared machine), and the plan's compute latency is its
slowest device's. Only ratios from this one run are reported:
speed-up = original time / slowest-device time.

    python -m benchmarks.compress [--branches 4] [--prune 0.3] [--repeat 9] [--size 224]

Models: the digits example (each plan recovered by the least-squares refit, fidelity on
its 450 test images against the original and against the float LCP plan) and ``examples.zoo.resnet50`` (random weights, calibrated on
N(0, 1) inputs). Writes ``benchmarks/results/compress.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]

from examples.digits.data import load_split
from examples.zoo import resnet50
from lcpc import compress, frontend, planner
from lcpc.fidelity import compare
from lcpc.calibrate import run_graph
from lcpc.ir import to_onnx
from lcpc.lower import lower
from lcpc.passes import prune
from lcpc.passes.recover import refit
from lcpc.runtime.session import open_session

RESULTS = ROOT / "benchmarks" / "results"
EXAMPLE = ROOT / "examples" / "digits" / "digits_cnn.onnx"


def session(model: bytes) -> ort.InferenceSession:
    return open_session(model, "model")


def variants(model, k: int, ratio: float, calib: np.ndarray, train: np.ndarray | None = None):
    """The four programs; with ``train``, each plan is recovered by the least-squares refit first
    (``lcpc recover --epochs 0``), the pruned one after pruning."""
    graph, source = frontend.load(model, None)
    plan = planner.plan(graph, source, k, "none")
    pruned, _ = prune.run(plan, ratio, calib, reconstruct=train is not None)
    if train is not None:
        plan, _ = refit.run(plan, train, "lsq")
        pruned, _ = refit.run(pruned, train, "lsq")
    lcp, small = lower(plan), lower(pruned)
    return graph, {
        "LCP": lcp,
        "+prune": small,
        "+quant": compress.apply(lcp, "int8", "fp32", calib),
        "+both": compress.apply(small, "int8", "fp32", calib),
        "+both, int8 wire": compress.apply(small, "int8", "int8", calib),
    }


def timed(graph, programs: dict, repeat: int, feed: np.ndarray) -> dict:
    """Seconds of the original and of every stage: all interleaved in one loop, the fastest run of
    each (the one least disturbed by other load on a shared machine)."""
    jobs = {("original", None): (session(to_onnx(graph).SerializeToString()), {graph.inputs[0]: feed})}
    rng = np.random.default_rng(0)
    for name, program in programs.items():
        for s in program.stages:
            feeds = {i: (rng.standard_normal(s.graph.info(i).shape) * 8).clip(-128, 127)
                     .astype(s.graph.info(i).dtype) for i in s.graph.inputs}
            jobs[(name, s.id)] = (session(to_onnx(s.graph).SerializeToString()), feeds)
    times = defaultdict(list)
    for sess, feeds in jobs.values():
        sess.run(None, feeds)
    for _ in range(repeat):
        for key, (sess, feeds) in jobs.items():
            start = time.perf_counter()
            sess.run(None, feeds)
            times[key].append(time.perf_counter() - start)
    return {key: float(np.min(v)) for key, v in times.items()}


def rows_for(label: str, model, k: int, ratio: float, repeat: int, calib: np.ndarray, test=None,
             train=None) -> list[list[str]]:
    start = time.time()
    graph, programs = variants(model, k, ratio, calib, train)
    t = timed(graph, programs, repeat, calib[:1])
    original = t[("original", None)]
    reference = run_graph(graph, test) if test is not None else None
    lcp_out = None
    rows = []
    for name, program in programs.items():
        per_device = defaultdict(float)
        for s in program.stages:
            per_device[s.device] += t[(name, s.id)]
        slowest = max(per_device.values())
        print(f"{label} {name}: ms per device " + ", ".join(f"{d}: {1e3 * v:.2f}" for d, v in sorted(per_device.items())),
              file=sys.stderr)
        fig = compress.figures(program)
        fidelity = ["", ""]
        if test is not None:
            out, _ = compress.run_program(program, test)
            lcp_out = out if lcp_out is None else lcp_out
            fidelity = [f"{100 * compare(reference, out)['top1_agreement']:.2f}%",
                        f"{100 * compare(lcp_out, out)['top1_agreement']:.2f}%"]
        rows.append([label, name, f"{1e3 * original:.2f}", f"{1e3 * slowest:.2f}", f"x{original / slowest:.2f}",
                     f"{fig['flops'] / 1e6:.1f}M", f"{fig['file_bytes'] / 1e3:.0f}kB",
                     f"{fig['wire_bytes']}", f"{fig['int8_stages']}/{fig['stages']}", *fidelity])
    print(f"{label}: {time.time() - start:.0f}s", file=sys.stderr)
    return rows


HEADER = ["model", "variant", "original ms", "slowest device ms", "speed-up", "FLOPs (all stages)",
          "stage files", "wire bytes", "int8 stages", "top-1 vs original", "top-1 vs LCP"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--prune", type=float, default=0.3)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--size", type=int, default=224, help="ResNet-50 input size")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    x_train, _, x_test, _ = load_split()
    rows = rows_for("digits_cnn", EXAMPLE, args.branches, args.prune, max(args.repeat, 50), x_train[:256],
                    test=x_test, train=x_train[:1024])
    if not args.skip_resnet:
        calib = np.random.default_rng(0).standard_normal((8, 3, args.size, args.size)).astype(np.float32)
        rows += rows_for(f"resnet50 ({args.size}x{args.size}, random weights)",
                         resnet50(size=args.size).SerializeToString(), args.branches, args.prune, args.repeat,
                         calib)
    table = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"K={args.branches}, --sync none, --prune {args.prune}, --quantize int8 (per stage: the faster of "
            f"float and static U8S8 QDQ, measured), fp32 wire except the last row of each model (int8, "
            f"ranges calibrated on the same data; its head quantizes the input in an extra level-0 stage). One "
            f"onnxruntime {ort.__version__} thread per device; all sessions timed interleaved in one run, "
            f"best of {args.repeat} (digits: {max(args.repeat, 50)}). Speed-up = original / slowest device "
            f"(compute only). Digits: pruning importance and layer reconstruction on 256 training images, "
            f"then every plan recovered by the least-squares refit on 1024 training images (as `lcpc recover "
            f"--epochs 0`), top-1 agreement on the 450 test images; 'vs LCP' isolates what pruning and int8 "
            f"change. ResNet-50: importance from weights and 8 N(0, 1) inputs, no reconstruction, no "
            f"fidelity (random weights).")
    text = "\n".join(table) + "\n\n" + note + " From one run of benchmarks/compress.py.\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compress.md").write_text(text)


if __name__ == "__main__":
    main()
