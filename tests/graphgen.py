"""Random valid CNN graphs (``onnx.ModelProto``) for lcpc's property tests.

Guarantees of every generated graph:

* opset 17, IR version 8, one float32 input ``input`` of shape ``[1, 3, H, W]`` (H, W
  in 8..16) and one or more float32 outputs whose declared shapes are exact
  (``onnx.checker.check_model(full_check=True)`` passes);
* determinism: the same seed gives a byte-identical model; ``from_seed(seed, n)`` is the
  first n blocks of ``from_seed(seed)`` (then a head), which is how hypothesis shrinks;
* weights are He-scaled and residual branches halved, so activations and outputs stay
  O(1) and float comparisons at 1e-4 relative are meaningful;
* widths are mostly multiples of 8 in 8..48, sometimes 6, 12 or 20 so that splits over
  K = 3 or 4 branches are uneven; no activation has fewer than 3 channels;
* ``Generated.max_branches`` is an independent oracle for lcpc's channel spaces: a
  union-find over channel atoms (residual Add and per-channel Mul couple operands, a
  grouped or depthwise conv keeps each group together, Concat composes, Split/Slice
  take sub-ranges, Flatten repeats), giving the smallest number of independent channel
  groups of any split tensor — the largest K any exact partition can use.

Shapes covered (``Generated.features`` names those one graph uses): residual Add,
Concat of 2-4 branches, C2f/CSP channel Split (even and uneven) and Slice,
squeeze-excite (1x1 convs, or Flatten+Gemm and Reshape back to [N,C,1,1]; Sigmoid or
HardSigmoid; GlobalAveragePool or ReduceMean), depthwise (multiplier 1 or 2), grouped
conv (1 < group < C), un-fused BatchNormalization after Concat, PRelu per channel,
LeakyRelu, HardSwish, Clip, SiLU as x * Sigmoid(x), MaxPool (also ceil_mode),
AveragePool, asymmetric Pad before a valid conv, Resize nearest x2 into a Concat or Add
with its skip (FPN), an NHWC layer between Transposes (tf2onnx without its optimiser),
Identity chains, and a head: GAP +
Flatten + Gemm, a 1x1 conv head, Flatten(C*H*W) + Gemm, or several outputs
(detection heads, optionally a raw feature map as an output).

Use :func:`from_seed` directly or :func:`graphs` as a hypothesis strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Sequence, TypeVar

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
CLASSES = 10
WIDTHS = (8, 16, 24, 32, 40, 48)
ODD_WIDTHS = (6, 12, 20)
INPUT_SIZES = ((16, 16), (12, 16), (8, 8))

T = TypeVar("T")


class Choices:
    """Structure choices from a seeded numpy generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def integer(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self.rng.integers(len(options)))]

    def chance(self, p: float) -> bool:
        return bool(self.rng.random() < p)


@dataclass(frozen=True)
class Generated:
    """One random graph and what the tests need to know about it."""

    model: onnx.ModelProto
    features: frozenset[str]
    max_branches: int          # smallest number of independent channel groups of a split tensor
    min_space: tuple[str, int]  # (tensor, groups) reaching that minimum
    description: str           # one line per block, for failure messages
    origin: str = ""           # how to rebuild it: "from_seed(5, 2)"

    def bytes(self) -> bytes:
        return self.model.SerializeToString()

    def __repr__(self) -> str:  # what hypothesis prints for a falsifying example
        return f"Generated({self.origin}, max_branches={self.max_branches}, blocks:\n{self.description})"


