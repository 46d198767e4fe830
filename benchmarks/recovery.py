"""Recovery on the digits example: test accuracy of the pure-LCP plan at each recovery level.

Runs exactly what a user types: for every K, ``lcpc convert`` (``pipeline.convert``) with
--sync none, then ``lcpc recover --epochs N`` (``pipeline.recover``: the numpy
least-squares refit, then N epochs of distillation from the original), and measures the
written folder with the local engine (``lcpc verify``: ``pipeline.verify``) on the
450 test images recovery never sees: test accuracy and top-1 agreement with the original,
after

- ``cut``: nothing (the block-diagonal weights as they are);
- ``refit``: ``lcpc recover --epochs 0`` (least squares only: no PyTorch; with ``--refit
  stats``, BatchNorm statistics only);
- ``distil Nep``: ``lcpc recover --epochs N``;

plus the bytes per inference of the plan (the same at every level: recovery changes
weights, not structure) against exact channel-wise model parallelism (--sync all), the
seconds each recovery took, and the held-out agreement after every epoch (the curve of
agreement against epochs, in the JSON). Recovery rows are repeated over ``--seeds``
seeds (held-out split, shuffling): the table gives the mean and the worst seed.

``--task shapes`` runs the harder stand-in task (``examples/shapes``: noisy 32x32
shapes, a converged VGG with BatchNorm; 8000 unlabelled training images, 2000 test images).

``--data synth:N`` recovers without any real image: per seed, N inputs synthesised from the
original model's BatchNorm statistics (``lcpc recover --data synth:N``: ``pipeline.synthetic_samples``,
once per seed and reused for every K, as ``--checkpoint`` keeps them), on the BatchNorm-kept
export of the task's model (``*_bn.onnx``; ``--bn`` picks that file for real data too);
``--compare-real`` adds, in the same run, the same rows recovered on the real training images.
The test images are real either way.

    python -m benchmarks.recovery [--task digits|shapes] [--branches 2 4 8] [--epochs 2 6] [--seeds 3]
                                  [--threads 1] [--lr LR] [--augment MODE] [--views V] [--temperature T]
                                  [--refit lsq|stats] [--data real|synth:N [--compare-real]
                                  [--synth-iterations I]] [--bn]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # reproducible timings on a shared machine
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from examples.digits.data import load_shipped
from lcpc import pipeline

RESULTS = ROOT / "benchmarks" / "results"
TASKS = {"digits": ROOT / "examples" / "digits" / "digits_cnn.onnx",
         "shapes": ROOT / "examples" / "shapes" / "shapes_vgg.onnx"}
BN_TASKS = {"digits": ROOT / "examples" / "digits" / "digits_cnn_bn.onnx",
            "shapes": ROOT / "examples" / "shapes" / "shapes_vgg_bn.onnx"}
MODEL = TASKS["digits"]


def test_figures(folder: Path, x_test, y_test) -> dict:
    """Accuracy and agreement of the written folder, run by the local engine (lcpc verify)."""
    fig = pipeline.verify(folder, x_test, y_test)
    return {"accuracy": fig["candidate_accuracy"], "agreement": fig["top1_agreement"],
            "kl": fig["kl_divergence"], "original_accuracy": fig["reference_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--task", choices=list(TASKS), default="digits")
    ap.add_argument("--lr", type=float, default=None, help="distillation learning rate (default: the Recipe's)")
    ap.add_argument("--augment", default=None, choices=["none", "shift", "flip", "shift+flip"],
                    help="training augmentation (default: the Recipe's)")
    ap.add_argument("--views", type=int, default=None,
                    help="augmented copies of each image per step (default: the Recipe's)")
    ap.add_argument("--refit", default=None, choices=["lsq", "stats"],
                    help="the cheap recovery distillation starts from (lcpc recover --refit; default: lsq)")
    ap.add_argument("--temperature", type=float, default=None, help="distillation temperature (default: the Recipe's)")
    ap.add_argument("--labels", action="store_true",
                    help="recover with the training labels as well (lcpc recover --labels; default: unlabelled)")
    ap.add_argument("--name", default=None, help="results file stem (default: recovery[_TASK], recovery_synth_TASK)")
    ap.add_argument("--data", default="real", help="real (the training images) or synth:N (synthesised inputs)")
    ap.add_argument("--compare-real", action="store_true", help="with --data synth: real-data rows too")
    ap.add_argument("--synth-iterations", type=int, default=None,
                    help="with --data synth: optimisation steps per batch (lcpc recover --synth-iterations)")
    ap.add_argument("--bn", action="store_true", help="the BatchNorm-kept export of the model (implied by synth)")
    args = ap.parse_args()
    recipe = overrides(args)
    import torch

    from lcpc.passes.recover.samples import Synthetic

    torch.set_num_threads(args.threads)
    synthetic = Synthetic.parse(args.data) if args.data != "real" else None
    if args.data != "real" and synthetic is None:
        raise SystemExit(f"--data {args.data}: real or synth:N")
    if synthetic is not None:  # no time bound here: the benchmark measures what the iterations give
        synthetic = replace(synthetic, time_limit=1e9, iterations=args.synth_iterations or synthetic.iterations)
    model = BN_TASKS[args.task] if synthetic or args.bn else TASKS[args.task]
    if args.task == "digits":
        x_train, y_train, x_test, y_test = load_shipped()
    else:
        from examples.shapes.data import load_split as load_shapes

        x_train, y_train, x_test, y_test = load_shapes()
    labels = y_train if args.labels else None
    rows = []
    kinds = (["synthetic", "real"] if args.compare_real else ["synthetic"]) if synthetic else ["real"]
    made: dict[int, object] = {}  # seed -> its synthetic samples, made once, used for every K

    def data_for(kind: str, seed: int):
        if kind == "real":
            return x_train
        if seed not in made:
            start = time.perf_counter()
            made[seed] = pipeline.synthetic_samples(model, None, synthetic, seed=seed)
            print(f"synthesised {synthetic.samples} inputs (seed {seed}) in {time.perf_counter() - start:.0f} s",
                  flush=True)
        return made[seed]

    info = meta(args, model, x_train, y_test, torch)
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.branches:
            cut_folder = Path(tmp) / f"k{k}_cut"
            manifest = pipeline.convert(model, cut_folder, k, "none")
            exact_bytes = manifest["totals"]["comparison"]["model_parallel"]["bytes_per_inference"]
            base = {"K": k, "bytes_per_inference": manifest["totals"]["bytes_per_inference"],
                    "exact_bytes_per_inference": exact_bytes}
            rows.append({**base, "recovery": "cut", **test_figures(cut_folder, x_test, y_test), "seconds": 0.0,
                         "runs": []})
            show(rows[-1])
            for kind in kinds:
                for label, epochs in [("refit", 0)] + [(f"distil {e}ep", e) for e in args.epochs]:
                    runs = []
                    for seed in range(args.seeds):
                        data = data_for(kind, seed)
                        out = Path(tmp) / f"k{k}_{kind}_{label.replace(' ', '_')}_{seed}"
                        start = time.perf_counter()
                        m = pipeline.recover(cut_folder, data, out, labels=labels if kind == "real" else None,
                                             epochs=epochs, seed=seed, **recipe)
                        seconds = time.perf_counter() - start
                        figures = m["fidelity"]["recovery"]
                        last = figures.get("distillation", figures.get("refit"))
                        start_agreement = (figures["refit"]["after"] if "refit" in figures
                                           else figures["distillation"]["before"])["top1_agreement"]
                        runs.append({**test_figures(out, x_test, y_test), "seconds": seconds, "seed": seed,
                                     "heldout_agreement": last["after"]["top1_agreement"],
                                     "curve": [{"epoch": 0, "heldout_agreement": start_agreement}]
                                     + [{"epoch": h["epoch"], "heldout_agreement": h["heldout"]["top1_agreement"]}
                                        for h in figures.get("distillation", {}).get("history", [])],
                                     "data": figures["data"], "warnings": last.get("warnings", [])})
                    rows.append({**base, "recovery": label, "data": kind, "runs": runs, **summary(runs)})
                    show(rows[-1])
                    write(rows, info, partial=True)
    write(rows, info, partial=False)


def overrides(args) -> dict:
    """The recovery settings given on the command line: the refit level and distillation
    options (the rest: ``pipeline.recover``'s and the Recipe's defaults)."""
    given = (("lr", args.lr), ("augment", args.augment), ("views", args.views), ("temperature", args.temperature),
             ("refit", args.refit))
    return {k: v for k, v in given if v is not None}


def meta(args, model: Path, x_train, y_test, torch) -> dict:
    return {"task": args.task, "model": str(model.relative_to(ROOT)), "test_images": int(len(y_test)),
            "train_images": int(len(x_train)), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "seeds": args.seeds,
            "recipe": overrides(args), "labels": args.labels, "data": args.data,
            "stem": args.name or (f"recovery_synth_{args.task}" if args.data != "real" else
                                  "recovery" if args.task == "digits" else f"recovery_{args.task}")}


def write(rows: list[dict], info: dict, partial: bool) -> None:
    """Results so far (``partial``: after every row, so a stopped run keeps what it measured)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = info["stem"]
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": info, "rows": rows, "partial": partial}, indent=1))
    table = markdown(rows, info) + ("\n(Partial: the run was stopped before every row was measured.)\n"
                                    if partial else "")
    (RESULTS / f"{stem}.md").write_text(table)
    if not partial:
        print(table)


