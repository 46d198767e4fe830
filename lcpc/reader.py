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
``read_model_and_weights`` gives the same model and checks with the main graph's large plain
weights read from the file straight into arrays (stand-ins without data in the model), so that
reading holds them once rather than as bytes, protobuf and arrays at once; a layout it does not
expect (protobuf groups, truncation, raw data given twice) is read by the plain path instead.
Normalising the graph is ``lcpc.frontend``'s job.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lcpc.errors import LcpcError
from lcpc.safety import (
    MAX_MODEL_BYTES,
    MAX_SHAPE_VALUES,
    MAX_TENSOR_BYTES,
    check_loops,
    first_line,
    inside,
    nbytes,
    printable,
)

MIN_OPSET = 9


@dataclass(frozen=True)
class Source:
    """Where a model came from, for the manifest."""

    path: str
    sha256: str
    opset: int


def read_model(source: str | os.PathLike | bytes) -> tuple[onnx.ModelProto, Source]:
    """Parse model bytes or a file, check it and load its external data (guarantees 1-5)."""
    data, where, base = _source_bytes(source)
    sha256 = hashlib.sha256(data).hexdigest()
    model = _parse(data, where)
    del data  # the parsed model holds its own copy: never both for longer than parsing
    return _checked(model, where, base, sha256, set())


def _source_bytes(source: str | os.PathLike | bytes) -> tuple[bytes, str, Path | None]:
    """The bytes of ``source``, how to name it in messages, and its folder (None for bytes)."""
    if isinstance(source, (bytes, bytearray)):
        data, where, base = bytes(source), "<bytes>", None
    else:
        path, where = _model_path(source)
        data, base = path.read_bytes(), path.resolve().parent
    if not data:
        raise LcpcError(f"{where}: file is empty, not an ONNX model")
    return data, where, base


def _model_path(source: str | os.PathLike) -> tuple[Path, str]:
    path = Path(source)
    where = printable(str(path))
    if path.is_dir():
        raise LcpcError(f"{where}: is a folder; give the path of an .onnx file")
    if not path.is_file():
        raise LcpcError(f"{where}: no such file")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise LcpcError(f"{where}: larger than 2 GiB, which no ONNX protobuf can be; "
                        f"models this large keep their weights in external data files")
    return path, where


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise LcpcError(f"{where}: not an ONNX model ({type(exc).__name__}: cannot parse protobuf)") from None
    if not _valid_strings(model):
        raise LcpcError(f"{where}: not an ONNX model (a name or string is not valid UTF-8)")
    if not model.HasField("graph") or not model.graph.node:
        raise LcpcError(f"{where}: not an ONNX model (no graph or no nodes)")
    return model


def _checked(model: onnx.ModelProto, where: str, base: Path | None, sha256: str, aside: set[int]
             ) -> tuple[onnx.ModelProto, Source]:
    """Guarantees 2-4 on a parsed model; ``aside``: indices of main-graph initializers whose data
    was set aside (already checked against their dims; stand-ins without data here)."""
    _load_external_data(model, base, where)
    _check_tensor_data(model, where, aside)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    _check_opset(opset, where)
    _check_graph(model, where, aside)
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


def _check_tensor_data(model: onnx.ModelProto, where: str, aside: set[int]) -> None:
    """Every stored tensor holds exactly the values its dims and element type call for (those
    set aside, main-graph initializers by index, were checked when they were set aside)."""
    for k, t in enumerate(_all_tensors(model)):
        if k in aside:  # _all_tensors yields the main graph's initializers first, in order
            continue
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


def _checker_view(model: onnx.ModelProto, aside: set[int]) -> onnx.ModelProto:
    """What the ONNX checker needs to see of ``model``, without a serialised copy of its weights:
    each large top-level initializer whose only data is ``raw_data`` of exactly the size its dims
    and type need (all the checker asks of such a tensor) stands in as an empty tensor of the
    same name and type, as does every initializer set aside (``aside``, by index). Everything else
    is the model's own (``model`` itself when nothing is big)."""
    plain = [k for k, t in enumerate(model.graph.initializer) if k in aside or _checked_tensor(t)]
    if not plain:
        return model
    view = onnx.ModelProto()
    _copy_fields(model, view, skip="graph")
    g = view.graph
    _copy_fields(model.graph, g, skip="initializer")
    kept = set(plain)
    for k, t in enumerate(model.graph.initializer):
        if k in kept:
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


