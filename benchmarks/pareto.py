"""Bytes on the wire vs accuracy after recovery: ``--sync auto --recover`` over a sweep of budgets.

For each model and K, runs what ``lcpc convert --sync auto --calib C --comm-budget B
--recover TRAIN --epochs E`` runs (``pipeline.convert_and_recover``) for budgets from pure
LCP to exact: the backward-elimination path is measured on the calibration inputs
(``passes.cut.auto_path``), its plans at up to 6 byte sizes (``cut.spread``) are the
candidates, each is recovered on TRAIN (the numpy least-squares refit, then E epochs of
distillation when PyTorch is installed) and scored on the recovery's own held-out split,
and the budget gets the best-scored affordable candidate. The budgets are the candidates'
bytes; one ``RecoveredScores`` memo is shared by the budgets (each candidate is recovered
once, as one user converting at each budget would get). The chosen folder is then measured
on the test inputs with the local engine (``pipeline.verify``): top-1 agreement with the
original (and accuracy with labels) before recovery (the same plan, converted without
recovery) and after, the bytes per inference its manifest records, and the budget.
Everything comes from one run.

- ``digits``: the bundled example; calibration: 128 training images; recovery: the 1347
  training images; held out: the 450 test images.
- ``lite0``: EfficientNet-Lite0 from ``../shared/models`` on the photos in
  ``../shared/photos`` (skipped when absent). The 12 photos give random 224x224 crops
  and flips: calibration and recovery crops come from photos 1-8, held-out crops from
  photos 9-12 (so held-out photos are never seen).

    python -m benchmarks.pareto [--models digits lite0] [--branches 4] [--budgets 6] [--epochs 2]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # reproducible timings on a shared machine

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from examples.digits.data import load_shipped
from lcpc import frontend, pipeline, planner
from lcpc.passes import cut

RESULTS = ROOT / "benchmarks" / "results"
DIGITS = ROOT / "examples" / "digits" / "digits_cnn.onnx"
SHARED = ROOT.parent / "shared"
LITE0 = SHARED / "models" / "efficientnet_lite0.onnx"
PHOTOS = SHARED / "photos"
STEM = "pareto"


def has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def photo_crops(files: list[Path], n: int, seed: int) -> np.ndarray:
    """``n`` random 224x224 crops (and mirror images) of the photos, scaled as Lite0 wants."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = 256 / min(w, h)
            images.append(np.asarray(im.resize((round(w * s), round(h * s))), dtype=np.float32))
    out = np.empty((n, 3, 224, 224), np.float32)
    for i in range(n):
        img = images[i % len(images)]
        y, x = rng.integers(0, img.shape[0] - 223), rng.integers(0, img.shape[1] - 223)
        crop = img[y:y + 224, x:x + 224]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = ((crop - 127.0) / 128.0).transpose(2, 0, 1)
    return out


