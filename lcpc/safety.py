"""Limits and checks for files that come from elsewhere (models, arrays, output folders).

Guarantees:
- ``inside(folder, name)`` resolves ``name`` under ``folder`` (following symlinks) and
  returns the path only when it stays inside ``folder``; absolute names, ``..`` and
  symlinks that leave the folder give ``None``;
- ``check_tensor_sizes`` runs ONNX shape inference before any constant is computed and
  refuses a model in which one tensor would exceed ``MAX_TENSOR_BYTES`` (a
  ConstantOfShape or Range of 10^12 elements), so folding cannot hang or exhaust memory;
- ``infer_shapes`` is ONNX shape inference that a hostile model cannot turn into a hang:
  data propagation is skipped when a long integer vector would be propagated; it never
  serialises or copies the model's large weights;
  ``check_loops`` refuses Loops without a small constant trip count, which folding or
  shape probing would otherwise run for as long as the model says;
- ``load_array`` reads ``.npy``/``.npz`` headers before any data: object arrays,
  pickles and arrays over ``MAX_TENSOR_BYTES`` are refused without being loaded (a
  memory-mapped ``.npy``, which is never loaded whole, only by its header);
  ``save_arrays`` writes an ``.npz`` under any names, never pickling;
- ``printable`` escapes control characters, so names inside a hostile file cannot
  drive the terminal when an error message is printed; it looks at no more of the text
  than it shows;
- ``signals_deferred`` holds SIGINT and SIGTERM back for the length of a block (a cleanup,
  a rename into place) and then lets the first of them act as it would have, so a signal
  cannot cut such a block short.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lcpc.errors import LcpcError

MAX_MODEL_BYTES = (2 << 30) - 1  # protobuf cannot hold more; larger models use external data
MAX_TENSOR_BYTES = 2 << 30  # one activation, weight or input array
MAX_NPZ_MEMBERS = 1024
MAX_LOOP_TRIPS = 1 << 16  # iterations of constant Loops, nested ones multiplied
MAX_SHAPE_VALUES = 4096  # longest 1-D integer tensor that shape inference may propagate


def inside(folder: Path, name: str) -> Path | None:
    """``folder/name`` resolved, or None when it would leave ``folder`` (or is not a plain name)."""
    if not name or "\0" in name or os.path.isabs(name):
        return None
    root = Path(folder).resolve()
    try:
        target = (root / name).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, odd names
        return None
    return target if root in target.parents else None


def nbytes(shape, itemsize: int) -> int:
    """Bytes of a tensor, in Python integers (no int64 overflow on hostile dims)."""
    return math.prod(int(d) for d in shape) * int(itemsize)


def itemsize(elem_type: int) -> int:
    """Bytes per element of an ONNX element type (1 for types numpy cannot hold)."""
    try:
        return max(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize, 1)
    except (KeyError, TypeError, ValueError):
        return 1


def check_tensor_sizes(model: onnx.ModelProto, where: str) -> None:
    """Refuse before folding when shape inference shows a tensor over ``MAX_TENSOR_BYTES``."""
    try:
        inferred = infer_shapes(model)
    except Exception:
        return  # shape problems are reported after folding, with context
    for name, dims, elem_type in _known_shapes(inferred):
        size = nbytes(dims, itemsize(elem_type))
        if size > MAX_TENSOR_BYTES:
            raise LcpcError(f"{where}: tensor '{printable(name, 200)}' would have shape {tuple(dims)} "
                            f"({size / 2**30:.3g} GiB), beyond lcpc's limit of {MAX_TENSOR_BYTES >> 30} GiB "
                            f"per tensor; check the model's shapes and --input-shape")


def check_loops(model: onnx.ModelProto, where: str) -> None:
    """Refuse a Loop that could run unbounded: lcpc runs parts of a model while loading it
    (constant folding, shape probing), so every Loop needs a constant trip count, and nested
    ones together at most ``MAX_LOOP_TRIPS`` iterations."""
    _check_loops(model.graph.node, _constants(model.graph, {}), 1, where)
    for function in model.functions:
        _check_loops(function.node, _constants(function, {}), 1, where)


def _constants(graph, outer: dict) -> dict:
    found = dict(outer)
    found.update({t.name: t for t in getattr(graph, "initializer", [])})
    for n in graph.node:
        if n.op_type == "Constant" and n.output:
            for a in n.attribute:
                if a.name == "value" and a.HasField("t"):
                    found[n.output[0]] = a.t
                elif a.name == "value_int":
                    found[n.output[0]] = helper.make_tensor("", onnx.TensorProto.INT64, [], [a.i])
    return found


def _check_loops(nodes, constants: dict, outer: int, where: str) -> None:
    for n in nodes:
        trips = 1
        if n.op_type == "Loop" and n.domain in ("", "ai.onnx"):
            tensor = constants.get(n.input[0]) if n.input else None
            try:
                trips = int(numpy_helper.to_array(tensor).reshape(-1)[0]) if tensor is not None else -1
            except Exception:
                trips = -1
            if trips < 0 or trips * outer > MAX_LOOP_TRIPS:
                raise LcpcError(f"{where}: Loop '{printable(n.name or '(unnamed)', 200)}' has no constant trip "
                                f"count of at most {MAX_LOOP_TRIPS} (nested loops counted together); lcpc runs "
                                f"parts of the model while loading it and cannot bound this one")
            trips = max(trips, 1)
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _check_loops(sub.node, _constants(sub, constants), outer * trips, where)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference, with data propagation (Shape -> Gather -> Reshape chains) only when
    no 1-D integer tensor is longer than ``MAX_SHAPE_VALUES``: onnx propagates such tensors value
    by value, which a hostile Range or initializer turns into minutes and gigabytes.

    Inference runs on a skeleton of the model whose large initializers are typed graph inputs
    (shape inference needs only their shapes), so the weights are neither serialised nor
    copied; the result is ``model`` itself, its nodes, value_info and outputs replaced by the
    inferred ones (the same annotations onnx's own inference returns in a copy)."""
    skeleton = skeleton_of(model)
    plain = onnx.shape_inference.infer_shapes(skeleton)
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
               onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16,
               onnx.TensorProto.UINT8}
    long_vectors = any(len(dims) == 1 and dims[0] > MAX_SHAPE_VALUES
                       for _, dims, elem_type in _known_shapes(plain) if elem_type in integer)
    long_vectors |= any(t.data_type in integer and len(t.dims) == 1 and t.dims[0] > MAX_SHAPE_VALUES
                        for t in _constant_tensors(model.graph))
    inferred = plain if long_vectors else onnx.shape_inference.infer_shapes(skeleton, data_prop=True)
    g, h = model.graph, inferred.graph
    for field in ("node", "value_info", "output"):
        g.ClearField(field)
        getattr(g, field).extend(getattr(h, field))
    return model


