"""Compress a lowered program: int8 stages (``compress.quantize``) and int8 on the wire (``compress.wire``).

Both act after lowering, on the ``Program`` a target is about to write (layers:
... -> lower -> compress -> targets; nothing here imports a target).

Guarantees:
- ``check_calib`` refuses calibration data whose shape does not fit the model input
  (one ``LcpcError`` naming both shapes), before anything is written;
- ``run_program`` executes a program in-process in the one run order
  (``lcpc.runtime.order``, which the engines follow), and returns the model output and
  any values asked for — so
  calibration sees exactly the values the stages and the wire will carry;
- ``apply`` with ``quantize="int8"`` gives every stage the faster of float and int8
  (static U8S8 with data, dynamic without), measured (``compress.quantize.choose``);
  ``"int8-all"`` quantizes every stage that has weights, unmeasured; the stage's
  ``format`` records the choice and its reason; ``wire="int8"`` then puts every
  transfer in int8 (``compress.wire``), ranges calibrated on the data or, without data, on
  ``wire.DEFAULT_SAMPLES`` N(0, 1) inputs;
- ``compare`` gives the report's comparison rows: FLOPs, busiest device, weight bytes,
  stage-file bytes, wire bytes, and top-1 agreement / KL with the original on the data.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import numpy as np

from lcpc.calibrate import run_graph
from lcpc.compress import quantize as quant
from lcpc.compress import wire as wire_format
from lcpc.errors import LcpcError
from lcpc.fidelity import compare as fidelity
from lcpc.ir import to_onnx
from lcpc.lower import Program, Stage, Transfer
from lcpc.perf.costs import graph_costs
from lcpc.runtime.coding import CODINGS, pack
from lcpc.runtime.order import RunOrder
from lcpc.runtime.session import open_session

QUANTIZE = ("int8", "int8-all")
CALIB_SAMPLES = 64   # planned batches that calibrate the int8 stages
WIRE_SAMPLES = 256   # planned batches that calibrate the wire ranges


def check_calib(inputs: dict, data: np.ndarray | None) -> None:
    """``data`` fits the model ``inputs`` (name -> TensorInfo) as a batch of calibration inputs."""
    if data is None:
        return
    if len(inputs) != 1:
        raise LcpcError("--calib: calibration needs a single-input model")
    name, spec = next(iter(inputs.items()))
    step = spec.shape[0]
    if not isinstance(data, np.ndarray) or data.ndim != len(spec.shape) or \
            tuple(data.shape[1:]) != tuple(spec.shape[1:]) or len(data) == 0 or len(data) % step:
        shape = getattr(data, "shape", None)
        raise LcpcError(f"--calib: calibration array of shape {tuple(shape) if shape is not None else '?'} does "
                        f"not fit the model input '{name}' {list(spec.shape)} (expected (N, "
                        f"{', '.join(map(str, spec.shape[1:]))}) with N a multiple of {step})")
    if not np.issubdtype(data.dtype, np.number) or not np.isfinite(data).all():
        raise LcpcError("--calib: calibration data must be finite numbers")


def run_program(program: Program, data: np.ndarray, keep: set[tuple[int, str]] | None = None
                ) -> tuple[np.ndarray, dict[tuple[int, str], list[np.ndarray]]]:
    """Run ``program`` on every planned batch of ``data``: (first model output, values of ``keep``)."""
    check_calib(program.inputs, data)
    sessions = {s.id: open_session(to_onnx(s.graph).SerializeToString(), f"stage {s.id}") for s in program.stages}
    name, spec = next(iter(program.inputs.items()))
    x = data.astype(spec.dtype, copy=False)
    step = spec.shape[0]
    kept: dict[tuple[int, str], list[np.ndarray]] = defaultdict(list)
    outputs = []
    first_output = next(iter(program.outputs.values()))
    values: dict[tuple[int, str], np.ndarray] = {}

    def run_level(stages: tuple[Stage, ...]) -> None:
        for s in stages:
            feeds = {i: values[(s.device, i)] for i in s.graph.inputs}
            values.update({(s.device, o): v for o, v in zip(s.graph.outputs, sessions[s.id].run(s.graph.outputs,
                                                                                                 feeds))})

    def move(t: Transfer) -> None:
        values[(t.dst, t.dst_name)] = values[(t.src, t.src_name)]

    order = RunOrder(program.stages, program.transfers)
    for start in range(0, len(x), step):
        values.clear()
        values[(0, name)] = x[start:start + step]
        order.walk(run_level, move)
        for key in keep or ():
            kept[key].append(values[key])
        outputs.append(values[(0, first_output)])
    return np.concatenate(outputs), kept


def wire_params(program: Program, data: np.ndarray | None, per_channel: bool = False
                ) -> dict[tuple[int, str], wire_format.WireQuant]:
    source = "calibration"
    if data is None:
        spec = next(iter(program.inputs.values()))
        data = np.random.default_rng(0).standard_normal(
            (wire_format.DEFAULT_SAMPLES * spec.shape[0], *spec.shape[1:])).astype(spec.dtype)
        source = "default"
    keys = wire_format.sources(program)
    step = next(iter(program.inputs.values())).shape[0]
    _, values = run_program(program, data[:WIRE_SAMPLES * step], set(keys))
    params = {}
    for k in keys:
        v = np.concatenate(values[k])
        if per_channel and v.ndim >= 2 and v.shape[1] > 1:  # one scale per channel (axis 1)
            flat = np.moveaxis(v, 1, 0).reshape(v.shape[1], -1)
            params[k] = wire_format.WireQuant.from_range(flat.min(axis=1), flat.max(axis=1), source, axis=1)
        else:
            params[k] = wire_format.WireQuant.from_range(v.min(), v.max(), source)
    return params


def stage_feeds(program: Program, data: np.ndarray) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per stage, the feeds it sees on (up to ``CALIB_SAMPLES`` planned batches of) ``data``."""
    step = next(iter(program.inputs.values())).shape[0]
    data = data[:CALIB_SAMPLES * step]
    keys = {(s.device, i) for s in program.stages for i in s.graph.inputs}
    _, values = run_program(program, data, keys)
    n = len(data) // step
    return {s.id: [{i: values[(s.device, i)][r] for i in s.graph.inputs} for r in range(n)]
            for s in program.stages}


