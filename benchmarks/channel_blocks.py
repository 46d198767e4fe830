"""Why equal devices keep equal channel shares: onnxruntime's CPU convolutions work in
blocks of channels, so a conv whose channel count is just over a block costs the next block.

Times one 3x3 conv, C -> C channels on a 56x56 map (a ResNet stage-1 conv at about K=4),
for C around 16, 32 and 64, one thread, minimum of interleaved runs; writes
``benchmarks/results/channel_blocks.{md,json}``.

    python -m benchmarks.channel_blocks [--runs 30]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]

from lcpc.runtime import bench
from lcpc.runtime.session import open_session

RESULTS = ROOT / "benchmarks" / "results"
CHANNELS = (15, 16, 17, 24, 31, 32, 33, 62, 64, 66)
SIDE = 56


def conv(c: int) -> bytes:
    w = numpy_helper.from_array(np.random.default_rng(c).standard_normal((c, c, 3, 3)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], f"conv{c}",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, SIDE, SIDE])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, SIDE, SIDE])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    items = []
    for c in CHANNELS:
        sess = open_session(conv(c), f"conv{c}")
        x = {"x": rng.standard_normal((1, c, SIDE, SIDE)).astype(np.float32)}
        items.append((str(c), lambda feeds, s=sess: s.run(None, feeds), x))
    times = bench.time_interleaved(items, args.runs, 3, np.random.default_rng(0))
    rows = [{"channels": c, "min_ms": 1e3 * float(np.min(times[str(c)])),
             "flops": 2 * c * c * 9 * SIDE * SIDE} for c in CHANNELS]
    m = bench.machine()
    lines = ["| channels in and out | ms (min) | ms per GFLOP |", "|---|---|---|"]
    lines += [f"| {r['channels']} | {r['min_ms']:.3f} | {r['min_ms'] / (r['flops'] / 1e9):.2f} |" for r in rows]
    text = "\n".join(lines) + (f"\n\nOne 3x3 conv on a {SIDE}x{SIDE} map, 1 onnxruntime thread, minimum of {args.runs} "
                               f"interleaved runs. Machine: {m['cpu']}, {m['cores']} cores, onnxruntime "
                               f"{m['onnxruntime']}. From one run of `python -m benchmarks.channel_blocks`.\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "channel_blocks.json").write_text(json.dumps({"machine": m, "rows": rows}, indent=1))
    (RESULTS / "channel_blocks.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
