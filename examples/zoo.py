"""A small zoo of randomly initialised CNN classifiers, used by the test suite.

Every model in :data:`ZOO` is built with ``onnx.helper`` and ``numpy`` only and
guarantees:

* opset 17, IR version 8, a single input ``input`` (float32, ``[1, 3, 32, 32]``)
  and a single output ``logits`` (float32, ``[1, 10]``);
* ``onnx.checker.check_model(model, full_check=True)`` passes;
* determinism: the weights come from ``np.random.default_rng(seed)``, so building
  a model twice gives byte-identical serialisations;
* every node has a unique, readable name (``conv3``) and every tensor a unique,
  readable name (``conv3_out``, ``conv3_weight``);
* every conv output has at least 8 channels, a multiple of 8, so the channels
  can be split into up to 8 branches (the only exception is the 10-channel
  classifier conv of :func:`squeezenet`);
* weights are He-normal-like, so activations and logits stay O(1) and float
  comparisons at a relative tolerance of 1e-4 are meaningful.

Run ``python -m examples.zoo OUT_DIR`` to write every model to
``OUT_DIR/<name>.onnx``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_SHAPE = (1, 3, 32, 32)
NUM_CLASSES = 10
OPSET = 17
IR_VERSION = 8

Shape = tuple[int, ...]


class NetBuilder:
    """Accumulates the nodes and initializers of a single-input CNN graph.

    Every layer method takes tensor names, appends one or more nodes and
    returns the name of the output tensor.  The builder tracks the shape of
    every tensor without the batch dimension (``(C, H, W)`` for feature maps,
    ``(F,)`` for flat features), so callers only give output widths.
    """

    def __init__(self, seed: int = 0, input_shape: Shape = INPUT_SHAPE) -> None:
        self.input_shape = tuple(input_shape)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, Shape] = {"input": self.input_shape[1:]}
        self._counts: Counter[str] = Counter()

    # ------------------------------------------------------------------ helpers

    def channels(self, x: str) -> int:
        """Number of channels (or flat features) of tensor ``x``."""
        return self.shapes[x][0]

    def _fresh(self, kind: str) -> str:
        """Return a new node name such as ``conv3``."""
        self._counts[kind] += 1
        return f"{kind}{self._counts[kind]}"

    def _const(self, name: str, value: np.ndarray) -> str:
        """Add an initializer and return its name."""
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def _random(self, shape: Sequence[int], std: float) -> np.ndarray:
        return (self.rng.standard_normal(shape) * std).astype(np.float32)

    def _uniform(self, shape: Sequence[int], low: float, high: float) -> np.ndarray:
        return self.rng.uniform(low, high, shape).astype(np.float32)

    def _emit(self, op_type: str, name: str, inputs: Sequence[str], shape: Shape, **attrs) -> str:
        """Append node ``name`` with a single output ``<name>_out`` of ``shape``."""
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=name, **attrs))
        self.shapes[out] = tuple(shape)
        return out

    def _unary(self, op_type: str, kind: str, x: str, **attrs) -> str:
        return self._emit(op_type, self._fresh(kind), [x], self.shapes[x], **attrs)

    @staticmethod
    def _window(size: int, k: int, stride: int, pad: int) -> int:
        return (size + 2 * pad - k) // stride + 1

    # --------------------------------------------------------- conv and linear

    def conv(
        self,
        x: str,
        cout: int,
        k: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = True,
        pad: int | None = None,
    ) -> str:
        """Conv ``k x k`` with symmetric padding ``pad`` (default ``k // 2``)."""
        cin, h, w = self.shapes[x]
        assert cin % groups == 0 and cout % groups == 0, (cin, cout, groups)
        pad = k // 2 if pad is None else pad
        name = self._fresh("conv")
        fan_in = cin // groups * k * k
        weight = self._random((cout, cin // groups, k, k), np.sqrt(2.0 / fan_in))
        inputs = [x, self._const(f"{name}_weight", weight)]
        if bias:
            inputs.append(self._const(f"{name}_bias", self._random((cout,), 0.1)))
        shape = (cout, self._window(h, k, stride, pad), self._window(w, k, stride, pad))
        return self._emit(
            "Conv", name, inputs, shape,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups,
        )

    def bn(self, x: str, gamma: float = 1.0) -> str:
        """BatchNormalization with random statistics; ``gamma`` scales the learned scale."""
        c = self.channels(x)
        name = self._fresh("bn")
        inputs = [
            x,
            self._const(f"{name}_scale", gamma * self._uniform((c,), 0.7, 1.3)),
            self._const(f"{name}_bias", self._random((c,), 0.1)),
            self._const(f"{name}_mean", self._random((c,), 0.1)),
            self._const(f"{name}_var", self._uniform((c,), 0.7, 1.3)),
        ]
        return self._emit("BatchNormalization", name, inputs, self.shapes[x], epsilon=1e-5)

    def conv_bn(self, x: str, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                pad: int | None = None, act: str | None = "relu", gamma: float = 1.0) -> str:
        """Bias-free conv, BatchNormalization, then the activation method named ``act``."""
        y = self.bn(self.conv(x, cout, k, stride, groups, bias=False, pad=pad), gamma)
        return getattr(self, act)(y) if act else y

    def gemm(self, x: str, n_out: int) -> str:
        """Gemm ``x @ W.T + b`` (``transB=1``) on flat features."""
        (n_in,) = self.shapes[x]
        name = self._fresh("gemm")
        w = self._const(f"{name}_weight", self._random((n_out, n_in), np.sqrt(1.0 / n_in)))
        b = self._const(f"{name}_bias", self._random((n_out,), 0.1))
        return self._emit("Gemm", name, [x, w, b], (n_out,), transB=1)

    def matmul_bias(self, x: str, n_out: int) -> str:
        """MatMul with a constant ``[n_in, n_out]`` weight followed by Add of a constant bias."""
        (n_in,) = self.shapes[x]
        name = self._fresh("matmul")
        w = self._const(f"{name}_weight", self._random((n_in, n_out), np.sqrt(1.0 / n_in)))
        y = self._emit("MatMul", name, [x, w], (n_out,))
        name = self._fresh("add")
        b = self._const(f"{name}_bias", self._random((n_out,), 0.1))
        return self._emit("Add", name, [y, b], (n_out,))

    # ------------------------------------------------------------- activations

    def relu(self, x: str) -> str:
        return self._unary("Relu", "relu", x)

    def clip6(self, x: str) -> str:
        """ReLU6 as Clip with ``min = 0`` and ``max = 6`` initializer inputs."""
        name = self._fresh("clip")
        lo = self._const(f"{name}_min", np.array(0.0, dtype=np.float32))
        hi = self._const(f"{name}_max", np.array(6.0, dtype=np.float32))
        return self._emit("Clip", name, [x, lo, hi], self.shapes[x])

    def hardswish(self, x: str) -> str:
        return self._unary("HardSwish", "hardswish", x)

    def hardsigmoid(self, x: str, alpha: float = 0.2, beta: float = 0.5) -> str:
        return self._unary("HardSigmoid", "hardsigmoid", x, alpha=alpha, beta=beta)

    def sigmoid(self, x: str) -> str:
        return self._unary("Sigmoid", "sigmoid", x)

    def swish(self, x: str) -> str:
        """``x * sigmoid(x)`` as a Sigmoid and a Mul node."""
        return self.mul(x, self.sigmoid(x))

    def leaky_relu(self, x: str, alpha: float = 0.1) -> str:
        return self._unary("LeakyRelu", "leakyrelu", x, alpha=alpha)

    def prelu(self, x: str) -> str:
        """PRelu with a per-channel slope initializer of shape ``[C, 1, 1]``."""
        name = self._fresh("prelu")
        slope = self._const(f"{name}_slope", self._uniform((self.channels(x), 1, 1), 0.05, 0.3))
        return self._emit("PRelu", name, [x, slope], self.shapes[x])

    # ------------------------------------------------------ elementwise, concat

    def add(self, a: str, b: str) -> str:
        shape = np.broadcast_shapes(self.shapes[a], self.shapes[b])
        return self._emit("Add", self._fresh("add"), [a, b], shape)

    def mul(self, a: str, b: str) -> str:
        shape = np.broadcast_shapes(self.shapes[a], self.shapes[b])
        return self._emit("Mul", self._fresh("mul"), [a, b], shape)

    def concat(self, xs: Sequence[str]) -> str:
        """Concat on the channel axis (axis 1)."""
        spatial = {self.shapes[x][1:] for x in xs}
        assert len(spatial) == 1, spatial
        shape = (sum(self.channels(x) for x in xs), *spatial.pop())
        return self._emit("Concat", self._fresh("concat"), xs, shape, axis=1)

    # ------------------------------------------------------ pooling and shapes

    def _pool(self, op_type: str, kind: str, x: str, k: int, stride: int | None, pad: int) -> str:
        stride = k if stride is None else stride
        c, h, w = self.shapes[x]
        shape = (c, self._window(h, k, stride, pad), self._window(w, k, stride, pad))
        return self._emit(
            op_type, self._fresh(kind), [x], shape,
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
        )

    def maxpool(self, x: str, k: int = 2, stride: int | None = None, pad: int = 0) -> str:
        """MaxPool ``k x k``; ``stride`` defaults to ``k``."""
        return self._pool("MaxPool", "maxpool", x, k, stride, pad)

    def avgpool(self, x: str, k: int = 2, stride: int | None = None, pad: int = 0) -> str:
        """AveragePool ``k x k`` (padding excluded from the mean); ``stride`` defaults to ``k``."""
        return self._pool("AveragePool", "avgpool", x, k, stride, pad)

    def gap(self, x: str) -> str:
        """GlobalAveragePool: ``(C, H, W) -> (C, 1, 1)``."""
        return self._emit("GlobalAveragePool", self._fresh("gap"), [x], (self.channels(x), 1, 1))

    def flatten(self, x: str) -> str:
        """Flatten with ``axis=1``."""
        return self._emit("Flatten", self._fresh("flatten"), [x], (int(np.prod(self.shapes[x])),), axis=1)

    def reshape(self, x: str, shape: Sequence[int]) -> str:
        """Reshape to ``shape`` (batch included, e.g. ``[1, -1]``) given as an initializer."""
        name = self._fresh("reshape")
        target = self._const(f"{name}_shape", np.array(shape, dtype=np.int64))
        out_shape = np.empty((1, *self.shapes[x])).reshape(shape).shape[1:]
        return self._emit("Reshape", name, [x, target], out_shape)

    def pad(self, x: str, pads: tuple[int, int, int, int]) -> str:
        """Zero Pad of the spatial axes; ``pads = (top, left, bottom, right)``."""
        top, left, bottom, right = pads
        name = self._fresh("pad")
        p = self._const(f"{name}_pads", np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64))
        c, h, w = self.shapes[x]
        return self._emit("Pad", name, [x, p], (c, h + top + bottom, w + left + right), mode="constant")

    # ---------------------------------------------------------------- blocks

    def se(self, x: str, reduce: int = 4) -> str:
        """Squeeze-excite: GAP -> 1x1 conv -> Relu -> 1x1 conv -> HardSigmoid -> Mul with ``x``."""
        c = self.channels(x)
        squeeze = c // reduce
        assert squeeze >= 8 and c % reduce == 0, (c, reduce)
        s = self.relu(self.conv(self.gap(x), squeeze, k=1))
        gate = self.hardsigmoid(self.conv(s, c, k=1), alpha=1.0 / 6.0)
        return self.mul(x, gate)

    # ---------------------------------------------------------------- output

    def build(self, name: str) -> onnx.ModelProto:
        """Return the checked model whose output ``logits`` is the last node's output."""
        last = self.nodes[-1]
        assert self.shapes[last.output[0]] == (NUM_CLASSES,), self.shapes[last.output[0]]
        last.output[0] = "logits"
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(self.input_shape))],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, NUM_CLASSES])],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="lcpc-zoo",
        )
        onnx.checker.check_model(model, full_check=True)
        return model


