"""Test accuracy against distillation epochs, from runs of ``benchmarks/recovery.py``.

Reads the JSON results that ``recovery.py`` wrote (one or more runs, any tasks and K)
and writes one table: per task, K, distillation recipe and epoch count, the mean and
worst-seed test accuracy and their gap to the original model, in points. It measures
nothing itself: every figure is one that ``recovery.py`` measured with ``lcpc verify`` on
test images recovery never saw. Runs with different recipes (``recovery.py --views 4``,
...) are rows of their own, under a recipe column; the refit (epoch 0) runs no
distillation, so it is one row whatever the recipe, except for the refit level
(``--refit stats``).

    python -m benchmarks.recovery_curve benchmarks/results/recovery.json \\
        benchmarks/results/recovery_shapes_epochs_k4.json benchmarks/results/recovery_shapes_epochs_k8.json \\
        benchmarks/results/recovery_shapes_epochs10_k8.json [more runs, e.g. with --views 4]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def rows(paths: list[Path]) -> list[dict]:
    """One row per (task, K, epochs) result; the refit is epoch 0."""
    out = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            meta, results, task = data["meta"], data["rows"], data["meta"]["task"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}: not a results file of benchmarks/recovery.py ({exc}); pass the .json it wrote")
        if data.get("partial"):
            raise SystemExit(f"{path}: the run was stopped before every row was measured; rerun it")
        for r in results:
            epochs = 0 if r["recovery"] == "refit" else _epochs(r["recovery"])
            if epochs is None:
                continue
            out.append({"task": task, "K": r["K"], "epochs": epochs, "seeds": len(r["runs"]),
                        "accuracy": r["accuracy"], "worst": r["worst_accuracy"],
                        "original": r["original_accuracy"],
                        "recipe": recipe_text(meta.get("recipe") if epochs else _refit_only(meta.get("recipe")),
                                              epochs and meta.get("labels")),
                        "source": path.name})
    unique: dict[tuple, dict] = {}
    for r in out:  # the same point from two runs (each run measures the refit): one row, if they agree
        key = (r["task"], r["K"], r["recipe"], r["epochs"])
        if key in unique and (unique[key]["accuracy"], unique[key]["worst"]) != (r["accuracy"], r["worst"]):
            raise SystemExit(f"{r['task']} K={r['K']} at {r['epochs']} epochs ({r['recipe']}) differs between "
                             f"{unique[key]['source']} and {r['source']}: rerun one of them")
        unique.setdefault(key, r)
    return sorted(unique.values(), key=lambda r: (r["task"], r["K"], r["epochs"] > 0, r["recipe"] != DEFAULT,
                                                  r["recipe"], r["epochs"]))


DEFAULT = "default"


def recipe_text(overrides: dict | None, labels: bool = False) -> str:
    """``recovery.py``'s recipe overrides as the command line gives them (``default``: none;
    ``--labels``: the run distilled with the training labels as well)."""
    options = [f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
               for k, v in sorted((overrides or {}).items())]
    return " ".join(options + (["--labels"] if labels else [])) or DEFAULT


def _refit_only(overrides: dict | None) -> dict:
    """Of a run's recipe, what its refit row (no distillation) depends on: the refit level."""
    return {k: v for k, v in (overrides or {}).items() if k == "refit"}


def _epochs(label: str) -> int | None:
    m = re.fullmatch(r"distil (\d+)ep", label)
    return int(m.group(1)) if m else None


def markdown(table: list[dict]) -> str:
    recipes = {r["recipe"] for r in table if r["epochs"]}
    column = len(recipes) > 1  # one recipe: named in the note instead
    lines = ["| task | K | " + ("recipe | " if column else "") + "epochs | test accuracy | worst seed | original | "
             "gap (mean) | gap (worst) |", "|---|---|" + ("---|" if column else "") + "---|---|---|---|---|---|"]
    for r in table:
        shown = "" if not r["epochs"] and r["recipe"] == DEFAULT else r["recipe"]  # the plain refit: no recipe
        lines.append(f"| {r['task']} | {r['K']} | " + (f"{shown} | " if column else "")
                     + f"{r['epochs'] or 'refit'} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['worst']:.2f}% | {100 * r['original']:.2f}% | "
                     f"{100 * (r['original'] - r['accuracy']):.2f} | {100 * (r['original'] - r['worst']):.2f} |")
    sources = sorted({r["source"] for r in table})
    seeds = sorted({r["seeds"] for r in table})
    note = (f"\nGap: points of test accuracy below the original. Mean and worst over {'/'.join(map(str, seeds))} "
            f"seed(s); `refit` is `--epochs 0`. "
            + ("Recipe: `benchmarks/recovery.py`'s options over the default (`passes/recover/distil.py`'s Recipe). "
               if column else f"Recipe: {next(iter(recipes), DEFAULT)}. ")
            + f"From benchmarks/recovery_curve.py over {', '.join(sources)}.\n")
    return "\n".join(lines) + "\n" + note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="JSON files written by benchmarks/recovery.py")
    ap.add_argument("--name", default="recovery_curve", help="results file stem")
    args = ap.parse_args()
    text = markdown(rows(args.results))
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