def apply(program: Program, quantize: str | None = None, wire: str = "fp32",
          calib: np.ndarray | None = None, code: str = "none") -> Program:
    """``program`` with int8 stages (``quantize``), an int8 wire (``wire``) and, with ``code``
    ``deflate``, every int8 message entropy-coded (``runtime.coding``), as asked."""
    if wire not in wire_format.WIRE_FORMATS:
        raise LcpcError(f"--wire {wire}: choose {' or '.join(wire_format.WIRE_FORMATS)}")
    if code not in CODINGS:
        raise LcpcError(f"--wire-code {code}: choose {' or '.join(CODINGS)}")
    if code != "none" and wire == "fp32":
        raise LcpcError(f"--wire-code {code} codes int8 messages: add --wire int8 or --wire int8-channel")
    if quantize is not None and quantize not in QUANTIZE:
        raise LcpcError(f"--quantize {quantize}: choose {' or '.join(QUANTIZE)}")
    check_calib(program.inputs, calib)
    if quantize is not None:
        quant.require()
        feeds = stage_feeds(program, calib) if calib is not None else {}
        stages = []
        for s in program.stages:
            if quantize == "int8-all":
                fmt = "int8" if calib is not None else "dynamic"
                graph = quant.quantize_graph(s.graph, fmt, feeds.get(s.id))
                choice = quant.Choice(fmt if quant.quantizable(s.graph) else "float",
                                      "--quantize int8-all" if quant.quantizable(s.graph)
                                      else "no Conv/Gemm/MatMul to quantize")
            else:
                candidates = ["int8"] if calib is not None else ["dynamic"]
                graph, choice = quant.choose(s.graph, candidates, feeds.get(s.id))
            stages.append(replace(s, graph=graph, format=choice))
        program = replace(program, stages=stages)
    if wire in ("int8", "int8-channel"):
        program = wire_format.quantize(program, wire_params(program, calib, per_channel=wire == "int8-channel"))
    if code == "deflate":
        program = coded(program, calib)
    return program


