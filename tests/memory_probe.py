"""Peak memory of recovery against the number of training images (run by
tests/test_recover_scale.py in a fresh process, so the peaks it reads are recovery's own).

    python tests/memory_probe.py recover N0 N1 N2 ...   # recover on a memory-mapped .npy of each size
    python tests/memory_probe.py read N                 # read a folder of N PNG images through a data loader

``recover`` converts a small 64x64 RGB CNN (K=2), then recovers it (the statistics refit and one
epoch of distillation, ``pipeline.recover`` as ``lcpc recover --refit stats`` runs it) on each number of training
inputs in turn, each a memory-mapped ``.npy``; ``read`` reads every image of a folder (in
subfolders) once, in training batches, through ``passes.recover.loader`` with a worker process.
Each prints one JSON line: the peak anonymous resident memory (``RssAnon``, sampled every few
milliseconds: the pages of a memory-mapped file belong to the page cache, which the kernel
reclaims, so ``ru_maxrss`` would count the file) during each run (``read``: before and during),
and the bytes the data would take in memory as float32 model inputs. Run it with
``MALLOC_MMAP_THRESHOLD_`` fixed, so glibc returns large freed blocks and one run's leftovers do
not blur the next run's peak. Memory flat in the number of images means the peaks do not grow
with it, however large the data.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import torch
from onnx import numpy_helper

from lcpc import pipeline
from lcpc.passes.recover.distil import Execution

SIDE = 64


def model() -> onnx.ModelProto:
    m = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3, {SIDE}, {SIDE}] input) => (float[1, 4] logits) {{
            a = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (input, w1, b1)
            r = Relu (a)
            c = Conv <pads = [1, 1, 1, 1], strides = [2, 2]> (r, w2, b2)
            s = Relu (c)
            p = GlobalAveragePool (s)
            f = Flatten (p)
            logits = Gemm <transB = 1> (f, w3, b3)
        }}""")
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 3, 3, 3), "b1": (8,), "w2": (16, 8, 3, 3), "b2": (16,), "w3": (4, 16), "b3": (4,)}
    for name, shape in shapes.items():
        m.graph.initializer.append(numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name))
    return m


def images(n: int, seed: int) -> np.ndarray:
    """``n`` smooth random RGB images (uint8, NHWC): cheap to write and decode."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)
    a, b, c = (rng.random((n, 1, 1, 3), dtype=np.float32) for _ in range(3))
    x = 255 * (a * ramp[None, :, None, None] + b * ramp[None, None, :, None] + c) / 3
    return x.astype(np.uint8)


def data(kind: str, n: int, folder: Path, seed: int, chunk: int = 500) -> Path:
    """``n`` training inputs on disk, written ``chunk`` at a time (the probe holds no more either)."""
    if kind == "npy":
        path = folder / f"train{n}.npy"
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, 3, SIDE, SIDE))
        for i in range(0, n, chunk):
            out[i:i + chunk] = images(min(chunk, n - i), seed + i).transpose(0, 3, 1, 2) / np.float32(255)
        out.flush()
        del out
        return path
    from PIL import Image

    root = folder / f"images{n}"
    for i in range(0, n, chunk):
        for j, img in enumerate(images(min(chunk, n - i), seed + i), i):
            sub = root / f"class{j % 4}"
            sub.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(sub / f"{j:06d}.png", compress_level=1)
    return root


class PeakAnon:
    """The highest ``RssAnon`` of this process seen while the block runs (sampled)."""

    def __enter__(self) -> PeakAnon:
        self.peak, self.running = anon(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, anon())
            time.sleep(0.003)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no RssAnon in /proc/self/status (Linux only)")


def recover(sizes: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        onnx.save(model(), root / "m.onnx")
        pipeline.convert(root / "m.onnx", root / "cut", 2, "none")
        peaks = []
        for i, n in enumerate(sizes):
            samples = pipeline.recovery_data(data("npy", n, root, i), None)
            with PeakAnon() as peak:
                pipeline.recover(root / "cut", samples, root / f"out{i}", epochs=1, batch_size=64, refit="stats",
                                 execution=Execution(device="cpu"))
            peaks.append(peak.peak)
            recorded = json.loads((root / f"out{i}" / "manifest.json").read_text())["fidelity"]["recovery"]["data"]
            assert recorded["samples"] == n and recorded["source"] == "npy", recorded
            (root / f"train{n}.npy").unlink()
    return {"peaks": peaks, "bytes": [n * 3 * SIDE * SIDE * 4 for n in sizes]}


def read(n: int) -> dict:
    from lcpc.images import Preprocessing
    from lcpc.passes.recover.loader import Batches

    with tempfile.TemporaryDirectory() as tmp:
        samples = pipeline.recovery_data(data("images", n, Path(tmp), 0), {"size": [SIDE, SIDE], "std": [255.0]})
        order = np.random.default_rng(0).permutation(n)
        before, total, seen = anon(), 0.0, 0
        with PeakAnon() as peak:
            for xb in Batches(samples, order, 64, workers=1):
                total += float(xb.sum())
                seen += len(xb)
        first = samples.take(order[:1])[0]
        j = int(Path(samples.files[order[0]]).stem)  # the image the file was written from
        pixels = images(500, j // 500 * 500)[j % 500]
        want = Preprocessing(size=(SIDE, SIDE), std=(255.0,)).normalize(pixels.transpose(2, 0, 1))
        assert seen == n and np.array_equal(first, want.astype(np.float32)), "the folder was not read as written"
    return {"before": before, "peak": peak.peak, "bytes": n * 3 * SIDE * SIDE * 4, "files": len(samples)}


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == "recover":
        print(json.dumps(recover([int(v) for v in sys.argv[2:]])))
    else:
        print(json.dumps(read(int(sys.argv[2]))))


if __name__ == "__main__":
    main()
