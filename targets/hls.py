"""Target ``hls``: each branch stage of a written folder as one hls4ml project, for an FPGA.

    lcpc export-hls OUT -o HLS_DIR [--precision fixed<16,6>|from-int8] [--reuse R] [--board pynq-z2|--part P]

Guarantees:
- reads a written folder (``manifest.read``: schema, dataflow, sha256 of every stage) and
  never changes it; ``HLS_DIR`` appears atomically (``targets.onnx.new_folder``) or not at all;
- every stage with weights becomes one hls4ml project ``HLS_DIR/<stage id>/`` (Vitis HLS
  backend, ``io_stream``), channels-last as hls4ml expects: a stage input or output of shape
  ``[1, C, H, W]`` is ``H x W x C`` in the project (``layout: nhwc`` in ``hls.json``), conv
  weights are transposed to ``(kh, kw, c_in, c_out)``; a stage without weights (the head's
  merge: Sum, Concat) stays in software and runs from ``OUT`` with onnxruntime;
- each ONNX op maps through one table, ``LAYERS``, one entry per op; an op the table lacks,
  or a form of it that hls4ml cannot take (grouped conv, dilation, a Flatten of a spatial
  map that feeds anything but a Gemm, int8 stages quantized without ``--calib``), ends the
  export with one ``LcpcError`` naming the stage file, the node and the op, before anything
  is written (``check`` does that alone, without hls4ml);
- precision: ``fixed<W,I>`` for every activation and accumulator (rounded to nearest and
  saturated: ``fixed<W,I,RND,SAT>``, unless the modes are given), and for each layer's
  weights and biases ``W`` bits with the integer bits their largest magnitude needs;
  ``from-int8`` (a folder converted with ``--quantize int8-all --calib``): the int8 weights'
  8 bits, for each activation the fixed-point type that covers its int8 grid
  (``FixedType.covering``), ``fixed<16,6>`` where the plan holds no int8 scale, and for a
  conv, dense or average-pooling layer an accumulator that keeps every product exact and no
  partial sum overflowing (``Mapping.accum_type``); a QuantizeLinear -> DequantizeLinear
  pair whose grid starts at 0 clips negatives as onnxruntime does (a ReLU layer: the
  quantizer folds ReLUs into such grids), any other pair is no layer;
- ``hls.json`` records per project its layers (op, hls4ml layer, output shape, MACs, weight
  count and bits, reuse factor, precision) and totals with a DSP/BRAM estimate at the reuse
  factor (``estimate``), against the board's capacity when ``--board`` names one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lcpc.errors import LcpcError
from lcpc.ir import Graph, Node, from_onnx
from lcpc.runtime import manifest as mf
from lcpc.runtime.manifest import Stage
from lcpc.safety import first_line, printable
from lcpc.targets.onnx import new_folder

FORMAT, VERSION, FILE = "lcpc-hls", 1, "hls.json"
INSTALL_HINT = "export-hls needs hls4ml: pip install 'lcpc[hls]'"
DEFAULT_PRECISION = "fixed<16,6>"
# board -> (FPGA part, DSP slices, 18 Kb block RAMs)
BOARDS = {"pynq-z2": ("xc7z020clg400-1", 220, 280), "ultra96": ("xczu3eg-sbva484-1-e", 360, 432),
          "zcu104": ("xczu7ev-ffvc1156-2-e", 1728, 624)}
DSP_MIN_BITS = 10   # products whose narrower operand has fewer bits go to LUTs, not DSP slices
BRAM_MIN_DEPTH = 64  # weight banks shallower than this stay in LUTs or registers


# ----------------------------------------------------------------------------- fixed-point types
@dataclass(frozen=True)
class FixedType:
    """``fixed<width,integer,quantization,overflow>`` as hls4ml writes it (integer bits include the sign)."""

    width: int
    integer: int
    quantization: str = "RND"
    overflow: str = "SAT"

    PATTERN = re.compile(r"^\s*(?:ap_)?fixed<\s*(\d+)\s*,\s*(-?\d+)\s*(?:,\s*([A-Z_]+)\s*)?(?:,\s*([A-Z_]+)\s*)?>\s*$")
    MODES = ({"RND", "RND_ZERO", "RND_MIN_INF", "RND_INF", "RND_CONV", "TRN", "TRN_ZERO"},
             {"SAT", "SAT_ZERO", "SAT_SYM", "WRAP", "WRAP_SM"})

    @classmethod
    def parse(cls, text: str, what: str = "--precision") -> FixedType:
        m = cls.PATTERN.match(text)
        if not m:
            raise LcpcError(f"{what} '{printable(text, 60)}': expected fixed<W,I> (e.g. fixed<16,6>) or from-int8")
        width, integer = int(m[1]), int(m[2])
        quant, over = m[3] or "RND", m[4] or "SAT"
        if not 2 <= width <= 64 or not -width < integer <= width:
            raise LcpcError(f"{what} '{printable(text, 60)}': width 2..64 and integer bits at most the width")
        if quant not in cls.MODES[0] or over not in cls.MODES[1]:
            raise LcpcError(f"{what} '{printable(text, 60)}': quantization one of {sorted(cls.MODES[0])}, "
                            f"overflow one of {sorted(cls.MODES[1])}")
        return cls(width, integer, quant, over)

    def __str__(self) -> str:
        return f"fixed<{self.width},{self.integer},{self.quantization},{self.overflow}>"

    def with_integer(self, integer: int) -> FixedType:
        return FixedType(self.width, integer, self.quantization, self.overflow)

    @staticmethod
    def integer_bits(largest: float) -> int:
        """Integer bits (sign included) a signed type needs to hold values up to ``largest`` in magnitude."""
        return 1 if largest <= 0 else max(math.floor(math.log2(largest)) + 2, -30)

    def fitting(self, values: np.ndarray | None) -> FixedType:
        """This width, with the integer bits ``values`` need (weights: no overflow, every other bit fraction)."""
        largest = float(np.abs(values).max()) if values is not None and values.size else 0.0
        return self.with_integer(self.integer_bits(largest))

    @classmethod
    def covering(cls, scale: float, zero_point: int, dtype: str) -> FixedType:
        """The type that holds every value of an int8/uint8 grid ``scale * (q - zero_point)``: its fraction bits
        resolve ``scale``, its integer bits hold the grid's largest magnitude."""
        lo, hi = (0, 255) if dtype == "uint8" else (-128, 127)
        largest = scale * max(abs(lo - zero_point), abs(hi - zero_point))
        integer = cls.integer_bits(largest)
        fraction = max(math.ceil(-math.log2(scale)), 0) if scale > 0 else 0
        return cls(min(integer + fraction, 64), integer)


