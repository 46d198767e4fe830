"""``lcpc inspect``: how lcpc treats each op of a model, before any conversion.

Guarantees: the figures come from the same analysis and layout rules ``convert``
uses (``analysis.analyse`` + ``passes.layouts.assign_layouts``), so what inspect calls
"split" is split by convert, what it calls a forced sync is one; the largest K is the
one ``convert`` accepts (the narrowest split space, in independent channel groups).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import numpy as np

from lcpc import ops
from lcpc.analysis import analyse
from lcpc.ir import Graph
from lcpc.passes.layouts import assign_layouts, max_split_branches
from lcpc.plan import Action


def treatment(behaviour: ops.Behaviour, layout: str, forced: bool) -> str:
    if isinstance(behaviour, ops.Sync):
        if behaviour.unsupported:
            return "unsupported (exact sync)"
        return "forced sync" if forced else "replicated"
    if layout == "S":
        return "split"
    if layout == "H":
        return "head"
    return "replicated"


def inspect_graph(g: Graph) -> dict[str, Any]:
    a = analyse(g)
    layouts, decisions = assign_layouts(g, a, 1)
    per_op: dict[str, Counter] = defaultdict(Counter)
    syncs = []
    for n in g.nodes:
        b = a.behaviours[n.name]
        out = next(o for o in n.outputs if o)
        forced = n.name in decisions and decisions[n.name].action == Action.FORCED_SYNC
        per_op[n.op][treatment(b, layouts[out], forced)] += 1
        if isinstance(b, ops.Sync) and (forced or b.unsupported):
            gathered = sum(g.info(i).nbytes for i in n.inputs if i and layouts.get(i) == "S")
            syncs.append({"node": n.name, "op": n.op, "reason": b.reason, "unsupported": b.unsupported,
                          "split_input_bytes": gathered})
    split = [t for t, lay in layouts.items() if lay == "S"]
    spaces: dict[int | None, dict[str, Any]] = {}
    for t in split:
        space = a.space(t)
        entry = spaces.setdefault(space, {"space": space, "tensors": 0, "max_channels": 0, "groups": None})
        groups = len(np.unique(a.classes[t]))
        entry["tensors"] += 1
        entry["max_channels"] = max(entry["max_channels"], g.info(t).shape[a.axis(t)])
        entry["groups"] = groups if entry["groups"] is None else min(entry["groups"], groups)
    max_k = max_split_branches(g, a)
    return {
        "ops": {op: dict(c) for op, c in sorted(per_op.items())},
        "spaces": sorted(spaces.values(), key=lambda s: s["space"]),
        "max_branches": int(max_k),
        "syncs": syncs,
        "unsupported": sorted({s["op"] for s in syncs if s["unsupported"]}),
        "nodes": len(g.nodes),
    }


def render(data: dict[str, Any], source: str, fmt: str = "text") -> str:
    """The inspection as text (rich tables), markdown or json."""
    import io
    import json

    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if fmt == "json":
        return json.dumps(dict(data, source=source), indent=1)
    headline = (f"{source}: {data['nodes']} nodes, {len(data['spaces'])} split channel spaces, "
                f"largest K = {data['max_branches']}")
    op_rows = [[op, ", ".join(f"{n} {how}" for how, n in sorted(c.items()))] for op, c in data["ops"].items()]
    sync_rows = [[s["node"], s["op"], s["reason"], str(s["split_input_bytes"])] for s in data["syncs"]]
    if fmt == "markdown":
        out = [f"# lcpc inspect\n\n{headline}\n", "| op | treatment |", "|---|---|"]
        out += [f"| {a} | {b} |" for a, b in op_rows]
        if sync_rows:
            out += ["", "| node | op | why | split input bytes |", "|---|---|---|---|"]
            out += ["| " + " | ".join(r) + " |" for r in sync_rows]
        return "\n".join(out) + "\n"
    buf = io.StringIO()
    console = Console(file=buf, width=110, force_terminal=False, color_system=None)
    console.print(Text(headline))
    table = Table(title="Ops", title_justify="left")
    table.add_column("op")
    table.add_column("treatment (node count)")
    for row in op_rows:
        table.add_row(*map(Text, row))
    console.print(table)
    if sync_rows:
        syncs = Table(title="Exact syncs lcpc must place", title_justify="left")
        for h in ("node", "op", "why", "split input bytes"):
            syncs.add_column(h)
        for row in sync_rows:
            syncs.add_row(*map(Text, row))
        console.print(syncs)
    if data["unsupported"]:
        console.print(Text("Ops lcpc does not model: " + ", ".join(data["unsupported"]))
                      + " (converted exactly behind a sync)")
    return buf.getvalue()
