"""Engine ``local``: run an lcpc output folder on this machine with onnxruntime.

Guarantees (beyond ``lcpc.runtime.engine.Engine``'s):
- one onnxruntime session per stage (``session.open_stage``: the checked bytes, the
  declared signature); the stages of one level run concurrently in a thread pool
  (onnxruntime releases the GIL), then the level's transfers move, in the one run order
  (``Manifest.order.walk``);
- every transfer's bytes are counted as they move (``Stats``), so a run can be
  compared byte for byte with the manifest;
- a folder fed image files moves the file's bytes (counted as they are) and each device
  that reads the image decodes it (``Engine.decode``); a coded message moves (and counts)
  its coded bytes (``runtime.coding``);
- devices left out (``run(..., without=...)``) run nothing and move nothing; the head's
  merge stage gets the contributions ``runtime.degrade`` fills in for them;
- an onnxruntime failure while running a stage is an ``LcpcError`` naming the stage.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lcpc.errors import LcpcError
from lcpc.runtime import manifest as mf
from lcpc.runtime.coding import pack, unpack
from lcpc.runtime.degrade import HEAD
from lcpc.runtime.engine import Engine
from lcpc.runtime.feeds import Stats
from lcpc.runtime.manifest import Stage, Transfer
from lcpc.runtime.session import open_stage
from lcpc.safety import first_line


class LocalEngine(Engine):
    """Runs a manifest's stages in this process; reuse one engine for many inputs."""

    describe = "local"

    def __init__(self, folder: str | Path, threads_per_stage: int = 1, threads: int | None = None) -> None:
        """``threads``, when given, is the budget for the whole engine (to compare with a model
        run on that many threads): min(K, threads) stages run at once, each on
        max(1, threads // K) onnxruntime threads; otherwise every stage of a level runs at
        once on ``threads_per_stage`` threads."""
        super().__init__(folder)
        k = self.manifest.branches
        workers = k if threads is None else max(1, min(k, threads))
        if threads is not None:
            threads_per_stage = max(1, threads // k)
        self.sessions = {s.id: open_stage(mf.read_stage(self.folder, s), s, self.folder / s.file, threads_per_stage)
                         for s in self.manifest.stages}
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def _run_once(self, feeds: dict[str, np.ndarray], stats: Stats | None, request: Any,
                  missing: frozenset[int]) -> tuple[dict[str, np.ndarray], frozenset[int]]:
        files = feeds if self.manifest.encoded else {}  # image files: each device decodes its own copy
        values: dict[tuple[int, str], np.ndarray] = {(0, k): self.decode(v) if files else v for k, v in feeds.items()}
        received: dict[int, int] = {}
        merge, _ = self.manifest.merge

        def run_level(stages: tuple[Stage, ...]) -> None:
            stages = tuple(s for s in stages if s.device not in missing)
            if missing and merge is not None and any(s.id == merge.stage for s in stages):
                given = {c.name: values[(HEAD, c.name)] for c in merge.contributions if c.device not in missing}
                values.update({(HEAD, name): v for name, v in merge.fill(given, missing).items()})
            for s, outs in zip(stages, list(self.pool.map(lambda s: self._run_stage(s, values), stages))):
                values.update({(s.device, o.name): v for o, v in zip(s.outputs, outs)})

        def move(t: Transfer) -> None:
            if t.src in missing or t.dst in missing:
                return
            if t.encoded:
                value = files[t.src_name]
                values[(t.dst, t.dst_name)] = self.decode(value)
            elif t.coding is not None:
                value = pack(values[(t.src, t.src_name)])
                values[(t.dst, t.dst_name)] = unpack(value, t.shape, t.dtype, f"transfer {t.id}")
            else:
                value = values[(t.src, t.src_name)]
                values[(t.dst, t.dst_name)] = value.copy()
            received[t.id] = received.get(t.id, 0) + value.nbytes

        self.manifest.order.walk(run_level, move)
        if stats is not None:
            stats.add(received)
        return {o.name: values[(o.device, o.local_name)] for o in self.manifest.outputs}, missing

    def _run_stage(self, stage: Stage, values: dict) -> list[np.ndarray]:
        feeds = {i.name: values[(stage.device, i.name)] for i in stage.inputs}
        try:
            return self.sessions[stage.id].run([o.name for o in stage.outputs], feeds)
        except Exception as exc:
            raise LcpcError(f"{self.folder / stage.file}: stage {stage.id} failed in onnxruntime: "
                            f"{first_line(exc)}") from None

    def close(self) -> None:
        self.pool.shutdown(wait=True)