# ----------------------------------------------------------------------------- options and records
@dataclass(frozen=True)
class Options:
    precision: str = DEFAULT_PRECISION     # fixed<W,I> or from-int8
    reuse: int = 1
    part: str | None = None
    board: str | None = None
    clock_ns: float = 10.0

    @property
    def from_int8(self) -> bool:
        return self.precision == "from-int8"

    @property
    def default_type(self) -> FixedType:
        return FixedType.parse(DEFAULT_PRECISION if self.from_int8 else self.precision)

    @property
    def fpga_part(self) -> str:
        if self.board is not None:
            return BOARDS[self.board][0]
        return self.part or BOARDS["pynq-z2"][0]

    def check(self) -> None:
        if not self.from_int8:
            FixedType.parse(self.precision)
        if self.reuse < 1:
            raise LcpcError(f"--reuse {self.reuse}: the reuse factor is a positive integer (1: fully parallel)")
        if self.board is not None and self.board not in BOARDS:
            raise LcpcError(f"--board {printable(self.board, 40)}: choose one of {', '.join(BOARDS)}, or give --part")
        if self.board is not None and self.part is not None:
            raise LcpcError("--board names its FPGA part: give --board or --part, not both")


@dataclass
class Layer:
    """One hls4ml layer of a project, with what the estimate needs."""

    name: str
    op: str                 # the ONNX op it came from
    node: str
    spec: dict[str, Any]    # the hls4ml layer dict
    shape: tuple[int, ...]  # its output, channels-last, without the batch
    macs: int = 0
    weights: int = 0
    multipliers_r1: int = 0  # parallel multipliers at reuse 1
    weight_type: FixedType | None = None
    bias_type: FixedType | None = None
    result_type: FixedType | None = None
    accum_type: FixedType | None = None   # default: the result type
    reuse: int = 1

    def record(self) -> dict[str, Any]:
        dsp, bram = estimate(self)
        return {"name": self.name, "op": self.op, "node": self.node, "layer": self.spec["class_name"],
                "shape": list(self.shape), "macs": self.macs, "weights": self.weights,
                "weight_bits": self.weights * (self.weight_type.width if self.weight_type else 0),
                "reuse": self.reuse, "dsp": dsp, "bram18": bram,
                "precision": {k: str(v) for k, v in (("weight", self.weight_type), ("bias", self.bias_type),
                                                      ("result", self.result_type), ("accum", self.accum_type))
                              if v is not None}}


