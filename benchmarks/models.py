"""Full-size image CNNs at 224x224 with random weights, at any width, for speed benchmarks.

Guarantees:
- ``build(name, width=1.0)`` returns a checked ONNX model (opset 17, input ``input``
  float32 [1, 3, 224, 224], output ``logits`` [1, 1000]) of the named architecture with
  every hidden channel count multiplied by ``width`` (rounded, at least 1): width 1/K is
  "the same network built directly at width 1/K", the limit a K-branch LCP device can
  reach. The image's 3 channels and the 1000 classes never scale;
- the layer structure is the published one (ResNet-18/50: torchvision; VGG-16: 13 convs
  and the 4096-4096-1000 classifier; MobileNetV2: width 1.0 table; EfficientNet-B0: its
  table with swish and squeeze-excite), with BatchNorm after every conv (folded at load);
- deterministic: the same name, width and seed give byte-identical models;
- only onnx and numpy are needed (no torch): the layers come from ``examples.zoo.NetBuilder``.

    python -m benchmarks.models OUT_DIR [--width 0.25]   # writes every model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]

from examples.zoo import IR_VERSION, OPSET, NetBuilder

SIZE = 224
CLASSES = 1000


class _Builder(NetBuilder):
    """NetBuilder at 224x224 with a 1000-class head and a width multiplier."""

    def __init__(self, width: float, seed: int) -> None:
        super().__init__(seed)
        self.width = width
        self.shapes["input"] = (3, SIZE, SIZE)

    def w(self, channels: int) -> int:
        return max(1, int(round(channels * self.width)))

    def finish(self, name: str) -> onnx.ModelProto:
        last = self.nodes[-1]
        assert self.shapes[last.output[0]] == (CLASSES,), self.shapes[last.output[0]]
        last.output[0] = "logits"
        graph = helper.make_graph(
            self.nodes, name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, CLASSES])],
            initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  ir_version=IR_VERSION, producer_name="lcpc-benchmarks")
        onnx.checker.check_model(model)
        return model


def _head(b: _Builder, x: str) -> None:
    b.gemm(b.flatten(b.gap(x)), CLASSES)


def resnet18(b: _Builder) -> None:
    x = b.maxpool(b.conv_bn("input", b.w(64), k=7, stride=2), k=3, stride=2, pad=1)
    for cout, stride in [(64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)]:
        y = b.conv_bn(x, b.w(cout), stride=stride)
        y = b.conv_bn(y, b.w(cout), act=None, gamma=0.5)
        if stride != 1 or b.channels(x) != b.w(cout):
            x = b.conv_bn(x, b.w(cout), k=1, stride=stride, act=None)
        x = b.relu(b.add(y, x))
    _head(b, x)


def resnet50(b: _Builder) -> None:
    x = b.maxpool(b.conv_bn("input", b.w(64), k=7, stride=2), k=3, stride=2, pad=1)
    for mid, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
        for i in range(blocks):
            s = stride if i == 0 else 1
            y = b.conv_bn(x, b.w(mid), k=1)
            y = b.conv_bn(y, b.w(mid), stride=s)
            y = b.conv_bn(y, b.w(4 * mid), k=1, act=None, gamma=0.5)
            if i == 0:
                x = b.conv_bn(x, b.w(4 * mid), k=1, stride=s, act=None)
            x = b.relu(b.add(y, x))
    _head(b, x)


def vgg16(b: _Builder) -> None:
    x = "input"
    for stage in [(64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)]:
        for cout in stage:
            x = b.conv_bn(x, b.w(cout))
        x = b.maxpool(x)
    x = b.flatten(x)
    x = b.relu(b.gemm(x, b.w(4096)))
    x = b.relu(b.gemm(x, b.w(4096)))
    b.gemm(x, CLASSES)


def _inverted(b: _Builder, x: str, expand: int, cout: int, stride: int, k: int, act: str,
              se: int | None) -> str:
    cin = b.channels(x)
    y = b.conv_bn(x, expand, k=1, act=act) if expand != cin else x
    y = b.conv_bn(y, expand, k=k, stride=stride, groups=expand, act=act)
    if se:
        s = b.gap(y)
        s = getattr(b, act)(b.conv(s, se, k=1))
        y = b.mul(y, b.sigmoid(b.conv(s, expand, k=1)))
    residual = stride == 1 and cin == cout
    y = b.conv_bn(y, cout, k=1, act=None, gamma=0.5 if residual else 1.0)
    return b.add(y, x) if residual else y


def mobilenet_v2(b: _Builder) -> None:
    x = b.conv_bn("input", b.w(32), stride=2, act="clip6")
    for t, c, n, s in [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)]:
        for i in range(n):
            x = _inverted(b, x, b.channels(x) * t, b.w(c), s if i == 0 else 1, 3, "clip6", None)
    _head(b, b.conv_bn(x, b.w(1280), k=1, act="clip6"))


def efficientnet_b0(b: _Builder) -> None:
    x = b.conv_bn("input", b.w(32), stride=2, act="swish")
    for t, c, n, s, k in [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3),
                          (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]:
        for i in range(n):
            cin = b.channels(x)
            x = _inverted(b, x, cin * t, b.w(c), s if i == 0 else 1, k, "swish", max(1, cin // 4))
    _head(b, b.conv_bn(x, b.w(1280), k=1, act="swish"))


MODELS: dict[str, Callable[[_Builder], None]] = {
    "resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16,
    "mobilenet_v2": mobilenet_v2, "efficientnet_b0": efficientnet_b0,
}


def build(name: str, width: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """The model ``name`` (a key of MODELS) with hidden widths multiplied by ``width``."""
    b = _Builder(width, seed)
    MODELS[name](b)
    return b.finish(f"{name}_w{width:g}")


def params(model: onnx.ModelProto) -> int:
    return int(sum(np.prod(t.dims) for t in model.graph.initializer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--model", action="append", choices=sorted(MODELS), default=None)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.model or MODELS:
        model = build(name, args.width)
        onnx.save(model, args.out / f"{name}.onnx")
        print(f"{name}: {params(model) / 1e6:.2f}M parameters")


if __name__ == "__main__":
    main()
