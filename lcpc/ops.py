"""The registry of per-op channel rules: how each ONNX op maps channel spaces.

Every op is classified into one :class:`Behaviour` (channel axis is axis 1, NCHW):

- ``Channelwise``  output channel c depends only on input channel c (activations,
  BN, pooling, spatial Pad/Resize/Slice, broadcast binary ops, ...). Inputs are
  sliced per their role: ``act`` (numpy broadcasting against the output), ``vec``
  (a per-channel vector on axis 0, BatchNormalization), ``keep`` (never sliced),
  ``sizes`` (Resize sizes: the channel entry is rewritten per branch).
- ``Dense``        every output channel mixes every input channel through a constant
  weight (Conv group=1, Gemm, MatMul, ConvTranspose group=1): R->S is free, S->S is
  either the LCP cut or an exact exchange.
- ``Grouped``      grouped / depthwise Conv: each group stays inside one branch.
- ``Concat``       channel-axis Concat: a composite of its inputs' spaces.
- ``ChannelSlice`` Split / Slice on the channel axis: sub-ranges of a space.
- ``Reshape``      Flatten / Reshape / Squeeze / Unsqueeze that keep the channel axis
  (after global pooling, or a C*H*W flatten before a classifier).
- ``Sync``         anything else: an exact all-gather in front of it, replicated
  compute, and a reason the report prints. Never a silent wrong answer.

Adding an op means one entry in ``RULES`` and one test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lcpc.ir import Graph, Node


@dataclass(frozen=True)
class Channelwise:
    """``broadcast``: inputs align with the output by numpy broadcasting (binary ops);
    otherwise every ``act`` input has its channels on ``in_axis``. The outputs have
    their channels on ``out_axis`` (a Transpose or a keepdims=0 reduction moves it)."""

    roles: tuple[str, ...]
    broadcast: bool = False
    in_axis: int = 1
    out_axis: int = 1
    kind: str = "channelwise"


@dataclass(frozen=True)
class Dense:
    """``in_axis``/``out_axis`` index the weight; ``axis`` is the activations' channel axis
    (1 for Conv and Gemm, the last axis for MatMul)."""

    weight: int
    in_axis: int
    out_axis: int
    bias: int | None
    axis: int = 1
    kind: str = "dense"


@dataclass(frozen=True)
class Grouped:
    groups: int
    kind: str = "grouped"


@dataclass(frozen=True)
class Concat:
    axis: int = 1
    kind: str = "concat"


@dataclass(frozen=True)
class ChannelSlice:
    ranges: tuple[tuple[int, int], ...]  # one [start, stop) per output
    axis: int = 1
    kind: str = "slice"


@dataclass(frozen=True)
class Reshape:
    in_axis: int = 1
    out_axis: int = 1
    kind: str = "reshape"


@dataclass(frozen=True)
class Sync:
    reason: str
    unsupported: bool = False
    kind: str = "sync"


Behaviour = Channelwise | Dense | Grouped | Concat | ChannelSlice | Reshape | Sync

UNARY = ("Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
         "Softplus", "Softsign", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil",
         "Round", "Erf", "Gelu", "Mish", "ThresholdedRelu", "Sign", "Not", "Cast", "Identity",
         "IsNaN", "IsInf", "Sin", "Cos", "Shrink")
BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal",
          "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "BitShift")
POOLS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
REDUCES = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")


def _act(node: Node, g: Graph, ca: int) -> Channelwise:
    if len(node.inputs) == 1:
        return Channelwise(("act",), in_axis=ca, out_axis=ca)
    return Channelwise(tuple("act" for _ in node.inputs), broadcast=True, out_axis=_broadcast_axis(node, g, ca))


def _broadcast_axis(node: Node, g: Graph, ca: int) -> int:
    """The output's channel axis, from ``ca`` in input 0's coordinates, by broadcasting."""
    return ca + len(g.info(node.outputs[0]).shape) - len(g.info(node.inputs[0]).shape)


def _unary(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise."""
    return _act(node, g, ca)