def estimate(layer: Layer) -> tuple[int, int]:
    """(DSP slices, 18 Kb block RAMs) of one layer at its reuse factor R, an estimate before synthesis:
    the layer has ``ceil(multipliers at R=1 / R)`` parallel multipliers (a conv in ``io_stream`` computes one
    output pixel at a time); each takes one DSP slice when both its operands are at least ``DSP_MIN_BITS``
    wide (narrower products go to LUTs); the weights sit in registers at R=1 and, at R > 1, in one bank per
    multiplier, ``R`` words deep, which takes block RAM (``ceil(bits / 18)`` per bank, one per 1024 words)
    once ``R >= BRAM_MIN_DEPTH``."""
    if not layer.multipliers_r1 or layer.weight_type is None:
        return 0, 0
    multipliers = math.ceil(layer.multipliers_r1 / layer.reuse)
    data = layer.result_type.width if layer.result_type else layer.weight_type.width
    dsp = multipliers if min(layer.weight_type.width, data) >= DSP_MIN_BITS else 0
    bram = 0
    if layer.reuse >= BRAM_MIN_DEPTH:
        bram = multipliers * math.ceil(layer.weight_type.width / 18) * math.ceil(layer.reuse / 1024)
    return dsp, bram


# ----------------------------------------------------------------------------- one stage -> layers
def _var(tensor: str) -> str:
    """An HLS variable name for an ONNX tensor name (a C identifier)."""
    return "t_" + re.sub(r"[^0-9A-Za-z_]", "_", tensor)


@dataclass
class Mapping:
    """What mapping one stage graph builds: its layers, and per ONNX tensor the HLS variable it is."""

    graph: Graph
    where: str
    options: Options
    layers: list[Layer] = field(default_factory=list)
    var: dict[str, str] = field(default_factory=dict)       # ONNX tensor -> HLS variable
    spatial_flat: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # flattened (C, H, W) maps
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    grids: dict[str, tuple[float, int, str]] = field(default_factory=dict)  # tensor -> int8 (scale, zp, dtype)

    def refuse(self, node: Node, why: str) -> LcpcError:
        return LcpcError(f"{self.where}: node '{printable(node.name, 120)}' (op {node.op}) cannot become an FPGA "
                         f"layer: {why}")

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self.graph.info(tensor).shape)

    def inputs(self, node: Node) -> list[str]:
        """The HLS variables of a node's activation inputs."""
        return [self.var[i] for i in node.inputs if i and i not in self.constants]

    def constant(self, node: Node, index: int) -> np.ndarray | None:
        if index >= len(node.inputs) or not node.inputs[index]:
            return None
        name = node.inputs[index]
        if name not in self.constants:
            raise self.refuse(node, f"input {index} ('{printable(name, 80)}') must be a constant (weights)")
        return self.constants[name]

    def result_type(self, tensor: str) -> FixedType:
        """An activation's type: covering its int8 grid (``from-int8``), else the chosen precision."""
        if self.options.from_int8 and tensor in self.grids:
            return FixedType.covering(*self.grids[tensor])
        return self.options.default_type

    def weight_types(self, weights: np.ndarray, bias: np.ndarray | None) -> tuple[FixedType, FixedType]:
        base = self.options.default_type
        if self.options.from_int8:
            base = base.__class__(8, 1, base.quantization, base.overflow)
        return base.fitting(weights), self.options.default_type.fitting(bias)

    def accum_type(self, node: Node, gain: float, fraction: int = 0,
                   bias: np.ndarray | None = None) -> FixedType | None:
        """``from-int8``: the accumulator of a layer whose every output sums input values times weights of
        total magnitude at most ``gain`` (a conv's or dense's largest row of weight magnitudes, a pool's
        window), plus ``bias``: every product exact (the input's fraction bits and ``fraction``, the
        weights') and no partial sum overflowing; None (the result type) for ``fixed<W,I>``."""
        if not self.options.from_int8:
            return None
        x = self.result_type(node.inputs[0])
        largest = gain * 2.0 ** (x.integer - 1) + (float(np.abs(bias).max(initial=0.0)) if bias is not None else 0.0)
        integer = FixedType.integer_bits(largest)
        return FixedType(min(integer + x.width - x.integer + fraction, 64), integer, x.quantization, x.overflow)

    def add(self, node: Node, spec: dict[str, Any], *, inputs: list[str] | None = None, var: str | None = None,
            **info: Any) -> None:
        """A layer computing the node's output (or ``var``, a step inside the node, of the output's shape)."""
        out = node.outputs[0]
        name = f"l{len(self.layers)}_{node.op.lower()}"
        if var is None:
            self.var[out] = var = _var(out)
        shape = nhwc(self.shape(out))
        spec = {"name": name, "inputs": inputs if inputs is not None else self.inputs(node), "outputs": [var],
                **spec}
        self.layers.append(Layer(name, node.op, node.name, spec, shape, result_type=self.result_type(out), **info))

    def producer(self, tensor: str) -> Layer | None:
        """The last layer that writes ``tensor``'s HLS variable (None: none does, e.g. a stage input)."""
        var = self.var[tensor]
        return next((layer for layer in reversed(self.layers) if layer.spec["outputs"] == [var]), None)

    def alias(self, node: Node, source: str) -> None:
        """The node's output is the same HLS variable as ``source`` (no layer)."""
        self.var[node.outputs[0]] = self.var[source]


def nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    """An ONNX activation shape ``(1, C[, H, W])`` as the project holds it, without the batch: ``(H, W, C)``."""
    return (*shape[2:], shape[1]) if len(shape) == 4 else tuple(shape[1:])


def _conv(m: Mapping, node: Node) -> None:
    w, b = m.constant(node, 1), m.constant(node, 2)
    x, y = m.shape(node.inputs[0]), m.shape(node.outputs[0])
    if w is None or len(x) != 4:
        raise m.refuse(node, "only 2-D convolutions with constant weights map")
    if any(d != 1 for d in node.attr("dilations", [1, 1])):
        raise m.refuse(node, "hls4ml's Conv2D has no dilation")
    if node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise m.refuse(node, "auto_pad: the folder's stages give explicit pads; convert again")
    group, c_in, c_out = int(node.attr("group", 1)), x[1], y[1]
    kh, kw = w.shape[2:]
    pads, strides = node.attr("pads", [0, 0, 0, 0]), node.attr("strides", [1, 1])
    common = dict(data_format="channels_last", in_height=x[2], in_width=x[3], n_chan=c_in, n_filt=c_out,
                  out_height=y[2], out_width=y[3], filt_height=kh, filt_width=kw, stride_height=strides[0],
                  stride_width=strides[1], pad_top=pads[0], pad_left=pads[1], pad_bottom=pads[2], pad_right=pads[3],
                  bias_data=b)
    wt, bt = m.weight_types(w, b)
    if group == 1:
        spec = dict(class_name="Conv2D", weight_data=np.ascontiguousarray(w.transpose(2, 3, 1, 0)), **common)
        mults = kh * kw * c_in * c_out
    elif group == c_in == c_out:
        spec = dict(class_name="DepthwiseConv2D", depth_multiplier=1,
                    weight_data=np.ascontiguousarray(w.transpose(2, 3, 0, 1)), **common)
        mults = kh * kw * c_in
    else:
        raise m.refuse(node, f"grouped convolution (group {group} of {c_in} channels): hls4ml maps group 1 and "
                             f"depthwise only")
    m.add(node, spec, macs=mults * y[2] * y[3], weights=int(w.size), multipliers_r1=mults, weight_type=wt,
          bias_type=bt, accum_type=m.accum_type(node, float(np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max()),
                                                wt.width - wt.integer, b))


def _dense(m: Mapping, node: Node) -> None:
    w = m.constant(node, 1)
    b = m.constant(node, 2) if node.op == "Gemm" else None
    if w is None or w.ndim != 2:
        raise m.refuse(node, "only a product with a constant 2-D weight maps (Dense)")
    if node.op == "Gemm":
        if node.attr("transA", 0) or node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0:
            raise m.refuse(node, "transA, alpha or beta other than the defaults")
        if node.attr("transB", 0):
            w = w.T
        if b is not None and b.size not in (1, w.shape[1]):
            raise m.refuse(node, f"bias of {b.size} values for {w.shape[1]} outputs")
        if b is not None:
            b = np.broadcast_to(b.reshape(-1), (w.shape[1],)).copy()
    source = node.inputs[0]
    if source in m.spatial_flat:  # rows in ONNX's (C, H, W) order; the project flattens (H, W, C)
        c, h, wd = m.spatial_flat[source]
        w = w.reshape(c, h, wd, -1).transpose(1, 2, 0, 3).reshape(c * h * wd, -1)
    wt, bt = m.weight_types(w, b)
    m.add(node, dict(class_name="Dense", weight_data=np.ascontiguousarray(w), bias_data=b, n_in=w.shape[0],
                     n_out=w.shape[1]), macs=int(w.size), weights=int(w.size), multipliers_r1=int(w.size),
          weight_type=wt, bias_type=bt, accum_type=m.accum_type(node, float(np.abs(w).sum(axis=0).max()),
                                                                wt.width - wt.integer, b))


