"""Quantize pass: int8 stage graphs with onnxruntime's quantization tools.

Why it acts on stage graphs: int8 formats are chosen by *measuring* each stage
(below), and stages only exist once the plan is lowered. So this pass maps one IR
``Graph`` to another and knows nothing of plans or programs; ``lcpc.compress``
applies it to every stage of a lowered ``Program`` before the onnx target writes it.
The layers stay frontend -> analysis -> plan -> passes -> lower -> compress -> targets.

Formats (``FORMATS``):
- ``float``: the stage as lowered;
- ``int8``: static QDQ, uint8 activations (calibrated min/max) and per-channel int8
  weights (U8S8) — the format x86 runs fast for narrow convs;
- ``int8-s8s8``: static QDQ, int8 activations and weights (onnxruntime's default);
- ``dynamic``: dynamic quantization, no calibration data: int8 weights, activation
  ranges computed per inference (DynamicQuantizeLinear + ConvInteger/MatMulInteger).

Guarantees:
- every result is standard ONNX (default domain only) that loads in onnxruntime;
  its inputs and outputs keep their names, shapes and dtypes, so the manifest's
  dataflow does not change; internal names are shortened (a file's bytes are its weights);
- ``choose`` times the candidates and the float graph on one thread, interleaved, in
  one run (best of at least 9 runs each), and keeps the fastest; a stage int8 would slow down stays ``float``, and
  the ``Choice`` says so with the measured times;
- a stage without Conv/Gemm/MatMul stays ``float`` (nothing to quantize).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from lcpc.errors import LcpcError
from lcpc.ir import Graph, from_onnx, tensor_infos, to_onnx
from lcpc.runtime.session import open_session

FORMATS = ("float", "int8", "int8-s8s8", "dynamic")
QUANTIZABLE = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass(frozen=True)
class Choice:
    """Which format one stage got, and why."""

    format: str
    reason: str
    seconds: dict = field(default_factory=dict)  # format -> seconds per run (best of the runs), as measured

    def as_dict(self) -> dict:
        return {"format": self.format, "reason": self.reason,
                "seconds": {k: float(f"{v:.4g}") for k, v in self.seconds.items()}}


def available() -> bool:
    try:
        import onnxruntime.quantization  # noqa: F401
    except Exception:
        return False
    return True


def require() -> None:
    if not available():
        raise LcpcError("--quantize int8 needs onnxruntime's quantization tools (onnxruntime.quantization), "
                        "which this onnxruntime lacks; install the full onnxruntime package")


def quantizable(graph: Graph) -> bool:
    return any(n.op in QUANTIZABLE for n in graph.nodes)


def quantize_graph(graph: Graph, fmt: str, calib: list[dict[str, np.ndarray]] | None = None) -> Graph:
    """``graph`` in format ``fmt``; static formats need ``calib`` (feeds for the graph's inputs)."""
    if fmt == "float" or not quantizable(graph):
        return graph
    if fmt not in FORMATS:
        raise LcpcError(f"unknown stage format {fmt}; choose from {', '.join(FORMATS)}")
    require()
    from onnxruntime import quantization as q

    logging.getLogger().setLevel(logging.ERROR)  # the tools warn about pre-processing on every call
    with tempfile.TemporaryDirectory(prefix="lcpc-quant-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(to_onnx(graph), src)
        if fmt == "dynamic":
            q.quantize_dynamic(src, dst, weight_type=q.QuantType.QInt8, per_channel=False)
        else:
            if not calib:
                raise LcpcError(f"stage format {fmt} needs calibration data (--calib)")
            activations = q.QuantType.QUInt8 if fmt == "int8" else q.QuantType.QInt8
            q.quantize_static(src, dst, _Reader(calib), quant_format=q.QuantFormat.QDQ, per_channel=True,
                              activation_type=activations, weight_type=q.QuantType.QInt8,
                              calibrate_method=q.CalibrationMethod.MinMax)
        model = onnx.shape_inference.infer_shapes(onnx.load_model(dst), strict_mode=True)
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise LcpcError(f"internal: quantized stage {graph.name} uses a non-standard domain")
    infos = dict(graph.tensors)
    infos.update(tensor_infos(model))
    result = from_onnx(model, infos)
    result.name = graph.name
    return _short_names(result)


def choose(graph: Graph, candidates: list[str], calib: list[dict[str, np.ndarray]] | None,
           repeat: int | None = None) -> tuple[Graph, Choice]:
    """The fastest of ``float`` and ``candidates`` for this stage, measured."""
    if not quantizable(graph):
        return graph, Choice("float", "no Conv/Gemm/MatMul to quantize")
    variants = {"float": graph}
    for fmt in candidates:
        variants[fmt] = quantize_graph(graph, fmt, calib)
    feeds = calib[0] if calib else {i: np.random.default_rng(0).standard_normal(graph.info(i).shape)
                                    .astype(graph.info(i).dtype) for i in graph.inputs}
    seconds = measure(variants, feeds, repeat)
    best = min(seconds, key=lambda f: seconds[f])
    if best == "float":
        fastest = min((f for f in seconds if f != "float"), key=lambda f: seconds[f])
        reason = f"int8 would slow it down ({fastest} x{seconds['float'] / seconds[fastest]:.2f}): kept float"
    else:
        reason = f"{best} x{seconds['float'] / seconds[best]:.2f} faster than float"
    return variants[best], Choice(best, reason, seconds)


def measure(variants: dict[str, Graph], feeds: dict[str, np.ndarray], repeat: int | None = None) -> dict[str, float]:
    """Seconds per run of each variant: one thread, runs interleaved in one loop, the fastest
    run of each (the one least disturbed by other load on the machine)."""
    sessions = {k: open_session(to_onnx(g).SerializeToString(), f"the {k} variant") for k, g in variants.items()}
    for s in sessions.values():  # warm-up, and a first estimate of the run time
        start = time.perf_counter()
        s.run(None, feeds)
        first = time.perf_counter() - start
    if repeat is None:
        repeat = int(np.clip(0.5 / max(first, 1e-6), 9, 200))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeat):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - start)
    return {k: float(np.min(v)) for k, v in times.items()}


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.feeds):
            return None
        self.pos += 1
        return self.feeds[self.pos - 1]

    def rewind(self) -> None:
        self.pos = 0

    def __len__(self) -> int:
        return len(self.feeds)


def _short_names(g: Graph) -> Graph:
    """Rename internal tensors, constants and nodes to short names (keeps inputs and outputs)."""
    keep = set(g.inputs) | set(g.outputs)
    names: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in names:
            names[name] = f"{'w' if name in g.constants else 't'}{len(names)}"
        return names[name]

    nodes = []
    for i, n in enumerate(g.nodes):
        nodes.append(type(n)(f"n{i}", n.op, [rename(x) for x in n.inputs], [rename(x) for x in n.outputs],
                             dict(n.attrs), n.domain))
    used = {x for n in g.nodes for x in n.inputs + n.outputs if x} | keep
    tensors = {rename(t): info for t, info in g.tensors.items() if t in used and t not in g.constants}
    constants = {rename(c): v for c, v in g.constants.items()}
    return g.copy(nodes=nodes, tensors=tensors, constants=constants)