# Residual branches end in a BatchNormalization whose scale is damped by this
# factor, so that the sum of the identity and the branch does not grow with depth.
RESIDUAL_GAMMA = 0.5


def _basic_block(b: NetBuilder, x: str, cout: int, stride: int = 1) -> str:
    """ResNet basic block with an identity or 1x1 conv + BN projection shortcut."""
    y = b.conv_bn(x, cout, stride=stride)
    y = b.conv_bn(y, cout, act=None, gamma=RESIDUAL_GAMMA)
    if stride != 1 or b.channels(x) != cout:
        x = b.conv_bn(x, cout, k=1, stride=stride, act=None)
    return b.relu(b.add(y, x))


def resnet_basic(seed: int = 0) -> onnx.ModelProto:
    """ResNet with basic blocks: stem, three stages (16, 32, 64), GAP, Flatten, Gemm."""
    b = NetBuilder(seed)
    x = b.conv_bn("input", 16)
    for cout, stride in [(16, 1), (16, 1), (32, 2), (32, 1), (64, 2)]:
        x = _basic_block(b, x, cout, stride)
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("resnet_basic")


def _bottleneck(b: NetBuilder, x: str, mid: int, cout: int, stride: int = 1) -> str:
    """ResNet bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand, projection when needed."""
    y = b.conv_bn(x, mid, k=1)
    y = b.conv_bn(y, mid, stride=stride)
    y = b.conv_bn(y, cout, k=1, act=None, gamma=RESIDUAL_GAMMA)
    if stride != 1 or b.channels(x) != cout:
        x = b.conv_bn(x, cout, k=1, stride=stride, act=None)
    return b.relu(b.add(y, x))