def _activation(kind: str) -> Callable[[Mapping, Node], None]:
    def build(m: Mapping, node: Node) -> None:
        m.add(node, dict(class_name="Activation", activation=kind))
    return build


def _leaky_relu(m: Mapping, node: Node) -> None:
    m.add(node, dict(class_name="LeakyReLU", activation="leaky_relu", activ_param=float(node.attr("alpha", 0.01))))


def _merge(op: str) -> Callable[[Mapping, Node], None]:
    """Add/Sum (``op`` add) or Concat on the channel axis (``op`` concatenate): hls4ml merges two inputs,
    so n inputs become a chain of n - 1 layers."""
    def build(m: Mapping, node: Node) -> None:
        if any(i in m.constants for i in node.inputs):
            raise m.refuse(node, "an operand is a constant; hls4ml merges two activations")
        shape = m.shape(node.outputs[0])
        if op == "concatenate":
            axis = int(node.attr("axis", 1))
            if axis % len(shape) != 1:
                raise m.refuse(node, f"Concat on axis {axis}; only the channel axis maps")
        names = m.inputs(node)
        if len(names) == 1:
            m.alias(node, node.inputs[0])
            return
        if op == "concatenate" and len(names) > 2:
            raise m.refuse(node, "Concat of more than two inputs")
        spec: dict[str, Any] = dict(class_name="Merge", op="add") if op == "add" else \
            dict(class_name="Concatenate", op=f"concatenate{len(nhwc(shape))}d", axis=-1)
        current = names[0]
        for i, other in enumerate(names[1:], start=1):
            step = None if i == len(names) - 1 else f"{_var(node.outputs[0])}_{i}"
            m.add(node, spec, inputs=[current, other], var=step)
            current = m.layers[-1].spec["outputs"][0]
    return build


def _pool(kind: str) -> Callable[[Mapping, Node], None]:
    def build(m: Mapping, node: Node) -> None:
        x, y = m.shape(node.inputs[0]), m.shape(node.outputs[0])
        if len(x) != 4:
            raise m.refuse(node, "only 2-D pooling maps")
        kh, kw = node.attr("kernel_shape")
        pads, strides = node.attr("pads", [0, 0, 0, 0]), node.attr("strides", [1, 1])
        if node.attr("ceil_mode", 0) or any(d != 1 for d in node.attr("dilations", [1, 1])):
            raise m.refuse(node, "ceil_mode or dilations")
        if kind == "Average" and any(pads) and not node.attr("count_include_pad", 0):
            raise m.refuse(node, "padded average pooling that excludes the padding")
        m.add(node, dict(class_name=f"{kind}Pooling2D", data_format="channels_last", in_height=x[2], in_width=x[3],
                         n_filt=x[1], out_height=y[2], out_width=y[3], pool_height=kh, pool_width=kw,
                         stride_height=strides[0], stride_width=strides[1], pad_top=pads[0], pad_left=pads[1],
                         pad_bottom=pads[2], pad_right=pads[3], count_pad=bool(any(pads))),
              accum_type=m.accum_type(node, kh * kw) if kind == "Average" else None)
    return build


def _global_pool(kind: str) -> Callable[[Mapping, Node], None]:
    def build(m: Mapping, node: Node) -> None:
        x = m.shape(node.inputs[0])
        if len(x) != 4:
            raise m.refuse(node, "only 2-D global pooling maps")
        m.add(node, dict(class_name=f"Global{kind}Pooling2D", data_format="channels_last", in_height=x[2],
                         in_width=x[3], n_filt=x[1], keepdims=False),
              accum_type=m.accum_type(node, x[2] * x[3]) if kind == "Average" else None)
        m.layers[-1].shape = (x[1],)
    return build


