"""Read a folder of JPEG/PNG images into one array, preprocessed the way a model expects.

Guarantees:
- ``Preprocessing`` is a frozen value that cannot hold an invalid spec: every field is
  checked on construction, and the ``LcpcError`` names the field and the bad value;
  ``to_dict`` / ``from_dict`` round-trip through JSON (the manifest's
  ``source.preprocessing``), and ``from_dict`` refuses unknown or missing keys.
- Per image, in this order: open with Pillow, apply the EXIF orientation, convert to
  RGB (or grayscale ``L``); resize (``shorter_side``: keep the aspect ratio, scale so
  the image just covers ``size / crop_fraction``, then crop the centre ``size``;
  ``stretch``: resize straight to ``size``); reorder channels (``BGR``); then, in
  float64, ``x[c] = (pixel[c] * scale - mean[c]) / std[c]`` on the 0-255 pixel values
  (mean and std in the output's channel order); lay out (``NCHW`` or ``NHWC``) and
  cast to ``dtype``. ``raw`` stops before the normalisation (uint8 pixels, already
  resized, reordered and laid out) and ``normalize`` does the rest, so
  ``apply == normalize(raw)`` exactly; that split is what lets a folder take raw uint8
  images on the wire and apply the normalisation in its stages. An image already at the
  target size is not resampled, and the centre crop starts at ``excess // 2`` on each
  axis, so small cases can be checked by hand.
- ``load_folder`` reads the ``.jpg``/``.jpeg``/``.png`` files (any case) directly in a
  folder, sorted by file name, ignores everything else, and ends in an ``LcpcError``
  naming the folder when it holds no image, or the file when one cannot be decoded;
  ``image_files(folder, recursive=True)`` lists those of its subfolders too (sorted by
  relative path, symbolic links to folders not followed), and ``read_image`` reads one
  file as ``load_folder`` reads each (for readers that stream, ``passes.recover.samples``).
- Pillow is an optional extra (``pip install 'lcpc[images]'``); without it, reading
  images ends in an ``LcpcError`` that says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESIZE_POLICIES = ("shorter_side", "stretch")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR", "L")
DTYPES = ("float32", "float16", "float64")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise LcpcError("reading images needs Pillow: pip install 'lcpc[images]' "
                        "(or pass the data as a .npy array)") from None
    return Image, ImageOps


def _bad(field: str, value: Any, want: str) -> LcpcError:
    return LcpcError(f"preprocessing {field}={value!r}: {want}")


@dataclass(frozen=True)
class Preprocessing:
    """How to turn an image file into one model input (see the module docstring).

    >>> lite0 = Preprocessing(size=(224, 224), mean=(127.0,), std=(128.0,))  # EfficientNet-Lite
    >>> imagenet = Preprocessing(size=(224, 224), scale=1 / 255, crop_fraction=0.875,
    ...                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    """

    size: tuple[int, int]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    scale: float = 1.0
    resize: str = "shorter_side"
    crop_fraction: float = 1.0
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    channels: str = "RGB"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        size = tuple(self.size) if isinstance(self.size, (tuple, list)) else ()
        if len(size) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
            raise _bad("size", self.size, "must be two positive integers (H, W)")
        object.__setattr__(self, "size", size)
        for name, choices in (("resize", RESIZE_POLICIES), ("interpolation", INTERPOLATIONS),
                              ("layout", LAYOUTS), ("channels", CHANNEL_ORDERS), ("dtype", DTYPES)):
            if getattr(self, name) not in choices:
                raise _bad(name, getattr(self, name), f"must be one of {', '.join(choices)}")
        for name in ("scale", "crop_fraction"):
            if not _is_real(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                raise _bad(name, getattr(self, name), "must be a finite number")
        if self.scale <= 0:
            raise _bad("scale", self.scale, "must be positive")
        if not 0 < self.crop_fraction <= 1:
            raise _bad("crop_fraction", self.crop_fraction, "must be in (0, 1]")
        for name in ("mean", "std"):
            value = getattr(self, name)
            seq = tuple(value) if isinstance(value, (tuple, list)) else ()
            if len(seq) not in {1, self.num_channels} or not all(_is_real(v) and math.isfinite(v) for v in seq):
                raise _bad(name, value, f"must be 1 or {self.num_channels} finite numbers "
                                        f"(one per {self.channels} channel)")
            object.__setattr__(self, name, tuple(float(v) for v in seq))
        if any(s == 0 for s in self.std):
            raise _bad("std", self.std, "must not contain 0")

    @property
    def num_channels(self) -> int:
        return 1 if self.channels == "L" else 3

    def input_shape(self, n: int = 1) -> tuple[int, ...]:
        """The array shape ``load_folder`` returns for ``n`` images."""
        h, w = self.size
        c = self.num_channels
        return (n, c, h, w) if self.layout == "NCHW" else (n, h, w, c)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples), for the manifest."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Any) -> Preprocessing:
        if not isinstance(data, dict):
            raise LcpcError(f"preprocessing must be an object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LcpcError(f"preprocessing: unknown key(s) {', '.join(unknown)}; "
                            f"known keys are {', '.join(sorted(known))}")
        if "size" not in data:
            raise LcpcError("preprocessing: 'size' (H, W) is required")
        return cls(**data)

    def apply(self, image) -> np.ndarray:
        """One Pillow image -> one preprocessed sample (no batch axis): ``normalize(raw(image))``."""
        return self.normalize(self.raw(image))

    def raw(self, image) -> np.ndarray:
        """One Pillow image -> the uint8 sample before normalisation: resized, channels in
        ``channels`` order, laid out as ``layout`` (no batch axis). What travels on the wire
        when a folder takes raw images."""
        Image, ImageOps = _pil()
        image = ImageOps.exif_transpose(image).convert("L" if self.channels == "L" else "RGB")
        image = self._resize(image, Image)
        x = np.asarray(image, dtype=np.uint8)
        if x.ndim == 2:
            x = x[:, :, None]
        if self.channels == "BGR":  # Pillow decodes RGB; mean and std are given in BGR order
            x = x[:, :, ::-1]
        if self.layout == "NCHW":
            x = x.transpose(2, 0, 1)
        return np.ascontiguousarray(x)

    def constants(self) -> tuple[float, np.ndarray, np.ndarray]:
        """``scale`` and the ``mean`` and ``std`` arrays (float64), shaped to broadcast over a
        sample or a batch in ``layout`` ((C, 1, 1) for NCHW, (C,) for NHWC):
        ``x = (pixel * scale - mean) / std``."""
        c = max(len(self.mean), len(self.std))
        shape = (c,) if self.layout == "NHWC" else (c, 1, 1)
        mean = np.broadcast_to(np.asarray(self.mean, np.float64), (c,)).reshape(shape)
        std = np.broadcast_to(np.asarray(self.std, np.float64), (c,)).reshape(shape)
        return self.scale, np.ascontiguousarray(mean), np.ascontiguousarray(std)

    def normalize(self, raw: np.ndarray, dtype: str | None = None) -> np.ndarray:
        """uint8 samples or batches (layout ``layout``) -> ``(x * scale - mean) / std`` in
        float64, cast to ``dtype`` (default ``self.dtype``). The stage prologue of a folder that
        takes raw images computes exactly this (``lcpc.lower``)."""
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
            raise LcpcError(f"raw image data must be a uint8 array, got {getattr(raw, 'dtype', type(raw).__name__)}")
        scale, mean, std = self.constants()
        x = (raw.astype(np.float64) * scale - mean) / std
        return np.ascontiguousarray(x, dtype=dtype or self.dtype)

    def _resize(self, image, Image):
        h, w = self.size
        resample = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC}[self.interpolation]
        if self.resize == "stretch":
            return image if image.size == (w, h) else image.resize((w, h), resample)
        iw, ih = image.size
        s = max(h / ih, w / iw) / self.crop_fraction
        nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
        if (nw, nh) != (iw, ih):
            image = image.resize((nw, nh), resample)
        left, top = (nw - w) // 2, (nh - h) // 2
        return image.crop((left, top, left + w, top + h))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def image_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The image files directly in ``folder`` sorted by name, or (``recursive``) in it and its
    subfolders, sorted by path relative to ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LcpcError(f"{folder}: no such folder")
    if recursive:
        found = [Path(root) / name for root, _, names in os.walk(folder) for name in names]
        files = sorted((p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                       key=lambda p: p.relative_to(folder).as_posix())
    else:
        files = sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                       key=lambda p: p.name)
    if not files:
        where = " or its subfolders" if recursive else ""
        raise LcpcError(f"{folder}: no images found{where} (looked for {', '.join(IMAGE_SUFFIXES)} files)")
    return files


def read_image(path: Path, prep: Preprocessing, raw: bool = False) -> np.ndarray:
    """One image file as ``load_folder`` reads it: ``prep.raw`` (``raw``) or ``prep.apply``."""
    Image, _ = _pil()
    image = _decode(path, Image)
    return prep.raw(image) if raw else prep.apply(image)


def load_folder(folder: str | Path, prep: Preprocessing, raw: bool = False) -> tuple[np.ndarray, list[str]]:
    """All images in ``folder`` as one batch ``prep.input_shape(N)``, and their file names;
    ``raw``: the uint8 pixels before normalisation (``Preprocessing.raw``), else ``prep.dtype``."""
    Image, _ = _pil()
    files = image_files(folder)
    batch = np.empty(prep.input_shape(len(files)), dtype=np.uint8 if raw else prep.dtype)
    for i, path in enumerate(files):
        image = _decode(path, Image)
        batch[i] = prep.raw(image) if raw else prep.apply(image)
    return batch, [p.name for p in files]


def _decode(path: Path, Image):
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise LcpcError(f"{path}: cannot read it as an image ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from None
