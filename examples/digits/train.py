"""Train the bundled digits CNN and export it to ONNX.

Run from the repository root::

    python -m examples.digits.train

Guarantees:

* Training is seeded and deterministic on CPU (fixed seed, deterministic
  algorithms, fixed thread count, seeded shuffling and augmentation), so a
  rerun with the same torch version reproduces the same weights.
* ``digits_cnn.onnx`` (next to this file) is the trained model in eval mode,
  exported with the legacy TorchScript exporter at opset 17, with one input
  ``input`` of shape ``[N, 1, 8, 8]`` and one output ``logits`` of shape
  ``[N, 10]`` (batch dimension ``N`` dynamic). It passes
  ``onnx.checker.check_model(..., full_check=True)``.
* The export is verified: the script fails unless onnxruntime's test accuracy
  on the ONNX file equals the torch model's.
* ``digits_cnn_bn.onnx`` is the same trained model exported with its BatchNorm layers
  kept (``do_constant_folding=False``): the same function, but with the running
  statistics that ``lcpc recover --data synth`` synthesises inputs from. The recorded
  digits results use ``digits_cnn.onnx``; this file serves the synthetic-data tests and
  benchmarks only.
* ``metrics.json`` (next to this file) records the test and train accuracy,
  parameter count, epochs, seed and torch version.

Every convolution has at least 16 output channels, a multiple of 8, so the
model can be split into up to 8 channel-parallel branches.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from examples.digits.data import NUM_CLASSES, load_split

HERE = Path(__file__).resolve().parent
ONNX_PATH = HERE / "digits_cnn.onnx"
ONNX_BN_PATH = HERE / "digits_cnn_bn.onnx"
METRICS_PATH = HERE / "metrics.json"

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 5e-4
MAX_SHIFT = 1
THREADS = 2
# (output channels, stride of the first block, number of blocks) per stage.
STAGES = ((32, 1, 1), (64, 2, 2), (64, 2, 1))
STEM_CHANNELS = 32


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    """Bias-free convolution with 'same'-style padding, followed by BatchNorm."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, shortcut, Add, ReLU.

    The shortcut is the identity, or a 1x1 conv+BN projection when the
    channel count or the stride changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2 = conv_bn(c_out, c_out, 3, 1)
        needs_projection = stride != 1 or c_in != c_out
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        return F.relu(y + self.shortcut(x))


class DigitsResNet(nn.Module):
    """Stem, residual stages (8x8 -> 4x4 -> 2x2), global average pool, linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, STEM_CHANNELS, 3, 1), nn.ReLU())
        blocks, c_in = [], STEM_CHANNELS
        for c_out, stride, count in STAGES:
            for i in range(count):
                blocks.append(BasicBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def make_deterministic() -> torch.Generator:
    """Seed everything, force deterministic kernels; return the data generator."""
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(THREADS)
    return torch.Generator().manual_seed(SEED)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to MAX_SHIFT pixels per axis, filling with zeros."""
    n, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4)
    dy, dx = torch.randint(0, 2 * MAX_SHIFT + 1, (2, n, 1), generator=gen)
    rows = (dy + torch.arange(h))[:, None, :, None]
    cols = (dx + torch.arange(w))[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    channel = torch.arange(x.shape[1])[None, :, None, None]
    return padded[batch, channel, rows, cols]


def train_epoch(model, optimizer, scheduler, x, y, gen) -> None:
    """One pass over (x, y) in seeded random order with shift augmentation."""
    model.train()
    order = torch.randperm(len(x), generator=gen)
    for start in range(0, len(x), BATCH_SIZE):
        idx = order[start:start + BATCH_SIZE]
        loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


@torch.no_grad()
def torch_predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    return model(x).argmax(1).numpy()


def onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x})[0].argmax(1)


def accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((pred == y).mean())


def train(x_train: np.ndarray, y_train: np.ndarray) -> nn.Module:
    gen = make_deterministic()
    model = DigitsResNet()
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps = EPOCHS * -(-len(x) // BATCH_SIZE)
    optimizer = torch.optim.AdamW(model.parameters(), LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, LEARNING_RATE, total_steps=steps, pct_start=0.1, anneal_strategy="cos"
    )
    for epoch in range(EPOCHS):
        train_epoch(model, optimizer, scheduler, x, y, gen)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}/{EPOCHS}: train acc "
                  f"{accuracy(torch_predict(model, x), y_train):.4f}")
    return model.eval()


def export_onnx(model: nn.Module, path: Path, keep_batchnorm: bool = False) -> None:
    """Export with the legacy exporter and check the result fully; ``keep_batchnorm``:
    without constant folding, so BatchNormalization nodes keep their running statistics."""
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), str(path), dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, do_constant_folding=not keep_batchnorm,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)


def main() -> None:
    x_train, y_train, x_test, y_test = load_split()
    model = train(x_train, y_train)
    test_acc = accuracy(torch_predict(model, torch.from_numpy(x_test)), y_test)
    train_acc = accuracy(torch_predict(model, torch.from_numpy(x_train)), y_train)
    print(f"torch test accuracy: {test_acc:.4f} (train {train_acc:.4f})")

    for path, keep in ((ONNX_PATH, False), (ONNX_BN_PATH, True)):
        export_onnx(model, path, keep_batchnorm=keep)
        onnx_acc = accuracy(onnx_predict(path, x_test), y_test)
        print(f"onnxruntime test accuracy of {path.name}: {onnx_acc:.4f}")
        if onnx_acc != test_acc:
            raise SystemExit(f"ONNX accuracy {onnx_acc} of {path.name} != torch accuracy {test_acc}")

    metrics = {
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "epochs": EPOCHS,
        "seed": SEED,
        "torch_version": torch.__version__,
    }
    METRICS_PATH.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
