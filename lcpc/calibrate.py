"""Run a plan's graph on calibration data, as the plan would compute it.

Guarantees:
- ``run_graph`` feeds a batch through onnxruntime and returns the first output
  (``run_graph_values``: the tensors asked for), so passes can measure fidelity without lowering
  (``lcpc.weights.masked_graph`` gives the graph a cut plan computes);
- ``Runner`` does the same chunk by chunk (passes that accumulate statistics never hold
  all activations). A graph planned for batch 1 runs with a dynamic batch when that
  gives the same values (checked on the first chunk against one-at-a-time runs), else
  one sample at a time: the values never depend on which.
"""

from __future__ import annotations

import numpy as np

from lcpc.errors import LcpcError
from lcpc.ir import Graph, to_onnx
from lcpc.runtime.session import open_session


def run_graph(graph: Graph, data: np.ndarray) -> np.ndarray:
    """The first output of ``graph`` (single input) for every sample of ``data``."""
    return run_graph_values(graph, data, graph.outputs[:1])[0]


def run_graph_values(graph: Graph, data: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
    """The listed tensors (any activation of the graph) for every sample of ``data``."""
    if len(graph.inputs) != 1:
        raise LcpcError("calibration needs a single-input model")
    spec = graph.info(graph.inputs[0])
    step = spec.shape[0]
    if data.ndim != len(spec.shape) or tuple(data.shape[1:]) != tuple(spec.shape[1:]) or len(data) % step:
        raise LcpcError(f"calibration data of shape {tuple(data.shape)} does not fit the model input "
                        f"{spec.shape} (batch a multiple of {step})")
    if not np.isfinite(data).all():
        raise LcpcError("calibration data contains NaN or Inf")
    chunks = list(Runner(graph, list(outputs)).batches(data.astype(spec.dtype, copy=False), 256))
    return [np.concatenate([ch[j] for ch in chunks]) for j in range(len(outputs))]


class Runner:
    """One onnxruntime session for some tensors of a graph.

    A graph planned for batch 1 is run with a dynamic batch when that gives the same
    values (checked on the first chunk: a Reshape to a fixed batch would not), else one
    sample at a time."""

    def __init__(self, graph: Graph, outputs: list[str]) -> None:
        self.graph, self.outputs = graph, list(outputs)
        probe = to_onnx(graph.copy(outputs=self.outputs))
        self.step = graph.info(graph.inputs[0]).shape[0]
        self.session = _session(probe)
        self.batched = None
        if self.step == 1:
            probe = to_onnx(_rebatched(graph, self.outputs))
            del probe.graph.value_info[:]
            for v in list(probe.graph.input) + list(probe.graph.output):
                v.type.tensor_type.shape.dim[0].dim_param = "N"
            try:
                self.batched = _session(probe, quiet=True)
            except Exception:  # a shape the dynamic batch breaks: stay with one sample at a time
                self.batched = None

    def _per_sample(self, chunk: np.ndarray) -> list[np.ndarray]:
        runs = [self.session.run(self.outputs, {self.graph.inputs[0]: chunk[j:j + self.step]})
                for j in range(0, len(chunk), self.step)]
        return [np.concatenate([r[k] for r in runs]) for k in range(len(self.outputs))]

    def batches(self, x: np.ndarray, size: int = 64):
        """Yield, per chunk of about ``size`` samples, the list of output arrays."""
        size = max(self.step, size // self.step * self.step)
        for i in range(0, len(x), size):
            chunk = x[i:i + size]
            if self.batched is not None:
                try:
                    got = self.batched.run(self.outputs, {self.graph.inputs[0]: chunk})
                except Exception:
                    got = None
                if i == 0 and got is not None:
                    want = self._per_sample(chunk[:2])
                    if not all(g.shape[1:] == w.shape[1:] and np.allclose(g[:2], w, rtol=1e-4, atol=1e-5)
                               for g, w in zip(got, want)):
                        got = None
                if got is None:
                    self.batched = None
                else:
                    yield got
                    continue
            yield self._per_sample(chunk)


def _rebatched(graph: Graph, outputs: list[str]) -> Graph:
    """The graph with each Reshape that pins batch 1 reshaping to ``[-1, *its static output
    shape[1:]]`` instead (the batch follows the input)."""
    constants = dict(graph.constants)
    for node in graph.nodes:
        if node.op == "Reshape" and len(node.inputs) > 1 and node.inputs[1] in constants:
            shape, out = np.asarray(constants[node.inputs[1]]), graph.info(node.outputs[0]).shape
            if shape.ndim == 1 and len(shape) == len(out) and shape[0] == 1 and out and out[0] == 1:
                constants[node.inputs[1]] = np.array([-1, *out[1:]], dtype=shape.dtype)
    return graph.copy(outputs=outputs, constants=constants)


def _session(model, quiet: bool = False):
    return open_session(model.SerializeToString(), "the calibration graph", threads=None, quiet=quiet)
