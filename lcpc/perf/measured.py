"""Compute time of stage files and of the original model, measured on this machine.

Guarantees: every figure is the median of ``repeat`` runs after one warm-up, one
onnxruntime thread per session (an edge device runs one stage at a time), on random
inputs of each input's declared shape and dtype; stage sessions are built from the
checked bytes (``manifest.read_stage``, ``stage_session.open_stage``); nothing is
written anywhere.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lcpc import manifest as mf
from lcpc.errors import LcpcError
from lcpc.safety import first_line
from lcpc.stage_session import open_stage


def _random(shape, dtype: str, rng: np.random.Generator) -> np.ndarray:
    if np.issubdtype(np.dtype(dtype), np.integer):
        return rng.integers(0, 256, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def median_time(session: ort.InferenceSession, feeds: dict[str, np.ndarray], repeat: int) -> float:
    names = [o.name for o in session.get_outputs()]
    session.run(names, feeds)
    times = []
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        session.run(names, feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def stage_times(folder: str | Path, manifest: dict[str, Any], repeat: int = 20) -> dict[str, float]:
    """Seconds per run of every stage of ``folder``, by stage id."""
    rng = np.random.default_rng(0)
    out = {}
    for s in manifest["stages"]:
        session = open_stage(mf.read_stage(folder, s), s, Path(folder) / s["file"])
        feeds = {i["name"]: _random(i["shape"], i["dtype"], rng) for i in s["inputs"]}
        out[s["id"]] = median_time(session, feeds, repeat)
    return out


def model_time(model: str | Path, repeat: int = 20) -> float:
    """Seconds per run of an ONNX model file (batch dims pinned to 1 where dynamic)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise LcpcError(f"{model}: onnxruntime cannot load it: {first_line(exc)}") from None
    rng = np.random.default_rng(0)
    types = {"tensor(float)": "float32", "tensor(uint8)": "uint8", "tensor(double)": "float64"}
    feeds = {i.name: _random([d if isinstance(d, int) else 1 for d in i.shape], types.get(i.type, "float32"), rng)
             for i in session.get_inputs()}
    return median_time(session, feeds, repeat)
