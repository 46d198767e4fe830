"""Recovery data as indexed samples, read a batch at a time and never all at once (numpy only).

Guarantees:
- a ``Samples`` is a sequence of model inputs of one shape: ``len``, ``sample_shape`` and
  ``take(indices)``, which returns those samples, in that order, as one float32 array; beyond
  what a ``take`` returns it holds only its description (a memory map, a list of file names),
  so memory does not grow with the number of samples;
- ``ArraySamples`` holds an array in memory or a memory-mapped ``.npy`` (``open_data``: the
  header is checked first by ``lcpc.safety.load_array``, the data are never loaded whole); uint8
  pixels are normalised batch by batch with the folder's preprocessing when one is given;
- ``ImageFolderSamples`` reads the images of a folder and its subfolders
  (``lcpc.images.image_files(recursive=True)``) with the manifest's preprocessing, one file per
  sample, when a ``take`` asks for it;
- every batch ``take`` returns is checked: a NaN or Inf ends in an ``LcpcError`` naming the
  sample (and its file);
- ``describe()`` is what the manifest's ``fidelity.recovery.data`` records: real or synthetic
  data, how many samples, from which file or folder, or how they were synthesised
  (``Synthetic``: ``--data synth[:N]``);
- samples pickle cheaply (a memory map as its path, a folder as its file list), so the worker
  processes of a multi-process recovery and of a data loader open the same data themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, image_files, read_image
from lcpc.safety import load_array

KINDS = ("real", "synthetic")


class Samples:
    """Indexed model inputs of one shape; see the module docstring."""

    sample_shape: tuple[int, ...]

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, indices) -> np.ndarray:
        """The samples at ``indices`` (in that order) as one float32 array, checked finite."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        batch = self._take(idx)
        finite = np.isfinite(batch.reshape(len(idx), -1)).all(axis=1)
        if not finite.all():
            bad = int(idx[int(np.argmin(finite))])
            raise LcpcError(f"recovery data: sample {bad}{self.where(bad)} holds NaN or Inf; recovery needs "
                            f"finite inputs")
        return batch

    def _take(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def where(self, index: int) -> str:
        """`` (of FILE)``: where sample ``index`` comes from, for messages."""
        return ""

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


class ArraySamples(Samples):
    """An in-memory array, or a memory-mapped ``.npy`` (``path``), of ``[N, *sample_shape]``."""

    def __init__(self, array: np.ndarray, *, path: str | Path | None = None, kind: str = "real",
                 normalise: Preprocessing | None = None, origin: dict | None = None) -> None:
        if kind not in KINDS:
            raise LcpcError(f"internal: data kind {kind}")
        if not isinstance(array, np.ndarray) or array.ndim < 1:
            raise LcpcError("recovery data must be an array with samples on its first axis")
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise LcpcError(f"recovery data must be real numbers, not {array.dtype}")
        self.array, self.path, self.kind, self.origin = array, (None if path is None else str(path)), kind, origin
        self.normalise = normalise if array.dtype == np.uint8 else None
        self.sample_shape = tuple(int(d) for d in array.shape[1:])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def _take(self, idx: np.ndarray) -> np.ndarray:
        order = np.argsort(idx, kind="stable")  # a memory map reads forward fastest
        rows = np.empty((len(idx),) + tuple(self.array.shape[1:]), dtype=self.array.dtype)
        rows[order] = self.array[idx[order]]
        if self.normalise is not None:
            return self.normalise.normalize(rows, "float32")
        return np.ascontiguousarray(rows, dtype=np.float32)

    def where(self, index: int) -> str:
        return f" of {self.path}" if self.path else ""

    def describe(self) -> dict[str, Any]:
        if self.kind == "synthetic":  # wherever they are kept (memory, a checkpoint's file): how they were made
            return {"kind": "synthetic", "samples": len(self), "source": "synthesised",
                    **({"synthesis": self.origin} if self.origin else {})}
        if self.path:
            return {"kind": "real", "samples": len(self), "source": "npy", "path": self.path}
        return {"kind": "real", "samples": len(self), "source": "array"}

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.array, np.memmap) and self.path:
            state["array"] = None  # reopened from the file, not copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.array is None:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class Synthetic:
    """``--data synth[:N]``: ``samples`` inputs synthesised from the original model's BatchNorm
    statistics (``passes.recover.synth``), at most ``time_limit`` seconds."""

    samples: int = 2048
    iterations: int = 500
    time_limit: float = 1800.0

    @staticmethod
    def parse(text: str) -> Synthetic | None:
        """``synth`` or ``synth:N`` as a ``Synthetic``; anything else is None (a path)."""
        match = re.fullmatch(r"synth(?::(\d+))?", text.strip())
        if match is None:
            return None
        n = int(match.group(1)) if match.group(1) else Synthetic.samples
        if n < 4:
            raise LcpcError(f"--data {text}: synthesise at least 4 samples (hundreds or more)")
        return Synthetic(samples=n)


