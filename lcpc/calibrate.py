"""Run a plan's graph on calibration data, as the plan would compute it.

Guarantees:
- ``run_graph`` feeds a batch through onnxruntime in slices of the graph's planned
  batch and returns the first output, so passes can measure fidelity without lowering
  (``lcpc.weights.masked_graph`` gives the graph a cut plan computes).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from lcpc.errors import LcpcError
from lcpc.ir import Graph, to_onnx


def run_graph(graph: Graph, data: np.ndarray, outputs: list[str] | None = None) -> np.ndarray | list[np.ndarray]:
    """For every sample of ``data`` (single-input graphs): the first output, or the listed
    tensors (any activation of the graph) when ``outputs`` is given."""

    if len(graph.inputs) != 1:
        raise LcpcError("calibration needs a single-input model")
    spec = graph.info(graph.inputs[0])
    step = spec.shape[0]
    if data.ndim != len(spec.shape) or tuple(data.shape[1:]) != tuple(spec.shape[1:]) or len(data) % step:
        raise LcpcError(f"calibration data of shape {tuple(data.shape)} does not fit the model input "
                        f"{spec.shape} (batch a multiple of {step})")
    if not np.isfinite(data).all():
        raise LcpcError("calibration data contains NaN or Inf")
    names = outputs or graph.outputs[:1]
    probe = Graph(graph.nodes, graph.inputs, list(names), graph.tensors, graph.constants, graph.opset,
                  dict(graph.extra_opsets), graph.name)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(to_onnx(probe).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = data.astype(spec.dtype, copy=False)
    runs = [sess.run(names, {graph.inputs[0]: x[i:i + step]}) for i in range(0, len(x), step)]
    values = [np.concatenate([r[j] for r in runs]) for j in range(len(names))]
    return values if outputs else values[0]
