"""Run an lcpc ``Graph`` in PyTorch, differentiably: the interpreter recovery trains.

Guarantees:
- ``GraphModule(graph)`` in eval mode computes what onnxruntime computes on
  ``to_onnx(graph)`` (float tolerance; tested on the zoo and the digits model), for
  any batch size when the graph keeps the batch on axis 0 (static Reshape/Flatten
  shapes are re-batched);
- the weights and biases of Conv, ConvTranspose, Gemm and MatMul are
  ``nn.Parameter``s; every other constant is a buffer;
- a subclass changes what a layer computes through three hooks only: ``weight(node)``
  (the weight a dense layer uses), ``before(node, arguments)`` (applied to a node's
  inputs) and ``after(node, outputs)`` (applied to a node's outputs), which is how the
  recovery student (``passes/recover/student.py``) masks cut weights, drops branches
  at the merge and inserts BatchNorms;
- an op it does not implement raises ``LcpcError`` at construction, naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lcpc.errors import LcpcError
from lcpc.ir import Graph, Node

Tensor = torch.Tensor
TRAINABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class GraphModule(nn.Module):
    """An ``lcpc.ir.Graph`` as a torch module; see the module docstring."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self._key: dict[str, str] = {}          # constant name -> parameter/buffer attribute
        self.params = nn.ParameterDict()
        self._static = graph.constants          # numpy values of constants, for static arguments
        trainable = self._trainable_constants()
        for i, (name, value) in enumerate(graph.constants.items()):
            key = f"c{i}"
            self._key[name] = key
            tensor = torch.from_numpy(np.array(value, copy=True))
            if name in trainable:
                self.params[key] = nn.Parameter(tensor.float())
            else:
                self.register_buffer(key, tensor, persistent=True)
        self._plans: list[tuple[Node, Callable]] = [(n, self._compile(n)) for n in graph.nodes]
        self._index = {o: i for i, n in enumerate(graph.nodes) for o in n.outputs if o}

    # ----------------------------------------------------------------- constants
    def _trainable_constants(self) -> set[str]:
        names = set()
        for n in self.graph.nodes:
            if n.op in TRAINABLE_OPS:
                for i in n.inputs[1:3]:
                    if i in self.graph.constants and np.issubdtype(self.graph.constants[i].dtype, np.floating):
                        names.add(i)
        return names

    def const(self, name: str) -> Tensor:
        key = self._key[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def weight(self, node: Node) -> Tensor:
        """The weight a dense node computes with (hook: the student masks it)."""
        return self.const(node.inputs[1])

    def before(self, node: Node, args: list) -> list:
        """A node's inputs as it sees them (hook: the student's branch dropout)."""
        return args

    def after(self, node: Node, outs: list) -> list:
        """A node's outputs as the rest of the graph sees them (hook: the student's BatchNorms)."""
        return outs

    def static(self, name: str) -> np.ndarray | None:
        """The numpy value of a constant input ('' or an activation gives None)."""
        return self._static.get(name) if name else None

    # ----------------------------------------------------------------- running
    def forward(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        env = self.run(dict(zip(self.graph.inputs, inputs)), self.graph.outputs)
        outs = tuple(env[o] for o in self.graph.outputs)
        return outs[0] if len(outs) == 1 else outs

    def run(self, feeds: dict[str, Tensor], want: Iterable[str]) -> dict[str, Tensor]:
        """Values of the tensors ``want`` (outputs or intermediates) for ``feeds``."""
        want = list(want)
        env: dict[str, Tensor] = dict(feeds)
        last = max((self._index[w] for w in want if w in self._index), default=len(self._plans) - 1)
        for node, fn in self._plans[:last + 1]:
            args = [None if not i else env[i] if i in env else self.const(i) for i in node.inputs]
            outs = self.after(node, fn(node, self.before(node, args)))
            for name, value in zip(node.outputs, outs):
                if name:
                    env[name] = value
        return {w: env[w] for w in want}

    # ----------------------------------------------------------------- compile
    def _compile(self, node: Node) -> Callable[[Node, list], list[Tensor]]:
        if node.domain not in ("", "ai.onnx"):
            raise LcpcError(f"{node.describe()}: recovery does not support custom op "
                            f"{node.domain}.{node.op} yet")
        builder = _BUILDERS.get(node.op)
        if builder is None:
            raise LcpcError(f"{node.describe()}: recovery does not support op {node.op} yet; "
                            f"convert without recovery, or ask for the op to be added")
        return builder(self, node)

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self.graph.info(tensor).shape


# --------------------------------------------------------------------------- helpers
def _ints(v) -> list[int]:
    return [int(x) for x in np.asarray(v).reshape(-1)]


def _spatial_pads(m: GraphModule, node: Node, kernel: list[int], strides: list[int],
                  dilations: list[int]) -> tuple[list[int], list[int]]:
    """(begin, end) pads per spatial axis, auto_pad resolved from the static shapes."""
    n = len(kernel)
    auto = node.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = _ints(node.attr("pads", [0] * 2 * n))
        return pads[:n], pads[n:]
    if auto == "VALID":
        return [0] * n, [0] * n
    ins, outs = m.shape(node.inputs[0])[2:], m.shape(node.outputs[0])[2:]
    begin, end = [], []
    for i in range(n):
        total = max(0, (outs[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - ins[i])
        small, big = total // 2, total - total // 2
        begin.append(small if auto == "SAME_UPPER" else big)
        end.append(big if auto == "SAME_UPPER" else small)
    return begin, end


def _torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads of the trailing axes in F.pad's order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        out += [b, e]
    return out


def _geometry(node: Node, kernel: list[int]) -> tuple[list[int], list[int]]:
    n = len(kernel)
    return _ints(node.attr("strides", [1] * n)), _ints(node.attr("dilations", [1] * n))


def _conv(m: GraphModule, node: Node):
    w_info = m.graph.info(node.inputs[1])
    kernel = list(w_info.shape[2:])
    strides, dilations = _geometry(node, kernel)
    begin, end = _spatial_pads(m, node, kernel, strides, dilations)
    group = int(node.attr("group", 1))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(len(kernel))
    if conv is None:
        raise LcpcError(f"{node.describe()}: recovery supports 1-3 spatial dims, not {len(kernel)}")
    symmetric = begin == end

    def fn(node, a):
        x = a[0] if symmetric else F.pad(a[0], _torch_pads(begin, end))
        return [conv(x, m.weight(node), a[2] if len(a) > 2 else None, strides,
                     begin if symmetric else 0, dilations, group)]
    return fn


def _conv_transpose(m: GraphModule, node: Node):
    kernel = list(m.graph.info(node.inputs[1]).shape[2:])
    strides, dilations = _geometry(node, kernel)
    group = int(node.attr("group", 1))
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(kernel)]
    ins, outs = m.shape(node.inputs[0])[2:], m.shape(node.outputs[0])[2:]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(ins, strides, kernel, dilations)]
    auto = node.attr("auto_pad", "NOTSET")
    if "pads" in node.attrs and auto in ("NOTSET", ""):
        begin = _ints(node.attr("pads"))[:len(kernel)]
    else:
        extra = _ints(node.attr("output_padding", [0] * len(kernel)))
        totals = [f + e - o for f, e, o in zip(full, extra, outs)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]

    def fn(node, a):
        y = conv(a[0], m.weight(node), None, strides, 0, 0, group, dilations)
        grow = [max(0, b + o - f) for b, o, f in zip(begin, outs, full)]
        if any(grow):
            y = F.pad(y, _torch_pads([0] * len(grow), grow))
        for axis, (b, o) in enumerate(zip(begin, outs)):
            y = y.narrow(2 + axis, b, o)
        if len(a) > 2 and a[2] is not None:
            y = y + a[2].reshape((1, -1) + (1,) * len(kernel))
        return [y]
    return fn


def _gemm(m: GraphModule, node: Node):
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    ta, tb = int(node.attr("transA", 0)), int(node.attr("transB", 0))
    weight_const = node.inputs[1] in m.graph.constants

    def fn(node, a):
        x = a[0].t() if ta else a[0]
        w = m.weight(node) if weight_const else a[1]
        y = x @ (w.t() if tb else w)
        if alpha != 1.0:
            y = y * alpha
        if len(a) > 2 and a[2] is not None:
            y = y + (a[2] * beta if beta != 1.0 else a[2])
        return [y]
    return fn


def _matmul(m: GraphModule, node: Node):
    weight_const = node.inputs[1] in m.graph.constants
    return lambda node, a: [torch.matmul(a[0], m.weight(node) if weight_const else a[1])]


def _pool(m: GraphModule, node: Node):
    if len([o for o in node.outputs if o]) > 1:
        raise LcpcError(f"{node.describe()}: recovery does not support pooling with an indices output yet")
    kernel = _ints(node.attr("kernel_shape"))
    n = len(kernel)
    strides, dilations = _geometry(node, kernel)
    begin, end = _spatial_pads(m, node, kernel, strides, dilations)
    ins, outs = m.shape(node.inputs[0])[2:], m.shape(node.outputs[0])[2:]
    extra = [max(0, (o - 1) * s + (k - 1) * d + 1 - (i + b + e))
             for o, s, k, d, i, b, e in zip(outs, strides, kernel, dilations, ins, begin, end)]
    ends = [e + x for e, x in zip(end, extra)]
    fn_pool = {1: (F.max_pool1d, F.avg_pool1d), 2: (F.max_pool2d, F.avg_pool2d),
               3: (F.max_pool3d, F.avg_pool3d)}[n]

    def crop(y: Tensor) -> Tensor:
        for axis, o in enumerate(outs):
            y = y.narrow(2 + axis, 0, o)
        return y

    if node.op == "MaxPool":
        fmt = torch.channels_last if n == 2 else torch.contiguous_format  # torch's NCHW CPU kernel is ~10x slower

        def max_pool(node, a):
            x = F.pad(a[0], _torch_pads(begin, ends), value=-math.inf) if any(begin + ends) else a[0]
            y = fn_pool[0](x.contiguous(memory_format=fmt), kernel, strides, 0, dilations)
            return [crop(y).contiguous()]
        return max_pool
    if any(d != 1 for d in dilations):
        raise LcpcError(f"{node.describe()}: recovery does not support dilated AveragePool yet")
    include = bool(node.attr("count_include_pad", 0))
    ones = torch.ones((1, 1) + tuple(ins))
    if include:
        ones = F.pad(ones, _torch_pads(begin, end), value=1.0)
        ones = F.pad(ones, _torch_pads([0] * n, extra), value=0.0)
    else:
        ones = F.pad(ones, _torch_pads(begin, ends), value=0.0)
    counts = fn_pool[1](ones, kernel, strides, 0)

    def fn(node, a):
        x = F.pad(a[0], _torch_pads(begin, ends))
        return [crop(fn_pool[1](x, kernel, strides, 0) / counts.to(x.device))]
    return fn


def _global(reduce: str):
    def build(m: GraphModule, node: Node):
        def fn(node, a):
            dims = tuple(range(2, a[0].dim()))
            return [a[0].mean(dims, keepdim=True) if reduce == "mean" else a[0].amax(dims, keepdim=True)]
        return fn
    return build


def _batchnorm(m: GraphModule, node: Node):
    if int(node.attr("training_mode", 0)) or len([o for o in node.outputs if o]) > 1:
        raise LcpcError(f"{node.describe()}: recovery does not support BatchNormalization in training mode")
    eps = float(node.attr("epsilon", 1e-5))
    return lambda node, a: [F.batch_norm(a[0], a[3], a[4], a[1], a[2], False, 0.0, eps)]


def _rebatch(m: GraphModule, node: Node):
    """Flatten / Reshape / Squeeze / Unsqueeze: the static output shape, batch re-applied."""
    src, dst = m.shape(node.inputs[0]), m.shape(node.outputs[0])
    keeps_batch = len(src) > 0 and len(dst) > 0 and src[0] == dst[0]

    def fn(node, a):
        x = a[0]
        if x.dim() == 0 or x.shape[0] == src[0]:
            return [x.reshape(dst)]
        if not keeps_batch:
            raise LcpcError(f"{node.describe()}: reshapes across the batch axis; recovery needs the "
                            f"model's batch size {src[0]}")
        return [x.reshape((x.shape[0],) + tuple(dst[1:]))]
    return fn


def _concat(m: GraphModule, node: Node):
    axis = int(node.attr("axis"))
    return lambda node, a: [torch.cat(a, axis)]


def _split(m: GraphModule, node: Node):
    axis = int(node.attr("axis", 0))
    sizes = [m.shape(o)[axis] for o in node.outputs]
    return lambda node, a: list(torch.split(a[0], sizes, axis))


def _slice(m: GraphModule, node: Node):
    params = [m.static(i) for i in node.inputs[1:]]
    if any(p is None and i for p, i in zip(params, node.inputs[1:])):
        raise LcpcError(f"{node.describe()}: recovery does not support Slice with run-time bounds yet")
    starts, ends = _ints(params[0]), _ints(params[1])
    rank = len(m.shape(node.inputs[0]))
    axes = _ints(params[2]) if len(params) > 2 and params[2] is not None else list(range(len(starts)))
    steps = _ints(params[3]) if len(params) > 3 and params[3] is not None else [1] * len(starts)
    axes = [a % rank for a in axes]

    def fn(node, a):
        x = a[0]
        for axis, start, stop, step in zip(axes, starts, ends, steps):
            idx = range(*slice(start, stop, step).indices(x.shape[axis]))
            if step == 1:
                x = x.narrow(axis, idx.start, len(idx))
            else:
                x = x.index_select(axis, torch.tensor(list(idx), dtype=torch.long, device=x.device))
        return [x]
    return fn


def _gather(m: GraphModule, node: Node):
    idx = m.static(node.inputs[1])
    if idx is None:
        raise LcpcError(f"{node.describe()}: recovery supports Gather with constant indices only")
    axis = int(node.attr("axis", 0))

    def fn(node, a):
        x = a[0]
        ax = axis % x.dim()
        flat = torch.from_numpy(np.asarray(idx, np.int64).reshape(-1) % x.shape[ax]).to(x.device)
        y = x.index_select(ax, flat)
        return [y.reshape(tuple(x.shape[:ax]) + tuple(np.shape(idx)) + tuple(x.shape[ax + 1:]))]
    return fn


def _pad(m: GraphModule, node: Node):
    pads = m.static(node.inputs[1]) if len(node.inputs) > 1 else node.attr("pads")
    if pads is None:
        raise LcpcError(f"{node.describe()}: recovery does not support Pad with run-time pads yet")
    pads = _ints(pads)
    rank = len(m.shape(node.inputs[0]))
    axes_c = m.static(node.inputs[3]) if len(node.inputs) > 3 else None
    axes = [a % rank for a in _ints(axes_c)] if axes_c is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    first = next((i for i in range(rank) if begin[i] or end[i]), rank)
    torch_pads = _torch_pads(begin[first:], end[first:])
    mode = node.attr("mode", "constant")
    value_c = m.static(node.inputs[2]) if len(node.inputs) > 2 else None
    value = float(np.asarray(value_c).reshape(-1)[0]) if value_c is not None and np.size(value_c) else 0.0
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]

    def fn(node, a):
        if not torch_pads:
            return [a[0]]
        if torch_mode == "constant":
            return [F.pad(a[0], torch_pads, value=value)]
        return [F.pad(a[0], torch_pads, mode=torch_mode)]
    return fn


def _resize(m: GraphModule, node: Node):
    ins, outs = m.shape(node.inputs[0]), m.shape(node.outputs[0])
    if ins[:2] != outs[:2]:
        raise LcpcError(f"{node.describe()}: recovery supports Resize of spatial axes only")
    mode = node.attr("mode", "nearest")
    ctm = node.attr("coordinate_transformation_mode", "half_pixel")
    scales_c = m.static(node.inputs[2]) if len(node.inputs) > 2 else None
    if mode == "linear":
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise LcpcError(f"{node.describe()}: recovery does not support linear Resize with "
                            f"coordinate_transformation_mode={ctm} yet")
        interp = {3: "linear", 4: "bilinear", 5: "trilinear"}[len(ins)]
        return lambda node, a: [F.interpolate(a[0], size=tuple(outs[2:]), mode=interp,
                                              align_corners=ctm == "align_corners")]
    if mode != "nearest":
        raise LcpcError(f"{node.describe()}: recovery does not support Resize mode '{mode}' yet")
    nearest = node.attr("nearest_mode", "round_prefer_floor")
    indices = []
    for axis in range(2, len(ins)):
        n_in, n_out = ins[axis], outs[axis]
        scale = float(scales_c[axis]) if scales_c is not None and np.size(scales_c) else n_out / n_in
        x = np.arange(n_out, dtype=np.float64)
        src = {"half_pixel": (x + 0.5) / scale - 0.5,
               "pytorch_half_pixel": (x + 0.5) / scale - 0.5 if n_out > 1 else 0 * x,
               "align_corners": x * (n_in - 1) / max(n_out - 1, 1),
               "asymmetric": x / scale,
               "tf_half_pixel_for_nn": (x + 0.5) / scale}.get(ctm)
        if src is None:
            raise LcpcError(f"{node.describe()}: recovery does not support nearest Resize with "
                            f"coordinate_transformation_mode={ctm} yet")
        rounded = {"round_prefer_floor": np.ceil(src - 0.5), "round_prefer_ceil": np.floor(src + 0.5),
                   "floor": np.floor(src), "ceil": np.ceil(src)}[nearest]
        indices.append(torch.from_numpy(np.clip(rounded, 0, n_in - 1).astype(np.int64)))

    def fn(node, a):
        y = a[0]
        for axis, idx in enumerate(indices):
            y = y.index_select(2 + axis, idx.to(y.device))
        return [y]
    return fn


def _softmax(m: GraphModule, node: Node):
    rank = len(m.shape(node.inputs[0]))
    if m.graph.opset < 13:
        axis = int(node.attr("axis", 1)) % rank

        def fn(node, a):
            x = a[0]
            flat = x.reshape(tuple(x.shape[:axis]) + (-1,))
            return [torch.softmax(flat, -1).reshape(x.shape)]
        return fn
    axis = int(node.attr("axis", -1))
    return lambda node, a: [torch.softmax(a[0], axis)]


def _reduce_mean(m: GraphModule, node: Node):
    axes = node.attr("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1]:
        axes = m.static(node.inputs[1])
        if axes is None:
            raise LcpcError(f"{node.describe()}: recovery does not support run-time reduce axes yet")
    keep = bool(node.attr("keepdims", 1))
    if axes is None or not np.size(axes):
        if node.attr("noop_with_empty_axes", 0):
            return lambda node, a: [a[0]]
        return lambda node, a: [a[0].mean(tuple(range(a[0].dim())), keepdim=keep)]
    dims = tuple(_ints(axes))
    return lambda node, a: [a[0].mean(dims, keepdim=keep)]


def _clip(m: GraphModule, node: Node):
    lo = m.static(node.inputs[1]) if len(node.inputs) > 1 else node.attr("min")
    hi = m.static(node.inputs[2]) if len(node.inputs) > 2 else node.attr("max")
    if (len(node.inputs) > 1 and node.inputs[1] and lo is None) or \
            (len(node.inputs) > 2 and node.inputs[2] and hi is None):
        raise LcpcError(f"{node.describe()}: recovery does not support Clip with run-time bounds yet")
    lo = None if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = None if hi is None else float(np.asarray(hi).reshape(-1)[0])
    return lambda node, a: [torch.clamp(a[0], lo, hi)]


def _transpose(m: GraphModule, node: Node):
    rank = len(m.shape(node.inputs[0]))
    perm = _ints(node.attr("perm", list(reversed(range(rank)))))
    return lambda node, a: [a[0].permute(perm)]


def _unary(f: Callable[[Node, Tensor], Tensor]):
    return lambda m, node: (lambda node, a: [f(node, a[0])])


def _binary(f: Callable[[Tensor, Tensor], Tensor]):
    return lambda m, node: (lambda node, a: [f(a[0], a[1])])


def _variadic(f: Callable[[Tensor, Tensor], Tensor]):
    def build(m, node):
        def fn(node, a):
            y = a[0]
            for x in a[1:]:
                y = f(y, x)
            return [y]
        return fn
    return build


_BUILDERS: dict[str, Callable[[GraphModule, Node], Callable]] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global("mean"),
    "GlobalMaxPool": _global("max"),
    "BatchNormalization": _batchnorm,
    "Flatten": _rebatch,
    "Reshape": _rebatch,
    "Squeeze": _rebatch,
    "Unsqueeze": _rebatch,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Pad": _pad,
    "Resize": _resize,
    "Softmax": _softmax,
    "ReduceMean": _reduce_mean,
    "Clip": _clip,
    "Transpose": _transpose,
    "Relu": _unary(lambda n, x: torch.relu(x)),
    "LeakyRelu": _unary(lambda n, x: F.leaky_relu(x, float(n.attr("alpha", 0.01)))),
    "Sigmoid": _unary(lambda n, x: torch.sigmoid(x)),
    "Tanh": _unary(lambda n, x: torch.tanh(x)),
    "HardSigmoid": _unary(lambda n, x: torch.clamp(float(n.attr("alpha", 0.2)) * x
                                                   + float(n.attr("beta", 0.5)), 0.0, 1.0)),
    "HardSwish": _unary(lambda n, x: x * torch.clamp(x / 6.0 + 0.5, 0.0, 1.0)),
    "Elu": _unary(lambda n, x: F.elu(x, float(n.attr("alpha", 1.0)))),
    "Softplus": _unary(lambda n, x: F.softplus(x)),
    "Exp": _unary(lambda n, x: torch.exp(x)),
    "Abs": _unary(lambda n, x: torch.abs(x)),
    "Neg": _unary(lambda n, x: -x),
    "Sqrt": _unary(lambda n, x: torch.sqrt(x)),
    "Reciprocal": _unary(lambda n, x: 1.0 / x),
    "Identity": _unary(lambda n, x: x),
    "Dropout": lambda m, node: (lambda node, a: [a[0]] + [None] * (len(node.outputs) - 1)),
    "PRelu": _binary(lambda x, s: torch.where(x >= 0, x, x * s)),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Sum": _variadic(torch.add),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
}
