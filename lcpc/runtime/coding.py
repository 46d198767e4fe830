"""Entropy coding of int8 messages on the wire (``--wire-code deflate``): lossless, so the values a
stage receives are exactly the int8 values its sender produced.

Guarantees: ``pack`` turns a value into raw DEFLATE bytes (zlib, level 9, no header or checksum: the
transport already guards the bytes) as a 1-D uint8 array, which engines move and count as they are;
``unpack`` gives the value back, of the shape and dtype the manifest declares, or an ``LcpcError``
naming the transfer when the bytes do not decode to it.
"""

from __future__ import annotations

import zlib

import numpy as np

from lcpc.errors import LcpcError

CODINGS = ("none", "deflate")


def pack(value: np.ndarray) -> np.ndarray:
    squeeze = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = squeeze.compress(np.ascontiguousarray(value).tobytes()) + squeeze.flush()
    return np.frombuffer(data, np.uint8)


def unpack(data: np.ndarray, shape: tuple[int, ...], dtype: str, what: str = "a message") -> np.ndarray:
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    try:
        raw = zlib.decompressobj(-15).decompress(data.tobytes(), expected + 1)
    except zlib.error as exc:
        raise LcpcError(f"{what}: its coded bytes do not decode ({exc})") from None
    if len(raw) != expected:
        raise LcpcError(f"{what}: decodes to {len(raw)} bytes, not the {expected} of {list(shape)} {dtype}")
    return np.frombuffer(raw, dtype).reshape(shape).copy()
