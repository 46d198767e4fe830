"""Read back the plan an output folder records (for recover, refit and any later pass).

Guarantees:
- nothing is planned again: layouts, the branch of every channel class and the typed
  decisions come from the manifest's ``plan`` and ``decisions``; only the channel
  analysis (a fact of the graph, not a decision) is recomputed;
- the original model is read from the manifest's source path (or the ``model`` given)
  and must match the recorded sha256 before it is used (it is the teacher of recovery);
- a pruned folder (``compression.prune``) gets the original graph without the recorded
  channel classes (``passes.prune.prune_graph``), the graph its plan was made for;
- the rebuilt plan passes ``plan.check`` and its channel classes are exactly those the
  manifest assigns, else an ``LcpcError`` says the folder was written by another lcpc.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from lcpc import frontend
from lcpc.analysis import analyse
from lcpc.errors import LcpcError
from lcpc.passes import merge, prune
from lcpc.plan import Decision, Plan, check
from lcpc.runtime.manifest import Manifest, read


def load(folder: str | Path, model: str | Path | None = None) -> tuple[Plan, Manifest]:
    """The plan ``folder`` was written from, and its manifest."""
    typed = read(folder)
    manifest = typed.json
    src = manifest["source"]
    path = Path(model) if model is not None else Path(src["path"])
    if not path.is_file():
        raise LcpcError(f"{folder}: the original model {path} is not there; pass --model PATH")
    graph, source = frontend.load(path, {i["name"]: tuple(i["shape"]) for i in src["inputs"]})
    if source.sha256 != src["sha256"]:
        raise LcpcError(f"{path}: sha256 differs from the model {folder} was converted from; pass --model "
                        f"with the original file")
    source = replace(source, path=str(path.resolve()))
    analysis = analyse(graph)
    pruning = (manifest.get("compression") or {}).get("prune")
    if pruning:  # a pruned plan: its graph is the original without the recorded channel classes
        graph, _ = prune.prune_graph(graph, analysis, prune.Pruning.from_dict(pruning))
        analysis = analyse(graph)
    recorded = manifest["plan"]
    branch_of_class = {int(c): b for c, b in recorded["branch_of_class"].items()}
    layouts = recorded["layouts"]
    split = [t for t, lay in layouts.items() if lay == "S"]
    classes = {int(c) for t in split if t in analysis.classes for c in analysis.classes[t]}
    if any(t not in analysis.classes for t in split) or classes != set(branch_of_class):
        raise LcpcError(f"{folder}: its plan does not match the channel analysis of {path}; was it written by "
                        f"another lcpc version? Convert the model again")
    decisions = {d["node"]: Decision(d["node"], d["op"], d["action"], d["cause"], d["reason"])
                 for d in manifest["decisions"]}
    sync = manifest["sync"]
    plan = Plan(graph, source, analysis, manifest["branches"], layouts, branch_of_class, decisions,
                sync["policy"], sync.get("partition", "energy"), sync.get("partition_energy", {}),
                tuple(recorded["shares"]) if "shares" in recorded else None)
    plan = replace(plan, merges=recorded["merges"] if "merges" in recorded else merge.fewest_bytes(plan))
    return check(plan, f"read from {folder}"), typed


def same_plan(a: Plan, b: Plan) -> bool:
    """Whether two plans make the same decisions on the same graph structure (weights aside):
    a plan recovered in memory can then stand in for the one a folder records."""
    def key(p: Plan):
        return (p.k, dict(p.layouts), dict(p.branch_of_class), {n: d.action for n, d in p.decisions.items()},
                dict(p.merges), p.shares, [(n.op, n.inputs, n.outputs) for n in p.graph.nodes])
    return key(a) == key(b)
