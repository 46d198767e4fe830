"""Load any ONNX CNN into lcpc's static-shaped IR.

Guarantees, in order:
1. the bytes parse as an ONNX model (at most 2 GiB), or :class:`LcpcError` says the file
   is not ONNX; every stored tensor holds exactly the data its dims and type call for;
2. external-data tensors (in subgraphs and functions too) are read only from regular
   files inside the model's folder, after every location, offset and length has been
   checked; a location that leaves the folder (``..``, absolute, symlink) is refused
   and never opened;
3. opsets 9..16 are upgraded to opset 17 with onnx's version converter;
4. dynamic input dims are pinned (``--input-shape NAME:1x3x224x224``; a lone dynamic
   batch dim defaults to 1), and unknown input names are refused; before anything is
   computed, a tensor that shape inference says would exceed ``MAX_TENSOR_BYTES`` (a
   huge input dim, ConstantOfShape, Range, Expand, Tile or Reshape) is refused;
5. constants are folded (weights held in Constant nodes become weights), Identity and
   inference-time Dropout disappear, and BatchNormalization following a Conv is folded
   into the Conv: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta;
6. every activation has a static shape (onnx shape inference, then one onnxruntime run
   for whatever inference could not type, e.g. custom ops).
The result computes the same function as the input model (tested against onnxruntime).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lcpc.errors import LcpcError
from lcpc.ir import Graph, Node, TensorInfo, from_onnx, tensor_infos, to_onnx
from lcpc.safety import (MAX_MODEL_BYTES, MAX_TENSOR_BYTES, check_loops, check_tensor_sizes, infer_shapes, inside,
                         itemsize, nbytes, printable)

TARGET_OPSET = 17
MIN_OPSET = 9
MAX_DIM = 1 << 24


@dataclass(frozen=True)
class Source:
    """Where a model came from, for the manifest."""

    path: str
    sha256: str
    opset: int


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``NAME:1x3x224x224`` specs; NAME may itself contain ':' (tf2onnx's ``input:0``)."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape or any(d <= 0 for d in shape):
            raise LcpcError(f"--input-shape '{spec}' is not NAME:DIMS (for example input:1x3x224x224)")
        shapes[name] = shape
    return shapes


def read_model(source: str | os.PathLike | bytes) -> tuple[onnx.ModelProto, Source]:
    """Parse model bytes or a file; load external data safely. Nothing else is changed."""
    if isinstance(source, (bytes, bytearray)):
        data, where, base = bytes(source), "<bytes>", None
    else:
        path = Path(source)
        where = printable(str(path))
        if path.is_dir():
            raise LcpcError(f"{where}: is a folder; give the path of an .onnx file")
        if not path.is_file():
            raise LcpcError(f"{where}: no such file")
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise LcpcError(f"{where}: larger than 2 GiB, which no ONNX protobuf can be; "
                            f"models this large keep their weights in external data files")
        data, base = path.read_bytes(), path.resolve().parent
    if not data:
        raise LcpcError(f"{where}: file is empty, not an ONNX model")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise LcpcError(f"{where}: not an ONNX model ({type(exc).__name__}: cannot parse protobuf)") from None
    if not _valid_strings(model):
        raise LcpcError(f"{where}: not an ONNX model (a name or string is not valid UTF-8)")
    if not model.HasField("graph") or not model.graph.node:
        raise LcpcError(f"{where}: not an ONNX model (no graph or no nodes)")
    _load_external_data(model, base, where)
    _check_tensor_data(model, where)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return model, Source(where, hashlib.sha256(data).hexdigest(), opset)


def _load_external_data(model: onnx.ModelProto, base: Path | None, where: str) -> None:
    """Every external location is checked (inside the model's folder, a regular file, offset and
    length within it, length equal to what the dims need) before any external file is opened."""
    tensors = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if not tensors:
        return
    if base is None:
        raise LcpcError(f"{where}: model uses external data files; load it from a path, not bytes")
    plan, total = [], 0
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        rel, name = info.get("location", ""), printable(t.name, 200)
        target = inside(base, rel)
        if target is None:
            raise LcpcError(f"{where}: tensor '{name}' points to external data '{printable(rel, 200)}' "
                            f"outside the model's folder; refusing to read it")
        if not target.is_file():
            raise LcpcError(f"{where}: tensor '{name}' needs external data file '{printable(rel, 200)}', "
                            f"which is missing")
        size = target.stat().st_size
        try:
            offset = int(info.get("offset", 0))
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError:
            raise LcpcError(f"{where}: tensor '{name}': external data offset/length are not integers") from None
        expected = _raw_bytes(t)
        if expected is None:
            raise LcpcError(f"{where}: tensor '{name}': external data of element type {t.data_type} "
                            f"is not supported (numeric tensors only)")
        if offset < 0 or length < 0 or offset + length > size or length != expected:
            raise LcpcError(f"{where}: tensor '{name}': external data ({length} bytes at offset {offset} of "
                            f"'{printable(rel, 200)}', {size} bytes long) does not hold the {expected} bytes "
                            f"its dims {list(t.dims)} need")
        total += length
        if total > MAX_MODEL_BYTES:
            raise LcpcError(f"{where}: external weights total more than 2 GiB; lcpc handles models whose "
                            f"weights fit in one ONNX protobuf (2 GiB)")
        plan.append((t, target, offset, length))
    for t, target, offset, length in plan:
        try:
            fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as f:
                f.seek(offset)
                t.raw_data = f.read(length)
        except OSError as exc:
            raise LcpcError(f"{where}: cannot read external data for tensor '{printable(t.name, 200)}' "
                            f"({exc.strerror})") from None
        if len(t.raw_data) != length:
            raise LcpcError(f"{where}: external data for tensor '{printable(t.name, 200)}' changed while "
                            f"being read")
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]


def _valid_strings(message) -> bool:
    """Whether every string field holds valid UTF-8 (protobuf parses invalid UTF-8 into ``bytes``
    that fail later, wherever a name is copied)."""
    for fd, value in message.ListFields():
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        items = value if repeated else [value]
        if fd.type == fd.TYPE_MESSAGE and not all(_valid_strings(item) for item in items):
            return False
        if fd.type == fd.TYPE_STRING and any(isinstance(item, bytes) for item in items):
            return False
    return True


def _check_tensor_data(model: onnx.ModelProto, where: str) -> None:
    """Every stored tensor holds exactly the values its dims and element type call for."""
    for t in _all_tensors(model):
        name = printable(t.name, 200)
        if nbytes(t.dims, 1) > MAX_TENSOR_BYTES or min(t.dims, default=0) < 0:
            raise LcpcError(f"{where}: tensor '{name}' claims dims {list(t.dims)[:8]}, which lcpc cannot hold")
        try:
            numpy_helper.to_array(t)
        except Exception as exc:
            raise LcpcError(f"{where}: tensor '{name}': its data does not match its dims {list(t.dims)} and "
                            f"element type {t.data_type} ({_first_line(exc)})") from None


_PACKED_BITS = {getattr(onnx.TensorProto, n): b for n, b in
                [("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)]
                if hasattr(onnx.TensorProto, n)}


def _raw_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes of ``t``'s raw data as its dims and type require; None for types with no fixed size."""
    count = math.prod(int(d) for d in t.dims)
    if t.data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[t.data_type] + 7) // 8
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    except (KeyError, TypeError, ValueError):
        return None
    return None if dtype.hasobject else count * dtype.itemsize


