"""The digits data set and its fixed train/test split.

Guarantees:

* The data are scikit-learn's bundled ``load_digits`` (1797 grayscale 8x8
  handwritten digits, classes 0-9); nothing is downloaded.
* Images are float32 in NCHW layout ``[N, 1, 8, 8]``, scaled to ``[0, 1]`` by
  dividing the raw 0-16 pixel values by 16. Labels are int64.
* The split is deterministic: ``train_test_split(test_size=0.25,
  random_state=0, stratify=y)``, so every call, on every machine, returns the
  same 1347 training and 450 test samples in the same order.

Only numpy and scikit-learn are used, so tests and benchmarks can import this
module without torch. The split is also shipped as .npy files next to this module
(``python -m examples.digits.data`` writes them; a test checks they match), so the
README's first command needs neither scikit-learn nor torch:
``train.npy`` / ``train_labels.npy`` and ``test.npy`` / ``test_labels.npy``.
"""

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FILES = ("train.npy", "train_labels.npy", "test.npy", "test_labels.npy")

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
_PIXEL_MAX = 16.0


def _images_and_labels() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / _PIXEL_MAX).astype(np.float32)
    return images.reshape(-1, *IMAGE_SHAPE), digits.target.astype(np.int64)


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(x_train, y_train, x_test, y_test)`` (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    x, y = _images_and_labels()
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=0, stratify=y
    )
    return x_train, y_train, x_test, y_test


def load_shipped() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same split from the shipped .npy files (numpy only)."""
    return tuple(np.load(HERE / f) for f in FILES)  # type: ignore[return-value]


if __name__ == "__main__":
    for name, array in zip(FILES, load_split()):
        np.save(HERE / name, array)
        print(f"wrote {HERE / name}: {array.shape} {array.dtype}")