def _check_graph(model: onnx.ModelProto, where: str, aside: set[int]) -> None:
    """The ONNX checker, then what lcpc needs beyond it: bounded Loops, tensors in subgraphs."""
    # The checker wants a shape field on graph inputs and outputs; a missing one means "unknown",
    # which --input-shape (inputs) and shape inference (outputs) settle later.
    unshaped = [vi.type.tensor_type for vi in list(model.graph.input) + list(model.graph.output)
                if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape")]
    for t in unshaped:
        t.shape.SetInParent()
    try:
        onnx.checker.check_model(_checker_view(model, aside))
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


# --- weights read aside: large raw initializers go from the file into arrays, never into protobuf --
# Element types whose raw data numpy reads as it is (on a little-endian machine). The front end
# keeps large weights of these types as numpy arrays, outside any protobuf; the others (bfloat16,
# 4-bit types) stay initializers and take graphsurgeon's own path.
ASIDE_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
               onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32,
               onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}
_GRAPH_KEY = 7 << 3 | 2        # ModelProto.graph, length-delimited (onnx.proto field numbers)
_INITIALIZER_KEY = 5 << 3 | 2  # GraphProto.initializer
_RAW_DATA_KEY = 9 << 3 | 2     # TensorProto.raw_data


class _Unusual(Exception):
    """The file is not laid out as the aside reader expects: the plain reader reads it instead."""


def read_model_and_weights(source: str | os.PathLike | bytes
                           ) -> tuple[onnx.ModelProto, dict[str, np.ndarray], Source]:
    """``read_model`` (guarantees 1-5), with the main graph's large weights set aside.

    Every initializer of the main graph with more than ``MAX_SHAPE_VALUES`` elements, of a type
    in ``ASIDE_TYPES``, whose only data is its ``raw_data`` of exactly the size its dims need, is
    read from the file straight into an array, ``weights[name]``, and stays in ``model`` as a
    stand-in of the same name, type and dims without data. Reading then holds the weights once,
    not as the file's bytes, the parsed protobuf and arrays at once. The file is read once and
    its sha256 is that of the bytes parsed. Bytes sources, big-endian machines and files laid
    out unusually (a protobuf group, a field running past its message) are read by
    ``read_model``, with no weights set aside."""
    if isinstance(source, (bytes, bytearray)) or sys.byteorder != "little":
        model, src = read_model(source)
        return model, {}, src
    path, where = _model_path(source)
    try:
        with open(path, "rb") as f:
            skeleton, payloads, sha256 = _AsideReader(f, os.fstat(f.fileno()).st_size).read()
    except (_Unusual, OSError):
        model, src = read_model(source)
        return model, {}, src
    if not skeleton:
        raise LcpcError(f"{where}: file is empty, not an ONNX model")
    model = _parse(skeleton, where)
    del skeleton
    weights, aside = _match_payloads(model, payloads, where)
    model, src = _checked(model, where, path.resolve().parent, sha256, aside)
    return model, weights, src


def _match_payloads(model: onnx.ModelProto, payloads: dict[int, np.ndarray], where: str
                    ) -> tuple[dict[str, np.ndarray], set[int]]:
    """Each set-aside raw data matched with its parsed initializer: a weight when it qualifies,
    else put back as the tensor's raw data. Returns the weights and their initializer indices."""
    inits = model.graph.initializer
    if any(k >= len(inits) for k in payloads):
        raise LcpcError(f"{where}: not an ONNX model (initializer data without an initializer)")
    weights, aside = {}, set()
    for k in sorted(payloads):
        t, payload = inits[k], payloads.pop(k)
        if _qualifies(t, len(payload)):
            weights[t.name] = payload.view(helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))
            aside.add(k)
        else:
            t.raw_data = payload.tobytes()
    return weights, aside


