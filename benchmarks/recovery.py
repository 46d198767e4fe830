"""Recovery on the digits example: test accuracy of the pure-LCP plan at each recovery level.

For every K, plans the digits example (examples/digits) with --sync none and measures,
on the 450 test images recovery never sees, the lowered plan run by the local engine
(per-device ONNX files): its test accuracy and top-1 agreement with the original after

- ``cut``: nothing (the block-diagonal weights as they are);
- ``bn``: BatchNorm re-estimation only (no refit, no training);
- ``refit+bn``: layer-wise least-squares refit, then BatchNorm re-estimation;
- ``distil Nep``: the full recipe of ``lcpc.passes.recover`` (refit, BatchNorm
  re-estimation, distillation for N epochs) on the unlabelled training images;

plus the bytes per inference of the plan (the same at every level: recovery changes
weights, not structure) against exact channel-wise model parallelism (--sync all), and
the seconds each recovery took. Distillation rows are repeated over ``--seeds`` seeds
(held-out split, shuffling): the table gives the mean and the worst seed.

    python benchmarks/recovery.py [--branches 2 4 8] [--epochs 2 6] [--seeds 3] [--threads 2]
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
sys.path.insert(0, str(ROOT))

from examples.digits.data import load_split  # noqa: E402
from lcpc import frontend, planner  # noqa: E402
from lcpc.fidelity import compare  # noqa: E402
from lcpc.lower import lower  # noqa: E402
from lcpc.passes import recover  # noqa: E402
from lcpc.targets import onnx as onnx_target  # noqa: E402
from lcpc.targets.local import LocalEngine  # noqa: E402

MODEL = ROOT / "examples" / "digits" / "digits_cnn.onnx"
RESULTS = ROOT / "benchmarks" / "results"


def test_figures(plan, x_test, y_test, reference_logits, folder: Path) -> dict:
    """Accuracy and agreement of the lowered plan, run by the local engine."""
    onnx_target.write(plan, lower(plan), folder)
    engine = LocalEngine(folder)
    try:
        logits = engine.run({"input": x_test})["logits"]
    finally:
        engine.close()
    fig = compare(reference_logits, logits, y_test)
    return {"accuracy": fig["candidate_accuracy"], "agreement": fig["top1_agreement"],
            "kl": fig["kl_divergence"], "original_accuracy": fig["reference_accuracy"]}


def levels(epochs: list[int], seeds: int) -> list[tuple[str, dict, int]]:
    """(label, recover.run keywords, seeds) per recovery level."""
    rows = [("bn", dict(epochs=0, refit=False), 1), ("refit+bn", dict(epochs=0), 1)]
    return rows + [(f"distil {e}ep", dict(epochs=e), seeds) for e in epochs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    x_train, _, x_test, y_test = load_split()
    graph, source = frontend.load(MODEL)
    reference_logits = original_logits(graph, x_test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.branches:
            plan = planner.plan(graph, source, k, "none")
            lcp_bytes = lower(plan).bytes_per_inference()
            exact_bytes = lower(planner.with_sync(plan, "all")).bytes_per_inference()
            base = {"K": k, "bytes_per_inference": lcp_bytes, "exact_bytes_per_inference": exact_bytes}
            fig = test_figures(plan, x_test, y_test, reference_logits, Path(tmp) / f"k{k}_cut")
            rows.append({**base, "recovery": "cut", **fig, "seconds": 0.0, "runs": []})
            show(rows[-1])
            for label, kwargs, n_seeds in levels(args.epochs, args.seeds):
                runs = []
                for seed in range(n_seeds):
                    start = time.perf_counter()
                    new_plan, report = recover.run(plan, x_train, seed=seed, **kwargs)
                    seconds = time.perf_counter() - start
                    fig = test_figures(new_plan, x_test, y_test, reference_logits,
                                       Path(tmp) / f"k{k}_{label.replace(' ', '_')}_{seed}")
                    runs.append({**fig, "seconds": seconds, "seed": seed,
                                 "heldout_agreement": report["after"]["top1_agreement"],
                                 "epochs_run": report["epochs_run"], "warnings": report["warnings"]})
                rows.append({**base, "recovery": label, "runs": runs, **summary(runs)})
                show(rows[-1])
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"model": "examples/digits/digits_cnn.onnx", "test_images": int(len(y_test)),
            "train_images": int(len(x_train)), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "seeds": args.seeds}
    (RESULTS / "recovery.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, meta)
    (RESULTS / "recovery.md").write_text(table)
    print(table)


def original_logits(graph, x: np.ndarray) -> np.ndarray:
    """The original model's logits (onnxruntime, one sample at a time: the graph is planned for 1)."""
    import onnxruntime as ort

    from lcpc.ir import to_onnx

    sess = ort.InferenceSession(to_onnx(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])


def summary(runs: list[dict]) -> dict:
    acc = [r["accuracy"] for r in runs]
    return {"accuracy": float(np.mean(acc)), "worst_accuracy": float(min(acc)),
            "agreement": float(np.mean([r["agreement"] for r in runs])),
            "kl": float(np.mean([r["kl"] for r in runs])),
            "original_accuracy": runs[0]["original_accuracy"],
            "seconds": float(np.mean([r["seconds"] for r in runs]))}


def show(r: dict) -> None:
    worst = f" (worst {100 * r['worst_accuracy']:.2f}%)" if len(r["runs"]) > 1 else ""
    print(f"K={r['K']} {r['recovery']:12s} accuracy {100 * r['accuracy']:6.2f}%{worst}  agreement "
          f"{100 * r['agreement']:6.2f}%  bytes {r['bytes_per_inference']}  {r['seconds']:.1f} s", flush=True)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["| K | recovery | test accuracy | worst seed | agreement | KL | bytes/inference (exact) | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = f"{100 * r['worst_accuracy']:.2f}%" if len(r["runs"]) > 1 else ""
        lines.append(f"| {r['K']} | {r['recovery']} | {100 * r['accuracy']:.2f}% | {worst} | "
                     f"{100 * r['agreement']:.2f}% | {r['kl']:.4f} | {r['bytes_per_inference']} "
                     f"({r['exact_bytes_per_inference']}) | {r['seconds']:.1f} |")
    note = (f"\nDigits example, original test accuracy {100 * rows[0]['original_accuracy']:.2f}% on "
            f"{meta['test_images']} test images; recovery on the {meta['train_images']} unlabelled training "
            f"images (10% held out), --sync none. Distillation rows: mean over {meta['seeds']} seeds. "
            f"torch {meta['torch']}, {meta['threads']} thread(s). From one run of benchmarks/recovery.py.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    main()
