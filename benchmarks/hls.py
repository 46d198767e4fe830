"""The recovered digits plan on an FPGA, emulated: ``export-hls`` + ``verify-hls`` on every branch.

Digits, K=4, ``--sync none``, recovered by the least-squares refit (``--recover train.npy --epochs 0``, no
PyTorch); every branch stage exported as one hls4ml project at ``fixed<16,6>`` (Vitis HLS, io_stream,
pynq-z2's part), each project's C++ emulation compiled with g++ and run on the 450 test images beside the
head's merge (onnxruntime), against the float plan. The per-branch table (MACs, weight bits, DSP/BRAM
estimate) is given at reuse factor 1 and at ``--reuse-high`` (an estimate only: the emulation is the same).
``--precision from-int8`` converts the plan with ``--quantize int8-all --calib`` (256 training images) and
checks the projects against that int8 plan.

    python -m benchmarks.hls [--precision 'fixed<16,6>'|from-int8] [--reuse-high 64]
    (needs hls4ml and g++; about 3 minutes on 2 cores; results in benchmarks/results/hls.{md,json}, or
    hls_from_int8.{md,json})
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from lcpc.pipeline import convert_and_recover
from lcpc.targets import hls, hls_verify

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
RESULTS = ROOT / "benchmarks" / "results"
GOAL = 0.99


def run(precision: str, reuse_high: int, out_dir: Path | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="lcpc-hls-bench-") as tmp:
        folder = Path(tmp) / "digits4"
        int8 = {"quantize": "int8-all", "calib": np.load(DIGITS / "train.npy")[:256]} if precision == "from-int8" else {}
        convert_and_recover(DIGITS / "digits_cnn.onnx", folder, DIGITS / "train.npy", epochs=0, branches=4,
                            sync="none", **int8)
        exports = {}
        for reuse in (1, reuse_high):
            start = time.perf_counter()
            exports[reuse] = hls.export(folder, Path(tmp) / f"hls-r{reuse}",
                                        hls.Options(precision=precision, reuse=reuse, board="pynq-z2"))
            exports[reuse]["export_s"] = time.perf_counter() - start
        x, y = np.load(DIGITS / "test.npy"), np.load(DIGITS / "test_labels.npy")
        check = hls_verify.verify(Path(tmp) / "hls-r1", x, y, progress=lambda p, s: print(f"compiled {p} in {s:.1f} s"))
    logits = check["outputs"]["logits"]
    model = "examples/digits (K=4, --sync none, refit-recovered" + (", --quantize int8-all)" if int8 else ")")
    result = {"setup": {"model": model, "plan": "int8" if int8 else "float", "precision": precision,
                        "board": "pynq-z2", "io_type": "io_stream", "backend": "Vitis",
                        "machine": f"{platform.machine()}, shared 2-core", "python": platform.python_version(),
                        "samples": int(len(x))},
              "check": check, "goal_top1": GOAL, "meets_goal": logits["top1_agreement"] >= GOAL,
              "tables": {str(r): hls.table(e) for r, e in exports.items()},
              "software": [s["id"] for s in exports[1]["stages"] if s["kind"] == "software"],
              "export_s": {str(r): e["export_s"] for r, e in exports.items()}}
    if out_dir is not None:
        write(result, out_dir)
    return result


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    s, check = result["setup"], result["check"]
    name = "hls_from_int8" if s["precision"] == "from-int8" else "hls"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    logits = check["outputs"]["logits"]
    lines = ["| check | value |", "|---|---|",
             f"| top-1 agreement with the {s.get('plan', 'float')} plan | {100 * logits['top1_agreement']:.2f}% of "
             f"{logits['samples']} "
             f"test images (goal {100 * result['goal_top1']:.0f}%) |",
             f"| largest logit error | {logits['max_abs_error']:.4f} (largest logit "
             f"{logits['max_abs_reference']:.2f}) |",
             f"| accuracy {s.get('plan', 'float')} plan / FPGA emulation | {100 * logits['float_accuracy']:.2f}% / "
             f"{100 * logits['fpga_accuracy']:.2f}% |",
             f"| compile one project (g++ -O3) | {min(check['compile_s'].values()):.1f} to "
             f"{max(check['compile_s'].values()):.1f} s |",
             f"| run the test set, emulated | {check['run_s']:.1f} s |", ""]
    for reuse, rows in result["tables"].items():
        lines += [f"Reuse factor {reuse}:", "",
                  "| project | device | layers | MACs | weights | weight bits | DSP (est.) | BRAM18 (est.) | "
                  "share of pynq-z2 |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['project']} | dev{r['device']} | {r['layers']} | {r['macs']:,} | {r['weights']:,} | "
                  f"{r['weight_bits']:,} | {r['dsp']:,} | {r['bram18']} | {100 * r['dsp_share']:.0f}% DSP, "
                  f"{100 * r['bram_share']:.0f}% BRAM |" for r in rows]
        lines.append("")
    lines.append(f"{s['model']}; each branch stage one hls4ml project ({s['backend']}, {s['io_type']}, "
                 f"{precision_words(s['precision'])}, part of {s['board']}); "
                 f"in software (onnxruntime): {', '.join(result['software'])}. DSP/BRAM are lcpc's estimate before "
                 f"synthesis (targets/hls.py `estimate`), not a synthesis report. Python {s['python']}, "
                 f"{s['machine']}. From one run of benchmarks/hls.py.")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def precision_words(precision: str) -> str:
    if precision == "from-int8":
        return ("from-int8: 8-bit weights, activations in the types covering their int8 grids, accumulators "
                "holding every product")
    return f"{precision} activations, weights at the same width fitted per layer"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="fixed<16,6>")
    ap.add_argument("--reuse-high", type=int, default=64)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    run(args.precision, args.reuse_high, args.out)


if __name__ == "__main__":
    main()
