"""Training for a lost device, on the digits example (or ``--task shapes``: noisy 32x32 shapes,
a VGG whose pooled features are gathered at the head): does recovery with branch dropout keep the
accuracy with every device present, and how much does it keep with one device missing?

Runs what a user runs: ``lcpc convert --branches K --sync none`` (pure LCP: the branches meet
only at the classifier, so the head can answer without any other device), then ``lcpc recover``
(refit, then ``--epochs`` epochs of distillation, with labels) with ``--branch-dropout P`` for
each P (0: none), for each seed; then ``lcpc verify`` on the 450 test images recovery never
sees, with every device and with each non-head device left out (``--without devN``: the head
merges the branches it has, rescaled as ``lcpc.runtime.degrade`` says). The converted folder
before recovery is measured the same way (the cut alone).

    python -m benchmarks.branch_dropout [--task digits|shapes] [--branches 4] [--epochs 2] [--seeds 3]
                                        [--dropout 0 0.25]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from examples.digits.data import load_shipped
from lcpc import pipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"digits": ROOT / "examples" / "digits" / "digits_cnn.onnx",
          "shapes": ROOT / "examples" / "shapes" / "shapes_vgg.onnx"}


def load(task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if task == "shapes":
        from examples.shapes.data import load_split
        return load_split()
    return load_shipped()


def accuracies(folder: Path, k: int, x_test: np.ndarray, y_test: np.ndarray) -> dict:
    """Test accuracy with every device ("all") and with each non-head device left out ("devN")."""
    out = {"all": pipeline.verify(folder, x_test, y_test)["candidate_accuracy"]}
    for d in range(1, k):
        out[f"dev{d}"] = pipeline.verify(folder, x_test, y_test, without=(f"dev{d}",))["candidate_accuracy"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=sorted(MODELS), default="digits")
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.25])
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    args.name = args.name or ("branch_dropout" if args.task == "digits" else f"branch_dropout_{args.task}")
    import torch

    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load(args.task)
    k = args.branches
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cut = root / "cut"
        pipeline.convert(MODELS[args.task], cut, k, "none")
        original = pipeline.verify(cut, x_test, y_test)["reference_accuracy"]
        rows.append({"dropout": None, "runs": [{"seed": None, **accuracies(cut, k, x_test, y_test)}]})
        show("cut, not recovered", rows[-1]["runs"][0])
        for p in args.dropout:
            runs = []
            for seed in range(args.seeds):
                out = root / f"p{p}_s{seed}"
                start = time.perf_counter()
                pipeline.recover(cut, x_train, out, labels=y_train, epochs=args.epochs, seed=seed, branch_dropout=p)
                runs.append({"seed": seed, "seconds": time.perf_counter() - start,
                             **accuracies(out, k, x_test, y_test)})
                show(f"--branch-dropout {p:g}, seed {seed}", runs[-1])
            rows.append({"dropout": p, "runs": runs})
            write(rows, args, original, True, len(x_train), len(x_test))
    write(rows, args, original, False, len(x_train), len(x_test))


def show(label: str, run: dict) -> None:
    missing = ", ".join(f"without {key} {100 * v:.2f}%" for key, v in run.items() if key.startswith("dev"))
    print(f"{label}: all devices {100 * run['all']:.2f}%, {missing}", flush=True)


def summary(runs: list[dict], k: int) -> dict:
    """Means over seeds, and the worst single figure with one device missing."""
    keys = ["all"] + [f"dev{d}" for d in range(1, k)]
    mean = {key: float(np.mean([r[key] for r in runs])) for key in keys}
    return {"mean": mean, "worst_all": float(min(r["all"] for r in runs)),
            "worst_missing": float(min(r[key] for r in runs for key in keys[1:]))}


def write(rows: list[dict], args, original: float, partial: bool, n_train: int, n_test: int) -> None:
    import torch

    k = args.branches
    meta = {"model": str(MODELS[args.task].relative_to(ROOT)), "branches": k, "epochs": args.epochs, "seeds": args.seeds,
            "original_accuracy": original, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}
    for r in rows:
        r["summary"] = summary(r["runs"], k)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "partial": partial}, indent=1))
    head = ["recovery", "all devices", "worst seed"] + [f"without dev{d}" for d in range(1, k)] + ["worst missing"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r["summary"]
        label = "none (the cut alone)" if r["dropout"] is None else \
            f"{args.epochs} epochs, `--branch-dropout {r['dropout']:g}`"
        cells = [label, f"{100 * s['mean']['all']:.2f}%", f"{100 * s['worst_all']:.2f}%"]
        cells += [f"{100 * s['mean'][f'dev{d}']:.2f}%" for d in range(1, k)] + [f"{100 * s['worst_missing']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    note = (f"\n{args.task.capitalize()} example ({meta['model']}, original test accuracy {100 * original:.2f}%) at "
            f"K={k}, `--sync none`; `lcpc recover` with labels (refit, then {args.epochs} epochs of distillation on "
            f"the {n_train} training images, 10% held out), mean of {args.seeds} seed(s); test accuracy by `lcpc verify` "
            f"on the {n_test} test images, with every device and `--without devN` (the head answers from the branches left, "
            f"rescaled). Worst missing: the lowest single figure with one device left out, over devices and seeds. "
            f"On {meta['machine']}, torch {meta['torch']}. From one run of benchmarks/branch_dropout.py.\n")
    text = "\n".join(lines) + "\n" + note + ("\n(Partial: stopped before every row was measured.)\n" if partial else "")
    (RESULTS / f"{args.name}.md").write_text(text)
    if not partial:
        print(text)


if __name__ == "__main__":
    main()
