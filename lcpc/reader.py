"""Read a model from untrusted bytes: parse it, check it, load its external data safely.

Guarantees:
1. the bytes parse as an ONNX model (at most ``MAX_MODEL_BYTES``, 2 GiB) whose strings are
   valid UTF-8 and whose graph has nodes, or :class:`LcpcError` says the file is not ONNX;
2. external-data tensors (in subgraphs and functions too) are read only from regular
   files inside the model's folder, after every location, offset and length has been
   checked; a location that leaves the folder (``..``, absolute, symlink) is refused
   and never opened; afterwards no tensor refers to external data;
3. every stored tensor holds exactly the data its dims and element type call for;
4. the model declares an ai.onnx opset from ``MIN_OPSET`` up to what the installed onnx
   knows, passes ``onnx.checker.check_model``, every Loop has a small constant trip count
   (``lcpc.safety.check_loops``) and every subgraph input and output is a tensor;
5. nothing else is changed: the graph is the one the file holds, and ``Source`` records
   where it came from (path, sha256 of the bytes, declared opset) for the manifest.
Normalising the graph is ``lcpc.frontend``'s job.
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
from lcpc.safety import MAX_MODEL_BYTES, MAX_TENSOR_BYTES, check_loops, first_line, inside, nbytes, printable

MIN_OPSET = 9


@dataclass(frozen=True)
class Source:
    """Where a model came from, for the manifest."""

    path: str
    sha256: str
    opset: int


def read_model(source: str | os.PathLike | bytes) -> tuple[onnx.ModelProto, Source]:
    """Parse model bytes or a file, check it and load its external data (guarantees 1-5)."""
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
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise LcpcError(f"{where}: not an ONNX model ({type(exc).__name__}: cannot parse protobuf)") from None
    del data  # the parsed model holds its own copy: never both for longer than parsing
    if not _valid_strings(model):
        raise LcpcError(f"{where}: not an ONNX model (a name or string is not valid UTF-8)")
    if not model.HasField("graph") or not model.graph.node:
        raise LcpcError(f"{where}: not an ONNX model (no graph or no nodes)")
    _load_external_data(model, base, where)
    _check_tensor_data(model, where)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    _check_opset(opset, where)
    _check_graph(model, where)
    return model, Source(where, sha256, opset)


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
        items = value if _repeated(fd) else [value]
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
                            f"element type {t.data_type} ({first_line(exc)})") from None


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


def _checker_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the ONNX checker needs to see of ``model``, without a serialised copy of its weights:
    each large top-level initializer whose only data is ``raw_data`` of exactly the size its dims
    and type need (all the checker asks of such a tensor) stands in as an empty tensor of the
    same name and type. Everything else is the model's own (``model`` itself when nothing is big)."""
    plain = [k for k, t in enumerate(model.graph.initializer) if _checked_tensor(t)]
    if not plain:
        return model
    view = onnx.ModelProto()
    _copy_fields(model, view, skip="graph")
    g = view.graph
    _copy_fields(model.graph, g, skip="initializer")
    plain = set(plain)
    for k, t in enumerate(model.graph.initializer):
        if k in plain:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=[0])
        else:
            g.initializer.append(t)
    return view


def _copy_fields(src, dst, skip: str) -> None:
    """Copy every field of protobuf message ``src`` but ``skip`` into ``dst``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if _repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _checked_tensor(t: onnx.TensorProto) -> bool:
    """Whether the checker's verdict on ``t`` is known without looking at its bytes: numeric,
    stored in ``raw_data`` alone, of exactly the size its dims need, and large enough to matter."""
    if t.data_location != onnx.TensorProto.DEFAULT or not t.HasField("raw_data") or len(t.dims) == 0:
        return False
    if any(len(getattr(t, f)) for f in ("float_data", "int32_data", "string_data", "int64_data",
                                         "double_data", "uint64_data", "external_data")):
        return False
    expected = _raw_bytes(t)
    return expected is not None and expected >= CHECKER_VIEW_BYTES and len(t.raw_data) == expected


CHECKER_VIEW_BYTES = 1 << 16  # initializers from this size up stand in as empty tensors for the checker


def _check_graph(model: onnx.ModelProto, where: str) -> None:
    """The ONNX checker, then what lcpc needs beyond it: bounded Loops, tensors in subgraphs."""
    # The checker wants a shape field on graph inputs and outputs; a missing one means "unknown",
    # which --input-shape (inputs) and shape inference (outputs) settle later.
    unshaped = [vi.type.tensor_type for vi in list(model.graph.input) + list(model.graph.output)
                if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    for t in unshaped:
        t.shape.SetInParent()
    try:
        onnx.checker.check_model(_checker_view(model))
    except Exception as exc:
        raise LcpcError(f"{where}: invalid ONNX graph: {first_line(exc)}") from None
    finally:
        for t in unshaped:
            t.ClearField("shape")
    check_loops(model, where)
    for graph in _subgraphs(model.graph):
        for vi in list(graph.input) + list(graph.output):
            if not vi.type.HasField("tensor_type"):
                raise LcpcError(f"{where}: value '{printable(vi.name, 200)}' of subgraph "
                                f"'{printable(graph.name, 200)}' is not a tensor; lcpc handles tensors only")