def _all_tensors(model: onnx.ModelProto):
    """Every TensorProto of the model: initializers (sparse too), node attributes, subgraphs, functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _subgraphs(graph: onnx.GraphProto):
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield sub
                yield from _subgraphs(sub)


def _graph_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes):
    for n in nodes:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _graph_tensors(sub)


def load(source: str | os.PathLike | bytes, input_shapes: dict[str, tuple[int, ...]] | None = None
         ) -> tuple[Graph, Source]:
    """Read, normalise and shape a model; see the module docstring for what that means."""
    model, src = read_model(source)
    where = src.path
    model = _check_and_upgrade(model, src, where)
    model = _pin_inputs(model, input_shapes or {}, where)
    model = _simplify(model, where)
    infos = _infer_shapes(model, where)
    graph = from_onnx(model, infos)
    _check_static(graph, where)
    return graph, src


def _check_and_upgrade(model: onnx.ModelProto, src: Source, where: str) -> onnx.ModelProto:
    _check_opset(src.opset, where)
    _check_graph(model, where)
    # Initializers listed as graph inputs (IR < 4 exporters) are weights, not inputs.
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    if src.opset < TARGET_OPSET:
        from onnx import version_converter
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:
            if src.opset < 11:
                raise LcpcError(f"{where}: cannot upgrade opset {src.opset} to {TARGET_OPSET}: "
                                f"{_first_line(exc)}") from None
    return model


def _check_opset(opset: int, where: str) -> None:
    if opset == 0:
        raise LcpcError(f"{where}: the model declares no ai.onnx opset; not a model lcpc can read")
    if opset < MIN_OPSET:
        raise LcpcError(f"{where}: opset {opset} is too old; lcpc reads opset {MIN_OPSET} and newer "
                        f"(re-export the model with a newer exporter)")
    known = onnx.defs.onnx_opset_version()
    if opset > known:
        raise LcpcError(f"{where}: opset {opset} is newer than the installed onnx knows ({known}); "
                        f"upgrade onnx or re-export with opset <= {known}")


def _check_graph(model: onnx.ModelProto, where: str) -> None:
    """The ONNX checker, then what lcpc needs beyond it: bounded Loops, tensors in subgraphs."""
    # The checker wants a shape field on graph inputs and outputs; a missing one means "unknown",
    # which --input-shape (inputs) and shape inference (outputs) settle later.
    unshaped = [vi.type.tensor_type for vi in list(model.graph.input) + list(model.graph.output)
                if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    for t in unshaped:
        t.shape.SetInParent()
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise LcpcError(f"{where}: invalid ONNX graph: {_first_line(exc)}") from None
    finally:
        for t in unshaped:
            t.ClearField("shape")
    check_loops(model, where)
    for graph in _subgraphs(model.graph):
        for vi in list(graph.input) + list(graph.output):
            if not vi.type.HasField("tensor_type"):
                raise LcpcError(f"{where}: value '{printable(vi.name, 200)}' of subgraph "
                                f"'{printable(graph.name, 200)}' is not a tensor; lcpc handles tensors only")


def _pin_inputs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], where: str) -> onnx.ModelProto:
    names = [i.name for i in model.graph.input]
    for name in shapes:
        if name not in names:
            raise LcpcError(f"--input-shape names '{printable(name, 200)}', but {where} has inputs: "
                            f"{printable(', '.join(names), 500)}")
    for inp in model.graph.input:
        tt, label = inp.type.tensor_type, printable(inp.name, 200)
        if not inp.type.HasField("tensor_type"):
            raise LcpcError(f"{where}: input '{label}' is not a tensor; lcpc handles tensor inputs only")
        if tt.elem_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            raise LcpcError(f"{where}: input '{label}' has element type "
                            f"{onnx.TensorProto.DataType.Name(tt.elem_type)}; lcpc handles numeric inputs only")
        dims = list(tt.shape.dim)
        if inp.name in shapes:
            want = shapes[inp.name]
            if dims and len(dims) != len(want):
                raise LcpcError(f"--input-shape {label}: rank {len(want)} given, the model's input has "
                                f"rank {len(dims)}")
            for d, v in zip(dims, want):
                if d.HasField("dim_value") and d.dim_value not in (0, v):
                    raise LcpcError(f"--input-shape {label}: dim {v} conflicts with the model's fixed "
                                    f"dim {d.dim_value}")
            new = want
        else:
            if not tt.HasField("shape"):
                raise LcpcError(f"{where}: input '{label}' has no shape; pass --input-shape "
                                f"{label}:1x3x224x224 (your dims)")
            new = []
            for axis, d in enumerate(dims):
                if d.HasField("dim_value") and d.dim_value > 0:
                    new.append(d.dim_value)
                elif axis == 0:
                    new.append(1)  # dynamic batch: plan for one image at a time
                else:
                    hint = "x".join(str(x.dim_value) if x.dim_value > 0 else ("1" if i == 0 else x.dim_param or "?")
                                    for i, x in enumerate(dims))
                    raise LcpcError(f"{where}: input '{label}' has dynamic dim '{printable(d.dim_param or '?', 100)}'"
                                    f" at axis {axis}; pin it with --input-shape {label}:{printable(hint, 300)} "
                                    f"(numbers for the names)")
        for v in new:
            if v > MAX_DIM:
                raise LcpcError(f"{where}: input '{label}' claims a dim of {v}, beyond lcpc's limit {MAX_DIM}")
        if nbytes(new, itemsize(tt.elem_type)) > MAX_TENSOR_BYTES:
            raise LcpcError(f"{where}: input '{label}' of shape {tuple(new)} is larger than lcpc's limit of "
                            f"{MAX_TENSOR_BYTES >> 30} GiB per tensor")
        tt.shape.Clear()
        for v in new:
            tt.shape.dim.add().dim_value = int(v)
    # Old shapes of intermediates and outputs may hold the dynamic dims: infer them anew.
    del model.graph.value_info[:]
    for out in model.graph.output:
        if not out.type.HasField("tensor_type"):
            raise LcpcError(f"{where}: output '{printable(out.name, 200)}' is not a tensor; lcpc handles tensor "
                            f"outputs only")
        if out.type.tensor_type.HasField("shape"):
            out.type.tensor_type.ClearField("shape")
    check_tensor_sizes(model, where)  # before folding computes anything
    return model


def _simplify(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """Fold constants, drop Identity/Dropout, fold BatchNormalization into Conv (graphsurgeon)."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # folding runs ORT; its optimizer warnings are noise here
    try:  # shapes let graphsurgeon fold Shape -> Gather -> Reshape chains of a pinned batch
        model = infer_shapes(model)  # lcpc.safety: no data propagation of long vectors
    except Exception:
        pass  # _infer_shapes reports shape problems after folding, with context
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise LcpcError(f"{where}: cannot import graph: {_first_line(exc)}") from None
    _drop_passthrough(graph)
    try:
        graph.fold_constants(error_ok=True).cleanup(remove_unused_graph_inputs=False).toposort()
    except Exception as exc:  # folding is an optimisation; a failure must not lose the model
        raise LcpcError(f"{where}: constant folding failed: {_first_line(exc)}") from None
    _fold_batchnorm(graph)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for node in graph.nodes:
        if node.op == "Constant":
            raise LcpcError(f"{where}: Constant node '{node.name}' could not be folded")
    try:
        out = gs.export_onnx(graph)
    except Exception as exc:  # e.g. a non-tensor value in a subgraph, which graphsurgeon cannot write
        raise LcpcError(f"{where}: cannot export the folded graph: {_first_line(exc)}") from None
    out.ir_version = max(min(model.ir_version, 9), 7)
    return out


