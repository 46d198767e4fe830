"""Engine ``local``: run an lcpc output folder on this machine with onnxruntime.

Guarantees:
- one onnxruntime session per stage; the stages of one level run concurrently in a
  thread pool (onnxruntime releases the GIL), then the level's transfers move;
- every transfer's bytes are counted as they move (``Stats``), so a run can be
  compared byte for byte with the manifest;
- inputs are checked first: unknown or missing names, wrong dtype, wrong shape,
  NaN/Inf and empty batches end in an ``LcpcError`` naming the input (and its file,
  when given); a batch larger than the planned one is run in slices of the planned
  batch size;
- the folder is read through ``manifest.read`` (schema, dataflow, containment, sha256
  tamper check); each session is built from the very bytes whose sha256 was checked
  (``manifest.read_stage``), so no external data or swapped file is ever loaded, and
  its inputs and outputs must be exactly those the manifest declares;
- an onnxruntime failure while running a stage is an ``LcpcError`` naming the stage.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from lcpc import manifest as mf
from lcpc.errors import LcpcError
from lcpc.safety import printable


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


class LocalEngine:
    """Runs a manifest's stages; reuse one engine for many inputs."""

    def __init__(self, folder: str | Path, threads_per_stage: int = 1) -> None:
        self.folder = Path(folder)
        self.manifest = mf.read(self.folder)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads_per_stage
        opts.inter_op_num_threads = 1
        self.sessions = {}
        for s in self.manifest["stages"]:
            where = self.folder / s["file"]
            try:  # from the checked bytes: no second read, no external data next to the file
                session = ort.InferenceSession(mf.read_stage(self.folder, s), opts,
                                               providers=["CPUExecutionProvider"])
            except LcpcError:
                raise
            except Exception as exc:
                raise LcpcError(f"{where}: onnxruntime cannot load it: {_first_line(exc)}") from None
            _check_signature(session, s, where)
            self.sessions[s["id"]] = session
        self.levels: dict[int, list[dict]] = defaultdict(list)
        for s in self.manifest["stages"]:
            self.levels[s["level"]].append(s)
        self.pool = ThreadPoolExecutor(max_workers=self.manifest["branches"])

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return self.manifest["source"]["inputs"]

    def check_inputs(self, feeds: dict[str, np.ndarray], files: dict[str, str] | None = None) -> int:
        """Validate feeds against the model's inputs; returns the number of planned batches.
        ``files`` maps input names to the files they came from, for the messages."""
        names = [i["name"] for i in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown or missing:
            sources = sorted({(files or {}).get(n, "") for n in unknown} - {""})
            where = f"{printable(', '.join(sources), 300)}: " if sources else ""
            raise LcpcError(f"{where}inputs {printable(unknown, 300) if unknown else ''} unknown, "
                            f"{printable(missing, 300) if missing else ''} missing; the model takes "
                            f"{printable(', '.join(names), 300)}")
        batch = None
        for spec in self.inputs:
            x = feeds[spec["name"]]
            where = f"{printable((files or {}).get(spec['name'], ''), 300)}: " if files else ""
            label = f"{where}input '{printable(spec['name'], 200)}'"
            want = tuple(spec["shape"])
            if not isinstance(x, np.ndarray):
                raise LcpcError(f"{label}: expected a numpy array, got {type(x).__name__}")
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

    def run(self, feeds: dict[str, np.ndarray], stats: Stats | None = None) -> dict[str, np.ndarray]:
        """Outputs under the model's original names, for a batch of any multiple of the plan's."""
        runs = self.check_inputs(feeds)
        step = {i["name"]: i["shape"][0] for i in self.inputs}
        results = [self._run_once({k: v[r * step[k]:(r + 1) * step[k]] for k, v in feeds.items()}, stats)
                   for r in range(runs)]
        return {o["name"]: np.concatenate([r[o["name"]] for r in results]) for o in self.manifest["outputs"]}

    def _run_once(self, feeds: dict[str, np.ndarray], stats: Stats | None) -> dict[str, np.ndarray]:
        values: dict[tuple[int, str], np.ndarray] = {(0, k): v for k, v in feeds.items()}
        by_level: dict[int, list[dict]] = defaultdict(list)
        for t in self.manifest["transfers"]:
            if t["kind"] == "input":
                self._move(t, values, stats)
            else:
                by_level[t["level"]].append(t)
        for level in sorted(set(self.levels) | set(by_level)):
            stages = self.levels.get(level, [])
            done = list(self.pool.map(lambda s: self._run_stage(s, values), stages))
            for s, outs in zip(stages, done):
                for spec, value in zip(s["outputs"], outs):
                    values[(s["device"], spec["name"])] = value
            for t in by_level.get(level, []):
                self._move(t, values, stats)
        if stats is not None:
            stats.samples += 1
        return {o["name"]: values[(o["device"], o["local_name"])] for o in self.manifest["outputs"]}

    def _run_stage(self, stage: dict, values: dict) -> list[np.ndarray]:
        feeds = {i["name"]: values[(stage["device"], i["name"])] for i in stage["inputs"]}
        try:
            return self.sessions[stage["id"]].run([o["name"] for o in stage["outputs"]], feeds)
        except Exception as exc:  # e.g. an op failing on these values
            raise LcpcError(f"{self.folder / stage['file']}: stage {stage['id']} failed in onnxruntime: "
                            f"{_first_line(exc)}") from None

    @staticmethod
    def _move(t: dict, values: dict, stats: Stats | None) -> None:
        value = values[(t["from"]["device"], t["from"]["name"])]
        values[(t["to"]["device"], t["to"]["name"])] = value.copy()
        if stats is not None:
            stats.bytes_by_transfer[t["id"]] += value.nbytes

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _check_signature(session: ort.InferenceSession, stage: dict, where: Path) -> None:
    """The stage file's inputs and outputs are the ones the manifest names, with its shapes and dtypes."""
    for kind, declared, actual in (("inputs", stage["inputs"], session.get_inputs()),
                                   ("outputs", stage["outputs"], session.get_outputs())):
        have = {a.name: (list(a.shape), a.type) for a in actual}
        want = {d["name"]: (d["shape"], f"tensor({_ORT_TYPES.get(d['dtype'], d['dtype'])})") for d in declared}
        if have != want:
            raise LcpcError(f"{where}: its {kind} differ from what the manifest says for stage {stage['id']}")


_ORT_TYPES = {"float32": "float", "float64": "double", "bool": "bool"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return printable(text.splitlines()[0], 300) if text else type(exc).__name__