def summary(runs: list[dict]) -> dict:
    acc = [r["accuracy"] for r in runs]
    return {"accuracy": float(np.mean(acc)), "worst_accuracy": float(min(acc)),
            "agreement": float(np.mean([r["agreement"] for r in runs])),
            "kl": float(np.mean([r["kl"] for r in runs])),
            "original_accuracy": runs[0]["original_accuracy"],
            "seconds": float(np.mean([r["seconds"] for r in runs]))}


def show(r: dict) -> None:
    worst = f" (worst {100 * r['worst_accuracy']:.2f}%)" if len(r["runs"]) > 1 else ""
    print(f"K={r['K']} {r.get('data', ''):9s} {r['recovery']:12s} accuracy {100 * r['accuracy']:6.2f}%{worst}  "
          f"agreement "
          f"{100 * r['agreement']:6.2f}%  bytes {r['bytes_per_inference']}  {r['seconds']:.1f} s", flush=True)


def markdown(rows: list[dict], meta: dict) -> str:
    synthetic = meta.get("data", "real") != "real"
    lines = ["| K | " + ("data | " if synthetic else "") + "recovery | test accuracy | worst seed | agreement | KL | "
             "bytes/inference (exact) | seconds |",
             "|---|" + ("---|" if synthetic else "") + "---|---|---|---|---|---|---|"]
    for r in rows:
        worst = f"{100 * r['worst_accuracy']:.2f}%" if len(r["runs"]) > 1 else ""
        data = f"{r.get('data', '')} | " if synthetic else ""
        lines.append(f"| {r['K']} | {data}{r['recovery']} | {100 * r['accuracy']:.2f}% | {worst} | "
                     f"{100 * r['agreement']:.2f}% | {r['kl']:.4f} | {r['bytes_per_inference']} "
                     f"({r['exact_bytes_per_inference']}) | {r['seconds']:.1f} |")
    task = "Digits example" if meta["task"] == "digits" else f"Task {meta['task']} ({meta['model']})"
    if synthetic:
        made = [r["data"]["synthesis"] for row in rows for r in row["runs"] if r.get("data", {}).get("kind")
                == "synthetic"]
        seconds = sorted({m["seed"]: m["seconds"] for m in made}.values())
        source = (f"recovery on {meta['data']} (inputs synthesised from the model's BatchNorm statistics, "
                  f"{made[0]['iterations']} iterations, {', '.join(f'{v:.0f}' for v in seconds)} s per seed, "
                  f"once per seed for every K; no real image seen)"
                  + (f" and, as `real`, on the {meta['train_images']} unlabelled training images" if any(
                      r.get("data") == "real" for r in rows) else "")
                  + " (10% held out)")
    else:
        source = (f"recovery on the {meta['train_images']} {'labelled' if meta.get('labels') else 'unlabelled'} "
                  f"training images (10% held out)")
    note = (f"\n{task}, original test accuracy {100 * rows[0]['original_accuracy']:.2f}% on "
            f"{meta['test_images']} test images; {source}, --sync none; "
            f"`distil Nep`: `lcpc recover --epochs N` (refit, then N epochs of distillation). "
            f"Recovery rows: mean over {meta['seeds']} seed(s). "
            + (f"Recipe overrides: {', '.join(f'{k} {v}' for k, v in meta['recipe'].items())}. " if meta.get("recipe")
               else "")
            + f"torch {meta['torch']}, {meta['threads']} thread(s). From one run of benchmarks/recovery.py.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    main()