def _drop_passthrough(graph) -> None:
    """Rewire consumers of Identity and (inference) Dropout to their input."""
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Dropout") or not node.inputs:
            continue
        if len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # Dropout's mask is used: leave it
        src, dst = node.inputs[0], node.outputs[0]
        if dst.name in outputs:
            continue
        for consumer in list(dst.outputs):
            for k, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[k] = src
        node.outputs.clear()


def _fold_batchnorm(graph) -> None:
    import onnx_graphsurgeon as gs

    outputs = {t.name for t in graph.outputs}
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.outputs) != 1 or not bn.inputs[0].inputs:
            continue
        conv = bn.inputs[0].inputs[0]
        params = bn.inputs[1:5]
        if (conv.op != "Conv" or len(bn.inputs[0].outputs) != 1 or bn.inputs[0].name in outputs
                or not all(isinstance(t, gs.Constant) for t in list(conv.inputs[1:]) + list(params))):
            continue
        w = conv.inputs[1].values.astype(np.float64)
        b = conv.inputs[2].values.astype(np.float64) if len(conv.inputs) > 2 else np.zeros(w.shape[:1])
        if w.ndim < 3 or b.shape != w.shape[:1] or any(p.values.shape != w.shape[:1] for p in params):
            continue  # malformed parameters: left for the checks downstream to report
        scale, beta, mean, var = (p.values.astype(np.float64) for p in params)
        k = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
        dtype = conv.inputs[1].values.dtype
        new_w = gs.Constant(conv.inputs[1].name + "_bnfold", (w * k.reshape(-1, *[1] * (w.ndim - 1))).astype(dtype))
        new_b = gs.Constant(conv.name + "_bias_bnfold", ((b - mean) * k + beta).astype(dtype))
        conv.inputs = [conv.inputs[0], new_w, new_b]
        conv.outputs = [bn.outputs[0]]
        bn.outputs.clear()