def _flatten(m: Mapping, node: Node) -> None:
    """Flatten/Reshape to (1, n): free after a global pool; a spatial (C, H, W) map is flattened in the
    project's (H, W, C) order, which only a Gemm that follows can undo (its rows are reordered)."""
    source, out = node.inputs[0], node.outputs[0]
    x, y = m.shape(source), m.shape(out)
    if len(y) != 2 or y[0] != x[0]:
        raise m.refuse(node, f"only a reshape to (batch, features) maps, not {list(x)} -> {list(y)}")
    held = m.layers[-1].shape if m.layers and m.layers[-1].spec["outputs"] == [m.var[source]] else None
    if len(x) == 2 or (len(x) == 4 and x[2] * x[3] == 1 and held == (x[1],)):
        m.alias(node, source)
        return
    if len(x) == 4:
        for consumer in m.graph.consumers(out):
            if consumer.op not in ("Gemm", "MatMul"):
                raise m.refuse(node, f"a flattened {x[1]}x{x[2]}x{x[3]} map feeds '{printable(consumer.name, 80)}' "
                                     f"(op {consumer.op}); in channels-last order only a Gemm can follow it")
        if out in m.graph.outputs:
            raise m.refuse(node, "a flattened spatial map is a stage output; its order would differ from ONNX's")
        m.spatial_flat[out] = (x[1], x[2], x[3])
    m.add(node, dict(class_name="Reshape", target_shape=[int(np.prod(x[1:]))]), inputs=m.inputs(node)[:1])


def _identity(m: Mapping, node: Node) -> None:
    m.alias(node, node.inputs[0])


def _grid(m: Mapping, node: Node) -> tuple[float, int, str]:
    """A QuantizeLinear's int8 grid ``(scale, zero point, dtype)``; refuses the forms that do not map."""
    scale, zp = m.constant(node, 1), m.constant(node, 2)
    consumers = m.graph.consumers(node.outputs[0])
    if scale is None or scale.size != 1 or not consumers or any(c.op != "DequantizeLinear" for c in consumers):
        raise m.refuse(node, "only per-tensor QuantizeLinear -> DequantizeLinear pairs of a --calib int8 plan map")
    if node.outputs[0] in m.graph.outputs:
        raise m.refuse(node, "int8 on the wire (--wire int8): export a folder converted with --wire fp32")
    dtype = str(zp.dtype) if zp is not None else "uint8"
    return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]) if zp is not None else 0, dtype


def _grids(m: Mapping) -> None:
    """Every activation's int8 grid, before any layer is built: a layer's result type is the grid of the
    tensor it computes (``from-int8``), and the QuantizeLinear comes after that layer."""
    for node in m.graph.nodes:
        if node.op == "QuantizeLinear":
            grid = _grid(m, node)
            rounded = [c.outputs[0] for c in m.graph.consumers(node.outputs[0])]
            for tensor in [node.inputs[0], node.outputs[0], *rounded]:
                m.grids[tensor] = grid


def _quantize(m: Mapping, node: Node) -> None:
    """QuantizeLinear of an activation, followed by DequantizeLinear: the pair clips to its grid. A grid that
    starts at 0 (zero point at the type's lowest value; where onnxruntime's quantizer folds a ReLU) clips
    negatives, so the pair becomes a ReLU layer; any other pair is no layer (its clipping is at calibrated
    bounds). Its grid sets the types of the activations it rounds (``from-int8``)."""
    _, zp, dtype = m.grids[node.outputs[0]]  # read and checked by _grids
    if node.inputs[0] in m.constants:
        return
    if zp == (0 if dtype == "uint8" else -128):
        clipped = m.producer(node.inputs[0])
        m.add(node, dict(class_name="Activation", activation="relu"))
        if clipped is not None:  # shaped as the layer it clips holds it (a global pool's (C,))
            m.layers[-1].shape = clipped.shape
    else:
        m.alias(node, node.inputs[0])


def _dequantize(m: Mapping, node: Node) -> None:
    """DequantizeLinear of int8 weights: folded into float weights; of a quantized activation: no layer."""
    source = node.inputs[0]
    if source in m.constants:
        q, scale, zp = m.constants[source].astype(np.float64), m.constant(node, 1), m.constant(node, 2)
        if scale is None:
            raise m.refuse(node, "no scale")
        axis = int(node.attr("axis", 1))
        shape = [1] * q.ndim
        if scale is not None and scale.size > 1:
            shape[axis] = scale.size
        zero = 0.0 if zp is None else zp.astype(np.float64).reshape(shape if zp.size > 1 else [1] * q.ndim)
        m.constants[node.outputs[0]] = ((q - zero) * scale.astype(np.float64).reshape(shape)).astype(np.float32)
        return
    producer = m.graph.producer(source)
    if producer is None or producer.op != "QuantizeLinear":
        raise m.refuse(node, "int8 on the wire (--wire int8): export a folder converted with --wire fp32")
    m.alias(node, source)


