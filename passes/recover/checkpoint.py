"""Recovery checkpoints: the whole state of a distillation, so a stopped run can continue.

Guarantees:
- ``Checkpoint(folder, fingerprint)`` keeps one file, ``folder/recovery.pt`` (with a readable
  summary beside it, ``recovery.json``); ``save`` writes each through a temporary file in the
  same folder, flushed to disk, then renamed over the old one, so a reader (a resumed run)
  sees the previous checkpoint or the new one, never part of one;
- ``open(resume)``: without ``resume`` a folder that already holds a checkpoint is refused
  (a run never overwrites another's progress silently); with ``resume`` a folder without one
  is refused, and so is a checkpoint of another run: the fingerprint (the plan's cut and
  source model, the data, the recipe, the seed and the split) must be the same, and the
  message names what differs;
- a checkpoint is read with ``torch.load(weights_only=True)``: it holds tensors, numbers and
  strings, and reading one cannot run code;
- ``fingerprint`` is JSON-ready and computed from the plan and settings alone (no data are
  read), so every process of a multi-process run computes the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from lcpc.errors import LcpcError

FILE = "recovery.pt"
SUMMARY = "recovery.json"
SYNTHETIC = "synthetic.npy"
FORMAT = 1


def fingerprint(plan, data: dict, labels: bool, recipe: dict, seed: int, holdout: float) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the plan (source model, K, cut, branches of
    the channel classes), the data's description, whether labels were given, the recipe, seed, split."""
    cut = sorted(plan.cut_nodes())
    branches = sorted((str(k), int(v)) for k, v in plan.branch_of_class.items())
    digest = hashlib.sha256(json.dumps([plan.source.sha256, plan.k, cut, branches]).encode()).hexdigest()
    return {"plan": digest, "data": dict(data), "labels": bool(labels), "recipe": dict(recipe), "seed": int(seed),
            "holdout": float(holdout)}


def check_fresh(folder: Path) -> None:
    """Refuse to start a run in ``folder`` when it holds an earlier run's checkpoint."""
    if (Path(folder) / FILE).is_file():
        raise LcpcError(f"--checkpoint {folder}: holds the checkpoint of an earlier recovery; pass --resume to "
                        f"continue it, or another --checkpoint folder")


class Checkpoint:
    """The checkpoint file of one recovery run; see the module docstring."""

    def __init__(self, folder: str | Path, fingerprint: dict[str, Any]) -> None:
        self.folder, self.fingerprint = Path(folder), fingerprint
        self.path = self.folder / FILE

    def exists(self) -> bool:
        return self.path.is_file()

    def open(self, resume: bool) -> dict | None:
        """The state to resume from (``resume``), or None for a fresh run; refuses the cases above."""
        if self.folder.exists() and not self.folder.is_dir():
            raise LcpcError(f"--checkpoint {self.folder}: exists and is not a folder")
        if not resume:
            check_fresh(self.folder)
            self.folder.mkdir(parents=True, exist_ok=True)
            return None
        if not self.exists():
            raise LcpcError(f"--resume: {self.folder} holds no checkpoint ({FILE}); run without --resume first")
        return self.load()

    def load(self) -> dict:
        import torch
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: never half-read
            raise LcpcError(f"{self.path}: not a readable recovery checkpoint ({type(exc).__name__}); remove it "
                            f"and recover again") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise LcpcError(f"{self.path}: written by another lcpc version; remove it and recover again")
        saved = json.loads(state["fingerprint"])
        keys = sorted(set(saved) | set(self.fingerprint))
        differs = [key for key in keys if saved.get(key) != self.fingerprint.get(key)]
        if differs:
            raise LcpcError(f"--resume: the checkpoint in {self.folder} is of another recovery (its "
                            f"{', '.join(differs)} differ from this run's); pass the same folder, data and "
                            f"settings, or another --checkpoint folder")
        return state

    def save(self, state: dict, summary: dict) -> None:
        """Write ``state`` (tensors, numbers, strings) and its readable ``summary`` atomically."""
        import torch
        self.folder.mkdir(parents=True, exist_ok=True)
        full = {**state, "format": FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        _replace(self.path, lambda f: torch.save(full, f))
        text = json.dumps({**summary, "fingerprint": self.fingerprint}, indent=1, default=str).encode()
        _replace(self.folder / SUMMARY, lambda f: f.write(text))


def _replace(path: Path, write) -> None:
    """Write ``path`` through a temporary sibling, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
