"""Train the teacher of the shapes task (a VGG with BatchNorm) to convergence and export it to ONNX.

    python -m examples.shapes.train   # writes examples/shapes/shapes_vgg.onnx and metrics.json (needs torch)

It also writes ``shapes_vgg_bn.onnx``: the same trained model exported with its BatchNorm layers
kept (no constant folding), whose running statistics ``lcpc recover --data synth`` synthesises
inputs from; the recorded shapes results use ``shapes_vgg.onnx``.

The teacher is over-parameterised for the task (32-64-64-128-128-128 channels) and
trained until its training loss stops falling (one-cycle schedule, ``EPOCHS`` epochs
on the 8000 training images), as the pretrained models users cut are; the noise keeps
it below 95% test accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from examples.shapes.data import CLASSES, load_split

HERE = Path(__file__).resolve().parent
WIDTHS = (32, 64, 64, 128, 128, 128)
EPOCHS = 12


def build():
    from torch import nn

    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    a, b, c, d, e, f = WIDTHS
    return nn.Sequential(*block(1, a), nn.MaxPool2d(2), *block(a, b), *block(b, c), nn.MaxPool2d(2),
                         *block(c, d), *block(d, e), nn.MaxPool2d(2), *block(e, f),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(f, len(CLASSES)))


def main(epochs: int = EPOCHS, batch: int = 64) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(1)
    x_train, y_train, x_test, y_test = load_split()
    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps = epochs * (len(xt) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(xt))
        total = 0.0
        for i in range(len(xt) // batch):
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        model.eval()
        with torch.no_grad():
            acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
        print(f"epoch {epoch + 1}: training loss {total / (len(xt) // batch):.3f} test accuracy {100 * acc:.2f}%",
              flush=True)
    for name, keep_batchnorm in (("shapes_vgg.onnx", False), ("shapes_vgg_bn.onnx", True)):
        torch.onnx.export(model, torch.zeros(1, 1, 32, 32), HERE / name, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False, do_constant_folding=not keep_batchnorm)
    (HERE / "metrics.json").write_text(json.dumps({"test_accuracy": acc, "epochs": epochs, "widths": WIDTHS,
                                                   "train_images": len(xt)}, indent=1))


if __name__ == "__main__":
    main()
