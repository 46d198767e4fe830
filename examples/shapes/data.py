"""A harder stand-in task for recovery benchmarks: noisy 32x32 shapes, 8 classes.

Guarantees: numpy only, deterministic (``make(n, seed)`` returns the same images on every
machine); images are float32 NCHW ``[n, 1, 32, 32]``, labels int64 in 0..7. Each image
holds one shape (disk, square, triangle, cross, ring, horizontal bar pair, vertical bar
pair, diamond) at a random position, size and intensity, plus a random distractor
stroke and strong Gaussian noise, so a small CNN stays below 95% accuracy.
``load_split()`` is the fixed split the benchmark uses: 8000 training images (the
teacher's training set and the unlabelled recovery data) and 2000 test images.
"""

from __future__ import annotations

import numpy as np

SIZE = 32
CLASSES = ("disk", "square", "triangle", "cross", "ring", "hbars", "vbars", "diamond")
NOISE = 0.55


def _shape(kind: int, yy, xx, cy, cx, r) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        return (dy ** 2 + dx ** 2 <= r ** 2).astype(np.float32)
    if kind == 1:
        return ((np.abs(dy) <= r * 0.8) & (np.abs(dx) <= r * 0.8)).astype(np.float32)
    if kind == 2:
        return ((dy <= r * 0.7) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)).astype(np.float32)
    if kind == 3:
        return (((np.abs(dy) <= r * 0.25) & (np.abs(dx) <= r)) | ((np.abs(dx) <= r * 0.25) & (np.abs(dy) <= r))) \
            .astype(np.float32)
    if kind == 4:
        d = np.sqrt(dy ** 2 + dx ** 2)
        return ((d <= r) & (d >= r * 0.55)).astype(np.float32)
    if kind == 5:
        return ((np.abs(np.abs(dy) - r * 0.5) <= r * 0.2) & (np.abs(dx) <= r)).astype(np.float32)
    if kind == 6:
        return ((np.abs(np.abs(dx) - r * 0.5) <= r * 0.2) & (np.abs(dy) <= r)).astype(np.float32)
    return (np.abs(dy) + np.abs(dx) <= r).astype(np.float32)


def make(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    x = np.empty((n, 1, SIZE, SIZE), np.float32)
    y = rng.integers(0, len(CLASSES), n).astype(np.int64)
    for i in range(n):
        r = rng.uniform(4.0, 8.0)
        cy, cx = rng.uniform(r, SIZE - r, 2)
        img = _shape(int(y[i]), yy, xx, cy, cx, r) * rng.uniform(0.6, 1.0)
        # a distractor stroke
        t = rng.uniform(0, np.pi)
        oy, ox = rng.uniform(0, SIZE, 2)
        line = np.abs((yy - oy) * np.cos(t) - (xx - ox) * np.sin(t)) <= 0.7
        img = np.maximum(img, line * rng.uniform(0.3, 0.8))
        x[i, 0] = img + rng.normal(0, NOISE, (SIZE, SIZE))
    return x, y


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: 8000 and 2000 images."""
    x_train, y_train = make(8000, 0)
    x_test, y_test = make(2000, 1)
    return x_train, y_train, x_test, y_test
