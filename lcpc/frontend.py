"""Normalise a model read by :mod:`lcpc.reader` into lcpc's static-shaped IR.

``load`` is the front end's public entry: bytes or a path in, a :class:`~lcpc.ir.Graph` and
its :class:`~lcpc.reader.Source` out. Reading and checking the untrusted file is
``lcpc.reader``'s job (see its guarantees); on top of those, this module's are, in order:

Guarantees:
1. initializers listed as graph inputs (IR < 4 exporters) are weights, not inputs;
   opsets 9..16 are upgraded to opset ``TARGET_OPSET`` (17) with onnx's version converter;
2. dynamic input dims (a ``dim_param``, no value, or a value of 0 or below, such as the
   ``-1`` PaddlePaddle writes) are pinned (``--input-shape NAME:1x3x224x224``; a lone
   dynamic batch dim defaults to 1); unknown input names and dims that conflict with the
   model's fixed dims are refused; before anything is computed, a tensor that shape
   inference says would exceed ``MAX_TENSOR_BYTES`` (a huge input dim, ConstantOfShape,
   Range, Expand, Tile or Reshape) is refused;
3. constants are folded (weights held in Constant nodes become weights), Identity and
   inference-time Dropout disappear, and BatchNormalization following a Conv is folded
   into the Conv: W' = W * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta
   (``load(..., norms=[])`` appends a ``FoldedNorm`` per BatchNormalization folded: its running
   statistics and the tensor, now the Conv's output, that it produced, for whatever needs the
   statistics the folded graph no longer holds, such as synthetic recovery data);
   nodes with a body (Loop, Scan) are never folded, and they do not stop the rest of the
   graph from being folded;
4. every node reads only its own inputs: a value a Loop body reads from an enclosing graph
   becomes one more loop-carried input that the body passes through unchanged; an If or
   Scan that reads such values is refused by name;
5. every activation has a static shape (onnx shape inference, then one onnxruntime run
   for whatever inference could not type, e.g. custom ops).
Large weights of a model file go from the file straight into arrays
(``reader.read_model_and_weights``); those of model bytes leave the parsed protobuf, which is
freed, as soon as they are arrays (``_take_weights``). From then on every weight exists once:
folding and normalising pass the arrays along (BatchNorm folding frees each conv weight it
replaces right away), and the graph is exported with them as typed inputs, not serialised.
The result computes the same function as the input model (tested against onnxruntime).
"""

from __future__ import annotations

import gc
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import helper, numpy_helper, version_converter

from lcpc.errors import LcpcError
from lcpc.ir import Graph, TensorInfo, from_onnx, tensor_infos
from lcpc.reader import ASIDE_TYPES, Source, read_model_and_weights
from lcpc.runtime.session import open_session
from lcpc.safety import (
    MAX_SHAPE_VALUES,
    MAX_TENSOR_BYTES,
    check_tensor_sizes,
    first_line,
    infer_shapes,
    itemsize,
    nbytes,
    printable,
    skeleton_of,
)

TARGET_OPSET = 17
MAX_DIM = 1 << 24
COLLECT_BYTES = 4 << 20   # weights from which the front end frees folding's copies at once (gc.collect)


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


@dataclass(frozen=True)
class FoldedNorm:
    """A BatchNormalization folded into the Conv ``conv``: ``tensor`` (the Conv's output in the
    folded graph) is ``scale * (x - mean) / sqrt(var + epsilon) + bias`` of the original Conv's
    output ``x``; the arrays are float64, one value per channel."""

    conv: str
    tensor: str
    scale: np.ndarray
    bias: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    epsilon: float


def load(source: str | os.PathLike | bytes, input_shapes: dict[str, tuple[int, ...]] | None = None,
         norms: list[FoldedNorm] | None = None) -> tuple[Graph, Source]:
    """Read, normalise and shape a model; see the module docstring for what that means.
    ``norms``: a list that gets a ``FoldedNorm`` per BatchNormalization folded into a Conv."""
    model, weights, src = read_model_and_weights(source)
    where = src.path
    if weights and src.opset < TARGET_OPSET:  # the version converter sees whole tensors
        _put_back(model, weights)
    model = _upgrade(model, src, where)
    model = _pin_inputs(model, input_shapes or {}, where)
    model, weights = _take_weights(model, weights)  # the parsed protobuf is freed here
    model, weights, order = _simplify(model, weights, where, norms)
    infos = _infer_shapes(model, weights, where)
    graph = from_onnx(model, infos, weights)
    graph.constants = {name: graph.constants[name] for name in order}
    _check_static(graph, where)
    return graph, src


def _is_weight(t: onnx.TensorProto) -> bool:
    """A large initializer of a plain numeric type: one that travels as a numpy array."""
    return t.data_type in ASIDE_TYPES and math.prod(t.dims) > MAX_SHAPE_VALUES