def coded(program: Program, data: np.ndarray | None) -> Program:
    """Every transfer whose coding shrinks it entropy-coded, with its mean coded size on (up to
    ``WIRE_SAMPLES`` planned batches of) ``data``, or, without data, on ``wire.DEFAULT_SAMPLES`` N(0, 1)
    inputs: the nominal bytes the manifest records (the engines count the real ones). A message that
    coding would not shrink on that data (a few values: DEFLATE's own bytes outweigh the gain) stays
    as it is, so coding never adds bytes to a plan."""
    spec = next(iter(program.inputs.values()))
    if data is None:
        data = np.random.default_rng(0).standard_normal(
            (wire_format.DEFAULT_SAMPLES * spec.shape[0], *spec.shape[1:])).astype(spec.dtype)
    keys = {(t.src, t.src_name) for t in program.transfers}
    _, values = run_program(program, data[:WIRE_SAMPLES * spec.shape[0]], keys)
    size = {k: max(1, round(float(np.mean([pack(v).nbytes for v in values[k]])))) for k in keys}
    return replace(program, transfers=[replace(t, coded_bytes=size[(t.src, t.src_name)])
                                       if size[(t.src, t.src_name)] < t.nbytes else t for t in program.transfers])


FIDELITY_SAMPLES = 512


def figures(program: Program) -> dict:
    """Compute, weights, file bytes and wire bytes of a program (per inference)."""
    per_device: dict[int, int] = defaultdict(int)
    flops = weight_bytes = file_bytes = 0
    for s in program.stages:
        c = graph_costs(s.graph)
        flops += c.flops
        per_device[s.device] += c.flops
        weight_bytes += c.weight_bytes
        file_bytes += len(to_onnx(s.graph).SerializeToString())
    formats = sorted({s.format.format for s in program.stages if s.format is not None})
    return {"flops": int(flops), "max_device_flops": int(max(per_device.values(), default=0)),
            "weight_bytes": int(weight_bytes), "file_bytes": int(file_bytes),
            "wire_bytes": int(program.bytes_per_inference()),
            "int8_stages": sum(1 for s in program.stages if s.format is not None and s.format.format != "float"),
            "stages": len(program.stages), **({"formats": formats} if formats else {})}


def compare(variants: dict[str, Program], original, calib: np.ndarray | None) -> dict:
    """The comparison table: the original graph next to each variant, fidelity on ``calib``."""
    c = graph_costs(original)
    rows: dict[str, dict[str, Any]] = {"original": {
        "flops": int(c.flops), "max_device_flops": int(c.flops), "weight_bytes": int(c.weight_bytes),
        "file_bytes": len(to_onnx(original).SerializeToString()), "wire_bytes": 0}}
    reference = None
    if calib is not None:
        step = next(iter(original.info(i) for i in original.inputs)).shape[0]
        calib = calib[:FIDELITY_SAMPLES * step]
        reference = run_graph(original, calib)
        rows["original"]["top1_agreement"] = 1.0
    for name, program in variants.items():
        rows[name] = figures(program)
        if reference is not None and calib is not None:
            out, _ = run_program(program, calib)
            f = fidelity(reference, out)
            rows[name]["top1_agreement"] = f["top1_agreement"]
            rows[name]["kl_divergence"] = f["kl_divergence"]
    return rows
