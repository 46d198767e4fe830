"""int8 on the wire: every tensor that crosses devices travels as int8/uint8.

This step acts on a lowered ``Program`` (after ``lcpc.lower``, before a target writes
it): the wire format is a property of the messages, which only exist once the plan is
lowered. It imports nothing above ``lower`` (layers: ... -> lower -> wire -> targets).

Guarantees:
- every transfer carries ``WireQuant`` parameters (scale s, zero point z, dtype uint8
  when the calibrated range is non-negative, else int8) and its ``info`` is the int8
  tensor's, so ``Program.bytes_per_inference`` and the manifest count the real bytes;
- the quantisation sits inside the stage files as standard ONNX ops: the producing
  stage ends in ``QuantizeLinear`` (q = saturate(round(x / s) + z)), each receiving
  stage starts with ``DequantizeLinear`` (x' = (q - z) s); engines move int8 arrays
  and need no code of their own for it;
- the model input is sent quantised too: a new head stage at level 0 quantises it and
  every other stage moves one level later (the input transfers become level-0
  broadcasts); the head itself keeps computing on the float input;
- the range [lo, hi] (widened to hold 0, so zero is exact) is the min/max of the value
  on the calibration data; without data it is measured on ``DEFAULT_SAMPLES`` inputs
  drawn from N(0, 1) (the usual normalised image statistics) — ``source`` says which;
- |x - x'| <= s / 2 for every x inside the range (values outside are clipped).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lcpc.errors import LcpcError
from lcpc.ir import Graph, Node, TensorInfo
from lcpc.lower import Program, Stage
from lcpc.plan import HEAD

DEFAULT_SAMPLES = 16
WIRE_FORMATS = ("fp32", "int8", "int8-channel")


@dataclass(frozen=True)
class WireQuant:
    """Affine int8 quantisation of one message: x ~ (q - zero_point) * scale, with one scale and zero
    point for the whole tensor, or (``axis`` set) one per channel along ``axis``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    dtype: str  # "uint8" | "int8"
    source: str  # "calibration" | "default"
    axis: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("uint8", "int8"):
            raise ValueError(f"wire quantisation: dtype {self.dtype} is not uint8 or int8")
        lo, hi = (0, 255) if self.dtype == "uint8" else (-128, 127)
        if len(self.scale) != len(self.zero_point) or not self.scale or (self.axis is None) != (len(self.scale) == 1):
            raise ValueError(f"wire quantisation: {len(self.scale)} scales and {len(self.zero_point)} zero points "
                             f"for axis {self.axis}")
        for s, z in zip(self.scale, self.zero_point):
            if not (np.isfinite(s) and s > 0 and lo <= z <= hi):
                raise ValueError(f"wire quantisation: scale {s}, zero point {z} invalid for {self.dtype}")

    @classmethod
    def from_range(cls, lo: float | np.ndarray, hi: float | np.ndarray, source: str, axis: int | None = None
                   ) -> WireQuant:
        """The quantisation of values in [lo, hi] (widened to hold 0): per tensor, or with ``axis`` per
        channel (``lo`` and ``hi`` one per channel, one dtype for all: uint8 when none goes below 0)."""
        lo = np.minimum(np.atleast_1d(np.asarray(lo, np.float64)), 0.0)
        hi = np.maximum(np.atleast_1d(np.asarray(hi, np.float64)), 0.0)
        dtype = "uint8" if lo.min() >= 0 else "int8"
        qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
        scale = (hi - lo) / (qmax - qmin)
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)
        zero = np.clip(np.round(qmin - lo / scale), qmin, qmax).astype(int)
        return cls(tuple(float(s) for s in scale), tuple(int(z) for z in zero), dtype, source,
                   axis if len(scale) > 1 else None)

    def as_dict(self) -> dict:
        if self.axis is None:
            return {"scheme": "affine", "scale": self.scale[0], "zero_point": self.zero_point[0], "dtype": self.dtype,
                    "range_from": self.source}
        return {"scheme": "affine", "scale": list(self.scale), "zero_point": list(self.zero_point), "axis": self.axis,
                "dtype": self.dtype, "range_from": self.source}

    def _along(self, values: tuple, rank: int) -> np.ndarray:
        v = np.asarray(values)
        if self.axis is None:
            return v.reshape(())
        shape = [1] * rank
        shape[self.axis] = len(v)
        return v.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """What QuantizeLinear computes (round half to even, saturate)."""
        info = np.iinfo(self.dtype)
        q = np.rint(x / self._along(self.scale, x.ndim).astype(np.float32)) + self._along(self.zero_point, x.ndim)
        return np.clip(q, info.min, info.max).astype(self.dtype)