def _infer_shapes(model: onnx.ModelProto, where: str) -> dict[str, TensorInfo]:
    try:
        infos = tensor_infos(infer_shapes(model))
    except Exception as exc:
        raise LcpcError(f"{where}: shape inference failed: {_first_line(exc)}") from None
    missing = [o for n in model.graph.node for o in n.output if o and o not in infos]
    if missing:
        infos.update(_shapes_by_running(model, missing, infos, where))
    for name, info in infos.items():
        if min(info.shape, default=0) < 0 or nbytes(info.shape, info.dtype.itemsize) > MAX_TENSOR_BYTES:
            raise LcpcError(f"{where}: tensor '{printable(name, 200)}' has shape {info.shape}, which lcpc "
                            f"cannot plan (negative, or over {MAX_TENSOR_BYTES >> 30} GiB)")
    return infos


def _shapes_by_running(model: onnx.ModelProto, names: list[str], infos: dict[str, TensorInfo],
                       where: str) -> dict[str, TensorInfo]:
    """Shapes shape inference could not give (custom or untyped ops): run the model once."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        feeds = {}
        for inp in model.graph.input:
            info = infos[inp.name]
            if nbytes(info.shape, info.dtype.itemsize) > MAX_TENSOR_BYTES or info.dtype.hasobject:
                raise ValueError(f"input '{inp.name}' cannot be fed: shape {info.shape} {info.dtype}")
            feeds[inp.name] = np.zeros(info.shape, dtype=info.dtype)
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = sess.run(names, feeds)
    except Exception as exc:
        raise LcpcError(f"{where}: cannot infer the shapes of {printable(', '.join(names[:3]), 300)}: "
                        f"{_first_line(exc)} (lcpc runs what shape inference cannot type in onnxruntime)") from None
    return {n: TensorInfo(tuple(v.shape), v.dtype) for n, v in zip(names, values)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0], 300) if text else type(exc).__name__


def _check_static(graph: Graph, where: str) -> None:
    for node in graph.nodes:
        for o in node.outputs:
            if o and o not in graph.tensors:
                raise LcpcError(f"{where}: cannot infer the shape of '{o}' from {node.describe()}; "
                                f"pin input dims with --input-shape")


def load_graph_only(model: onnx.ModelProto) -> Graph:
    """IR view of a model lcpc wrote itself (stage files): no folding, shapes inferred."""
    inferred = onnx.shape_inference.infer_shapes(model)
    return from_onnx(model, tensor_infos(inferred))


def save_roundtrip(graph: Graph) -> bytes:
    """Serialise a loaded graph again (used by the round-trip test and by verify)."""
    return to_onnx(graph).SerializeToString()


__all__ = ["Source", "load", "read_model", "parse_input_shapes", "load_graph_only", "save_roundtrip",
           "Node", "helper", "numpy_helper"]
