"""Recovery across processes and interruptions, on the digits example: does 2-process
data-parallel distillation (gloo, on the CPU) reach what 1 process reaches, and does a killed
and resumed recovery end where an uninterrupted one ends?

Runs what a user runs, ``lcpc convert`` then ``lcpc recover`` (refit, then ``--epochs`` epochs
of distillation):

- ``processes``: for each K and seed, ``pipeline.recover`` (``lcpc recover``; the library, for
  the seed) with ``--procs 1`` and with ``--procs 2`` (the same global batch, split over the
  processes); the held-out agreement the recovery measured, and the test accuracy and agreement
  of the written folder (``lcpc verify`` on the 450 test images recovery never sees);
- ``resume``: for each K, the ``lcpc recover --checkpoint DIR`` command killed with SIGKILL
  during its last epoch (after the previous epoch's checkpoint), then the same command with
  ``--resume``; and one stopped with Ctrl-C (SIGINT) in its first epoch, then resumed; each
  against the uninterrupted command: the test figures, and whether every weight of every written
  stage file is the same (the files themselves are not compared byte for byte: the order in
  which a stage file lists its value types varies between processes).

    python -m benchmarks.recovery_scale [--branches 4 8] [--epochs 2] [--seeds 3] [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from examples.digits.data import load_shipped
from lcpc import pipeline
from lcpc.passes.recover.distil import Execution

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "examples" / "digits" / "digits_cnn.onnx"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def lcpc(*args: str) -> subprocess.Popen:
    """The ``lcpc`` command (of this Python's environment), running."""
    command = [sys.executable, "-c", "import sys; from lcpc.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed ({proc.returncode}): {out[-2000:]}")
    return out


def figures(folder: Path, x_test, y_test) -> dict:
    fig = pipeline.verify(folder, x_test, y_test)
    manifest = json.loads((folder / "manifest.json").read_text())
    distil = manifest["fidelity"]["recovery"]["distillation"]
    return {"accuracy": fig["candidate_accuracy"], "agreement": fig["top1_agreement"],
            "original_accuracy": fig["reference_accuracy"], "heldout_agreement": distil["after"]["top1_agreement"],
            "processes": distil["processes"], "throughput": distil["throughput"],
            "resumed_from": (distil.get("checkpoint") or {}).get("resumed_from"),
            "weights": weights(folder, manifest)}


def weights(folder: Path, manifest: dict) -> dict[str, np.ndarray]:
    """Every initializer of every stage file, by stage and name."""
    import onnx
    from onnx import numpy_helper

    out = {}
    for stage in manifest["stages"]:
        for t in onnx.load(folder / stage["file"]).graph.initializer:
            out[f"{stage['id']}/{t.name}"] = numpy_helper.to_array(t)
    return out


def same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def recover(cut: Path, out: Path, train: Path, epochs: int, *extra: str) -> subprocess.Popen:
    return lcpc("recover", str(cut), "--data", str(train), "--epochs", str(epochs), "--train-device", "cpu",
                "-o", str(out), "--force", *extra)


def wait_for_epochs(folder: Path, epochs: int, proc: subprocess.Popen, limit: float = 1800) -> None:
    """Until ``folder``'s checkpoint summary says ``epochs`` epochs are done."""
    deadline = time.monotonic() + limit
    summary = folder / "recovery.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the run to interrupt ended first: {proc.communicate()[0][-2000:]}")
        if summary.is_file():
            try:
                if json.loads(summary.read_text())["epochs_done"] >= epochs:
                    return
            except (ValueError, KeyError):
                pass
        time.sleep(0.1)
    raise SystemExit(f"no checkpoint of {epochs} epoch(s) in {folder} after {limit} s")


def wait_for_steps(folder: Path, proc: subprocess.Popen, seconds: float) -> None:
    """Let the run train for ``seconds`` (it has started when its checkpoint folder exists)."""
    deadline = time.monotonic() + 600
    while not folder.is_dir() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branches", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--name", default="recovery_scale")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # one thread per process, as in the lcpc commands below (OMP_NUM_THREADS=1)
    x_train, _, x_test, y_test = load_shipped()
    rows: list[dict] = []
    resume: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = root / "train.npy"
        np.save(train, x_train)
        for k in args.branches:
            cut = root / f"k{k}"
            pipeline.convert(MODEL, cut, k, "none")
            for procs in (1, args.procs):
                runs = []
                for seed in range(args.seeds):
                    out = root / f"k{k}_p{procs}_s{seed}"
                    start = time.perf_counter()
                    pipeline.recover(cut, pipeline.recovery_data(train, None), out, epochs=args.epochs, seed=seed,
                                     execution=Execution(device="cpu", procs=procs))
                    fig = figures(out, x_test, y_test)
                    del fig["weights"]
                    runs.append({"seed": seed, "seconds": time.perf_counter() - start, **fig})
                    show(f"K={k} procs={procs} seed {seed}", runs[-1])
                rows.append({"K": k, "procs": procs, "runs": runs, **summary(runs)})
                write(rows, resume, args, partial=True)
            resume += resume_runs(k, cut, root, train, args.epochs, x_test, y_test)
            write(rows, resume, args, partial=True)
    write(rows, resume, args, partial=False)