def skeleton_of(model: onnx.ModelProto, keep: Callable[[onnx.TensorProto], bool] | None = None
                ) -> onnx.ModelProto:
    """``model`` without the data of its initializers over ``MAX_SHAPE_VALUES`` elements (or those
    ``keep`` rejects): those become graph inputs of the same type and shape (small ones, which
    may be shape data, stay). The skeleton holds copies of what it keeps, none of ``model``'s
    memory, so ``model`` can be freed once its weights are read."""
    keep = keep or (lambda t: math.prod(t.dims) <= MAX_SHAPE_VALUES)
    g = model.graph
    skeleton = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    s = skeleton.graph
    s.name = g.name
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(s, field).extend(getattr(g, field))
    inputs = {i.name for i in g.input}
    for t in g.initializer:
        if keep(t):
            s.initializer.append(t)
        elif t.name not in inputs:
            s.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return skeleton


def _known_shapes(model: onnx.ModelProto):
    """(name, dims, elem_type) of every declared value whose dims are all known and non-negative."""
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if not (vi.type.HasField("tensor_type") and t.HasField("shape")):
            continue
        if all(d.HasField("dim_value") and d.dim_value >= 0 for d in t.shape.dim):
            yield vi.name, [d.dim_value for d in t.shape.dim], t.elem_type


def _constant_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.HasField("t"):
                yield a.t


def load_array(path: Path, mmap: bool = False) -> dict[str, np.ndarray] | np.ndarray:
    """An ``.npy`` array or an ``.npz``'s arrays by name; headers are checked before data is read.
    ``mmap``: an ``.npy`` is memory-mapped read-only instead of read (``np.memmap``), and may then
    exceed ``MAX_TENSOR_BYTES``, which bounds memory, not files; an ``.npz`` is refused."""
    try:
        if mmap:
            if zipfile.is_zipfile(path):
                raise LcpcError(f"{path}: an .npz cannot be memory-mapped; save the array as one .npy")
            with open(path, "rb") as f:
                _check_header(f, str(path), limit=None)
            return np.load(path, mmap_mode="r", allow_pickle=False)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                members = [m for m in zf.namelist() if m.endswith(".npy")]
                if len(zf.namelist()) > MAX_NPZ_MEMBERS or not members:
                    raise LcpcError(f"{path}: an .npz must hold 1 to {MAX_NPZ_MEMBERS} .npy arrays")
                for m in members:
                    with zf.open(m) as f:
                        _check_header(f, f"{path}[{m[:-4]}]")
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        with open(path, "rb") as f:
            _check_header(f, str(path))
        return np.load(path, allow_pickle=False)
    except LcpcError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, SyntaxError) as exc:
        raise LcpcError(f"{path}: not a readable .npy/.npz array file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'})") from None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` of ``arrays`` under their own names (any name, even ``file``), never pickled."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)


def _check_header(f, where: str, limit: int | None = MAX_TENSOR_BYTES) -> None:
    try:
        version = np.lib.format.read_magic(f)
    except ValueError:
        raise LcpcError(f"{where}: not an .npy array (pickled or other data is never loaded)") from None
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    if dtype.hasobject:
        raise LcpcError(f"{where}: holds Python objects (dtype {dtype}); lcpc loads numeric arrays only "
                        f"and never unpickles")
    if limit is not None and nbytes(shape, dtype.itemsize) > limit:
        raise LcpcError(f"{where}: array of shape {tuple(shape)} is larger than lcpc's limit of "
                        f"{MAX_TENSOR_BYTES >> 30} GiB")


def printable(text: object, limit: int = 2000) -> str:
    """``text`` (any object, as ``str`` gives it) on one line, control characters escaped, at most
    ``limit`` characters."""
    shown = str(text)[:limit + 1]  # escaping never shortens: the rest would be cut anyway
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in shown.replace("\n", " "))
    return out if len(out) <= limit else out[:limit] + "..."


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, printable, for a one-line error."""
    text = str(exc).strip()
    return printable(text.splitlines()[0], 300) if text else type(exc).__name__


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Run the block with SIGINT and SIGTERM held back; the first that arrived then acts as it
    would have (its Python handler, or the default action). Only the main thread can handle
    signals; elsewhere the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[signal.Signals] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, _frame: arrived.append(signal.Signals(signum)))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if arrived:
            handler = previous[arrived[0]]
            if callable(handler):
                handler(arrived[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(arrived[0])
