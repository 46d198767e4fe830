"""Engine ``local``: run an lcpc output folder on this machine with onnxruntime.

Guarantees:
- one onnxruntime session per stage; the stages of one level run concurrently in a
  thread pool (onnxruntime releases the GIL), then the level's transfers move, in the
  order ``lcpc.schedule`` gives (shared with the Ray engine);
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

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lcpc import manifest as mf
from lcpc.errors import LcpcError
from lcpc.schedule import Schedule, Stats, check_feeds, join_batches, planned_batches
from lcpc.safety import first_line
from lcpc.stage_session import open_stage


class LocalEngine:
    """Runs a manifest's stages; reuse one engine for many inputs."""

    def __init__(self, folder: str | Path, threads_per_stage: int = 1, threads: int | None = None) -> None:
        """``threads``, when given, is the budget for the whole engine (to compare with a model
        run on that many threads): min(K, threads) stages run at once, each on
        max(1, threads // K) onnxruntime threads; otherwise every stage of a level runs at
        once on ``threads_per_stage`` threads."""
        self.folder = Path(folder)
        self.manifest = mf.read(self.folder)
        k = self.manifest["branches"]
        workers = k if threads is None else max(1, min(k, threads))
        if threads is not None:
            threads_per_stage = max(1, threads // k)
        self.sessions = {s["id"]: open_stage(mf.read_stage(self.folder, s), s, self.folder / s["file"],
                                             threads_per_stage)
                         for s in self.manifest["stages"]}
        self.schedule = Schedule(self.manifest)
        self.pool = ThreadPoolExecutor(max_workers=workers)

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return mf.feeds(self.manifest)

    def check_inputs(self, feeds: dict[str, np.ndarray], files: dict[str, str] | None = None) -> int:
        """Validate feeds against the model's inputs; returns the number of planned batches."""
        return check_feeds(self.inputs, feeds, files)

    describe = "local"

    def run(self, feeds: dict[str, np.ndarray], stats: Stats | None = None, request: Any = None,
            ) -> dict[str, np.ndarray]:
        """Outputs under the model's original names, for a batch of any multiple of the plan's
        (``request`` names the request in errors of distributed engines; unused here)."""
        self.check_inputs(feeds)
        results = [self._run_once(part, stats) for part in planned_batches(self.inputs, feeds)]
        return join_batches(self.manifest, results)

    def _run_once(self, feeds: dict[str, np.ndarray], stats: Stats | None) -> dict[str, np.ndarray]:
        values: dict[tuple[int, str], np.ndarray] = {(0, k): v for k, v in feeds.items()}
        for t in self.schedule.input_transfers:
            self._move(t, values, stats)
        for level in self.schedule.levels:
            done = list(self.pool.map(lambda s: self._run_stage(s, values), level.stages))
            for s, outs in zip(level.stages, done):
                for spec, value in zip(s["outputs"], outs):
                    values[(s["device"], spec["name"])] = value
            for t in level.transfers:
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
                            f"{first_line(exc)}") from None

    @staticmethod
    def _move(t: dict, values: dict, stats: Stats | None) -> None:
        value = values[(t["from"]["device"], t["from"]["name"])]
        values[(t["to"]["device"], t["to"]["name"])] = value.copy()
        if stats is not None:
            stats.bytes_by_transfer[t["id"]] += value.nbytes

    def rebuild(self) -> list[str]:
        """Nothing to rebuild: sessions in this process do not die on their own."""
        return []

    def close(self) -> None:
        self.pool.shutdown(wait=True)