def _qualifies(t: onnx.TensorProto, length: int) -> bool:
    """Whether ``t``, parsed without its ``length`` bytes of raw data, is a weight to keep aside."""
    if t.HasField("raw_data") or t.data_location != onnx.TensorProto.DEFAULT or t.data_type not in ASIDE_TYPES:
        return False
    if any(len(getattr(t, f)) for f in ("float_data", "int32_data", "string_data", "int64_data",
                                         "double_data", "uint64_data", "external_data")):
        return False
    if min(t.dims, default=0) < 0 or nbytes(t.dims, 1) > MAX_TENSOR_BYTES:
        return False
    return math.prod(t.dims) > MAX_SHAPE_VALUES and _raw_bytes(t) == length


class _AsideReader:
    """One pass over a model file: the file without the large raw data of its main graph's
    initializers (the skeleton, lengths rewritten), those raw data as arrays by initializer
    index, and the sha256 of every byte read. Fields are copied as they are; what protobuf
    merges (several ``graph`` fields) is walked in the same order, so indices match the parse."""

    def __init__(self, f, size: int) -> None:
        self.f, self.size, self.pos, self.sha = f, size, 0, hashlib.sha256()
        self.payloads: dict[int, np.ndarray] = {}
        self.initializers = 0

    def read(self) -> tuple[bytes, dict[int, np.ndarray], str]:
        skeleton = self._message(self.size, {_GRAPH_KEY: self._graph})
        if self.f.read(1):
            raise _Unusual  # the file grew while being read
        return skeleton, self.payloads, self.sha.hexdigest()

    def _message(self, end: int, handlers: dict) -> bytes:
        """Fields up to ``end``, copied, except those with a handler (which returns the new body)."""
        parts = []
        while self.pos < end:
            key, raw = self._varint()
            if key in handlers:
                length, _ = self._varint()
                body = handlers[key](self.pos + length)
                parts.append(raw + _varint(len(body)) + body)
            else:
                parts.append(raw + self._rest_of_field(key & 7))
        if self.pos != end:
            raise _Unusual
        return b"".join(parts)

    def _graph(self, end: int) -> bytes:
        return self._message(end, {_INITIALIZER_KEY: self._initializer})

    def _initializer(self, end: int) -> bytes:
        index, self.initializers = self.initializers, self.initializers + 1
        parts: list[bytes] = []
        raws: list[tuple[int, bytes, np.ndarray]] = []
        raw_fields = 0
        while self.pos < end:
            key, raw = self._varint()
            if key == _RAW_DATA_KEY:
                raw_fields += 1
                length, raw_len = self._varint()
                if length > MAX_SHAPE_VALUES:
                    raws.append((len(parts), raw + raw_len, self._array(length)))
                    parts.append(b"")
                    continue
                parts.append(raw + raw_len + self._take(length))
            else:
                parts.append(raw + self._rest_of_field(key & 7))
        if self.pos != end:
            raise _Unusual
        if len(raws) == 1 and raw_fields == 1:
            self.payloads[index] = raws[0][2]  # the tensor's one raw data, set aside
        else:  # raw data given more than once (the last wins): leave every piece in place
            for at, head, payload in raws:
                parts[at] = head + payload.tobytes()
        return b"".join(parts)

    def _rest_of_field(self, wire_type: int) -> bytes:
        if wire_type == 0:
            return self._varint()[1]
        if wire_type == 1:
            return self._take(8)
        if wire_type == 5:
            return self._take(4)
        if wire_type == 2:
            length, raw = self._varint()
            return raw + self._take(length)
        raise _Unusual  # groups (3, 4) and invalid wire types: protobuf's own parser decides

    def _take(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise _Unusual
        data = self.f.read(n)
        if len(data) != n:
            raise _Unusual  # the file shrank while being read
        self.sha.update(data)
        self.pos += n
        return data

    def _array(self, n: int) -> np.ndarray:
        if self.pos + n > self.size:
            raise _Unusual
        buf = np.empty(n, np.uint8)
        view, done = memoryview(buf.data), 0
        while done < n:
            got = self.f.readinto(view[done:])
            if not got:
                raise _Unusual
            done += got
        self.sha.update(view)
        self.pos += n
        return buf

    def _varint(self) -> tuple[int, bytes]:
        raw = b""
        for _ in range(10):
            raw += self._take(1)
            if raw[-1] < 0x80:
                return sum((b & 0x7F) << (7 * i) for i, b in enumerate(raw)), raw
        raise _Unusual


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)