def resume_runs(k: int, cut: Path, root: Path, train: Path, epochs: int, x_test, y_test) -> list[dict]:
    base = root / f"k{k}_whole"
    finish(recover(cut, base, train, epochs), f"K={k} uninterrupted")
    whole = figures(base, x_test, y_test)
    out = []
    for how in ("SIGKILL", "SIGINT"):
        ckpt, dest = root / f"k{k}_{how}_ckpt", root / f"k{k}_{how}"
        proc = recover(cut, dest, train, epochs, "--checkpoint", str(ckpt))
        if how == "SIGKILL":  # in the last epoch, after the previous epoch's checkpoint
            wait_for_epochs(ckpt, epochs - 1, proc)
            time.sleep(1.0)
            proc.send_signal(signal.SIGKILL)
        else:  # Ctrl-C during the first epoch: it saves the step it reached
            wait_for_steps(ckpt, proc, 3.0)
            proc.send_signal(signal.SIGINT)
        stopped, _ = proc.communicate(timeout=600)
        summary = json.loads((ckpt / "recovery.json").read_text()) if (ckpt / "recovery.json").is_file() else {}
        finish(recover(cut, dest, train, epochs, "--checkpoint", str(ckpt), "--resume"), f"K={k} resume")
        got = figures(dest, x_test, y_test)
        out.append({"K": k, "interruption": how, "exit_code": proc.returncode, "last_line": stopped.strip()[-300:],
                    "checkpoint": {key: summary.get(key) for key in ("epochs_done", "steps_done", "interrupted")},
                    "resumed_from": got["resumed_from"], "accuracy": got["accuracy"], "agreement": got["agreement"],
                    "uninterrupted_accuracy": whole["accuracy"], "uninterrupted_agreement": whole["agreement"],
                    "identical_weights": same_weights(got["weights"], whole["weights"])})
        print(f"K={k} {how}: resumed from {got['resumed_from']}, accuracy {100 * got['accuracy']:.2f}% "
              f"(uninterrupted {100 * whole['accuracy']:.2f}%), identical weights {out[-1]['identical_weights']}",
              flush=True)
    return out


def summary(runs: list[dict]) -> dict:
    return {key: float(np.mean([r[key] for r in runs])) for key in ("accuracy", "agreement", "heldout_agreement",
                                                                     "seconds")} | {
        "worst_accuracy": float(min(r["accuracy"] for r in runs)), "original_accuracy": runs[0]["original_accuracy"],
        "samples_per_second": float(np.mean([r["throughput"]["samples_per_second"] for r in runs]))}


def show(label: str, r: dict) -> None:
    print(f"{label}: test accuracy {100 * r['accuracy']:.2f}%, agreement {100 * r['agreement']:.2f}%, held-out "
          f"agreement {100 * r['heldout_agreement']:.2f}%, {r['seconds']:.1f} s", flush=True)


def write(rows: list[dict], resume: list[dict], args, partial: bool) -> None:
    import torch

    meta = {"model": str(MODEL.relative_to(ROOT)), "epochs": args.epochs, "seeds": args.seeds, "procs": args.procs,
            "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"meta": meta, "processes": rows, "resume": resume,
                                                           "partial": partial}, indent=1))
    text = markdown(rows, resume, meta) + ("\n(Partial: the run was stopped before every row was measured.)\n"
                                           if partial else "")
    (RESULTS / f"{args.name}.md").write_text(text)
    if not partial:
        print(text)


def markdown(rows: list[dict], resume: list[dict], meta: dict) -> str:
    lines = ["| K | processes | test accuracy | worst seed | test agreement | held-out agreement | samples/s | "
             "seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['procs']} | {100 * r['accuracy']:.2f}% | {100 * r['worst_accuracy']:.2f}% | "
                     f"{100 * r['agreement']:.2f}% | {100 * r['heldout_agreement']:.2f}% | "
                     f"{r['samples_per_second']:.0f} | {r['seconds']:.1f} |")
    lines += ["", "| K | interrupted by | checkpoint held | resumed from | test accuracy | uninterrupted | "
              "same weights |", "|---|---|---|---|---|---|---|"]
    for r in resume:
        held, at = r["checkpoint"], r["resumed_from"]
        lines.append(f"| {r['K']} | {r['interruption']} (exit {r['exit_code']}) | {held['epochs_done']} epoch(s) "
                     f"+ {held['steps_done'] if held['interrupted'] else 0} step(s) | epoch {at['epoch']}, step "
                     f"{at['steps_done']} | {100 * r['accuracy']:.2f}% | "
                     f"{100 * r['uninterrupted_accuracy']:.2f}% | {'yes' if r['identical_weights'] else 'no'} |")
    original = rows[0]["original_accuracy"] if rows else float("nan")
    note = (f"\nDigits example ({meta['model']}), original test accuracy {100 * original:.2f}%; `lcpc recover` (refit, "
            f"then {meta['epochs']} epochs of distillation on the 1347 training images, 10% held out) with `--procs 1` "
            f"and `--procs {meta['procs']}` (gloo: the same global batch of 8, split over the processes, BatchNorm "
            f"statistics over the whole batch), mean and worst of {meta['seeds']} seed(s) (split and shuffling); "
            f"test figures by `lcpc verify` on the 450 test images. "
            f"Resume: the same recovery with `--checkpoint`, killed (SIGKILL) during its last epoch or stopped with "
            f"Ctrl-C (SIGINT) during its first, then rerun with `--resume`, against the uninterrupted run "
            f"(same weights: every weight of every stage file equal). "
            f"samples/s: distillation steps only, on this shared {meta['machine']} (torch {meta['torch']}, one thread "
            f"per process). From one run of benchmarks/recovery_scale.py.\n")
    return "\n".join(lines) + "\n" + note


if __name__ == "__main__":
    main()