def _elementwise(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise with numpy broadcasting: per-channel constants are sliced per branch."""
    return _act(node, g, ca)


def _clip(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise."""  # min/max are scalars
    return Channelwise(("act", "keep", "keep")[: len(node.inputs)], in_axis=ca, out_axis=ca)


def _dropout(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise (removed at load when its mask is unused)."""
    return Channelwise(("act",) + ("keep",) * (len(node.inputs) - 1), in_axis=ca, out_axis=ca)


def _mixing(what: str) -> Callable[[Node, Graph, int], Behaviour]:
    def rule(node: Node, g: Graph, ca: int) -> Behaviour:
        return _mixes(what)
    rule.__doc__ = f"exact sync: {what} mixes channels."
    return rule


def _mixes(what: str) -> Sync:
    return Sync(f"{what} mixes channels")


def _rank(g: Graph, name: str) -> int:
    return len(g.info(name).shape)


def _const(g: Graph, name: str) -> np.ndarray | None:
    return g.constants.get(name) if name else None


def _conv(node: Node, g: Graph, ca: int) -> Behaviour:
    """dense when group=1 (R->S free, S->S cut or exchange); grouped/depthwise otherwise (each group in one branch)."""
    w = _const(g, node.inputs[1])
    if w is None:
        return Sync("Conv weights are computed at run time")
    if ca != 1:
        return Sync("Conv on a tensor whose channels are not on axis 1")
    if len(node.inputs) > 2 and node.inputs[2] and _const(g, node.inputs[2]) is None:
        return Sync("Conv bias is computed at run time")
    group = int(node.attr("group", 1))
    if group == 1:
        return Dense(1, 1, 0, 2 if len(node.inputs) > 2 and node.inputs[2] else None)
    return Grouped(group)


def _conv_transpose(node: Node, g: Graph, ca: int) -> Behaviour:
    """dense when group=1; grouped/depthwise otherwise (each group in one branch)."""
    if _const(g, node.inputs[1]) is None:
        return Sync("ConvTranspose weights are computed at run time")
    if ca != 1:
        return Sync("ConvTranspose on a tensor whose channels are not on axis 1")
    if len(node.inputs) > 2 and node.inputs[2] and _const(g, node.inputs[2]) is None:
        return Sync("ConvTranspose bias is computed at run time")
    group = int(node.attr("group", 1))
    if group != 1:
        return Grouped(group)
    return Dense(1, 0, 1, 2 if len(node.inputs) > 2 and node.inputs[2] else None)


def _gemm(node: Node, g: Graph, ca: int) -> Behaviour:
    """dense with a constant weight (classifier: exact merge at the head); transA=1 or two activations: exact sync."""
    if _const(g, node.inputs[1]) is None:
        return _mixes("Gemm between two activations")
    if node.attr("transA", 0) or ca != 1:
        return Sync("Gemm with transA=1 has no channel axis lcpc can split")
    bias = 2 if len(node.inputs) > 2 and node.inputs[2] else None
    if bias is not None and _const(g, node.inputs[2]) is None:
        return Sync("Gemm bias is computed at run time")
    return Dense(1, 1, 0, bias) if node.attr("transB", 0) else Dense(1, 0, 1, bias)


def _matmul(node: Node, g: Graph, ca: int) -> Behaviour:
    """dense for [..., C] x constant [C, M] (channels last: a classifier, or a channels-last linear layer); between activations (attention) or over another axis: exact sync."""
    w = _const(g, node.inputs[1])
    if w is None:
        return _mixes("MatMul between two activations (attention)")
    rank = _rank(g, node.inputs[0])
    if w.ndim != 2 or rank < 2 or ca != rank - 1:
        return Sync("MatMul over a non-channel axis")
    return Dense(1, 0, 1, None, axis=rank - 1)


def _bn(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise, parameters sliced per branch (folded into a preceding Conv at load)."""
    if int(node.attr("training_mode", 0)) or len([o for o in node.outputs if o]) > 1:
        return Sync("BatchNormalization in training mode")
    if ca != 1:
        return Sync("BatchNormalization on a tensor whose channels are not on axis 1")
    return Channelwise(("act", "vec", "vec", "vec", "vec"))


def _instance_norm(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise, parameters sliced per branch."""
    if ca != 1:
        return Sync("InstanceNormalization on a tensor whose channels are not on axis 1")
    return Channelwise(("act", "vec", "vec"))


def _pool(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise (an indices output: exact sync)."""
    if len([o for o in node.outputs if o]) > 1:
        return Sync(f"{node.op} with an indices output")
    if ca != 1:
        return Sync(f"{node.op} pools axes 2.. but the channels are on axis {ca}")
    return Channelwise(("act",))


def _pad(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise when only spatial axes are padded; otherwise exact sync."""
    pads = _const(g, node.inputs[1]) if len(node.inputs) > 1 else node.attr("pads")
    if pads is None:
        return Sync("Pad with run-time pads")
    pads = np.asarray(pads).reshape(-1)
    given = _const(g, node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    rank = _rank(g, node.inputs[0])
    axes = list(range(rank)) if given is None else [int(a) % rank for a in given]
    n = len(axes)
    touched = {a for i, a in enumerate(axes) if pads[i] or pads[i + n]}
    if touched & {0, ca}:
        return Sync("Pad on the batch or channel axis")
    return Channelwise(("act",) + ("keep",) * (len(node.inputs) - 1), in_axis=ca, out_axis=ca)


def _resize(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise when the channel axis is not scaled (sizes rewritten per branch)."""
    roles = ["act", "keep", "keep", "sizes"][: len(node.inputs)]
    scales = _const(g, node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] else None
    if scales is not None and scales.size and (scales[0] != 1 or scales[ca] != 1):
        return Sync("Resize that scales the channel axis")
    if ca != 1:
        return Sync("Resize of a tensor whose channels are not on axis 1")
    if len(node.inputs) > 3 and node.inputs[3] and _const(g, node.inputs[3]) is None:
        return Sync("Resize with run-time sizes")
    return Channelwise(tuple(roles))


def _upsample(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise when the channel axis is not scaled."""
    scales = _const(g, node.inputs[1]) if len(node.inputs) > 1 else None
    if scales is None or scales[0] != 1 or scales[1] != 1 or ca != 1:
        return Sync("Upsample that scales the channel axis or has run-time scales")
    return Channelwise(("act", "keep"))


def _softmax(node: Node, g: Graph, ca: int) -> Behaviour:
    """exact sync over the channel axis (runs on the head after the classifier); channelwise over a spatial axis."""
    rank = _rank(g, node.inputs[0])
    axis = int(node.attr("axis", -1 if g.opset >= 13 else 1)) % rank
    if g.opset < 13 and axis <= ca:
        return _mixes(f"{node.op} over axes >= {axis}")
    if axis == ca:
        return _mixes(f"{node.op} over the channel axis")
    if axis == 0:
        return Sync(f"{node.op} over the batch axis")
    return Channelwise(("act",), in_axis=ca, out_axis=ca)


def _reduce(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise over spatial axes; exact sync over the channel or batch axis."""
    rank = _rank(g, node.inputs[0])
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        axes = _const(g, node.inputs[1])
        if axes is None:
            return Sync(f"{node.op} over run-time axes")
    if axes is None or len(axes) == 0:
        return _mixes(f"{node.op} over all axes")
    axes = {int(a) % rank for a in np.asarray(axes).reshape(-1)}
    if axes & {0, ca}:
        return _mixes(f"{node.op} over the batch or channel axis")
    out_axis = ca if node.attr("keepdims", 1) else ca - len([a for a in axes if a < ca])
    return Channelwise(("act",) + ("keep",) * (len(node.inputs) - 1), in_axis=ca, out_axis=out_axis)


def _concat(node: Node, g: Graph, ca: int) -> Behaviour:
    """channel axis: composite of the inputs' spaces; other axes: channelwise."""
    rank = _rank(g, node.outputs[0])
    axis = int(node.attr("axis")) % rank
    if rank < 2:
        return Sync("Concat of vectors")
    if axis == ca:
        return Concat(axis)
    return Channelwise(tuple("act" for _ in node.inputs), broadcast=True, out_axis=ca)


def _split(node: Node, g: Graph, ca: int) -> Behaviour:
    """channel axis: sub-ranges of the input's space; other axes: channelwise."""
    rank = _rank(g, node.inputs[0])
    axis = int(node.attr("axis", 0)) % rank
    if axis != ca:
        return Channelwise(("act",) + ("keep",) * (len(node.inputs) - 1), in_axis=ca, out_axis=ca)
    sizes = [g.info(o).shape[ca] for o in node.outputs]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return ChannelSlice(tuple((int(s), int(s + n)) for s, n in zip(starts, sizes)), ca)


def _slice(node: Node, g: Graph, ca: int) -> Behaviour:
    """channel axis (step 1): a sub-range of the space; spatial axes: channelwise; batch axis: exact sync."""
    params = [_const(g, i) if i else None for i in node.inputs[1:]]
    if len(node.inputs) < 3 or any(p is None for p, i in zip(params, node.inputs[1:]) if i):
        return Sync("Slice with run-time bounds")
    rank = _rank(g, node.inputs[0])
    starts, ends = np.asarray(params[0]), np.asarray(params[1])
    given = params[2] if len(params) > 2 and params[2] is not None else np.arange(len(starts))
    steps = params[3] if len(params) > 3 and params[3] is not None else np.ones(len(starts), np.int64)
    axes = [int(a) % rank for a in given]
    if 0 in axes:
        return Sync("Slice on the batch axis")
    if ca not in axes:
        return Channelwise(("act",) + ("keep",) * (len(node.inputs) - 1), in_axis=ca, out_axis=ca)
    if len(axes) > 1 or int(steps[0]) != 1:
        return Sync("Slice on the channel axis together with other axes or a step")
    c = g.info(node.inputs[0]).shape[ca]
    start, stop, _ = slice(int(starts[0]), int(ends[0])).indices(c)
    return ChannelSlice(((start, stop),), ca)


def _reshape_like(node: Node, g: Graph, ca: int) -> Behaviour:
    """keeps the space when it only flattens C*H*W or adds/removes unit dims after the channel axis; otherwise exact sync."""
    src, dst = g.info(node.inputs[0]).shape, g.info(node.outputs[0]).shape
    if len(src) >= 2 and len(dst) >= 2 and src[0] == dst[0]:
        c = src[ca]
        rest = [d for i, d in enumerate(src) if i not in (0, ca)]
        if all(d == 1 for d in rest) and c > 1 and list(dst[1:]).count(c) == 1 \
                and all(d in (1, c) for d in dst[1:]):
            return Reshape(ca, 1 + list(dst[1:]).index(c))
        if ca == 1 and len(dst) == 2 and dst[1] == int(np.prod(src[1:])):
            return Reshape(1, 1)
    return Sync(f"{node.op} from {list(src)} to {list(dst)} moves the channel axis")


def _flatten(node: Node, g: Graph, ca: int) -> Behaviour:
    """keeps the space at axis=1 (C*H*W features follow their channel); otherwise exact sync."""
    if int(node.attr("axis", 1)) % max(_rank(g, node.inputs[0]), 1) != 1:
        return Sync("Flatten at an axis other than 1")
    return _reshape_like(node, g, ca)


def _transpose(node: Node, g: Graph, ca: int) -> Behaviour:
    """channelwise: the channel axis is tracked to its new position (NCHW <-> NHWC)."""
    perm = node.attr("perm") or list(range(_rank(g, node.inputs[0])))[::-1]
    if perm[0] != 0:
        return Sync("Transpose that moves the batch axis")
    return Channelwise(("act",), in_axis=ca, out_axis=list(perm).index(ca))


RULES: dict[str, Callable[[Node, Graph, int], Behaviour]] = {
    **{op: _unary for op in UNARY},
    **{op: _elementwise for op in BINARY},
    **{op: _pool for op in POOLS},
    **{op: _reduce for op in REDUCES},
    "Clip": _clip,
    "Dropout": _dropout,
    "BatchNormalization": _bn,
    "InstanceNormalization": _instance_norm,
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Pad": _pad,
    "Resize": _resize,
    "Upsample": _upsample,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Hardmax": _softmax,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Flatten": _flatten,
    "Reshape": _reshape_like,
    "Squeeze": _reshape_like,
    "Unsqueeze": _reshape_like,
    "LRN": _mixing("LRN (local response normalisation)"),
    "Transpose": _transpose,
    "DepthToSpace": _mixing("DepthToSpace"),
    "SpaceToDepth": _mixing("SpaceToDepth"),
    "Einsum": _mixing("Einsum"),
    "LayerNormalization": _mixing("LayerNormalization"),
    "ArgMax": _mixing("ArgMax"),
    "TopK": _mixing("TopK"),
}


def classify(node: Node, g: Graph, ca: int = 1) -> Behaviour:
    """The channel behaviour of one node whose channels sit on axis ``ca`` of input 0
    (for broadcasting ops: the channel-carrying input's axis, aligned to input 0's rank);
    unknown ops are a ``Sync`` marked unsupported."""
    if node.domain not in ("", "ai.onnx"):
        return Sync(f"custom op {node.domain}.{node.op} is not modelled by lcpc", unsupported=True)
    rule = RULES.get(node.op)
    if rule is None:
        return Sync(f"op {node.op} is not modelled by lcpc's channel analysis", unsupported=True)
    if len(g.info(node.outputs[0]).shape) < 2:
        return Sync(f"{node.op} output has no channel axis")
    return rule(node, g, ca)


def rules_table() -> list[tuple[str, str]]:
    """(ops, treatment) rows: the registry grouped by the rule's docstring."""
    groups: dict[str, list[str]] = {}
    for op, rule in RULES.items():
        groups.setdefault((rule.__doc__ or "").strip().rstrip("."), []).append(op)
    rows = [(", ".join(sorted(ops)), doc) for doc, ops in groups.items()]
    rows.append(("any other op, custom domains", "exact sync: all-gather in front, replicated compute, "
                                                 "listed by name in the report"))
    return rows


def markdown_table() -> str:
    lines = ["| ops | how lcpc treats them |", "|---|---|"]
    lines += [f"| {ops} | {doc} |" for ops, doc in rules_table()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