def sweep(name: str, model: Path, k: int, calib, train, test, labels, n_budgets: int, epochs: int, tmp: Path,
          done: list[dict]) -> list[dict]:
    """The rows of one model and K; ``done`` (the rows of earlier sweeps) and these are
    written after every row, so a stopped run keeps what it measured."""
    graph, source = frontend.load(model)
    path = cut.auto_path(planner.plan(graph, source, k, "none"), calib)
    scores = pipeline.RecoveredScores(train, epochs=epochs)  # one memo: each candidate is recovered once
    rows = []
    for budget in [p["bytes"] for p in cut.spread(path, n_budgets)]:
        start = time.perf_counter()
        out = tmp / f"{name}_k{k}_{budget}"
        m = pipeline.convert_and_recover(model, out, train, epochs=epochs, branches=k, sync="auto", calib=calib,
                                         comm_budget=budget, scores=scores)
        after = pipeline.verify(out, test, labels, model)
        exchanges = m["sync"]["exchanges"]
        cut_folder = out.with_name(out.name + "_cut")  # the same plan before recovery
        pipeline.convert(model, cut_folder, k, ",".join(exchanges) if exchanges else "none")
        before = pipeline.verify(cut_folder, test, labels, model)
        choice = (m.get("fidelity") or {}).get("sync_auto")
        rows.append({"model": name, "K": k, "budget": budget, "bytes_per_inference": m["totals"]["bytes_per_inference"],
                     "exchanges": len(exchanges), "cuts": len(m["sync"]["cuts"]),
                     "recovery": f"refit+{epochs}ep" if m["sync"]["cuts"] else "exact",
                     "candidates": choice["candidates"] if choice else [],
                     "agreement_cut": before["top1_agreement"], "agreement": after["top1_agreement"],
                     "accuracy": after.get("candidate_accuracy"), "original_accuracy": after.get("reference_accuracy"),
                     "heldout": after["samples"], "seconds": time.perf_counter() - start})
        r = rows[-1]
        write(done + rows, partial=True)
        print(f"{name} K={k} budget {budget:>9d} bytes {r['bytes_per_inference']:>9d} exchanges {r['exchanges']:>2d} "
              f"agreement {100 * r['agreement_cut']:6.2f}% -> {100 * r['agreement']:6.2f}% ({r['recovery']})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["digits", "lite0"], choices=["digits", "lite0"])
    ap.add_argument("--branches", type=int, nargs="+", default=[4])
    ap.add_argument("--budgets", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=2, help="distillation epochs after the refit (0: refit only)")
    ap.add_argument("--lite0-epochs", type=int, default=0,
                    help="distillation epochs for EfficientNet-Lite0 (default 0: refit only; CPU training at 224 "
                         "px takes minutes per epoch)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--crops", type=int, nargs=3, default=[16, 96, 32], metavar=("CALIB", "TRAIN", "HELDOUT"),
                    help="Lite0: photo crops for calibration, recovery and held-out measurement")
    ap.add_argument("--name", default="pareto", help="results file stem in benchmarks/results")
    args = ap.parse_args()
    global STEM
    STEM = args.name
    if has_torch():
        import torch

        torch.set_num_threads(args.threads)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.branches:
            if "digits" in args.models:
                x_train, _, x_test, y_test = load_shipped()
                calib = x_train[np.sort(np.random.default_rng(0).permutation(len(x_train))[:128])]
                epochs = args.epochs if has_torch() else 0
                rows += sweep("digits", DIGITS, k, calib, x_train, x_test, y_test, args.budgets, epochs, Path(tmp), rows)
            if "lite0" in args.models:
                if not (LITE0.is_file() and PHOTOS.is_dir()):
                    print(f"skipping lite0: {LITE0} or {PHOTOS} is not there")
                    continue
                photos = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
                seen, unseen = photos[:8], photos[8:]
                n_calib, n_train, n_held = args.crops
                rows += sweep("lite0", LITE0, k, photo_crops(seen, n_calib, 1), photo_crops(seen, n_train, 2),
                              photo_crops(unseen, n_held, 3), None, args.budgets,
                              args.lite0_epochs if has_torch() else 0, Path(tmp), rows)
    print(write(rows, partial=False))


def write(rows: list[dict], partial: bool) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{STEM}.json").write_text(json.dumps({"rows": rows, "partial": partial}, indent=1))
    table = markdown(rows) + ("\n(Partial: the run was stopped before every budget was measured.)\n" if partial else "")
    (RESULTS / f"{STEM}.md").write_text(table)
    return table


def markdown(rows: list[dict]) -> str:
    lines = ["| model | K | budget | bytes/inference | exchanges | recovery | held-out agreement: cut -> recovered "
             "| test accuracy |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else ""
        lines.append(f"| {r['model']} | {r['K']} | {r['budget']} | {r['bytes_per_inference']} | {r['exchanges']} | "
                     f"{r['recovery']} | {100 * r['agreement_cut']:.2f}% -> {100 * r['agreement']:.2f}% | {acc} |")
    notes = []
    for model in sorted({r["model"] for r in rows}):
        ours = [r for r in rows if r["model"] == model]
        monotone = all(b["agreement"] >= a["agreement"] for a, b in zip(ours, ours[1:]))
        within = all(r["bytes_per_inference"] <= r["budget"] for r in ours)
        notes.append(f"{model}: {len(ours)} budgets, held-out agreement after recovery "
                     f"{'never decreases' if monotone else 'DECREASES somewhere'} as the budget grows; "
                     f"{'no plan exceeds its budget' if within else 'A PLAN EXCEEDS ITS BUDGET'}; "
                     f"{ours[0]['heldout']} held-out samples")
    return "\n".join(lines) + "\n\n" + ". ".join(notes) + ". From one run of benchmarks/pareto.py.\n"


if __name__ == "__main__":
    main()