class _Atoms:
    """Union-find over channel atoms: the oracle for channel spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n)

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def groups(self, atoms: np.ndarray) -> int:
        return len({self.find(int(a)) for a in atoms})


class Builder:
    """Appends nodes with exact shape tracking (``shapes[t]`` excludes the batch dim)."""

    def __init__(self, choose: Choices, weight_seed: int, size: tuple[int, int]) -> None:
        self.c = choose
        self.rng = np.random.default_rng(weight_seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {"input": (3, *size)}
        self.atoms: dict[str, np.ndarray] = {}
        self.uf = _Atoms()
        self.features: set[str] = set()
        self.log: list[str] = []
        self.n = 0

    # ----------------------------------------------------------------- basics
    def name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}{self.n}"

    def const(self, hint: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(value, hint))
        return hint

    def weight(self, shape: Sequence[int], fan_in: int, gain: float = 2.0) -> np.ndarray:
        return (self.rng.standard_normal(shape) * math.sqrt(gain / fan_in)).astype(np.float32)

    def emit(self, op: str, inputs: Sequence[str], shapes: Sequence[tuple[int, ...]], name: str | None = None,
             **attrs) -> list[str]:
        name = name or self.name(op.lower())
        outs = [f"{name}_out" if len(shapes) == 1 else f"{name}_out{i}" for i in range(len(shapes))]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=name, **attrs))
        for o, s in zip(outs, shapes):
            self.shapes[o] = tuple(int(d) for d in s)
        return outs

    def channels(self, x: str) -> int:
        return self.shapes[x][0]

    def carry(self, x: str, y: str) -> str:
        if x in self.atoms:
            self.atoms[y] = self.atoms[x]
        return y

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for p, q in zip(a.tolist(), b.tolist()):
            self.uf.union(p, q)

    # ----------------------------------------------------------------- layers
    def conv(self, x: str, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             pads: Sequence[int] | None = None, gain: float = 2.0, bias: bool = True) -> str:
        cin, h, w = self.shapes[x]
        pads = list(pads) if pads is not None else [k // 2] * 4
        oh = (h + pads[0] + pads[2] - k) // stride + 1
        ow = (w + pads[1] + pads[3] - k) // stride + 1
        name = self.name("conv")
        fan_in = cin // group * k * k
        ins = [x, self.const(f"{name}_w", self.weight((cout, cin // group, k, k), fan_in, gain))]
        if bias:
            ins.append(self.const(f"{name}_b", (self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        out = self.emit("Conv", ins, [(cout, oh, ow)], name, kernel_shape=[k, k], strides=[stride, stride],
                        pads=pads, group=group)[0]
        new = self.uf.fresh(cout)
        if group > 1:
            gi, go = cin // group, cout // group
            src = self.atoms.get(x)
            for g in range(group):
                members = new[g * go:(g + 1) * go]
                if src is not None:
                    members = np.concatenate([members, src[g * gi:(g + 1) * gi]])
                self.unite(members[:1].repeat(len(members) - 1), members[1:])
        self.atoms[out] = new
        return out

    def act(self, x: str, kind: str | None = None) -> str:
        kind = kind or self.c.choice(("relu", "leakyrelu", "hardswish", "clip", "prelu", "silu"))
        self.features.add(kind)
        c = self.channels(x)
        if kind == "relu":
            y = self.emit("Relu", [x], [self.shapes[x]])[0]
        elif kind == "leakyrelu":
            y = self.emit("LeakyRelu", [x], [self.shapes[x]], alpha=0.1)[0]
        elif kind == "hardswish":
            y = self.emit("HardSwish", [x], [self.shapes[x]])[0]
        elif kind == "clip":
            name = self.name("clip")
            lo = self.const(f"{name}_min", np.array(0.0, np.float32))
            hi = self.const(f"{name}_max", np.array(6.0, np.float32))
            y = self.emit("Clip", [x, lo, hi], [self.shapes[x]], name)[0]
        elif kind == "prelu":
            name = self.name("prelu")
            slope = self.const(f"{name}_slope", self.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32))
            y = self.emit("PRelu", [x, slope], [self.shapes[x]], name)[0]
        elif kind == "silu":  # as PyTorch exports it: x * Sigmoid(x)
            return self.mul(x, self.carry(x, self.emit("Sigmoid", [x], [self.shapes[x]])[0]))
        else:
            raise ValueError(kind)
        return self.carry(x, y)

    def bn(self, x: str) -> str:
        c, name = self.channels(x), self.name("bn")
        params = [self.rng.uniform(0.7, 1.3, c), self.rng.standard_normal(c) * 0.1,
                  self.rng.standard_normal(c) * 0.1, self.rng.uniform(0.7, 1.3, c)]
        ins = [x] + [self.const(f"{name}_{p}", v.astype(np.float32))
                     for p, v in zip(("scale", "bias", "mean", "var"), params)]
        self.features.add("bn_unfused")
        return self.carry(x, self.emit("BatchNormalization", ins, [self.shapes[x]], name, epsilon=1e-5)[0])

    def add(self, a: str, b: str) -> str:
        y = self.emit("Add", [a, b], [self.shapes[a]])[0]
        self.unite(self.atoms[a], self.atoms[b])
        return self.carry(a, y)

    def mul(self, x: str, s: str) -> str:
        y = self.emit("Mul", [x, s], [self.shapes[x]])[0]
        self.unite(self.atoms[x], self.atoms[s])
        return self.carry(x, y)

    def concat(self, xs: Sequence[str]) -> str:
        c = sum(self.channels(x) for x in xs)
        y = self.emit("Concat", xs, [(c, *self.shapes[xs[0]][1:])], axis=1)[0]
        self.atoms[y] = np.concatenate([self.atoms[x] for x in xs])
        return y

    def split(self, x: str, sizes: Sequence[int]) -> list[str]:
        rest = self.shapes[x][1:]
        name = self.name("split")
        sizes_t = self.const(f"{name}_sizes", np.array(sizes, np.int64))
        outs = self.emit("Split", [x, sizes_t], [(n, *rest) for n in sizes], name, axis=1)
        start = 0
        for o, n in zip(outs, sizes):
            self.atoms[o] = self.atoms[x][start:start + n]
            start += n
        return outs

    def slice(self, x: str, start: int, stop: int) -> str:
        name = self.name("slice")
        ins = [x] + [self.const(f"{name}_{k}", np.array([v], np.int64))
                     for k, v in (("starts", start), ("ends", stop), ("axes", 1))]
        y = self.emit("Slice", ins, [(stop - start, *self.shapes[x][1:])], name)[0]
        self.atoms[y] = self.atoms[x][start:stop]
        return y

    def pool(self, x: str, op: str, k: int, stride: int, pad: int = 0, ceil: bool = False, **attrs) -> str:
        c, h, w = self.shapes[x]
        rnd = math.ceil if ceil else math.floor
        oh, ow = (rnd((d + 2 * pad - k) / stride) + 1 for d in (h, w))
        extra = {"ceil_mode": 1} if ceil else {}
        y = self.emit(op, [x], [(c, oh, ow)], kernel_shape=[k, k], strides=[stride, stride],
                      pads=[pad] * 4, **extra, **attrs)[0]
        return self.carry(x, y)

    def gap(self, x: str) -> str:
        if self.c.chance(0.25):  # some exporters write the global pool as a ReduceMean
            self.features.add("reducemean")
            y = self.emit("ReduceMean", [x], [(self.channels(x), 1, 1)], axes=[2, 3], keepdims=1)[0]
        else:
            y = self.emit("GlobalAveragePool", [x], [(self.channels(x), 1, 1)])[0]
        return self.carry(x, y)

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        shape = (1, *self.shapes[x])
        return self.carry(x, self.emit("Transpose", [x], [tuple(shape[p] for p in perm[1:])], perm=list(perm))[0])

    def flatten(self, x: str) -> str:
        shape = self.shapes[x]
        y = self.emit("Flatten", [x], [(int(np.prod(shape)),)], axis=1)[0]
        if x in self.atoms:
            self.atoms[y] = np.repeat(self.atoms[x], int(np.prod(shape[1:])))
        return y

    def terminal(self, y: str) -> str:
        """``y`` comes from a classifier layer: lcpc merges it on the head, it is not split."""
        del self.atoms[y]
        return y

    def gemm(self, x: str, n_out: int, gain: float = 2.0) -> str:
        (n_in,) = self.shapes[x]
        name = self.name("gemm")
        w = self.const(f"{name}_w", self.weight((n_out, n_in), n_in, gain))
        b = self.const(f"{name}_b", (self.rng.standard_normal(n_out) * 0.1).astype(np.float32))
        y = self.emit("Gemm", [x, w, b], [(n_out,)], name, transB=1)[0]
        self.atoms[y] = self.uf.fresh(n_out)
        return y

    def reshape_cx11(self, x: str) -> str:
        (c,) = self.shapes[x]
        name = self.name("reshape")
        shape = self.const(f"{name}_shape", np.array([0, c, 1, 1], np.int64))
        return self.carry(x, self.emit("Reshape", [x, shape], [(c, 1, 1)], name)[0])

    def pad(self, x: str, pads: Sequence[int]) -> str:
        """Constant Pad on H, W with ``pads`` = (top, left, bottom, right)."""
        c, h, w = self.shapes[x]
        t, left, b, r = pads
        name = self.name("pad")
        p = self.const(f"{name}_pads", np.array([0, 0, t, left, 0, 0, b, r], np.int64))
        return self.carry(x, self.emit("Pad", [x, p], [(c, h + t + b, w + left + r)], name, mode="constant")[0])

    def resize2x(self, x: str) -> str:
        c, h, w = self.shapes[x]
        name = self.name("resize")
        scales = self.const(f"{name}_scales", np.array([1, 1, 2, 2], np.float32))
        return self.carry(x, self.emit("Resize", [x, "", scales], [(c, 2 * h, 2 * w)], name, mode="nearest")[0])

    def identity(self, x: str) -> str:
        return self.carry(x, self.emit("Identity", [x], [self.shapes[x]])[0])

    def sigmoid(self, x: str) -> str:
        if self.c.chance(0.5):
            self.features.add("hardsigmoid")
            return self.carry(x, self.emit("HardSigmoid", [x], [self.shapes[x]], alpha=0.2, beta=0.5)[0])
        self.features.add("sigmoid")
        return self.carry(x, self.emit("Sigmoid", [x], [self.shapes[x]])[0])

    # ----------------------------------------------------------------- choices
    def count(self, feature: str, lo: int, hi: int) -> int:
        n = self.c.integer(lo, hi)
        self.features.add(f"{feature}{n}")
        return n

    def width(self) -> int:
        if self.c.chance(0.2):
            self.features.add("odd_width")
            return self.c.choice(ODD_WIDTHS)
        return self.c.choice(WIDTHS)


# --------------------------------------------------------------------- blocks
def _block_conv(b: Builder, x: str) -> str:
    return b.act(b.conv(x, b.width()))


def _block_residual(b: Builder, x: str) -> str:
    b.features.add("residual")
    c = b.channels(x)
    y = b.act(b.conv(x, c))
    y = b.conv(y, c, gain=0.5)
    return b.act(b.add(x, y))


def _block_concat(b: Builder, x: str) -> str:
    n = b.count("concat", 2, 4)
    branches = []
    for _ in range(n):
        k = b.c.choice((1, 3))
        branches.append(b.act(b.conv(x, b.width(), k=k), "relu"))
    y = b.concat(branches)
    if b.c.chance(0.6):
        y = b.bn(y)
    y = b.act(y)
    if b.channels(y) > 48:
        y = b.act(b.conv(y, b.width(), k=1))
    return y


def _block_c2f(b: Builder, x: str) -> str:
    c = b.channels(x)
    if b.c.chance(0.3) and c % 4 == 0 and c >= 16:
        sizes = [c // 4, 3 * c // 4]
        b.features.add("split_uneven")
    else:
        sizes = [c // 2, c // 2]
        b.features.add("split_c2f")
    if b.c.chance(0.3):
        b.features.add("slice_c2f")
        parts = [b.slice(x, 0, sizes[0]), b.slice(x, sizes[0], c)]
    else:
        parts = b.split(x, sizes)
    outs = list(parts)
    y = parts[1]
    for _ in range(b.c.integer(1, 2)):
        h = b.act(b.conv(y, sizes[1]))
        y = b.add(y, b.conv(h, sizes[1], gain=0.5))
        outs.append(y)
    return b.act(b.conv(b.concat(outs), b.width(), k=1))


def _block_slice(b: Builder, x: str) -> str:
    """Process a channel sub-range (uneven when the width allows), keep the rest."""
    b.features.add("slice")
    c = b.channels(x)
    cut = b.c.choice(tuple(v for v in (c // 2, c // 4, 3 * c // 8) if 4 <= v <= c - 4 and v % 2 == 0) or (c // 2,))
    head, tail = b.slice(x, 0, cut), b.slice(x, cut, c)
    head = b.act(b.conv(head, cut))
    return b.concat([tail, head] if b.c.chance(0.5) else [head, tail])


def _block_se(b: Builder, x: str) -> str:
    c = b.channels(x)
    mid = b.c.choice(tuple(v for v in (c // 2, 8, c // 4) if v >= 4 and v % 2 == 0) or (c,))
    s = b.gap(x)
    if b.c.chance(0.5):
        b.features.add("se_gemm")
        s = b.reshape_cx11(b.gemm(b.act(b.gemm(b.flatten(s), mid), "relu"), c, gain=1.0))
    else:
        b.features.add("se_conv")
        s = b.conv(b.act(b.conv(s, mid, k=1), "relu"), c, k=1, gain=1.0)
    return b.mul(x, b.sigmoid(s))


def _block_depthwise(b: Builder, x: str) -> str:
    c = b.channels(x)
    mult = b.c.choice((1, 2))
    b.features.add("depthwise" if mult == 1 else "depthwise_x2")
    y = b.act(b.conv(x, c * mult, group=c))
    return b.act(b.conv(y, b.width(), k=1))


def _block_grouped(b: Builder, x: str) -> str:
    c = b.channels(x)
    cout = b.width()
    few = b.c.chance(0.2)  # fewer groups than branches: K is limited by the groups
    options = tuple(g for g in ((2, 3) if few else (4, 8)) if g < min(c, cout) and c % g == 0 and cout % g == 0)
    if not options:
        return _block_conv(b, x)
    b.features.add("grouped")
    return b.act(b.conv(x, cout, group=b.c.choice(options)))


def _block_pool(b: Builder, x: str) -> str:
    c, h, w = b.shapes[x]
    if min(h, w) < 4:
        return b.act(x)
    kind = b.c.choice(("max", "max_ceil", "avg"))
    b.features.add({"max": "maxpool", "max_ceil": "maxpool_ceil", "avg": "avgpool"}[kind])
    if kind == "max":
        return b.pool(x, "MaxPool", 2, 2)
    if kind == "max_ceil":
        return b.pool(x, "MaxPool", 3, 2, ceil=True)
    return b.pool(x, "AveragePool", 3, 1, pad=1, count_include_pad=b.c.choice((0, 1)))


def _block_pad_conv(b: Builder, x: str) -> str:
    """TF-style SAME: an asymmetric Pad then a conv without padding."""
    b.features.add("pad_asym")
    c, h, w = b.shapes[x]
    stride = 2 if min(h, w) >= 4 and b.c.chance(0.5) else 1
    y = b.pad(x, b.c.choice(((0, 0, 1, 1), (1, 1, 1, 1), (0, 1, 1, 0))) if stride == 2 else (1, 1, 1, 1))
    return b.act(b.conv(y, b.width(), stride=stride, pads=[0, 0, 0, 0]))


def _block_fpn(b: Builder, x: str) -> str:
    """Down (stride-2 conv), up (Resize nearest x2), then Concat or Add with the skip."""
    c, h, w = b.shapes[x]
    if h % 2 or w % 2 or h < 4:
        return _block_residual(b, x)
    b.features.add("fpn")
    down = b.act(b.conv(x, b.width(), stride=2))
    up = b.resize2x(b.act(b.conv(down, c, k=1, gain=1.0)))
    if b.c.chance(0.5):
        return b.act(b.add(x, up))
    return b.act(b.conv(b.concat([x, up]), b.width(), k=1))


def _block_nhwc(b: Builder, x: str) -> str:
    """A Keras-style layer in NHWC between Transposes (tf2onnx without its optimiser): bias on
    the last axis, an activation, back to NCHW, then a conv. The oracle carries the channel
    atoms through, as a channel-axis-tracking lcpc would; a syncing lcpc makes them ``R``."""
    b.features.add("nhwc_sandwich")
    c = b.channels(x)
    y = b.transpose(x, (0, 2, 3, 1))
    bias = b.const(f"{b.name('bias')}_nhwc", (b.rng.standard_normal(c) * 0.1).astype(np.float32))
    y = b.carry(y, b.emit("Add", [y, bias], [b.shapes[y]])[0])
    y = b.carry(y, b.emit("Relu", [y], [b.shapes[y]])[0])
    return b.act(b.conv(b.transpose(y, (0, 3, 1, 2)), b.width(), k=1))


def _block_identity(b: Builder, x: str) -> str:
    b.features.add("identity")
    for _ in range(b.c.integer(1, 3)):
        x = b.identity(x)
    return x


def _block_downsample(b: Builder, x: str) -> str:
    c, h, w = b.shapes[x]
    if min(h, w) < 4:
        return _block_conv(b, x)
    b.features.add("stride2")
    return b.act(b.conv(x, b.width(), stride=2))


BLOCKS: dict[str, Callable[[Builder, str], str]] = {
    "conv": _block_conv, "residual": _block_residual, "concat": _block_concat, "c2f": _block_c2f,
    "slice": _block_slice, "se": _block_se, "depthwise": _block_depthwise, "grouped": _block_grouped,
    "pool": _block_pool, "pad_conv": _block_pad_conv, "fpn": _block_fpn, "identity": _block_identity,
    "downsample": _block_downsample, "nhwc": _block_nhwc,
}


# --------------------------------------------------------------------- heads
HEADS = ("gap_gemm", "conv", "flatten_gemm", "multi")


def _head(b: Builder, kind: str, x: str, taps: list[str]) -> list[str]:
    b.features.add(f"head_{kind}")
    if kind == "gap_gemm":
        return [b.terminal(b.gemm(b.flatten(b.gap(x)), CLASSES, gain=1.0))]
    if kind == "conv":
        y = b.terminal(b.conv(x, CLASSES, k=1, gain=1.0))
        return [b.flatten(b.gap(y)) if b.c.chance(0.5) else y]
    if kind == "flatten_gemm":
        c, h, w = b.shapes[x]
        if h * w > 16:
            x = b.pool(x, "MaxPool", 2, 2)
        return [b.terminal(b.gemm(b.flatten(x), CLASSES, gain=1.0))]
    outs = [b.terminal(b.conv(x, CLASSES, k=1, gain=1.0))]
    for t in taps[-2:]:
        outs.append(b.terminal(b.conv(t, b.c.choice((6, 12)), k=1, gain=1.0)))
    if b.c.chance(0.3):
        b.features.add("feature_output")
        outs.append(x)
    return outs


def build(choose: Choices, blocks: int | None = None) -> Generated:
    """One random CNN. ``choose`` picks the input size, the blocks and the head; each block's
    details (widths, activations, variants) come from a generator seeded by ``choose``, so the
    blocks before block i do not depend on how many blocks follow. ``blocks`` overrides the
    number of blocks (1..6)."""
    def details() -> Choices:
        return Choices(choose.integer(0, 2**32 - 1))

    size = choose.choice(INPUT_SIZES)
    b = Builder(details(), choose.integer(0, 2**32 - 1), size)
    x = b.act(b.conv("input", b.width(), stride=b.c.choice((1, 2)) if size[0] >= 12 else 1))
    b.log.append(f"input {size} -> stem -> {b.shapes[x]}")
    taps = []
    drawn = choose.integer(1, 6)  # drawn even when ``blocks`` is given: same blocks, fewer of them
    for _ in range(blocks or drawn):
        kind = choose.choice(tuple(BLOCKS))
        b.c = details()
        before = x
        x = BLOCKS[kind](b, x)
        b.log.append(f"{kind}: {b.shapes[before]} -> {b.shapes[x]}")
        if b.shapes[x][1:] != b.shapes[before][1:]:
            taps.append(before)
    head = choose.choice(HEADS)
    b.c = details()
    outs = _head(b, head, x, taps)
    b.log.append(f"head {head}: {len(outs)} output(s)")
    if len(outs) > 1:
        b.features.add("multi_output")
    return _finish(b, outs)


def _finish(b: Builder, outs: list[str]) -> Generated:
    # An output that some node also consumes is fine; an output listed twice is not.
    outs = list(dict.fromkeys(outs))
    graph = helper.make_graph(
        b.nodes, "graphgen",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, *b.shapes["input"]])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, [1, *b.shapes[o]]) for o in outs],
        b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="graphgen")
    model.ir_version = IR_VERSION
    tensor, groups = min(((t, b.uf.groups(a)) for t, a in b.atoms.items()), key=lambda p: p[1])
    return Generated(model, frozenset(b.features), groups, (tensor, groups), "\n".join(b.log))


def from_seed(seed: int, blocks: int | None = None) -> Generated:
    """The graph for ``seed`` (deterministic). ``blocks`` overrides the number of blocks; block i
    is the same for every ``blocks`` > i, so fewer blocks is a prefix of the same network."""
    return replace(build(Choices(seed), blocks), origin=f"from_seed({seed}, {blocks})")


def graphs():
    """A hypothesis strategy of :func:`from_seed` graphs. Shrinking drops trailing blocks and
    tries smaller seeds; a falsifying example prints how to rebuild it."""
    from hypothesis import strategies as st

    return st.builds(from_seed, st.integers(0, 2**32 - 1), st.integers(1, 6))
