"""Bytes on the wire vs accuracy on the example model: the Pareto table of K x sync policy.

For every K and sync policy, converts the digits example (examples/digits), optionally
recovers it (least-squares refit of the cut layers on the training images, then
distillation for --epochs epochs when PyTorch is installed), and measures on the held-out
test split: test accuracy of the plan, top-1 agreement with the original, and the bytes
per inference the manifest records. Everything comes from this one run.

    python benchmarks/pareto.py [--branches 2 4 8] [--epochs 2] [--no-recover]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples.digits.data import load_split  # noqa: E402
from lcpc import pipeline  # noqa: E402


MODEL = ROOT / "examples" / "digits" / "digits_cnn.onnx"
RESULTS = ROOT / "benchmarks" / "results"
POLICIES = ("none", "every:4", "every:2", "all")


def pareto(rows: list[dict]) -> None:
    """Mark rows no other row beats on both bytes and accuracy."""
    for r in rows:
        r["pareto"] = not any(o["bytes_per_inference"] <= r["bytes_per_inference"]
                              and o["accuracy"] >= r["accuracy"] and o is not r
                              and (o["bytes_per_inference"], o["accuracy"]) != (r["bytes_per_inference"], r["accuracy"])
                              for o in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--epochs", type=int, default=2, help="distillation epochs after the refit (0: refit only)")
    ap.add_argument("--no-recover", action="store_true")
    args = ap.parse_args()
    x_train, _, x_test, y_test = load_split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.branches:
            for policy in POLICIES:
                start = time.perf_counter()
                out = Path(tmp) / f"k{k}_{policy.replace(':', '')}"
                manifest = pipeline.convert(MODEL, out, k, policy)
                stages = [("cut", out, manifest)]
                if manifest["sync"]["cuts"] and not args.no_recover:
                    rec = out.with_name(out.name + "_rec")
                    epochs = args.epochs if _has_torch() else 0
                    stages.append((f"refit+{epochs}ep", rec, pipeline.recover(out, x_train, rec, epochs=epochs)))
                for label, folder, m in stages:
                    fig = pipeline.verify(folder, x_test, y_test, MODEL)
                    rows.append({"K": k, "sync": policy, "recovery": label,
                                 "bytes_per_inference": m["totals"]["bytes_per_inference"],
                                 "accuracy": fig["candidate_accuracy"], "original_accuracy": fig["reference_accuracy"],
                                 "agreement": fig["top1_agreement"], "seconds": time.perf_counter() - start})
                    r = rows[-1]
                    print(f"K={k} --sync {policy:8s} {label:10s} bytes {r['bytes_per_inference']:>7d}  "
                          f"accuracy {100 * r['accuracy']:6.2f}%  agreement {100 * r['agreement']:6.2f}%", flush=True)
    pareto(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pareto.json").write_text(json.dumps(rows, indent=1))
    lines = ["| K | sync | recovery | bytes/inference | test accuracy | agreement | Pareto |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['K']} | {r['sync']} | {r['recovery']} | {r['bytes_per_inference']} | "
              f"{100 * r['accuracy']:.2f}% | {100 * r['agreement']:.2f}% | {'*' if r['pareto'] else ''} |"
              for r in rows]
    note = (f"\nDigits example, original test accuracy {100 * rows[0]['original_accuracy']:.2f}% "
            f"({len(y_test)} test images). From one run of benchmarks/pareto.py.\n")
    (RESULTS / "pareto.md").write_text("\n".join(lines) + "\n" + note)
    print("\n".join(lines) + note)


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