# ONNX op -> how it becomes hls4ml layers (the one table; an op missing here is refused by name)
LAYERS: dict[str, Callable[[Mapping, Node], None]] = {
    "Conv": _conv, "Gemm": _dense, "MatMul": _dense,
    "Relu": _activation("relu"), "Sigmoid": _activation("sigmoid"), "Tanh": _activation("tanh"),
    "LeakyRelu": _leaky_relu,
    "Add": _merge("add"), "Sum": _merge("add"), "Concat": _merge("concatenate"),
    "MaxPool": _pool("Max"), "AveragePool": _pool("Average"),
    "GlobalAveragePool": _global_pool("Average"), "GlobalMaxPool": _global_pool("Max"),
    "Flatten": _flatten, "Reshape": _flatten, "Identity": _identity, "Dropout": _identity,
    "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
}


def map_stage(graph: Graph, where: str, options: Options) -> Mapping:
    """The hls4ml layers of one stage graph (refuses, by node and op, what does not map)."""
    m = Mapping(graph, where, options, constants=dict(graph.constants))
    if options.from_int8 and not any(n.op == "QuantizeLinear" for n in graph.nodes):
        raise LcpcError(f"{where}: --precision from-int8 needs int8 stages with fixed ranges: convert with "
                        f"--quantize int8-all --calib X.npy, or give --precision fixed<W,I>")
    _grids(m)
    for name in graph.inputs:
        m.var[name] = _var(name)
    for node in graph.nodes:
        build = LAYERS.get(node.op)
        if build is None or node.domain not in ("", "ai.onnx"):
            raise m.refuse(node, f"hls4ml has no layer for it (mapped: {', '.join(sorted(LAYERS))})")
        if not node.outputs or not node.inputs:
            raise m.refuse(node, "no input or output")
        build(m, node)
    for out in graph.outputs:
        if out in graph.inputs or out not in m.var or m.producer(out) is None:
            raise LcpcError(f"{where}: stage output '{printable(out, 80)}' is not computed on the FPGA")
    return m


# ----------------------------------------------------------------------------- export
def stage_graph(folder: Path, stage: Stage) -> Graph:
    """The stage's graph, from the checked bytes of its file."""
    return from_onnx(onnx.load_from_string(mf.read_stage(folder, stage)))


# ops that carry a layer's weights: a stage with one runs on the FPGA
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger", "QLinearConv",
                "QLinearMatMul"}


def is_hardware(graph: Graph) -> bool:
    """A stage with a weighted layer (Conv, Gemm, MatMul) runs on the FPGA; one without (a merge: Sum, Concat,
    a bias) stays in software."""
    return any(n.op in WEIGHTED_OPS for n in graph.nodes)


def check(folder: str | Path, options: Options) -> dict[str, Mapping]:
    """Every hardware stage's mapping, or the ``LcpcError`` of the first one that does not map (no hls4ml)."""
    options.check()
    folder = Path(folder)
    manifest = mf.read(folder)
    graphs = {s.id: (s, stage_graph(folder, s)) for s in manifest.stages}
    return {sid: map_stage(graph, printable(folder / s.file), options)
            for sid, (s, graph) in graphs.items() if is_hardware(graph)}


