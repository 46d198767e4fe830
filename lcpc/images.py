"""Read a folder of JPEG/PNG images into one array, preprocessed the way a model expects.

Guarantees:
- ``Preprocessing`` is a frozen value that cannot hold an invalid spec: every field is
  checked on construction, and the ``LcpcError`` names the field and the bad value; sides
  are at most ``MAX_SIDE`` pixels, and ``(pixel * scale - mean) / std`` must stay within
  ``dtype``'s range for every pixel value 0..255 (so normalising never overflows or warns);
  ``to_dict`` / ``from_dict`` round-trip through JSON (the manifest's
  ``source.preprocessing``), and ``from_dict`` refuses unknown or missing keys.
- Per image, in this order: open with Pillow, apply the EXIF orientation, convert to
  RGB (or grayscale ``L``); resize (``shorter_side``: keep the aspect ratio, scale so
  the image just covers ``size / crop_fraction``, then crop the centre ``size``; bilinear and
  bicubic resample only the kept pixels (Pillow's ``box``: the source region the crop comes
  from, with the whole-image filter taps), about a third less time on a 512x320 photo, and
  Pillow's rounding between its two passes then differs from resizing the whole image and
  cropping by up to 2 levels on at most 0.3% of values (measured on photos); nearest
  resizes the whole image and crops, exactly;
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
  naming the folder when it holds no image or the batch would exceed
  ``lcpc.safety.MAX_TENSOR_BYTES``, or naming the file when one cannot be decoded as JPEG
  or PNG (empty, corrupt, truncated, another format), is a link leading out of the folder,
  claims more than ``MAX_IMAGE_PIXELS`` (a decompression bomb: refused from its header,
  before decoding) or would be resized past that (an extreme aspect ratio or
  ``crop_fraction``). No Pillow warning reaches the user: a decompression-bomb warning is
  that error, notices about images Pillow still decodes (palette transparency, odd EXIF)
  are dropped. ``image_files(folder, recursive=True)`` lists the images of its subfolders too
  (sorted by path relative to the folder, links to folders not followed), and ``read_image``
  reads one of them as ``load_folder`` reads each, with the same refusals (for readers that
  stream, ``passes.recover.samples``).
- Pillow is an optional extra (``pip install 'lcpc[images]'``); without it, reading
  images ends in an ``LcpcError`` that says so.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from lcpc import safety
from lcpc.errors import LcpcError
from lcpc.safety import first_line, printable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
RESIZE_POLICIES = ("shorter_side", "stretch")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
LAYOUTS = ("NCHW", "NHWC")
CHANNEL_ORDERS = ("RGB", "BGR", "L")
DTYPES = ("float32", "float16", "float64")
MAX_SIDE = 16384                 # pixels per side of a model input
MAX_IMAGE_PIXELS = 89_478_485    # Pillow's default bomb limit: a quarter GiB of RGB, decoded or resized
FORMATS = ("JPEG", "PNG")        # the only decoders Pillow may use
MAX_FILE_BYTES = 64 << 20        # an image file sent as it is
ORIENTATION = 0x0112             # the EXIF Orientation tag: 1 upright, 2-8 a flip or turn to undo


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
        if max(size) > MAX_SIDE:
            raise _bad("size", self.size, f"must have sides of at most {MAX_SIDE} pixels")
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
        reach = max(abs((p * self.scale - m) / d) for p in (0, 255) for m in self.mean for d in self.std)
        top = float(np.finfo(self.dtype).max)
        if not reach <= top:  # inf and NaN too
            raise LcpcError(f"preprocessing: (pixel * scale - mean) / std reaches {reach:.3g} for pixels 0..255, "
                            f"beyond {self.dtype}'s range ({top:.3g}); check scale={self.scale:g}, mean and std")

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
        if image.getexif().get(ORIENTATION, 1) != 1:  # only then a transposed copy (each copy costs a board ms)
            image = ImageOps.exif_transpose(image)
        mode = "L" if self.channels == "L" else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
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
        if not iw * s * ih * s <= MAX_IMAGE_PIXELS:  # a thin sliver of an image, or a tiny crop_fraction
            raise LcpcError(f"a {iw}x{ih} image would be resized to {iw * s:.3g}x{ih * s:.3g} pixels to cover "
                            f"{w}x{h} at crop_fraction {self.crop_fraction:g}, more than {MAX_IMAGE_PIXELS}")
        nw, nh = max(w, round(iw * s)), max(h, round(ih * s))
        left, top = (nw - w) // 2, (nh - h) // 2
        crop = (left, top, left + w, top + h)
        if (nw, nh) == (iw, ih):
            return image.crop(crop)
        if self.interpolation == "nearest":  # no filter to save, and whole-image pixel indices stay exact
            return image.resize((nw, nh), resample).crop(crop)
        # only the crop's pixels, from the source box they come from (the filter reaches outside it)
        sx, sy = iw / nw, ih / nh
        return image.resize((w, h), resample, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


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


def read_image(folder: str | Path, relative: str, prep: Preprocessing, raw: bool = False) -> np.ndarray:
    """The image file at ``relative`` (a path inside ``folder``, as ``image_files`` lists it,
    relative to the folder) as ``load_folder`` reads each: ``prep.raw`` (``raw``) or ``prep.apply``."""
    Image, _ = _pil()
    return _read(Path(folder), Path(folder) / relative, prep, raw, Image, relative)


def load_folder(folder: str | Path, prep: Preprocessing, raw: bool = False) -> tuple[np.ndarray, list[str]]:
    """All images in ``folder`` as one batch ``prep.input_shape(N)``, and their file names;
    ``raw``: the uint8 pixels before normalisation (``Preprocessing.raw``), else ``prep.dtype``."""
    Image, _ = _pil()
    files = image_files(folder)
    shape, dtype = prep.input_shape(len(files)), np.dtype(np.uint8 if raw else prep.dtype)
    if safety.nbytes(shape, dtype.itemsize) > safety.MAX_TENSOR_BYTES:
        raise LcpcError(f"{folder}: {len(files)} images at {prep.size[0]}x{prep.size[1]} make a batch of "
                        f"{safety.nbytes(shape, dtype.itemsize) / 2**30:.3g} GiB, beyond lcpc's limit of "
                        f"{safety.MAX_TENSOR_BYTES >> 30} GiB; pass fewer images")
    batch = np.empty(shape, dtype=dtype)
    for i, path in enumerate(files):
        batch[i] = _read(Path(folder), path, prep, raw, Image)
    return batch, [p.name for p in files]


def _read(folder: Path, path: Path, prep: Preprocessing, raw: bool, Image, name: str | None = None) -> np.ndarray:
    """One image file (``name``: its path inside ``folder``, default its file name) as one sample
    (see the module docstring for what is refused)."""
    where = printable(path)
    if safety.inside(folder, name or path.name) is None:
        raise LcpcError(f"{where}: a link that leads outside {printable(folder)}; images are read from the folder "
                        f"itself")
    if path.stat().st_size == 0:
        raise LcpcError(f"{where}: cannot read it as an image (the file is empty)")
    return _decode(path, prep, raw, Image, where)


def read_file(folder: Path, path: Path) -> bytes:
    """An image file's bytes, as they are (what a folder fed image files is sent), after the checks
    ``load_folder`` makes on a file (inside ``folder``, not empty, not larger than lcpc reads)."""
    where = printable(path)
    if safety.inside(folder, path.name) is None:
        raise LcpcError(f"{where}: a link that leads outside {printable(folder)}; images are read from the folder "
                        f"itself")
    size = path.stat().st_size
    if not 0 < size <= MAX_FILE_BYTES:
        raise LcpcError(f"{where}: {size} bytes; an image file of 1 byte to {MAX_FILE_BYTES >> 20} MiB")
    return path.read_bytes()


def decode(data: bytes, prep: Preprocessing, where: str = "image") -> np.ndarray:
    """An encoded image file's bytes (JPEG or PNG, as read from disk or a camera) -> the uint8
    sample before normalisation (``Preprocessing.raw``), with the batch axis: exactly what
    ``load_folder(..., raw=True)`` gives for the same file."""
    Image, _ = _pil()
    if not data:
        raise LcpcError(f"{where}: cannot read it as an image (no bytes)")
    return _decode(io.BytesIO(data), prep, True, Image, where)[None]


def _decode(source: Path | io.BytesIO, prep: Preprocessing, raw: bool, Image, where: str) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # notices about images Pillow still decodes
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=FORMATS) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(f"{width}x{height} pixels")
                image.load()
                return prep.raw(image) if raw else prep.apply(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LcpcError(f"{where}: its header claims more pixels than lcpc decodes (at most {MAX_IMAGE_PIXELS}; "
                        f"a decompression bomb?): {first_line(exc)}") from None
    except LcpcError as exc:
        raise LcpcError(f"{where}: {exc}") from None
    except Image.UnidentifiedImageError:
        raise LcpcError(f"{where}: cannot read it as an image (not a JPEG or PNG, the two formats lcpc reads, "
                        f"or damaged past recognition)") from None
    except Exception as exc:  # Pillow's decoders raise many types on hostile bytes
        raise LcpcError(f"{where}: cannot read it as an image ({type(exc).__name__}: {first_line(exc)}; "
                        f"lcpc reads JPEG and PNG)") from None
