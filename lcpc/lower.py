"""Lower a plan to a distributed program: per-device stages and the transfers between them.

Guarantees:
- every device's computation is split into *stages* at communication points; a
  value received from another device is available one *level* after the level that
  produced it, so running all stages of level 0, then the transfers they feed, then
  level 1, ... executes the program (no deadlock, branches of a level in parallel);
- each stage is a self-contained ``Graph`` (own inputs, outputs, weights) that
  becomes one ONNX file;
- every byte that crosses devices is a ``Transfer`` with its shape and dtype, so the
  manifest's byte counts are exact, not estimates;
- with no cut decisions the program computes exactly the original model (up to
  float summation order): tested over the zoo and random graphs.

Raw input on the wire (``lower(plan, raw=RawInput)``, chosen by ``raw_input``): when the
preprocessing is known and is exactly elementwise on the model's input (one image input
of the shape ``Preprocessing.input_shape``), the model input is fed and sent as the uint8
image (a quarter of the float32 bytes) and every device that consumes it starts with the
prologue ``Cast(float64) -> Mul(scale) -> Sub(mean) -> Div(std) -> Cast(model dtype)``
(per-channel constants shaped for the layout): exactly ``Preprocessing.normalize``, so the
outputs equal those of the float input preprocessed in numpy. Resizing, cropping and channel
reordering stay with whoever makes the uint8 tensor (``Preprocessing.raw``). The input
transfers then carry uint8 and are counted as such.

Local value names: an ``S`` tensor's own slice keeps the original name on each
branch; ``name:full`` is a gathered copy, ``name:take<n>`` a local channel selection,
``name@<src>`` a received piece.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lcpc import ops
from lcpc.analysis import channel_inputs
from lcpc.errors import LcpcError
from lcpc.images import Preprocessing
from lcpc.ir import Graph, Node, TensorInfo, toposort
from lcpc.plan import HEAD, Action, Plan
from lcpc.weights import DenseWeight


@dataclass(frozen=True)
class RawInput:
    """Model input ``name`` travels as the uint8 image; its consumers apply ``prep`` first.
    ``encoded``: it travels as the image file itself (JPEG/PNG bytes), which each device that
    reads it decodes to that uint8 image (``lcpc.images.decode``) before its stages run."""

    name: str
    prep: Preprocessing
    encoded: bool = False


@dataclass(frozen=True)
class Transfer:
    """One point-to-point message per inference."""

    tensor: str          # the original model tensor it carries (a slice or partial of it)
    kind: str            # input | gather | reduce | broadcast
    src: int
    src_name: str
    dst: int
    dst_name: str
    info: TensorInfo
    level: int           # level after which it is sent (inputs: sent before level 0)
    quant: Any = None    # compress.wire.WireQuant when the message travels as int8, else None (float)
    coded_bytes: int | None = None  # entropy-coded (deflate): its mean size on calibration data, else None

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    @property
    def wire_bytes(self) -> int:
        """Bytes on the wire per inference: the coded size when the message is entropy-coded."""
        return self.coded_bytes if self.coded_bytes is not None else self.nbytes


@dataclass
class Stage:
    id: str
    device: int
    level: int
    graph: Graph
    format: Any = None   # compress.quantize.Choice when lcpc.compress chose the stage's number format


@dataclass(frozen=True)
class Contribution:
    """What one branch contributes to a layer merged at the head: its partial outputs or its slice
    of the layer's input, as the head-local value ``name`` (a merge the runtime can answer without
    some branches: ``lcpc.runtime.degrade``)."""

    layer: str       # the merged layer (the classifier node)
    branch: int
    name: str        # local name on the head
    share: float     # the branch's fraction of the layer's input channels


@dataclass
class Program:
    stages: list[Stage]
    transfers: list[Transfer]
    outputs: dict[str, str]            # model output -> local name on the head device
    inputs: dict[str, TensorInfo] = field(default_factory=dict)  # model inputs (all on the head)
    raw: RawInput | None = None        # the model input that is fed and sent as the uint8 image
    contributions: list[Contribution] = field(default_factory=list)  # of every layer merged at the head

    def bytes_per_inference(self) -> int:
        return sum(t.wire_bytes for t in self.transfers)


@dataclass
class _Device:
    nodes: list[Node] = field(default_factory=list)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    levels: dict[str, int] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)


INPUT_WIRES = ("auto", "float", "uint8", "encoded")


def raw_input(graph: Graph, prep: Preprocessing | None, wire: str = "auto") -> RawInput | None:
    """How the model input travels: ``wire`` ``float`` (as the model takes it), ``uint8`` (the raw
    image; needs ``prep`` to be exactly elementwise on the input), ``encoded`` (the image file,
    decoded to that uint8 image on each device; one image per inference) or ``auto`` (uint8 when
    there is a preprocessing). A preprocessing that cannot give the model's one float input (its
    shape, channels, layout) is refused whatever the wire."""
    if wire not in INPUT_WIRES:
        raise LcpcError(f"input wire '{wire}': choose {', '.join(INPUT_WIRES)}")
    if prep is None:
        if wire in ("float", "auto"):
            return None
        raise LcpcError(f"--input-wire {wire} needs the preprocessing: add --preprocess size=...,mean=...,std=...")
    why = None
    if len(graph.inputs) != 1:
        why = f"the model has {len(graph.inputs)} inputs (an image feeds exactly one)"
    else:
        info = graph.info(graph.inputs[0])
        want = prep.input_shape(info.shape[0] if info.shape else 1)
        if not np.issubdtype(info.dtype, np.floating):
            why = f"the model input '{graph.inputs[0]}' is {info.dtype.name}, not a float image"
        elif tuple(info.shape) != want:
            why = (f"the model input '{graph.inputs[0]}' has shape {list(info.shape)}, the preprocessing "
                   f"(size {prep.size[0]}x{prep.size[1]}, {prep.channels}, {prep.layout}) gives {list(want)}")
    if why is not None:  # the preprocessing could never feed this model, whatever travels on the wire
        raise LcpcError(f"--preprocess: {why}; fix its size, channels or layout to give the model's input")
    if wire == "encoded" and info.shape[0] != 1:
        raise LcpcError(f"--input-wire encoded: the model input '{graph.inputs[0]}' takes a batch of "
                        f"{info.shape[0]}; an encoded image is one: use --input-wire uint8 or float")
    return None if wire == "float" else RawInput(graph.inputs[0], prep, encoded=wire == "encoded")


def lower(plan: Plan, raw: RawInput | None = None) -> Program:
    return _Lowering(plan, raw).run()


class _Lowering:
    def __init__(self, plan: Plan, raw: RawInput | None = None) -> None:
        self.plan, self.g, self.k = plan, plan.graph, plan.k
        self.raw = raw
        self.devices = [_Device() for _ in range(self.k)]
        self.transfers: list[Transfer] = []
        self.cache: dict[tuple, str] = {}
        self.contributions: list[Contribution] = []

    # ----------------------------------------------------------------- building blocks
    def _unique(self, d: int, base: str) -> str:
        dev, name, n = self.devices[d], base, 1
        while name in dev.names:
            n += 1
            name = f"{base}~{n}"
        dev.names.add(name)
        return name

    def const(self, d: int, value: np.ndarray, hint: str) -> str:
        name = self._unique(d, hint)
        # np.array, not np.ascontiguousarray: that one returns at least 1-D arrays, and a
        # scalar that turns into shape (1,) breaks ops that need scalars (Loop's trip count).
        self.devices[d].constants[name] = np.array(value, order="C")
        self.devices[d].infos[name] = TensorInfo(tuple(value.shape), value.dtype)
        return name

    def emit(self, d: int, op: str, inputs: list[str], outputs: list[tuple[str, TensorInfo]],
             attrs: dict | None = None, name: str | None = None) -> list[str]:
        dev = self.devices[d]
        level = max([dev.levels[i] for i in inputs if i and i in dev.levels], default=0)
        out_names = []
        for base, info in outputs:
            out = self._unique(d, base)
            dev.infos[out] = info
            dev.levels[out] = level
            out_names.append(out)
        dev.nodes.append(Node(self._unique(d, name or f"{op}:{out_names[0]}"), op, list(inputs),
                              out_names, dict(attrs or {})))
        return out_names

    def send(self, tensor: str, kind: str, src: int, src_name: str, dst: int, dst_base: str) -> str:
        info = self.devices[src].infos[src_name]
        dst_name = self._unique(dst, dst_base)
        level = self.devices[src].levels[src_name]
        self.devices[dst].infos[dst_name] = info
        self.devices[dst].levels[dst_name] = 0 if kind == "input" else level + 1
        self.transfers.append(Transfer(tensor, kind, src, src_name, dst, dst_name, info, level))
        return dst_name

    def select(self, d: int, x: str, idx: np.ndarray, axis: int, base: str) -> str:
        """Channels ``idx`` of local value ``x`` along ``axis`` (Slice if contiguous, else Gather)."""
        info = self.devices[d].infos[x]
        if len(idx) == info.shape[axis] and np.array_equal(idx, np.arange(len(idx))):
            return x
        out_info = info.with_dim(axis, len(idx))
        if len(idx) and np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
            args = [self.const(d, np.array([v], np.int64), f"{base}.{k}")
                    for k, v in (("start", idx[0]), ("end", idx[-1] + 1), ("axis", axis))]
            return self.emit(d, "Slice", [x] + args, [(base, out_info)])[0]
        ind = self.const(d, np.asarray(idx, np.int64), f"{base}.idx")
        return self.emit(d, "Gather", [x, ind], [(base, out_info)], {"axis": axis})[0]

    # ----------------------------------------------------------------- materialising
    def full(self, t: str, d: int) -> str:
        """The whole tensor ``t`` on device ``d`` (communicating if needed)."""
        key = (t, d, "full")
        if key in self.cache:
            return self.cache[key]
        layout = self.plan.layouts[t]
        if t in self.g.inputs:
            name = self.fed(t, d)
            if self.raw is not None and t == self.raw.name:
                name = self.prologue(d, name)
        elif layout == "R":
            name = self.cache[(t, d, "R")]
        elif layout == "H":
            head = self.cache[(t, HEAD, "H")]
            name = head if d == HEAD else self.send(t, "broadcast", HEAD, head, d, f"{t}@head")
        else:  # S: all-gather
            pieces, order = [], []
            for j in range(self.k):
                piece = self.cache[(t, j, "S")]
                pieces.append(piece if j == d else self.send(t, "gather", j, piece, d, f"{t}@{j}"))
                order.append(self.plan.own(t, j))
            info, axis = self.g.info(t), self.axis(t)
            cat = self.emit(d, "Concat", pieces, [(f"{t}:cat", info)], {"axis": axis})[0]
            perm = np.concatenate(order)
            name = self.select(d, cat, np.argsort(perm), axis, f"{t}:full")
        self.cache[key] = name
        return name

    def fed(self, t: str, d: int) -> str:
        """Model input ``t`` on device ``d`` as it arrives: fed on the head, sent to the others
        (the uint8 image when it travels raw)."""
        key = (t, d, "fed")
        if key not in self.cache:
            if d == HEAD:
                dev = self.devices[HEAD]
                info = self.g.info(t)
                dev.names.add(t)
                dev.infos[t] = TensorInfo(info.shape, np.dtype(np.uint8)) if self.raw and t == self.raw.name \
                    else info
                dev.levels[t] = 0
                self.cache[key] = t
            else:
                self.cache[key] = self.send(t, "input", HEAD, self.fed(t, HEAD), d, t)
        return self.cache[key]

    def prologue(self, d: int, x: str) -> str:
        """The preprocessing on the uint8 image ``x``: exactly ``Preprocessing.normalize`` (float64)."""
        raw = self.raw
        assert raw is not None, "the prologue is emitted only for a raw input"
        info = self.g.info(raw.name)
        wide = TensorInfo(info.shape, np.dtype(np.float64))
        scale, mean, std = raw.prep.constants()
        y = self.emit(d, "Cast", [x], [(f"{x}:f64", wide)], {"to": 11})[0]
        if scale != 1.0:
            y = self.emit(d, "Mul", [y, self.const(d, np.array(scale, np.float64), "prep.scale")],
                          [(f"{x}:scaled", wide)])[0]
        y = self.emit(d, "Sub", [y, self.const(d, mean, "prep.mean")], [(f"{x}:centred", wide)])[0]
        y = self.emit(d, "Div", [y, self.const(d, std, "prep.std")], [(f"{x}:normed", wide)])[0]
        to = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}[info.dtype]
        return self.emit(d, "Cast", [y], [(f"{x}:pre", info)], {"to": to})[0]

    def axis(self, t: str) -> int:
        return self.plan.analysis.axis(t)

    def mine(self, t: str, d: int, idx: np.ndarray, axis: int | None = None) -> str:
        """Channels ``idx`` (along ``axis``, default: the channel axis) of ``t`` on branch ``d``:
        the local slice if ``t`` is split this way, else a local selection from the whole tensor."""
        axis = self.axis(t) if axis is None else axis
        if self.plan.layouts.get(t) == "S" and axis == self.axis(t) and np.array_equal(self.plan.own(t, d), idx):
            return self.cache[(t, d, "S")]
        key = (t, d, "take", axis, np.asarray(idx).tobytes())
        if key not in self.cache:
            self.cache[key] = self.select(d, self.full(t, d), idx, axis, f"{t}:take")
        return self.cache[key]

    def define(self, t: str, d: int, layout: str, name: str) -> None:
        self.cache[(t, d, layout)] = name

    # ----------------------------------------------------------------- per-node lowering
    def run(self) -> Program:
        for node in self.g.nodes:
            self.lower_node(node)
        outputs = {o: self.full(o, HEAD) for o in self.g.outputs}
        self._dead_code(outputs)
        return Program(self._stages(outputs), self.transfers, outputs, {i: self.g.info(i) for i in self.g.inputs},
                       self.raw, self.contributions)

    def lower_node(self, node: Node) -> None:
        b = self.plan.analysis.behaviours[node.name]
        outs = [o for o in node.outputs if o]
        layout = self.plan.layouts[outs[0]]
        decision = self.plan.decisions.get(node.name)
        if layout == "S" and isinstance(b, ops.Dense) and decision is not None and decision.action == Action.EXCHANGE:
            self.exchange(node, b)
        elif layout == "S":
            handlers: dict[str, Callable[[Node, Any, int], None]] = {
                "channelwise": self.split_channelwise, "dense": self.split_dense,
                "grouped": self.split_grouped, "concat": self.split_concat,
                "slice": self.split_slice, "reshape": self.split_reshape,
            }
            handler = handlers[b.kind]
            for k in range(self.k):
                handler(node, b, k)
        elif layout == "H" and isinstance(b, ops.Dense) and decision is not None \
                and decision.action == Action.MERGE and self.plan.layouts.get(node.inputs[0]) == "S":
            self.merge(node, b)
        else:
            devices = [HEAD] if layout == "H" else range(self.k)
            for d in devices:
                ins = [i if (not i or i in self.g.constants) else self.full(i, d) for i in node.inputs]
                ins = [self._const_input(d, i) for i in ins]
                names = self.emit(d, node.op, ins, [(o, self.g.info(o)) for o in outs], node.attrs,
                                  node.name)
                for o, name in zip(outs, names):
                    self.define(o, d, layout, name)

    def _const_input(self, d: int, name: str, value: np.ndarray | None = None) -> str:
        if not name or name not in self.g.constants:
            return name
        return self.const(d, self.g.constants[name] if value is None else value, name)

    def _out_info(self, t: str, n: int) -> TensorInfo:
        return self.g.info(t).with_dim(self.axis(t), n)

    def split_channelwise(self, node: Node, b: ops.Channelwise, k: int) -> None:
        outs = [o for o in node.outputs if o]
        idx = self.plan.own(outs[0], k)
        out_rank = len(self.g.info(outs[0]).shape)
        aligned = dict(channel_inputs(node, self.g, b))
        ins: list[str] = []
        for i, (name, role) in enumerate(zip(node.inputs, b.roles)):
            if not name:
                ins.append(name)
            elif name in self.g.constants:
                value = self.g.constants[name]
                if role == "vec":
                    value = value[idx]
                elif role == "sizes":
                    value = value.copy()
                    value[1] = len(idx)
                elif role == "act" and aligned.get(i) is not None:
                    value = np.take(value, idx, axis=aligned[i])
                ins.append(self.const(k, value, name))
            elif role == "act" and aligned.get(i) is not None:
                axis = aligned[i]
                ins.append(self.mine(name, k, idx, axis))
            elif role in ("act", "keep"):
                ins.append(self.full(name, k))
            else:
                raise LcpcError(f"{node.describe()}: input '{name}' with role {role} must be a constant")
        assert out_rank >= 2
        names = self.emit(k, node.op, ins, [(o, self._out_info(o, len(idx))) for o in outs], node.attrs,
                          node.name)
        for o, name in zip(outs, names):
            self.define(o, k, "S", name)

    def _weight(self, node: Node, b: ops.Dense) -> tuple[DenseWeight, np.ndarray]:
        view = DenseWeight.of(node, b)
        return view, self.g.constants[view.weight]

    def _bias(self, node: Node, b: ops.Dense) -> np.ndarray | None:
        return None if b.bias is None else self.g.constants[node.inputs[b.bias]]

    def _emit_dense(self, d: int, node: Node, b: ops.Dense, x: str, w: np.ndarray, bias: np.ndarray | None,
                    out_base: str, out_info: TensorInfo) -> str:
        ins = [x, self.const(d, w, f"{node.name}.weight")]
        attrs = dict(node.attrs)
        if bias is not None:
            ins.append(self.const(d, bias, f"{node.name}.bias"))
        elif node.op == "Gemm":
            attrs.pop("beta", None)
        return self.emit(d, node.op, ins, [(out_base, out_info)], attrs, node.name)[0]

    def _slice_bias(self, node: Node, b: ops.Dense, idx: np.ndarray) -> np.ndarray | None:
        bias = self._bias(node, b)
        if bias is None or bias.size == 1:
            return bias
        return np.take(bias, idx, axis=bias.ndim - 1)

    def split_dense(self, node: Node, b: ops.Dense, k: int) -> None:
        x, out = node.inputs[0], node.outputs[0]
        idx = self.plan.own(out, k)
        view, w_all = self._weight(node, b)
        w = view.rows(w_all, idx)
        if self.plan.layouts[x] == "S":  # the cut: keep the block-diagonal part
            w = view.cols(w, self.plan.own(x, k))
            local = self.cache[(x, k, "S")]
        else:
            local = self.full(x, k)
        y = self._emit_dense(k, node, b, local, w, self._slice_bias(node, b, idx), out,
                             self._out_info(out, len(idx)))
        self.define(out, k, "S", y)

    def _has_full_everywhere(self, t: str) -> bool:
        return all((t, d, "full") in self.cache for d in range(self.k))

    def exchange(self, node: Node, b: ops.Dense) -> None:
        """Exact S->S: all-gather the input or reduce-scatter partial outputs, fewer bytes wins."""
        x, out = node.inputs[0], node.outputs[0]
        x_bytes, y_bytes = self.g.info(x).nbytes, self.g.info(out).nbytes
        view, w_all = self._weight(node, b)
        if self._has_full_everywhere(x) or x_bytes <= y_bytes:
            for k in range(self.k):
                idx = self.plan.own(out, k)
                y = self._emit_dense(k, node, b, self.full(x, k), view.rows(w_all, idx),
                                     self._slice_bias(node, b, idx), out, self._out_info(out, len(idx)))
                self.define(out, k, "S", y)
            return
        order = [self.plan.own(out, j) for j in range(self.k)]
        sizes = [len(o) for o in order]
        received: dict[int, list[str]] = defaultdict(list)
        for k in range(self.k):
            w = view.block(w_all, np.concatenate(order), self.plan.own(x, k))
            partial = self._emit_dense(k, node, b, self.cache[(x, k, "S")], w, None, f"{out}:partial",
                                       self.g.info(out))
            split = self.const(k, np.array(sizes, np.int64), f"{node.name}.sizes")
            pieces = self.emit(k, "Split", [partial, split],
                               [(f"{out}:part{j}", self._out_info(out, n)) for j, n in enumerate(sizes)],
                               {"axis": self.axis(out)})
            for j, piece in enumerate(pieces):
                received[j].append(piece if j == k else self.send(out, "reduce", k, piece, j, f"{out}@{k}"))
        for j in range(self.k):
            total = self._sum(j, received[j], self._slice_bias(node, b, order[j]), out,
                              self._out_info(out, sizes[j]), self.axis(out))
            self.define(out, j, "S", total)

    def _sum(self, d: int, parts: list[str], bias: np.ndarray | None, base: str, info: TensorInfo,
             axis: int) -> str:
        ins = list(parts)
        if bias is not None:
            shape = [1] * (len(info.shape) - 1)  # broadcast over the batch axis
            shape[axis - 1] = -1
            ins.append(self.const(d, bias.reshape(shape if bias.ndim == 1 else bias.shape), f"{base}.bias"))
        return self.emit(d, "Sum", ins, [(base, info)])[0]

    def merge(self, node: Node, b: ops.Dense) -> None:
        """Terminal Dense on an S input: gather features or reduce partial outputs at the head,
        as ``plan.merges`` says (``passes.merge``)."""
        x, out = node.inputs[0], node.outputs[0]
        view, w_all = self._weight(node, b)
        share = [len(self.plan.own(x, k)) / self.g.info(x).shape[self.axis(x)] for k in range(self.k)]
        if self.plan.merges[node.name] == "features":
            y = self._emit_dense(HEAD, node, b, self.full(x, HEAD), w_all,
                                 self._bias(node, b), out, self.g.info(out))
            gathered = {t.src: t.dst_name for t in self.transfers if t.tensor == x and t.kind == "gather"
                        and t.dst == HEAD}
            for k in range(self.k):
                piece = self.cache[(x, k, "S")] if k == HEAD else gathered[k]
                self.contributions.append(Contribution(node.name, k, piece, share[k]))
        else:
            parts = []
            for k in range(self.k):
                w = view.cols(w_all, self.plan.own(x, k))
                p = self._emit_dense(k, node, b, self.cache[(x, k, "S")], w, None, f"{out}:partial",
                                     self.g.info(out))
                parts.append(p if k == HEAD else self.send(out, "reduce", k, p, HEAD, f"{out}@{k}"))
                self.contributions.append(Contribution(node.name, k, parts[-1], share[k]))
            bias = self._bias(node, b)
            if bias is not None and node.op == "Gemm":
                bias = bias * float(node.attr("beta", 1.0))
            y = self._sum(HEAD, parts, bias, out, self.g.info(out), self.axis(out))
        self.define(out, HEAD, "H", y)

    def split_grouped(self, node: Node, b: ops.Grouped, k: int) -> None:
        """Whole groups per branch when the input is split; on a replicated input any output
        channel can go anywhere: each owned channel becomes its own group over a gathered copy
        of its group's inputs."""
        x, out = node.inputs[0], node.outputs[0]
        c_in, c_out = self.g.info(x).shape[1], self.g.info(out).shape[1]
        gi, go = c_in // b.groups, c_out // b.groups
        idx = self.plan.own(out, k)
        transpose = node.op == "ConvTranspose"  # weights [C_in, C_out/G, ...] instead of [C_out, C_in/G, ...]
        if self.plan.layouts[x] == "S":
            groups = np.unique(idx // go)
            in_idx = np.concatenate([np.arange(g * gi, (g + 1) * gi) for g in groups])
            weight = self.g.constants[node.inputs[1]][in_idx if transpose else idx]
            n_groups = len(groups)
        else:
            in_idx = np.concatenate([np.arange(o // go * gi, (o // go + 1) * gi) for o in idx])
            w = self.g.constants[node.inputs[1]]
            if transpose:  # rows: the input channels of each owned output's group; cols: that output
                weight = np.stack([w[o // go * gi:(o // go + 1) * gi, o % go] for o in idx])
                weight = weight.reshape(len(idx) * gi, 1, *w.shape[2:])
            else:
                weight = w[idx]
            n_groups = len(idx)
        ins = [self.mine(x, k, in_idx), self.const(k, weight, f"{node.name}.weight")]
        if len(node.inputs) > 2 and node.inputs[2]:
            ins.append(self.const(k, self.g.constants[node.inputs[2]][idx], f"{node.name}.bias"))
        attrs = dict(node.attrs, group=int(n_groups))
        y = self.emit(k, node.op, ins, [(out, self._out_info(out, len(idx)))], attrs, node.name)[0]
        self.define(out, k, "S", y)

    def split_concat(self, node: Node, b: ops.Concat, k: int) -> None:
        out = node.outputs[0]
        idx = self.plan.own(out, k)
        pieces, offset = [], 0
        for name in node.inputs:
            c = self.g.info(name).shape[b.axis]
            part = idx[(idx >= offset) & (idx < offset + c)] - offset
            offset += c
            if not len(part):
                continue
            if name in self.g.constants:
                pieces.append(self.const(k, np.take(self.g.constants[name], part, axis=b.axis), name))
            else:
                pieces.append(self.mine(name, k, part))
        y = self.emit(k, "Concat", pieces, [(out, self._out_info(out, len(idx)))], node.attrs, node.name)[0]
        self.define(out, k, "S", y)

    def split_slice(self, node: Node, b: ops.ChannelSlice, k: int) -> None:
        x = node.inputs[0]
        for out, (start, stop) in zip([o for o in node.outputs if o], b.ranges):
            idx = self.plan.own(out, k)
            if self.plan.layouts[x] == "S":
                own_in = self.plan.own(x, k)
                local = np.nonzero((own_in >= start) & (own_in < stop))[0]
                if not np.array_equal(own_in[local] - start, idx):
                    raise LcpcError(f"internal: {node.describe()} slice does not match the partition")
                y = self.select(k, self.cache[(x, k, "S")], local, b.axis, out)
            else:
                y = self.mine(x, k, idx + start)
            self.define(out, k, "S", y)

    def split_reshape(self, node: Node, b: ops.Reshape, k: int) -> None:
        x, out = node.inputs[0], node.outputs[0]
        idx = self.plan.own(out, k)
        src_shape = self.g.info(x).shape
        per_channel = int(np.prod(src_shape)) // (src_shape[0] * src_shape[b.in_axis])
        local = self.mine(x, k, np.unique(idx // per_channel))
        target = list(self.g.info(out).shape)
        target[0], target[b.out_axis] = 0, -1
        shape = self.const(k, np.array(target, np.int64), f"{node.name}.shape")
        y = self.emit(k, "Reshape", [local, shape], [(out, self._out_info(out, len(idx)))], name=node.name)[0]
        self.define(out, k, "S", y)

    # ----------------------------------------------------------------- finishing
    def _dead_code(self, outputs: dict[str, str]) -> None:
        """Drop nodes and transfers nothing downstream needs (replicated work no one reads)."""
        needed = {(HEAD, name) for name in outputs.values()}
        by_dst = {(t.dst, t.dst_name): t for t in self.transfers}
        producers = {(d, o): n for d, dev in enumerate(self.devices) for n in dev.nodes for o in n.outputs}
        work = list(needed)
        while work:
            key = work.pop()
            d, _ = key
            sources = []
            if key in producers:
                sources = [(d, i) for i in producers[key].inputs if i and i not in self.devices[d].constants]
            elif key in by_dst:
                t = by_dst[key]
                sources = [(t.src, t.src_name)]
            for s in sources:
                if s not in needed:
                    needed.add(s)
                    work.append(s)
        self.transfers = [t for t in self.transfers if (t.dst, t.dst_name) in needed]
        for d, dev in enumerate(self.devices):
            dev.nodes = [n for n in dev.nodes if any((d, o) in needed for o in n.outputs)]
            used = {i for n in dev.nodes for i in n.inputs}
            dev.constants = {c: v for c, v in dev.constants.items() if c in used}

    def _stages(self, outputs: dict[str, str]) -> list[Stage]:
        sent = {(t.src, t.src_name) for t in self.transfers}
        stages = []
        for d, dev in enumerate(self.devices):
            by_level: dict[int, list[Node]] = defaultdict(list)
            for n in dev.nodes:
                by_level[dev.levels[n.outputs[0]]].append(n)
            consumed_at = defaultdict(set)
            for n in dev.nodes:
                for i in n.inputs:
                    consumed_at[i].add(dev.levels[n.outputs[0]])
            for level in sorted(by_level):
                nodes = by_level[level]
                produced = {o for n in nodes for o in n.outputs}
                used = [i for n in nodes for i in n.inputs if i]
                inputs = list(dict.fromkeys(i for i in used if i not in produced and i not in dev.constants))
                outs = [o for n in nodes for o in n.outputs
                        if (d, o) in sent or any(lv > level for lv in consumed_at[o])
                        or (d == HEAD and o in outputs.values())]
                consts = {c: dev.constants[c] for c in dict.fromkeys(used) if c in dev.constants}
                infos = {t: dev.infos[t] for t in set(used) | produced if t not in consts}
                ordered = toposort(nodes, set(inputs) | set(consts))
                graph = Graph(ordered, inputs, outs, infos, consts, self.g.opset, dict(self.g.extra_opsets),
                              name=f"lcpc_d{d}_l{level}")
                stages.append(Stage(f"d{d}_l{level}", d, level, graph))
        return sorted(stages, key=lambda s: (s.level, s.device))
