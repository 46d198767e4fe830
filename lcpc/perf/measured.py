"""Compute time of stage files and of the original model, measured on this machine.

Guarantees: every figure is the median of ``repeat`` runs after one warm-up, one
onnxruntime thread per session (an edge device runs one stage at a time), on random
inputs of each input's declared shape and dtype (``runtime.feeds.random_feeds``); stage
sessions are built from the checked bytes (``manifest.read_stage``,
``session.open_stage``); nothing is written anywhere.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lcpc.images import Preprocessing, decode, image_files, read_file
from lcpc.perf.network import ImageCost
from lcpc.runtime import manifest as mf
from lcpc.runtime.feeds import random_feeds
from lcpc.runtime.manifest import Manifest, Tensor
from lcpc.runtime.session import open_session, open_stage


def median_time(session: ort.InferenceSession, feeds: dict[str, np.ndarray], repeat: int) -> float:
    names = [o.name for o in session.get_outputs()]
    session.run(names, feeds)
    times = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def stage_times(folder: str | Path, manifest: Manifest, repeat: int = 20) -> dict[str, float]:
    """Seconds per run of every stage of ``folder``, by stage id."""
    rng = np.random.default_rng(0)
    out = {}
    for s in manifest.stages:
        session = open_stage(mf.read_stage(folder, s), s, Path(folder) / s.file)
        out[s.id] = median_time(session, random_feeds(s.inputs, rng), repeat)
    return out


def image_cost(manifest: Manifest, images: Path | None = None, runs: int = 5) -> ImageCost:
    """An encoded image's cost for the network model: with ``images`` (a folder of the camera's JPEG/PNG
    files), the median file size and the median time to decode one here; else the manifest's nominal
    size and a generated photo-like JPEG of the input's size (noise over a gradient, quality 90)."""
    prep = Preprocessing.from_dict(dict(manifest.preprocessing or {}))
    if images is not None:
        blobs = [read_file(Path(images), p) for p in image_files(images)]
    else:
        blobs = [synthetic_jpeg(prep)]
    seconds = []
    for blob in blobs:
        decode(blob, prep)  # warm
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            decode(blob, prep)
            times.append(time.perf_counter() - start)
        seconds.append(float(np.median(times)))
    size = int(np.median([len(b) for b in blobs])) if images is not None else \
        int(manifest.json["source"]["encoded"]["nominal_bytes"])
    return ImageCost(size, float(np.median(seconds)))


def synthetic_jpeg(prep: Preprocessing) -> bytes:
    """A photo-like JPEG a little larger than the input (so decoding resizes it), from a fixed seed."""
    from PIL import Image

    h, w = (int(s * 1.15) for s in prep.size)
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, h * w * 3).reshape(h, w, 3)
    pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert("L" if prep.channels == "L" else "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(double)": "float64"}


def model_time(model: str | Path, repeat: int = 20) -> float:
    """Seconds per run of an ONNX model file (batch dims pinned to 1 where dynamic)."""
    session = open_session(model, model)
    specs = [Tensor(i.name, tuple(d if isinstance(d, int) else 1 for d in i.shape), _TYPES.get(i.type, "float32"))
             for i in session.get_inputs()]
    return median_time(session, random_feeds(specs, np.random.default_rng(0)), repeat)
