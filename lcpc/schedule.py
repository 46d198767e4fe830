"""The run order of a manifest, shared by every engine (local threads, Ray actors).

Guarantees:
- ``Schedule(manifest)`` holds the order ``manifest.validate`` replays: the input
  transfers first, then level by level the stages of that level (which may run
  concurrently), then the transfers leaving that level; following it never looks up
  a value that is not there;
- ``Schedule.steps`` splits each level per device into a ``Step`` (the stages the
  device runs at that level and the transfers it sends after them, grouped by
  destination), so a distributed engine makes one call per device per level;
- ``Schedule.receives`` maps, per device, the local name of every value that arrives
  by transfer to that transfer's id, so an engine counts received bytes by id;
- ``check_feeds`` refuses unknown or missing input names, wrong dtype or shape,
  NaN/Inf and empty batches with an ``LcpcError`` naming the input (and its file);
  ``Stats`` counts the bytes each transfer moved, by transfer id, for every engine;
- nothing here changes the manifest or depends on how values are stored or moved.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.safety import printable


@dataclass(frozen=True)
class Level:
    """One level: its stages (run concurrently), then its transfers (moved after them)."""

    level: int
    stages: tuple[dict, ...]
    transfers: tuple[dict, ...]


@dataclass(frozen=True)
class Step:
    """What one device does at one level: run ``stages``, then send ``sends[dst]``."""

    level: int
    device: int
    stages: tuple[dict, ...]
    sends: dict[int, tuple[dict, ...]] = field(default_factory=dict)

    @property
    def destinations(self) -> list[int]:
        return sorted(self.sends)


class Schedule:
    """The execution order of one manifest (see the module docstring)."""

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.manifest = manifest
        self.input_transfers = tuple(t for t in manifest["transfers"] if t["kind"] == "input")
        stages, transfers = defaultdict(list), defaultdict(list)
        for s in manifest["stages"]:
            stages[s["level"]].append(s)
        for t in manifest["transfers"]:
            if t["kind"] != "input":
                transfers[t["level"]].append(t)
        self.levels = tuple(Level(lv, tuple(stages[lv]), tuple(transfers[lv]))
                            for lv in sorted(set(stages) | set(transfers)))
        self.receives: dict[int, dict[str, int]] = defaultdict(dict)
        for t in manifest["transfers"]:
            self.receives[t["to"]["device"]][t["to"]["name"]] = t["id"]

    @property
    def devices(self) -> list[int]:
        return [d["id"] for d in self.manifest["devices"]]

    def steps(self) -> list[list[Step]]:
        """Per level, the steps of the devices that have work at it (stages or sends)."""
        out = []
        for lv in self.levels:
            per_device: dict[int, tuple[list, dict]] = {}
            for s in lv.stages:
                per_device.setdefault(s["device"], ([], defaultdict(list)))[0].append(s)
            for t in lv.transfers:
                per_device.setdefault(t["from"]["device"], ([], defaultdict(list)))[1][t["to"]["device"]].append(t)
            out.append([Step(lv.level, d, tuple(st), {dst: tuple(ts) for dst, ts in sends.items()})
                        for d, (st, sends) in sorted(per_device.items())])
        return out

    def model_outputs(self) -> list[dict]:
        return self.manifest["outputs"]


@dataclass
class Stats:
    """Bytes that actually crossed devices during a run, per transfer id."""

    samples: int = 0
    bytes_by_transfer: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def total(self) -> int:
        return sum(self.bytes_by_transfer.values())

    def as_dict(self, manifest: dict[str, Any]) -> dict[str, Any]:
        rows = []
        for t in manifest["transfers"]:
            rows.append({"id": t["id"], "tensor": t["tensor"], "kind": t["kind"],
                         "from": t["from"]["device"], "to": t["to"]["device"],
                         "bytes": int(self.bytes_by_transfer.get(t["id"], 0)),
                         "manifest_bytes_per_inference": t["bytes"]})
        return {"samples": self.samples, "runs": self.samples, "total_bytes": self.total(),
                "transfers": rows}


def check_feeds(inputs: list[dict], feeds: dict[str, np.ndarray], files: dict[str, str] | None = None) -> int:
    """Validate feeds against what the folder is fed (``manifest.feeds``); returns the
    number of planned batches. ``files`` maps input names to the files they came from."""
    names = [i["name"] for i in inputs]
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
        x = feeds[spec["name"]]
        where = f"{printable((files or {}).get(spec['name'], ''), 300)}: " if files else ""
        label = f"{where}input '{printable(spec['name'], 200)}'"
        want = tuple(spec["shape"])
        if not isinstance(x, np.ndarray):
            raise LcpcError(f"{label}: expected a numpy array, got {type(x).__name__}")
        if x.dtype != np.dtype(spec["dtype"]) and spec["dtype"] == "uint8":
            raise LcpcError(f"{label}: dtype {x.dtype}; this folder takes the raw image as uint8 and applies "
                            f"the preprocessing itself: pass the pixels before normalisation "
                            f"(lcpc.images.load_folder(folder, prep, raw=True))")
        if x.dtype != np.dtype(spec["dtype"]):
            raise LcpcError(f"{label}: dtype {x.dtype}, the model takes {spec['dtype']} "
                            f"(convert with .astype('{spec['dtype']}'))")
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
    return int(batch)


def planned_batches(inputs: list[dict], feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Checked feeds cut into slices of the planned batch size, in order."""
    step = {i["name"]: i["shape"][0] for i in inputs}
    runs = feeds[inputs[0]["name"]].shape[0] // step[inputs[0]["name"]]
    return [{k: v[r * step[k]:(r + 1) * step[k]] for k, v in feeds.items()} for r in range(runs)]


def join_batches(manifest: dict[str, Any], results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {o["name"]: np.concatenate([r[o["name"]] for r in results]) for o in manifest["outputs"]}