def _take_weights(model: onnx.ModelProto, aside: dict[str, np.ndarray]
                  ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The large initializers as numpy arrays (``aside``: those the reader already read into
    arrays, stand-ins in ``model``), and the rest of the model as a skeleton that declares them
    as typed graph inputs (``safety.skeleton_of``). The skeleton shares no memory with ``model``:
    once the caller drops ``model``, each weight is held once, as an array. (protobuf frees a
    message's memory only with the whole message, not field by field.)"""
    inputs = {i.name for i in model.graph.input}
    weights = dict(aside)
    weights.update({t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                    if t.name not in aside and _is_weight(t) and t.name not in inputs})
    return skeleton_of(model, keep=lambda t: t.name not in weights), weights


def _put_back(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> None:
    """The set-aside weights as raw data of their stand-ins again (emptying ``weights``)."""
    for t in model.graph.initializer:
        if t.name in weights and not t.HasField("raw_data"):
            t.raw_data = weights[t.name].tobytes()
    weights.clear()


def _upgrade(model: onnx.ModelProto, src: Source, where: str) -> onnx.ModelProto:
    """Guarantee 1."""
    # Initializers listed as graph inputs (IR < 4 exporters) are weights, not inputs.
    inits = {t.name for t in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    if src.opset < TARGET_OPSET:
        try:
            model = version_converter.convert_version(model, TARGET_OPSET)
        except Exception as exc:
            if src.opset < 11:
                raise LcpcError(f"{where}: cannot upgrade opset {src.opset} to {TARGET_OPSET}: "
                                f"{first_line(exc)}") from None
    return model


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
                if _fixed(d) not in (None, v):
                    raise LcpcError(f"--input-shape {label}: dim {v} conflicts with the model's fixed "
                                    f"dim {d.dim_value}")
            new = list(want)
        else:
            if not tt.HasField("shape"):
                raise LcpcError(f"{where}: input '{label}' has no shape; pass --input-shape "
                                f"{label}:1x3x224x224 (your dims)")
            new = []
            for axis, d in enumerate(dims):
                if _fixed(d) is not None:
                    new.append(d.dim_value)
                elif axis == 0:
                    new.append(1)  # dynamic batch: plan for one image at a time
                else:
                    hint = "x".join(str(x.dim_value) if _fixed(x) else ("1" if i == 0 else x.dim_param or "?")
                                    for i, x in enumerate(dims))
                    raise LcpcError(f"{where}: input '{label}' has dynamic dim '{printable(_dynamic_name(d), 100)}'"
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


def _fixed(dim: onnx.TensorShapeProto.Dimension) -> int | None:
    """The dim's fixed size, or None when it is dynamic: a ``dim_param``, no value, or a value
    of 0 or below (PaddlePaddle and some other exporters write -1 for "dynamic")."""
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _dynamic_name(dim: onnx.TensorShapeProto.Dimension) -> str:
    """How the model names a dynamic dim, for messages: its dim_param, its negative value, or '?'."""
    if dim.HasField("dim_value") and dim.dim_value < 0:
        return str(dim.dim_value)
    return dim.dim_param or "?"


def _simplify(model: onnx.ModelProto, weights: dict[str, np.ndarray], where: str,
              norms: list[FoldedNorm] | None = None) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str]]:
    """Fold constants, drop Identity/Dropout, fold BatchNormalization into Conv (graphsurgeon).

    ``model`` declares ``weights`` as typed graph inputs (``_take_weights``); graphsurgeon gets
    them back as constants, and ``weights`` is emptied so that a weight folding replaces is
    freed. Returns the folded model, its large constants again as typed inputs and arrays (the
    exported protobuf holds no copy of them), and the names of all its constants in the order
    an export with initializers would list them."""
    ort.set_default_logger_severity(3)  # folding runs ORT; its optimizer warnings are noise here
    large = sum(a.nbytes for a in weights.values()) >= COLLECT_BYTES
    try:  # shapes let graphsurgeon fold Shape -> Gather -> Reshape chains of a pinned batch
        model = infer_shapes(model)  # lcpc.safety: no data propagation of long vectors
    except Exception:
        pass  # _infer_shapes reports shape problems after folding, with context
    try:
        graph = gs.import_onnx(model)
    except Exception as exc:
        raise LcpcError(f"{where}: cannot import graph: {first_line(exc)}") from None
    _restore_weights(graph, weights)
    _drop_passthrough(graph)
    try:
        graph.fold_constants(error_ok=True, should_exclude_node=_has_body).cleanup(
            remove_unused_graph_inputs=False).toposort()
    except Exception as exc:  # folding is an optimisation; a failure must not lose the model
        raise LcpcError(f"{where}: constant folding failed: {first_line(exc)}") from None
    if large:  # folding evaluated copies of the graph that share the weights' arrays: free them now
        gc.collect()  # (a full collection costs 0.1 s in a large process: only where the memory matters)
    _fold_batchnorm(graph, norms)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    _explicit_loop_inputs(graph, where)
    for node in graph.nodes:
        if node.op == "Constant":
            raise LcpcError(f"{where}: Constant node '{node.name}' could not be folded")
    order = [name for name, t in graph.tensors().items()
             if isinstance(t, gs.Constant) and not isinstance(t._values, gs.ir.tensor.SparseValues)]
    weights = _weights_as_inputs(graph)
    try:
        out = gs.export_onnx(graph)
    except Exception as exc:  # e.g. a non-tensor value in a subgraph, which graphsurgeon cannot write
        raise LcpcError(f"{where}: cannot export the folded graph: {first_line(exc)}") from None
    out.ir_version = max(min(model.ir_version, 9), 7)
    return out, weights, order


def _restore_weights(graph, weights: dict[str, np.ndarray]) -> None:
    """Turn the graph inputs that stand for ``weights`` back into constants, emptying ``weights``."""
    tensors = graph.tensors()
    for name in list(weights):
        tensor = tensors.get(name)
        values = weights.pop(name)
        if tensor is not None:
            tensor.to_constant(values)
    graph.inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]


def _weights_as_inputs(graph) -> dict[str, np.ndarray]:
    """Large top-level constants of plain numeric types, read only by top-level nodes and not
    graph outputs, become typed graph inputs; returns their arrays, which export then never copies."""
    top = {id(n) for n in graph.nodes}
    outputs = {t.name for t in graph.outputs}
    weights = {}
    for name, t in graph.tensors().items():
        if not isinstance(t, gs.Constant) or not isinstance(t._values, np.ndarray) or name in outputs:
            continue
        values = t.values
        try:
            plain = helper.np_dtype_to_tensor_dtype(values.dtype) in ASIDE_TYPES
            same = np.dtype(t.export_dtype) == values.dtype
        except (KeyError, TypeError, ValueError):
            continue
        if plain and same and values.size > MAX_SHAPE_VALUES and all(id(n) in top for n in t.outputs):
            weights[name] = values
            t.to_variable(dtype=values.dtype, shape=list(values.shape))
            t.type = "tensor_type"  # what Variable() sets and Constant.to_variable does not
            graph.inputs.append(t)
    return weights


def _has_body(node) -> bool:
    """Whether a node carries a subgraph with inputs (a Loop or Scan body). Such nodes are not
    folded even when all their inputs are constant: graphsurgeon evaluates the foldable part of
    the graph as one model after stripping unused graph inputs from every subgraph too, so a
    Loop body that ignores its iteration number loses that input, onnxruntime rejects the model
    and nothing at all is folded. Left in place, the node runs as it is, behind an exact sync.
    (If branches have no inputs; an If with a constant condition is still flattened.)"""
    return any(sub.inputs for sub in node.subgraphs())


def _explicit_loop_inputs(graph, where: str) -> None:
    """Every value a subgraph reads from an enclosing graph becomes an explicit input, so that
    planning and lowering, which see only node inputs, place and rename it like any other.

    A Loop gets it as one more loop-carried value that its body passes through unchanged
    (``v_in -> Identity -> v_out``; the extra final value is unused), which computes the same
    function. Other ops with such subgraphs (If, Scan) are refused by name."""
    for node in graph.nodes:
        foreign = {}
        for sub in node.subgraphs():
            foreign.update({n: t for n, t in sub._foreign_tensors().items() if n and isinstance(t, gs.Variable)})
        if not foreign:
            continue
        if node.op != "Loop" or node.domain not in (None, "", "ai.onnx"):
            names = printable(", ".join(sorted(foreign)[:3]), 300)
            raise LcpcError(f"{where}: node '{printable(node.name, 200)}' (op {node.op}) reads {names} from the "
                            f"enclosing graph inside its subgraph; lcpc handles that for Loop only "
                            f"(pass the values in as inputs, or re-export without control flow)")
        body = node.attrs["body"]
        carried = len(node.inputs) - 2
        for k, (name, outer) in enumerate(sorted(foreign.items())):
            inner = gs.Variable(f"{name}@{node.name}.in", dtype=outer.dtype, shape=outer.shape)
            through = gs.Variable(f"{name}@{node.name}.out", dtype=outer.dtype, shape=outer.shape)
            _replace_input(body, outer, inner)
            body.nodes.append(gs.Node("Identity", f"{name}@{node.name}.pass", inputs=[inner], outputs=[through]))
            body.inputs.insert(2 + carried + k, inner)
            body.outputs.insert(1 + carried + k, through)
            node.inputs.append(outer)
            node.outputs.insert(carried + k, gs.Variable(f"{name}@{node.name}.final", dtype=outer.dtype,
                                                         shape=outer.shape))
        graph.toposort()


def _replace_input(graph, old, new) -> None:
    """Make every node of ``graph`` and of its nested subgraphs read ``new`` where it read ``old``."""
    for node in graph.nodes:
        node.inputs = [new if t is old else t for t in node.inputs]
        for sub in node.subgraphs():
            _replace_input(sub, old, new)


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


def _fold_batchnorm(graph, norms: list[FoldedNorm] | None = None) -> None:
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
        eps = float(bn.attrs.get("epsilon", 1e-5))
        k = scale / np.sqrt(var + eps)
        if norms is not None:
            norms.append(FoldedNorm(conv.name, bn.outputs[0].name, scale, beta, mean, var, eps))
        dtype = conv.inputs[1].values.dtype
        new_w = (w * k.reshape(-1, *[1] * (w.ndim - 1))).astype(dtype)
        del w  # one layer's float64 buffers at a time
        new_b = gs.Constant(conv.name + "_bias_bnfold", ((b - mean) * k + beta).astype(dtype))
        replaced = list(conv.inputs[1:])
        conv.inputs = [conv.inputs[0], gs.Constant(conv.inputs[1].name + "_bnfold", new_w), new_b]
        conv.outputs = [bn.outputs[0]]
        bn.outputs.clear()
        _release_unread(replaced, outputs)


def _release_unread(tensors, outputs: set[str]) -> None:
    """Free the arrays of constants no node reads any more and no graph output names: graphsurgeon's
    tensors and nodes refer to each other, so a replaced weight would otherwise live until the cyclic
    garbage collector runs (ResNet-50: one more copy of its conv weights while folding and planning)."""
    for t in tensors:
        if isinstance(t, gs.Constant) and not t.outputs and t.name not in outputs:
            t.values = np.zeros((0,), dtype=t.values.dtype)


def _infer_shapes(model: onnx.ModelProto, weights: dict[str, np.ndarray], where: str) -> dict[str, TensorInfo]:
    """Shapes of every value but ``weights`` (which ``model`` declares as typed inputs)."""
    try:
        infos = tensor_infos(infer_shapes(model))
    except Exception as exc:
        raise LcpcError(f"{where}: shape inference failed: {first_line(exc)}") from None
    missing = [o for n in model.graph.node for o in n.output if o and o not in infos]
    if missing:
        infos.update(_shapes_by_running(model, missing, infos, weights, where))
    for name in weights:
        infos.pop(name, None)
    for name, info in infos.items():
        if min(info.shape, default=0) < 0 or nbytes(info.shape, info.dtype.itemsize) > MAX_TENSOR_BYTES:
            raise LcpcError(f"{where}: tensor '{printable(name, 200)}' has shape {info.shape}, which lcpc "
                            f"cannot plan (negative, or over {MAX_TENSOR_BYTES >> 30} GiB)")
    return infos


def _shapes_by_running(model: onnx.ModelProto, names: list[str], infos: dict[str, TensorInfo],
                       weights: dict[str, np.ndarray], where: str) -> dict[str, TensorInfo]:
    """Shapes shape inference could not give (custom or untyped ops): run the model once."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
    try:
        feeds = {}
        for inp in model.graph.input:
            if inp.name in weights:
                feeds[inp.name] = weights[inp.name]
                continue
            info = infos[inp.name]
            if nbytes(info.shape, info.dtype.itemsize) > MAX_TENSOR_BYTES or info.dtype.hasobject:
                raise ValueError(f"input '{inp.name}' cannot be fed: shape {info.shape} {info.dtype}")
            feeds[inp.name] = np.zeros(info.shape, dtype=info.dtype)
        sess = open_session(probe.SerializeToString(), "the shape probe", threads=None)
        values = sess.run(names, feeds)
    except Exception as exc:
        raise LcpcError(f"{where}: cannot infer the shapes of {printable(', '.join(names[:3]), 300)}: "
                        f"{first_line(exc)} (lcpc runs what shape inference cannot type in onnxruntime)") from None
    return {n: TensorInfo(tuple(v.shape), v.dtype) for n, v in zip(names, values)}


def _check_static(graph: Graph, where: str) -> None:
    for node in graph.nodes:
        for o in node.outputs:
            if o and o not in graph.tensors:
                raise LcpcError(f"{where}: cannot infer the shape of '{o}' from {node.describe()}; "
                                f"pin input dims with --input-shape")


__all__ = ["TARGET_OPSET", "Source", "load", "parse_input_shapes"]