def export(folder: str | Path, out: str | Path, options: Options, force: bool = False) -> dict[str, Any]:
    """Write ``out`` (see the module docstring); returns what ``hls.json`` holds."""
    folder, out = Path(folder), Path(out)
    mappings = check(folder, options)  # refuses before hls4ml is imported or anything is written
    manifest = mf.read(folder)
    try:
        from hls4ml.model import ModelGraph
        from hls4ml.utils.config import create_config
    except ImportError:
        raise LcpcError(INSTALL_HINT) from None
    stages = []
    with new_folder(out, force) as tmp:
        for stage in manifest.stages:
            if stage.id not in mappings:
                stages.append(_software(stage))
                continue
            m = mappings[stage.id]
            config = create_config(output_dir=str(tmp / stage.id), project_name=stage.id, backend="Vitis",
                                   io_type="io_stream", part=options.fpga_part, clock_period=options.clock_ns)
            config["HLSConfig"] = {"Model": {"Precision": str(options.default_type), "ReuseFactor": options.reuse,
                                             "Strategy": "Latency" if options.reuse == 1 else "Resource"},
                                   "LayerName": {layer.name: _layer_config(layer) for layer in m.layers}}
            specs = [{"name": m.var[i], "class_name": "InputLayer", "input_shape": list(nhwc(m.shape(i)))}
                     for i in m.graph.inputs]
            outputs = [layer.name for o in m.graph.outputs if (layer := m.producer(o)) is not None]  # map_stage: all
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    model = ModelGraph.from_layer_list(config, specs + [layer.spec for layer in m.layers],
                                                       [m.var[i] for i in m.graph.inputs], outputs)
                    model.write()
            except Exception as exc:
                raise LcpcError(f"{printable(folder / stage.file)}: hls4ml cannot build the project for stage "
                                f"{stage.id}: {first_line(exc)}") from None
            for layer in m.layers:  # the reuse factor hls4ml settled on (it moves to a valid one)
                if layer.name in model.graph:
                    layer.reuse = int(model.graph[layer.name].get_attr("reuse_factor", options.reuse) or 1)
            stages.append(_project_record(stage, m))
        record = {"format": FORMAT, "version": VERSION, "source": {"folder": str(folder.resolve()),
                                                                   "manifest_sha256": _sha256(folder / mf.MANIFEST)},
                  "backend": "Vitis", "io_type": "io_stream", "part": options.fpga_part, "board": options.board,
                  "precision": options.precision if options.from_int8 else str(options.default_type),
                  "reuse": options.reuse, "clock_ns": options.clock_ns, "stages": stages}
        (tmp / FILE).write_text(json.dumps(record, indent=1))
    return record


def _layer_config(layer: Layer) -> dict[str, Any]:
    precision = {"result": str(layer.result_type), "accum": str(layer.accum_type or layer.result_type)}
    if layer.weight_type is not None:
        precision.update(weight=str(layer.weight_type), bias=str(layer.bias_type))
    return {"Precision": precision}


def _software(stage: Stage) -> dict[str, Any]:
    return {"id": stage.id, "device": stage.device, "level": stage.level, "kind": "software", "file": stage.file}


def _project_record(stage: Stage, m: Mapping) -> dict[str, Any]:
    layers = [layer.record() for layer in m.layers]
    io_ = {kind: [{"name": t, "shape": list(m.shape(t)), "project_shape": list(nhwc(m.shape(t))),
                   "layout": "nhwc" if len(m.shape(t)) == 4 else "nc"} for t in names]
           for kind, names in (("inputs", m.graph.inputs), ("outputs", m.graph.outputs))}
    totals = {k: sum(layer[k] for layer in layers) for k in ("macs", "weights", "weight_bits", "dsp", "bram18")}
    return {"id": stage.id, "device": stage.device, "level": stage.level, "kind": "hls", "project": stage.id,
            "file": stage.file, **io_, "layers": layers, "totals": totals}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- the per-branch table
def table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per hardware project: MACs, weights and their bits, DSP/BRAM estimate (and the board's share)."""
    capacity = BOARDS.get(record.get("board") or "")
    rows = []
    for s in record["stages"]:
        if s["kind"] != "hls":
            continue
        t = s["totals"]
        row = {"project": s["project"], "device": s["device"], "layers": len(s["layers"]), **t}
        if capacity:
            row["dsp_share"] = t["dsp"] / capacity[1]
            row["bram_share"] = t["bram18"] / capacity[2]
        rows.append(row)
    return rows


def render_table(record: dict[str, Any]) -> str:
    """The per-branch table as Markdown."""
    rows = table(record)
    board = record.get("board")
    head = "| project | device | layers | MACs | weights | weight bits | DSP (est.) | BRAM18 (est.) |"
    lines = [head + (f" of {board} |" if board else ""), "|---" * (8 + bool(board)) + "|"]
    for r in rows:
        line = (f"| {r['project']} | dev{r['device']} | {r['layers']} | {r['macs']:,} | {r['weights']:,} | "
                f"{r['weight_bits']:,} | {r['dsp']} | {r['bram18']} |")
        if board:
            line += f" {100 * r['dsp_share']:.0f}% DSP, {100 * r['bram_share']:.0f}% BRAM |"
        lines.append(line)
    software = [s["id"] for s in record["stages"] if s["kind"] == "software"]
    lines.append("")
    lines.append(f"precision {record['precision']}, reuse factor {record['reuse']}, part {record['part']}, "
                 f"{record['io_type']}; in software (onnxruntime): {', '.join(software) or 'nothing'}")
    return "\n".join(lines)
