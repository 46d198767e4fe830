"""What an engine is fed and what it counts: input checks, planned batches, bytes moved.

Guarantees:
- ``check_feeds`` refuses unknown or missing input names, wrong dtype or shape, NaN/Inf
  and empty batches with an ``LcpcError`` naming the input (and its file), and returns
  the number of planned batches in the feeds;
- ``planned_batches`` cuts checked feeds into slices of the planned batch size, in
  order, and ``join_batches`` puts the per-slice outputs back together;
- ``Stats`` counts the bytes each transfer moved, by transfer id, the same way for every
  engine, so a run compares with the manifest transfer by transfer;
- ``random_feeds`` gives inputs of declared shapes and dtypes for timing runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.runtime.manifest import Manifest, Tensor
from lcpc.safety import printable


@dataclass
class Stats:
    """Bytes that actually crossed devices during a run, per transfer id."""

    samples: int = 0
    bytes_by_transfer: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    degraded: dict[Any, tuple[str, ...]] = field(default_factory=dict)  # request -> devices it was answered without

    def total(self) -> int:
        return sum(self.bytes_by_transfer.values())

    def add(self, counts: dict[int, int]) -> None:
        """One inference's bytes received, by transfer id."""
        for tid, n in counts.items():
            self.bytes_by_transfer[tid] += n
        self.samples += 1

    def as_dict(self, manifest: Manifest) -> dict[str, Any]:
        rows = [{"id": t.id, "tensor": t.tensor, "kind": t.kind, "from": t.src, "to": t.dst,
                 "bytes": int(self.bytes_by_transfer.get(t.id, 0)), "manifest_bytes_per_inference": t.bytes}
                for t in manifest.transfers]
        return {"samples": self.samples, "runs": self.samples, "total_bytes": self.total(), "transfers": rows,
                "degraded": [{"request": r, "without": list(names)} for r, names in self.degraded.items()]}


def check_feeds(inputs: Sequence[Tensor], feeds: dict[str, np.ndarray], files: dict[str, str] | None = None) -> int:
    """Validate feeds against what the folder is fed (``Manifest.feeds``); returns the
    number of planned batches. ``files`` maps input names to the files they came from."""
    names = [i.name for i in inputs]
    unknown = sorted(set(feeds) - set(names))
    missing = [n for n in names if n not in feeds]
    if unknown or missing:
        sources = sorted({(files or {}).get(n, "") for n in unknown} - {""})
        where = f"{printable(', '.join(sources), 300)}: " if sources else ""
        raise LcpcError(f"{where}inputs {printable(unknown, 300) if unknown else ''} unknown, "
                        f"{printable(missing, 300) if missing else ''} missing; the model takes "
                        f"{printable(', '.join(names), 300)}")
    batch = None
    for spec in inputs:
        x = feeds[spec.name]
        where = f"{printable((files or {}).get(spec.name, ''), 300)}: " if files else ""
        label = f"{where}input '{printable(spec.name, 200)}'"
        want = spec.shape
        if not isinstance(x, np.ndarray):
            raise LcpcError(f"{label}: expected a numpy array, got {type(x).__name__}")
        if x.dtype != np.dtype(spec.dtype) and spec.dtype == "uint8":
            raise LcpcError(f"{label}: dtype {x.dtype}; this folder takes the raw image as uint8 and applies "
                            f"the preprocessing itself: pass the pixels before normalisation "
                            f"(lcpc.images.load_folder(folder, prep, raw=True))")
        if x.dtype != np.dtype(spec.dtype):
            raise LcpcError(f"{label}: dtype {x.dtype}, the model takes {spec.dtype} "
                            f"(convert with .astype('{spec.dtype}'))")
        if x.ndim != len(want) or tuple(x.shape[1:]) != want[1:]:
            raise LcpcError(f"{label}: shape {tuple(x.shape)}, the model takes "
                            f"(N, {', '.join(map(str, want[1:]))})")
        if x.shape[0] == 0:
            raise LcpcError(f"{label}: empty batch (shape {tuple(x.shape)})")
        if x.shape[0] % want[0]:
            raise LcpcError(f"{label}: batch {x.shape[0]} is not a multiple of the planned batch {want[0]}")
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            raise LcpcError(f"{label}: contains NaN or Inf")
        n = x.shape[0] // want[0]
        if batch is not None and n != batch:
            raise LcpcError(f"{label}: batch {x.shape[0]} disagrees with the other inputs' batch")
        batch = n
    return int(batch or 0)


MAX_ENCODED_BYTES = 64 << 20  # one image file on the wire


def check_encoded(inputs: Sequence[Tensor], feeds: dict[str, Any], files: dict[str, str] | None = None) -> int:
    """Feeds of a folder fed image files: each input one file's bytes (``bytes`` or a 1-D uint8 array,
    not empty, at most ``MAX_ENCODED_BYTES``); returns 1 (one image per inference)."""
    names = [i.name for i in inputs]
    if sorted(feeds) != sorted(names):
        raise LcpcError(f"inputs {printable(sorted(feeds), 300)} given; this folder is fed the image file of "
                        f"{printable(', '.join(names), 300)}")
    for name in names:
        x = feeds[name]
        where = f"{printable((files or {}).get(name, ''), 300)}: " if files else ""
        label = f"{where}input '{printable(name, 200)}'"
        if not (isinstance(x, (bytes, bytearray)) or (isinstance(x, np.ndarray) and x.dtype == np.uint8
                                                      and x.ndim == 1)):
            raise LcpcError(f"{label}: this folder is fed the image file itself (JPEG or PNG bytes, as read from "
                            f"disk), not a decoded array; pass the file")
        if not 0 < len(x) <= MAX_ENCODED_BYTES:
            raise LcpcError(f"{label}: {len(x)} bytes; an image file of 1 to {MAX_ENCODED_BYTES >> 20} MiB")
    return 1


def encoded(blob: Any) -> np.ndarray:
    """An image file's bytes as the 1-D uint8 array engines move."""
    return blob if isinstance(blob, np.ndarray) else np.frombuffer(bytes(blob), np.uint8)


def planned_batches(inputs: Sequence[Tensor], feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Checked feeds cut into slices of the planned batch size, in order."""
    step = {i.name: i.shape[0] for i in inputs}
    runs = feeds[inputs[0].name].shape[0] // step[inputs[0].name]
    return [{k: v[r * step[k]:(r + 1) * step[k]] for k, v in feeds.items()} for r in range(runs)]


def join_batches(manifest: Manifest, results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {o.name: np.concatenate([r[o.name] for r in results]) for o in manifest.outputs}


def random_feeds(specs: Sequence[Tensor], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Inputs of the declared shapes and dtypes, for timing (CNN compute does not depend on the
    values): normal floats, small integers, False."""
    feeds = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
        else:
            feeds[spec.name] = np.zeros(spec.shape, dtype)
    return feeds