class ImageFolderSamples(Samples):
    """The images of ``folder`` and its subfolders, read with ``prep`` one at a time."""

    def __init__(self, folder: str | Path, prep: Preprocessing) -> None:
        self.folder, self.prep = Path(folder), prep
        self.files = [p.relative_to(self.folder).as_posix() for p in image_files(folder, recursive=True)]
        self.sample_shape = tuple(prep.input_shape(1)[1:])

    def __len__(self) -> int:
        return len(self.files)

    def _take(self, idx: np.ndarray) -> np.ndarray:
        batch = np.empty((len(idx),) + self.sample_shape, dtype=np.float32)
        for row, i in enumerate(idx):
            batch[row] = read_image(self.folder, self.files[int(i)], self.prep)
        return batch

    def where(self, index: int) -> str:
        return f" ({self.folder / self.files[index]})"

    def describe(self) -> dict[str, Any]:
        return {"kind": "real", "samples": len(self), "source": "images", "path": str(self.folder)}


def as_samples(data: Samples | np.ndarray) -> Samples:
    """``data`` as ``Samples`` (an array is wrapped, in memory)."""
    return data if isinstance(data, Samples) else ArraySamples(np.asarray(data))


def open_data(path: Path, preprocessing: dict | None, *, for_raw_folder: bool = False) -> Samples:
    """Real recovery data at ``path``: a ``.npy`` (memory-mapped) or a folder of images read with
    ``preprocessing`` (a manifest's ``source.preprocessing``). uint8 arrays are normalised with it
    when the folder takes raw images (``for_raw_folder``)."""
    prep = Preprocessing.from_dict(dict(preprocessing)) if preprocessing is not None else None
    if path.is_dir():
        if prep is None:
            raise LcpcError(f"{path} is an image folder, but the manifest has no preprocessing; convert with "
                            f"--preprocess size=...,mean=...,std=... or pass a .npy batch")
        return ImageFolderSamples(path.resolve(), prep)
    if not path.is_file():
        raise LcpcError(f"{path}: no such data file or image folder")
    array = load_array(path, mmap=True)
    assert isinstance(array, np.ndarray)
    return ArraySamples(array, path=path.resolve(), normalise=prep if for_raw_folder else None)


def check(samples: Samples, input_name: str, want: tuple[int, ...], labels=None) -> np.ndarray | None:
    """Refuse data of the wrong shape or too few samples, and labels that are not one integer per
    sample; returns the labels as int64 (or None)."""
    if tuple(samples.sample_shape) != tuple(want[1:]):
        raise LcpcError(f"recovery data has shape {[len(samples), *samples.sample_shape]}; the model's input "
                        f"'{input_name}' needs [N, {', '.join(map(str, want[1:]))}]")
    if len(samples) < 4:
        raise LcpcError(f"recovery data holds {len(samples)} samples; it needs training images (hundreds or more)")
    if labels is None:
        return None
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(samples) or not np.issubdtype(y.dtype, np.integer):
        raise LcpcError(f"labels must be {len(samples)} integers, one per sample (got {len(y)} of {y.dtype})")
    return y.astype(np.int64)
