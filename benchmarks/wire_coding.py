"""Smaller merges: the bytes of every wire format (float32, int8 per tensor, int8 per channel, each
with and without DEFLATE coding) and what they cost in fidelity, measured on held-out data.

Two models, pure LCP at K=4: the digits example (recovered by the least-squares refit, its
calibration the first 256 training images, scored on the test images: accuracy and agreement with
the float32 wire) and EfficientNet-Lite0 at 224 (``../shared/models``, calibrated on crops and
flips of six of the photos, scored on the other six; agreement and KL with the float32 wire, since
an unrecovered cut has no accuracy to speak of). For each: the merge's bytes per inference (what the
branches send the head), its bits per value, and the whole plan's bytes.

    python -m benchmarks.wire_coding

Writes ``benchmarks/results/wire_coding.{md,json}``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from lcpc import pipeline
from lcpc.fidelity import compare
from lcpc.images import Preprocessing, load_folder
from lcpc.runtime.feeds import Stats
from lcpc.runtime.local import LocalEngine
from lcpc.runtime.manifest import read

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED = ROOT.parent / "shared"
VARIANTS = [("fp32", "none"), ("int8", "none"), ("int8", "deflate"), ("int8-channel", "none"),
            ("int8-channel", "deflate")]


def measure(folder: Path, x: np.ndarray) -> tuple[np.ndarray, dict]:
    manifest = read(folder)
    stats = Stats()
    with LocalEngine(folder) as engine:
        out = next(iter(engine.run({manifest.inputs[0].name: x}, stats).values()))
    merge = [t for t in manifest.transfers if t.kind in ("reduce", "gather") and t.dst == 0]
    values = sum(int(np.prod(t.shape)) for t in merge)
    merged = sum(stats.bytes_by_transfer[t.id] for t in merge) / stats.samples
    return out, {"merge_bytes": merged, "bits_per_value": 8 * merged / values if values else None,
                 "total_bytes": stats.total() / stats.samples, "merge_values": values}


def one(label: str, model: Path, calib: np.ndarray, test: np.ndarray, labels: np.ndarray | None, tmp: Path,
        refit: np.ndarray | None = None) -> list[dict]:
    rows, reference = [], None
    for wire, code in VARIANTS:
        folder = tmp / f"{label}-{wire}-{code}"
        options = {"calib": calib, "wire": wire, "wire_code": code} if wire != "fp32" else {}
        if refit is not None:
            pipeline.convert_and_recover(model, folder, refit, epochs=0, branches=4, sync="none", **options)
        else:
            pipeline.convert(model, folder, 4, "none", **options)
        out, row = measure(folder, test)
        if reference is None:
            reference = out
        fig = compare(reference, out, labels)
        rows.append({"model": label, "wire": wire, "code": code, **row, "agreement": fig["top1_agreement"],
                     "kl": fig["kl_divergence"], "accuracy": fig.get("candidate_accuracy")})
        print(rows[-1], flush=True)
    return rows


def lite0_data() -> tuple[np.ndarray, np.ndarray] | None:
    if not (SHARED / "models" / "efficientnet_lite0.onnx").is_file() or not (SHARED / "photos").is_dir():
        return None
    x, _ = load_folder(SHARED / "photos", Preprocessing(size=(224, 224), mean=(127.0,), std=(128.0,)))
    calib = np.concatenate([x[:6], x[:6, :, :, ::-1], x[:6, :, ::-1, :]])  # crops' stand-ins: flips
    return np.ascontiguousarray(calib), x[6:]


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lcpc-wire-") as tmp:
        digits = ROOT / "examples" / "digits"
        train = np.load(digits / "train.npy")
        rows += one("digits_cnn (example, refit)", digits / "digits_cnn.onnx", train[:256],
                    np.load(digits / "test.npy"), np.load(digits / "test_labels.npy"), Path(tmp), refit=train)
        data = lite0_data()
        if data is not None:
            rows += one("efficientnet_lite0 (cut, unrecovered)", SHARED / "models" / "efficientnet_lite0.onnx",
                        data[0], data[1], None, Path(tmp))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "wire_coding.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["| model | wire | coding | merge bytes / inference | bits per merged value | plan bytes / inference "
             "| agreement with fp32 | KL vs fp32 | accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        lines.append(f"| {r['model']} | {r['wire']} | {r['code']} | {r['merge_bytes']:.0f} | "
                     f"{r['bits_per_value']:.2f} | {r['total_bytes']:.0f} | {100 * r['agreement']:.2f}% | "
                     f"{r['kl']:.2g} | {acc} |")
    note = ("\nK=4, --sync none. Bytes are what the engine counted, per inference, on the held-out data (the "
            "coded sizes as they came); the merge is what the branches send the head. From one run of "
            "`python -m benchmarks.wire_coding`.\n")
    (RESULTS / "wire_coding.md").write_text("\n".join(lines) + "\n" + note)
    print((RESULTS / "wire_coding.md").read_text())


if __name__ == "__main__":
    main()
