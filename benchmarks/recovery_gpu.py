"""Distillation throughput of a 224x224 model recovered from an image folder: images per second,
on a GPU (or, slowly, the CPU), so the time of an ImageNet-scale recovery can be stated from a
measurement.

Builds ResNet-18 (``benchmarks/models.py``: the torchvision layer structure, random weights, BatchNorm
kept) at ``--width``, writes ``--images`` JPEG images (256x256, in class subfolders) to a folder,
converts the model to ``--branches`` branches with ImageNet preprocessing (shorter side to 256, centre
crop 224), and runs what ``lcpc recover FOLDER --data IMAGES --refit none --epochs E --train-device D
--procs P --batch-size B --workers W`` runs: the images are decoded by data-loader workers and
streamed, the student trains with mixed precision on CUDA. It prints and records the distillation's
images per second (training steps only: what an epoch costs per image; the held-out evaluation is
extra) and the time one epoch over ImageNet's 1,281,167 training images would take at that rate.

    python -m benchmarks.recovery_gpu [--device cuda] [--procs 1] [--images 8192] [--batch-size 256]
                                      [--width 1.0] [--branches 4] [--epochs 1] [--workers 8]
    python -m benchmarks.recovery_gpu --device cpu --images 64 --batch-size 16 --width 0.125   # the CPU check
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
import onnx

from benchmarks import models
from lcpc import pipeline
from lcpc.passes.recover.distil import Execution

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGENET_TRAIN = 1_281_167
PREPROCESSING = {"size": [224, 224], "crop_fraction": 0.875, "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                 "std": [0.229, 0.224, 0.225]}


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` 256x256 RGB JPEGs (smooth colour fields with noise), 10 per class subfolder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, 256, dtype=np.float32)
    for i in range(n):
        a, b, c = rng.random((3, 3), dtype=np.float32)
        img = 255 * (a * ramp[:, None, None] + b * ramp[None, :, None] + c) / 3
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        sub = folder / f"class{i // 10:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(sub / f"{i:06d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None, help="data-loader processes per training process")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--name", default=None, help="results file stem (default: recovery_gpu_DEVICE)")
    args = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        onnx.save(models.build("resnet18", width=args.width), root / "resnet18.onnx")
        start = time.perf_counter()
        write_images(root / "images", args.images)
        written = time.perf_counter() - start
        pipeline.convert(root / "resnet18.onnx", root / "cut", args.branches, "none", preprocessing=PREPROCESSING)
        execution = Execution(device=args.device, procs=args.procs, workers=args.workers)
        start = time.perf_counter()
        manifest = pipeline.recover(root / "cut", pipeline.recovery_data(root / "images", PREPROCESSING),
                                    root / "out", epochs=args.epochs, refit="none", batch_size=args.batch_size,
                                    precision=args.precision, execution=execution)
        total = time.perf_counter() - start
    distil = manifest["fidelity"]["recovery"]["distillation"]
    rate = distil["throughput"]["samples_per_second"]
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else \
        f"CPU ({platform.machine()}, {os.cpu_count()} cores, shared)"
    result = {"model": "resnet18", "width": args.width, "branches": args.branches, "images": args.images,
              "epochs": args.epochs, "batch_size": args.batch_size, "procs": args.procs, "device": device,
              "workers": distil["workers"], "precision": distil["precision"],
              "images_per_second": rate, "training_seconds": distil["throughput"]["seconds"],
              "recovery_seconds": round(total, 1), "images_written_seconds": round(written, 1),
              "heldout_agreement": distil["after"]["top1_agreement"],
              "imagenet_epoch_hours": round(IMAGENET_TRAIN / rate / 3600, 2) if rate else None,
              "torch": torch.__version__, "cpus": os.cpu_count()}
    print(f"{rate:.1f} images/s (distillation of ResNet-18 x{args.width:g} at 224x224, K={args.branches}, "
          f"{args.procs} process(es) on {device}, batch {args.batch_size}); one ImageNet epoch "
          f"({IMAGENET_TRAIN} images) would take {result['imagenet_epoch_hours']} h", flush=True)
    stem = args.name or f"recovery_gpu_{args.device}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (RESULTS / f"{stem}.md").write_text(
        "| device | processes | model | images | batch | precision | images/s | one ImageNet epoch |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {device} | {args.procs} | ResNet-18 x{args.width:g}, 224x224, K={args.branches} | {args.images} | "
        f"{args.batch_size} | {result['precision']} | {rate:.1f} | {result['imagenet_epoch_hours']} h |\n\n"
        f"`lcpc recover --data IMAGE_FOLDER --refit none --epochs {args.epochs}` on {args.images} JPEG images "
        f"(256x256, decoded and cropped to 224x224 by {distil['workers']} data-loader worker(s) per process); "
        f"images/s counts the distillation steps only (teacher and student forward, student backward); random "
        f"weights, so the accuracy figures mean nothing here. torch {torch.__version__}. From one run of "
        f"benchmarks/recovery_gpu.py.\n")


if __name__ == "__main__":
    main()
