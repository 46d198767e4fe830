"""lcpc's intermediate representation: a plain, static-shaped dataflow graph.

Guarantees:
- ``Graph.nodes`` is in topological order; every activation tensor has a static
  shape and dtype in ``Graph.tensors``; weights live in ``Graph.constants`` as numpy
  arrays (never protobuf).
- ``from_onnx`` / ``to_onnx`` are the only places protobuf is read or written, so
  analysis, planning and passes work on numpy and Python values alone.
- ``to_onnx(from_onnx(m))`` computes the same function as ``m`` (round-trip test).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lcpc.errors import LcpcError


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and element type of one tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def with_dim(self, axis: int, size: int) -> TensorInfo:
        shape = list(self.shape)
        shape[axis] = size
        return TensorInfo(tuple(shape), self.dtype)


@dataclass
class Node:
    """One operator application. ``inputs`` may contain '' for an absent optional input."""

    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    domain: str = ""

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def describe(self) -> str:
        return f"node '{self.name}' (op {self.op})"


@dataclass
class Graph:
    """A static-shaped ONNX graph in numpy form."""

    nodes: list[Node]
    inputs: list[str]
    outputs: list[str]
    tensors: dict[str, TensorInfo]
    constants: dict[str, np.ndarray]
    opset: int
    extra_opsets: dict[str, int] = field(default_factory=dict)
    name: str = "graph"

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        """Recompute producer/consumer maps after the node list changed."""
        self._producer = {o: n for n in self.nodes for o in n.outputs if o}
        self._by_name = {n.name: n for n in self.nodes}
        self._consumers: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    self._consumers.setdefault(i, []).append(n)

    def node(self, name: str) -> Node:
        """The node called ``name`` (KeyError when there is none)."""
        return self._by_name[name]

    def has_node(self, name: str) -> bool:
        return name in self._by_name

    def copy(self, **changes: Any) -> Graph:
        """A new graph with ``changes`` (field=value) applied, e.g. ``g.copy(outputs=[...])``. The
        other fields' lists and dicts are copied, their items (nodes, arrays) shared, so either graph
        can be edited without touching the other's structure. The only way lcpc copies a graph."""
        fields = {"nodes": list(self.nodes), "inputs": list(self.inputs), "outputs": list(self.outputs),
                  "tensors": dict(self.tensors), "constants": dict(self.constants), "opset": self.opset,
                  "extra_opsets": dict(self.extra_opsets), "name": self.name}
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"Graph has no field {', '.join(sorted(unknown))}")
        return Graph(**{**fields, **changes})

    def with_constants(self, updates: dict[str, np.ndarray]) -> Graph:
        """The same graph with some constants replaced (the others shared, not copied)."""
        return self.copy(constants={**self.constants, **updates})

    def producer(self, tensor: str) -> Node | None:
        return self._producer.get(tensor)

    def consumers(self, tensor: str) -> list[Node]:
        return self._consumers.get(tensor, [])

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def info(self, tensor: str) -> TensorInfo:
        if tensor in self.constants:
            c = self.constants[tensor]
            return TensorInfo(tuple(c.shape), c.dtype)
        return self.tensors[tensor]


def _attr_value(a: onnx.AttributeProto) -> Any:
    value = helper.get_attribute_value(a)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8", errors="replace") for v in value]
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return value


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return tuple(dims)


def tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    """Static shapes and dtypes of every value the model declares (inputs, outputs, value_info)."""
    g = model.graph
    out: dict[str, TensorInfo] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shape = _shape_of(vi)
        elem = vi.type.tensor_type.elem_type
        if shape is None or not elem:
            continue
        out[vi.name] = TensorInfo(shape, np.dtype(helper.tensor_dtype_to_np_dtype(elem)))
    return out


def from_onnx(model: onnx.ModelProto, infos: dict[str, TensorInfo] | None = None,
              weights: dict[str, np.ndarray] | None = None) -> Graph:
    """Convert a shape-inferred ONNX model (no external data, no Constant nodes left) to a Graph.
    ``weights``: constants held outside the protobuf, which declares them as graph inputs."""
    g = model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    constants.update(weights or {})
    infos = dict(infos if infos is not None else tensor_infos(model))
    nodes = []
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            raise LcpcError(f"internal: Constant node '{name}' survived constant folding")
        nodes.append(Node(name, n.op_type, list(n.input), list(n.output),
                          {a.name: _attr_value(a) for a in n.attribute}, n.domain))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    extra = {o.domain: o.version for o in model.opset_import if o.domain not in ("", "ai.onnx")}
    inputs = [i.name for i in g.input if i.name not in constants]
    return Graph(nodes, inputs, [o.name for o in g.output], infos, constants, opset, extra,
                 g.name or "graph")


def _value_info(name: str, info: TensorInfo) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        name, helper.np_dtype_to_tensor_dtype(np.dtype(info.dtype)), list(info.shape))


def to_onnx(graph: Graph, ir_version: int = 8) -> onnx.ModelProto:
    """Serialise a Graph to an ONNX model (constants as initializers)."""
    nodes = []
    for n in graph.nodes:
        nodes.append(helper.make_node(n.op, n.inputs, n.outputs, name=n.name, domain=n.domain or None,
                                      **{k: _to_attr(v) for k, v in n.attrs.items()}))
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in graph.constants.items()]
    value_infos = [_value_info(t, graph.tensors[t]) for t in graph.tensors
                   if t not in graph.inputs and t not in graph.outputs and t not in graph.constants]
    onnx_graph = helper.make_graph(
        nodes, graph.name,
        [_value_info(i, graph.tensors[i]) for i in graph.inputs],
        [_value_info(o, graph.info(o)) for o in graph.outputs],
        initializer=inits, value_info=value_infos)
    opsets = [helper.make_opsetid("", graph.opset)]
    opsets += [helper.make_opsetid(d, v) for d, v in graph.extra_opsets.items()]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="lcpc")
    model.ir_version = ir_version
    return model


def _to_attr(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value)
    return value


def toposort(nodes: list[Node], available: set[str]) -> list[Node]:
    """Order nodes so each runs after the producers of its inputs (stable for ready nodes)."""
    produced = {o for n in nodes for o in n.outputs}
    ready = set(available)
    pending = list(nodes)
    ordered: list[Node] = []
    while pending:
        progress = []
        rest = []
        for n in pending:
            if all((not i) or i in ready or i not in produced for i in n.inputs):
                progress.append(n)
                ready.update(n.outputs)
            else:
                rest.append(n)
        if not progress:
            names = ", ".join(n.name for n in rest[:5])
            raise LcpcError(f"graph has a cycle or a missing producer around {names}")
        ordered.extend(progress)
        pending = rest
    return ordered
