"""Train the teacher of the shapes task (a small VGG with BatchNorm) and export it to ONNX.

    python -m examples.shapes.train   # writes examples/shapes/shapes_vgg.onnx (needs torch)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from examples.shapes.data import CLASSES, load_split

HERE = Path(__file__).resolve().parent


def build():
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, 16), nn.MaxPool2d(2), *block(16, 32), *block(32, 32), nn.MaxPool2d(2),
                         *block(32, 64), *block(64, 64), nn.MaxPool2d(2), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(CLASSES)))


def main(epochs: int = 5) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(2)
    x_train, y_train, x_test, y_test = load_split()
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps = epochs * (len(xt) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt))
        for i in range(len(xt) // 64):
            idx = order[i * 64:(i + 1) * 64]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
        print(f"epoch {epoch + 1}: loss {float(loss):.3f} test accuracy {100 * acc:.2f}%", flush=True)
    torch.onnx.export(model, torch.zeros(1, 1, 32, 32), HERE / "shapes_vgg.onnx", input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
    (HERE / "metrics.json").write_text(json.dumps({"test_accuracy": acc, "epochs": epochs}, indent=1))


if __name__ == "__main__":
    main()