def sources(program: Program) -> list[tuple[int, str]]:
    """The (device, local name) of every value that is sent, in transfer order."""
    return list(dict.fromkeys((t.src, t.src_name) for t in program.transfers))


def quantize(program: Program, params: dict[tuple[int, str], WireQuant]) -> Program:
    """``program`` with every transfer in int8; ``params`` holds one entry per ``sources`` key."""
    missing = [k for k in sources(program) if k not in params]
    if missing:
        raise LcpcError(f"internal: no wire quantisation for sent values {missing[:3]}")
    if not program.transfers:
        return program
    shift = 1 if any(t.kind == "input" for t in program.transfers) else 0
    stages = [replace(s, id=f"d{s.device}_l{s.level + shift}", level=s.level + shift, graph=s.graph.copy())
              for s in program.stages]
    producer = {(s.device, o): s for s in stages for o in s.graph.outputs}
    if shift:
        sent_inputs = [name for (d, name) in sources(program)
                       if d == HEAD and name in program.inputs and (d, name) not in producer]
        opset = program.stages[0].graph.opset
        wire = Stage(f"d{HEAD}_l0", HEAD, 0, Graph([], list(sent_inputs), [], {n: program.inputs[n] for n in
                                                                                 sent_inputs}, {}, opset,
                                                 name=f"lcpc_d{HEAD}_l0"))
        stages.insert(0, wire)
        for name in sent_inputs:
            producer[(HEAD, name)] = wire
    qname: dict[tuple[int, str], str] = {}
    for key in sources(program):
        d, name = key
        stage = producer[key]
        q = params[key]
        qname[key] = _add_quantize(stage.graph, name, q)
        needed_here = any(name in s.graph.inputs for s in stages if s.device == d and s is not stage) or \
            (d == HEAD and name in program.outputs.values())
        if not needed_here:
            stage.graph.outputs.remove(name)
    transfers = []
    for t in program.transfers:
        q = params[(t.src, t.src_name)]
        info = TensorInfo(t.info.shape, np.dtype(q.dtype))
        dst = _receive(stages, t.dst, t.dst_name, q, info)
        kind, level = ("broadcast", 0) if t.kind == "input" else (t.kind, t.level + shift)
        transfers.append(replace(t, kind=kind, level=level, src_name=qname[(t.src, t.src_name)],
                                 dst_name=dst, info=info, quant=q))
    for s in stages:
        s.graph.reindex()
    return replace(program, stages=sorted(stages, key=lambda s: (s.level, s.device)), transfers=transfers,
                   outputs=dict(program.outputs), inputs=dict(program.inputs))


def _fresh(g: Graph, base: str) -> str:
    taken = set(g.tensors) | set(g.constants) | set(g.inputs) | {o for n in g.nodes for o in n.outputs}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}~{n}"
    return name


def _params(g: Graph, base: str, q: WireQuant) -> list[str]:
    scale, zero = _fresh(g, f"{base}.scale"), _fresh(g, f"{base}.zero_point")
    shape = () if q.axis is None else (len(q.scale),)
    g.constants[scale] = np.array(q.scale, np.float32).reshape(shape)
    g.constants[zero] = np.array(q.zero_point, q.dtype).reshape(shape)
    return [scale, zero]


def _axis(q: WireQuant) -> dict:
    return {} if q.axis is None else {"axis": q.axis}


def _add_quantize(g: Graph, name: str, q: WireQuant) -> str:
    if g.opset < (10 if q.axis is None else 13):
        raise LcpcError(f"--wire int8{'' if q.axis is None else '-channel'} needs opset "
                        f"{10 if q.axis is None else 13} or newer (QuantizeLinear); the model has opset {g.opset}")
    out = _fresh(g, f"{name}:q")
    g.nodes.append(Node(_fresh(g, f"QuantizeLinear:{out}"), "QuantizeLinear", [name] + _params(g, out, q), [out],
                        _axis(q)))
    g.tensors[out] = TensorInfo(g.info(name).shape, np.dtype(q.dtype))
    g.outputs.append(out)
    return out


def _receive(stages: list[Stage], device: int, name: str, q: WireQuant, info: TensorInfo) -> str:
    """Rename the received value to its int8 form in every stage of ``device`` that reads it,
    dequantising it first thing there."""
    users = [s for s in stages if s.device == device and name in s.graph.inputs]
    qname = f"{name}:q"
    for s in users:
        g = s.graph
        qname = f"{name}:q"
        if qname in g.tensors or qname in g.constants:
            raise LcpcError(f"internal: stage {s.id} already has a value named {qname}")
        g.inputs[g.inputs.index(name)] = qname
        g.tensors[qname] = info
        g.nodes.insert(0, Node(_fresh(g, f"DequantizeLinear:{name}"), "DequantizeLinear",
                               [qname] + _params(g, qname, q), [name], _axis(q)))
    return qname
