"""Rebuild the plan an output folder was written from (for recover and refit).

Guarantees: the original model is read from the manifest's source path (or the
``model`` given) and must match the recorded sha256; it is planned again with the
folder's K, input shapes, partition method and exact exchanges (as named nodes, so an
``auto`` choice is reproduced without calibration data); the result is checked to
cut and exchange exactly the layers the manifest lists, else an ``LcpcError``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lcpc import frontend, planner
from lcpc.errors import LcpcError
from lcpc.manifest import read
from lcpc.plan import Plan


def plan_from_folder(folder: str | Path, model: str | Path | None = None) -> tuple[Plan, dict]:
    manifest = read(folder)
    src = manifest["source"]
    path = Path(model) if model is not None else Path(src["path"])
    if not path.is_file():
        raise LcpcError(f"{folder}: the original model {path} is not there; pass --model PATH")
    graph, source = frontend.load(path, {i["name"]: tuple(i["shape"]) for i in src["inputs"]})
    if source.sha256 != src["sha256"]:
        raise LcpcError(f"{path}: sha256 differs from the model {folder} was converted from; pass --model "
                        f"with the original file")
    source = replace(source, path=str(path.resolve()))
    exchanges = manifest["sync"]["exchanges"]
    policy = ",".join(exchanges) if exchanges else "none"
    plan = planner.plan(graph, source, manifest["branches"], policy, manifest["sync"].get("partition", "energy"))
    plan = replace(plan, sync_policy=manifest["sync"]["policy"])
    if sorted(plan.cut_nodes()) != sorted(manifest["sync"]["cuts"]):
        raise LcpcError(f"{folder}: re-planning {path} does not reproduce the folder's cut layers; was it "
                        f"written by another lcpc version?")
    return plan, manifest