def resnet50(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    """ResNet-50 as on ImageNet (not in ``ZOO``, too big for the tests; for benchmarks): 7x7
    stem, max pool, bottleneck stages of 3, 4, 6, 3 blocks (64-256 ... 512-2048 channels),
    GAP, Flatten, Gemm to 10 classes; input ``[1, 3, size, size]``; ~23.5M parameters.
    ``resnet50_like`` is the same network body on the zoo's 32x32 input, without the stem pool."""
    b = NetBuilder(seed, (1, 3, size, size))
    x = b.maxpool(b.conv_bn("input", 64, k=7, stride=2), k=3, stride=2, pad=1)
    for blocks, mid, stride in [(3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)]:
        for i in range(blocks):
            x = _bottleneck(b, x, mid, 4 * mid, stride if i == 0 else 1)
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("resnet50")


def resnet_bottleneck(seed: int = 0) -> onnx.ModelProto:
    """ResNet with bottleneck blocks (projection and identity shortcuts), GAP, Flatten, Gemm."""
    b = NetBuilder(seed)
    x = b.conv_bn("input", 16)
    for mid, cout, stride in [(16, 32, 1), (16, 32, 1), (24, 64, 2), (24, 64, 1)]:
        x = _bottleneck(b, x, mid, cout, stride)
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("resnet_bottleneck")


def resnet50_like(seed: int = 0) -> onnx.ModelProto:
    """ResNet-50-sized (bottlenecks [3, 4, 6, 3], widths 256..2048, ~23M weights) on the zoo's
    32x32 input, for benchmarks; not in ``ZOO`` (too large for the unit tests)."""
    b = NetBuilder(seed)
    x = b.conv_bn("input", 64)
    for blocks, mid, cout, stride in [(3, 64, 256, 1), (4, 128, 512, 2), (6, 256, 1024, 2), (3, 512, 2048, 2)]:
        for n in range(blocks):
            x = _bottleneck(b, x, mid, cout, stride if n == 0 else 1)
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("resnet50_like")


def vgg(seed: int = 0) -> onnx.ModelProto:
    """VGG: conv-BN-Relu stacks and MaxPools, GAP, Reshape [1, -1], Gemm-Relu-Gemm."""
    b = NetBuilder(seed)
    x = "input"
    for stage in [(16, 16), (32, 32), (64,)]:
        for cout in stage:
            x = b.conv_bn(x, cout)
        x = b.maxpool(x)
    x = b.reshape(b.gap(x), [1, -1])
    b.gemm(b.relu(b.gemm(x, 32)), NUM_CLASSES)
    return b.build("vgg")


def _inverted_residual(
    b: NetBuilder,
    x: str,
    expand: int,
    cout: int,
    stride: int = 1,
    k: int = 3,
    act: str = "clip6",
    se_reduce: int | None = None,
    same_pad: bool = False,
) -> str:
    """MobileNet inverted residual: 1x1 expand, depthwise k x k, optional SE, 1x1 project.

    With ``same_pad`` a strided depthwise conv is preceded by an explicit
    bottom/right Pad (TensorFlow "SAME" style) instead of symmetric conv padding.
    """
    cin = b.channels(x)
    y = b.conv_bn(x, expand, k=1, act=act) if expand != cin else x
    if same_pad:
        y = b.pad(y, (0, 0, k - stride, k - stride))
        y = b.conv_bn(y, expand, k=k, stride=stride, groups=expand, pad=0, act=act)
    else:
        y = b.conv_bn(y, expand, k=k, stride=stride, groups=expand, act=act)
    if se_reduce:
        y = b.se(y, se_reduce)
    residual = stride == 1 and cin == cout
    y = b.conv_bn(y, cout, k=1, act=None, gamma=RESIDUAL_GAMMA if residual else 1.0)
    return b.add(y, x) if residual else y


def mobilenet_v2(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 with Clip(0, 6), a depthwise multiplier-2 conv and a Pad-ed stride-2 block."""
    b = NetBuilder(seed)
    x = b.conv_bn("input", 16, act="clip6")
    # Depthwise conv with channel multiplier 2 (group = Cin = 16, Cout = 32), then project.
    x = b.conv_bn(x, 32, groups=16, act="clip6")
    x = b.conv_bn(x, 16, k=1, act=None)
    x = _inverted_residual(b, x, 48, 16)
    x = _inverted_residual(b, x, 64, 24, stride=2, same_pad=True)
    x = _inverted_residual(b, x, 64, 24)
    x = _inverted_residual(b, x, 64, 32, stride=2)
    x = _inverted_residual(b, x, 64, 32)
    x = b.conv_bn(x, 64, k=1, act="clip6")
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("mobilenet_v2")


def mobilenet_v3(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV3: HardSwish, squeeze-excite, and a MatMul + Add classifier."""
    b = NetBuilder(seed)
    x = b.conv_bn("input", 16, act="hardswish")
    x = _inverted_residual(b, x, 16, 16, act="relu", se_reduce=2)
    x = _inverted_residual(b, x, 64, 24, stride=2, act="relu")
    x = _inverted_residual(b, x, 64, 24, k=5, act="hardswish", se_reduce=4)
    x = _inverted_residual(b, x, 64, 40, stride=2, k=5, act="hardswish", se_reduce=4)
    x = _inverted_residual(b, x, 64, 40, act="hardswish", se_reduce=4)
    x = b.conv_bn(x, 64, k=1, act="hardswish")
    b.matmul_bias(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("mobilenet_v3")


def inception(seed: int = 0) -> onnx.ModelProto:
    """GoogLeNet-style: two inception blocks with 4 and 3 parallel branches, AveragePool."""
    b = NetBuilder(seed)
    x = b.maxpool(b.conv_bn("input", 32))
    # Block A (4 branches): 1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | maxpool 3x3/1 -> 1x1.
    x = b.concat([
        b.conv_bn(x, 16, k=1),
        b.conv_bn(b.conv_bn(x, 16, k=1), 24),
        b.conv_bn(b.conv_bn(x, 8, k=1), 8, k=5),
        b.conv_bn(b.maxpool(x, k=3, stride=1, pad=1), 16, k=1),
    ])
    x = b.avgpool(x)
    # Block B (3 branches): 1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3.
    x = b.concat([
        b.conv_bn(x, 16, k=1),
        b.conv_bn(b.conv_bn(x, 16, k=1), 24),
        b.conv_bn(b.conv_bn(b.conv_bn(x, 16, k=1), 16), 16),
    ])
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("inception")


def _dense_layer(b: NetBuilder, x: str, growth: int, bottleneck: bool) -> str:
    """Pre-activation dense layer (BN-Relu-[1x1]-3x3) whose output is Concat'ed to ``x``."""
    y = b.relu(b.bn(x))
    if bottleneck:
        y = b.relu(b.bn(b.conv(y, 4 * growth, k=1, bias=False)))
    y = b.conv(y, growth, bias=False)
    return b.concat([x, y])


def densenet(seed: int = 0) -> onnx.ModelProto:
    """DenseNet: two dense blocks (growth 8) joined by a BN-Relu-1x1 conv-AvgPool transition."""
    b = NetBuilder(seed)
    x = b.conv("input", 16, bias=False)
    for _ in range(4):
        x = _dense_layer(b, x, 8, bottleneck=False)
    x = b.avgpool(b.conv(b.relu(b.bn(x)), 24, k=1, bias=False))
    for _ in range(3):
        x = _dense_layer(b, x, 8, bottleneck=True)
    x = b.relu(b.bn(x))
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("densenet")


def _fire(b: NetBuilder, x: str, squeeze: int, expand: int) -> str:
    """SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated."""
    s = b.relu(b.conv(x, squeeze, k=1))
    return b.concat([b.relu(b.conv(s, expand, k=1)), b.relu(b.conv(s, expand))])


def squeezenet(seed: int = 0) -> onnx.ModelProto:
    """SqueezeNet: fire modules without BN and a 10-channel conv classifier -> GAP -> Flatten."""
    b = NetBuilder(seed)
    x = b.maxpool(b.relu(b.conv("input", 32)))
    x = _fire(b, x, 8, 16)
    x = _fire(b, x, 8, 16)
    x = b.maxpool(x)
    x = _fire(b, x, 16, 32)
    b.flatten(b.gap(b.conv(x, NUM_CLASSES, k=1)))
    return b.build("squeezenet")


def _resnext_block(b: NetBuilder, x: str, width: int, cout: int, stride: int = 1, last: bool = False) -> str:
    """ResNeXt block: 1x1 + PRelu, grouped 3x3 (4 groups) + LeakyRelu, 1x1, shortcut.

    The block output goes through Relu, or through swish (Sigmoid + Mul) if ``last``.
    """
    y = b.conv_bn(x, width, k=1, act="prelu")
    y = b.conv_bn(y, width, stride=stride, groups=4, act="leaky_relu")
    y = b.conv_bn(y, cout, k=1, act=None, gamma=RESIDUAL_GAMMA)
    if stride != 1 or b.channels(x) != cout:
        x = b.conv_bn(x, cout, k=1, stride=stride, act=None)
    y = b.add(y, x)
    return b.swish(y) if last else b.relu(y)


def grouped_resnext(seed: int = 0) -> onnx.ModelProto:
    """ResNeXt with grouped convs, LeakyRelu, PRelu and a final swish, GAP, Flatten, Gemm."""
    b = NetBuilder(seed)
    x = b.conv_bn("input", 16, act="leaky_relu")
    x = _resnext_block(b, x, 32, 32)
    x = _resnext_block(b, x, 32, 64, stride=2)
    x = _resnext_block(b, x, 64, 64, last=True)
    b.gemm(b.flatten(b.gap(x)), NUM_CLASSES)
    return b.build("grouped_resnext")


ZOO: dict[str, Callable[[], onnx.ModelProto]] = {
    "resnet_basic": resnet_basic,
    "resnet_bottleneck": resnet_bottleneck,
    "vgg": vgg,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "inception": inception,
    "densenet": densenet,
    "squeezenet": squeezenet,
    "grouped_resnext": grouped_resnext,
}


def main(argv: Sequence[str]) -> None:
    """Write every zoo model to ``argv[1]/<name>.onnx``."""
    if len(argv) != 2:
        sys.exit(f"usage: {argv[0]} OUT_DIR")
    out_dir = Path(argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, builder in ZOO.items():
        onnx.save(builder(), out_dir / f"{name}.onnx")


if __name__ == "__main__":
    main(sys.argv)
