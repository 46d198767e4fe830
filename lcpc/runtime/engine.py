"""``Engine``: what every engine that runs a written folder does, and ``open_engine`` to get one.

Guarantees:
- an engine reads its folder once (``manifest.read``: schema, dataflow, containment,
  sha256 of every stage) and holds the typed view as ``manifest``;
- ``inputs`` is what it is fed (``Manifest.feeds``); ``check_inputs`` refuses bad feeds
  with an ``LcpcError`` naming the input and its file; ``run`` checks the feeds, runs a
  batch of any multiple of the planned batch in planned slices, in order, and returns
  the outputs under the model's names, counting every transfer's bytes into ``Stats``;
  ``run(..., without=[names])`` leaves those devices out and answers from the branches
  that are left (``runtime.degrade``), or refuses when the plan cannot; every answer made
  without some device is recorded (``Stats.degraded``);
- ``rebuild`` replaces what died (nothing, for an engine whose sessions live in this
  process) and returns the names of the devices rebuilt; ``close`` frees everything the
  engine started and may be called twice; an engine is a context manager;
- ``describe`` says which engine (and mode) ran, for the user;
- ``open_engine`` opens the engine by name and imports Ray (or MPI) only when asked for it; an option
  the engine does not take is refused, never ignored, and a devices file given to an engine
  that places no devices is still read first, so a bad one is refused as itself (file, key,
  why) and a good one with a message that says what to do instead.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.images import Preprocessing, decode
from lcpc.perf import devices as dv
from lcpc.runtime import degrade
from lcpc.runtime import manifest as mf
from lcpc.runtime.feeds import Stats, check_encoded, check_feeds, encoded, join_batches, planned_batches
from lcpc.runtime.manifest import Tensor

# engine name -> the module and class that implement it, imported when asked for (Ray is optional and slow
# to import)
ENGINES = {"local": ("lcpc.runtime.local", "LocalEngine"), "ray": ("lcpc.runtime.ray", "RayEngine"),
           "mpi": ("lcpc.runtime.mpi", "MpiEngine")}


def image_preprocessing(manifest: mf.Manifest) -> Preprocessing:
    """How a folder fed image files turns each file into its input (``source.preprocessing``)."""
    return Preprocessing.from_dict(dict(manifest.preprocessing or {}))


class Engine(abc.ABC):
    """Runs one written folder; reuse one engine for many requests (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = mf.read(self.folder)
        self.rebuilt: list[str] = []  # devices whose process was replaced in the background, in order
        self.prep: Preprocessing | None = None  # a folder fed image files: how they become its input

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        return self.manifest.feeds

    @property
    @abc.abstractmethod
    def describe(self) -> str:
        """Which engine runs the folder, in words."""

    def check_inputs(self, feeds: dict[str, np.ndarray], files: dict[str, str] | None = None) -> int:
        """Validate feeds against the folder's inputs; returns the number of planned batches (a
        folder fed image files takes one file per input and inference)."""
        if self.manifest.encoded:
            return check_encoded(self.inputs, feeds, files)
        return check_feeds(self.inputs, feeds, files)

    def decode(self, blob: np.ndarray) -> np.ndarray:
        """An image file's bytes -> the uint8 image this folder's stages take (``images.decode``)."""
        if self.prep is None:
            self.prep = image_preprocessing(self.manifest)
        return decode(blob.tobytes(), self.prep, f"the image of request input ({blob.nbytes} bytes)")

    def run(self, feeds: dict[str, np.ndarray], stats: Stats | None = None, request: Any = None,
            without: Collection[str] = ()) -> dict[str, np.ndarray]:
        """Outputs under the model's original names, for a batch of any multiple of the plan's
        (``request`` names the request in the errors of distributed engines). ``without`` names
        devices to leave out on purpose: the head answers from the branches it has
        (``runtime.degrade``; refused for a plan that cannot). An answer given without some
        device is recorded in ``stats.degraded`` under ``request``."""
        missing = self.device_ids(without)
        self.check_inputs(feeds)
        parts = [{k: encoded(v) for k, v in feeds.items()}] if self.manifest.encoded else \
            planned_batches(self.inputs, feeds)
        answers = [self._run_once(part, stats, request, missing) for part in parts]
        left_out = sorted({d for _, gone in answers for d in gone})
        if stats is not None and left_out:
            stats.degraded[request] = tuple(self.manifest.names[d] for d in left_out)
        return join_batches(self.manifest, [out for out, _ in answers])

    def device_ids(self, names: Collection[str]) -> frozenset[int]:
        """The ids of the devices called ``names``, checked: each may be left out of this plan."""
        ids = {n: d for d, n in self.manifest.names.items()}
        unknown = [n for n in names if n not in ids]
        if unknown:
            raise LcpcError(f"--without {', '.join(unknown)}: no such device; the plan has "
                            f"{', '.join(self.manifest.names.values())}")
        missing = frozenset(ids[n] for n in names)
        degrade.check(*self.manifest.merge, missing, self.manifest.names)
        return missing

    @abc.abstractmethod
    def _run_once(self, feeds: dict[str, np.ndarray], stats: Stats | None, request: Any,
                  missing: frozenset[int]) -> tuple[dict[str, np.ndarray], frozenset[int]]:
        """One planned batch without the devices ``missing``: (the model outputs by name, the devices
        the answer was made without); the bytes moved counted into ``stats``."""

    def rebuild(self) -> list[str]:
        """Replace what died; returns the names of the devices rebuilt."""
        return []

    @abc.abstractmethod
    def close(self) -> None:
        """Free what the engine started (idempotent)."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_engine(folder: str | Path, engine: str = "local", **options: Any) -> Engine:
    """The engine called ``engine`` (``ENGINES``) on ``folder``. ``options`` go to its constructor
    (``ray``: address, devices, timeout, mode; see ``lcpc.runtime.ray``; ``mpi``: timeout, hostfile,
    mpi_args); those given as None are left to the engine's defaults, and one the engine does not take is
    refused, never ignored."""
    if engine not in ENGINES:
        raise LcpcError(f"unknown engine '{engine}'; choose {' or '.join(ENGINES)}")
    module, name = ENGINES[engine]
    cls = getattr(importlib.import_module(module), name)
    given = {k: v for k, v in options.items() if v is not None}
    takes = inspect.signature(cls).parameters
    if "devices" in given and "devices" not in takes:  # a file the user names is used or refused
        dv.load(given["devices"]).check_names(d.name for d in mf.read(folder).devices)
        raise LcpcError(f"--devices {given['devices']}: the {engine} engine runs every device in this process, so "
                        f"there is nothing to place; drop --devices, or pass --engine ray to place the devices "
                        f"as the file says")
    for key in given:
        if key not in takes:
            raise LcpcError(f"--{key.replace('_', '-')} does not apply to the {engine} engine: drop it, or choose "
                            f"an engine that uses it")
    return cls(folder, **given)
