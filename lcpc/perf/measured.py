"""Compute time of stage files and of the original model, measured on this machine.

Guarantees: every figure is the median of ``repeat`` runs after one warm-up, one
onnxruntime thread per session (an edge device runs one stage at a time), on random
inputs of each input's declared shape and dtype (``runtime.feeds.random_feeds``); stage
sessions are built from the checked bytes (``manifest.read_stage``,
``session.open_stage``); nothing is written anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

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


_TYPES = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(double)": "float64"}


def model_time(model: str | Path, repeat: int = 20) -> float:
    """Seconds per run of an ONNX model file (batch dims pinned to 1 where dynamic)."""
    session = open_session(model, model)
    specs = [Tensor(i.name, tuple(d if isinstance(d, int) else 1 for d in i.shape), _TYPES.get(i.type, "float32"))
             for i in session.get_inputs()]
    return median_time(session, random_feeds(specs, np.random.default_rng(0)), repeat)
