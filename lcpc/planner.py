"""Build a plan: layouts for every tensor, then the partition and sync passes.

Layout rules (DESIGN.md, "layouts and transitions"):
- model inputs are ``R``;
- a Dense layer turns ``R`` or ``S`` into ``S`` (R->S is free; S->S is the cut or an
  exact exchange, decided by ``passes.cut``), except a *terminal* Dense layer (the
  classifier), whose output is merged exactly on the head: ``H``; a Dense layer with
  a single output channel produces ``R`` (nothing to split);
- grouped convs, channelwise ops, Concat, channel Slice/Split and channel-keeping
  reshapes keep ``S`` when any channel-carrying input is ``S``, else ``R``;
- any op on an ``H`` input runs on the head: ``H``;
- a tensor whose channel groups are fewer than K (an SE bottleneck of 4 channels at
  K = 8) runs whole on every device (``R``), behind an exact gather; a K that leaves
  more than a quarter of the FLOPs unsplit that way is refused with the largest K that works;
- an op lcpc does not model (``Sync``) sees whole inputs: an exact all-gather in
  front of it, replicated compute behind it (``R``), and a decision with its reason.
"""

from __future__ import annotations

import numpy as np

from lcpc import ops
from lcpc.analysis import analyse, channel_inputs
from lcpc.errors import LcpcError
from lcpc.frontend import Source
from lcpc.ir import Graph
from lcpc.plan import Decision, Layout, Plan

MAX_BRANCHES = 64


def plan(graph: Graph, source: Source, k: int, sync: str = "none", partition_method: str = "energy",
         calib=None, comm_budget: int | None = None) -> Plan:
    """Plan ``graph`` for ``k`` branches with sync policy ``sync`` (passes.cut) and
    channel partition ``partition_method`` (passes.partition)."""
    from lcpc.passes import cut, partition

    if not 2 <= k <= MAX_BRANCHES:
        raise LcpcError(f"--branches {k}: choose K between 2 and {MAX_BRANCHES}")
    analysis = analyse(graph)
    layouts, decisions = assign_layouts(graph, analysis, k)
    _refuse_mostly_replicated(graph, analysis, decisions, k)
    p = Plan(graph, source, analysis, k, layouts, decisions=decisions)
    p = partition.run(p, partition_method)
    return cut.run(p, sync, calib, comm_budget)


NARROW = "channel groups cannot be split over"
MAX_NARROW_FLOPS = 0.25


def _refuse_mostly_replicated(graph: Graph, analysis, decisions: dict[str, Decision], k: int) -> None:
    """Narrow spaces run whole on every device; refuse a K that leaves much compute unsplit."""
    narrow = [n for n, d in decisions.items() if NARROW in d.reason]
    total = sum(analysis.flops.values()) or 1
    share = sum(analysis.flops[n] for n in narrow) / total
    if share > MAX_NARROW_FLOPS:
        widest_ok = max_split_branches(graph, analysis)
        raise LcpcError(f"--branches {k} is larger than the channel space of {len(narrow)} layers "
                        f"({100 * share:.0f}% of the FLOPs would run unsplit on every device); use "
                        f"--branches {widest_ok} or fewer")


def max_split_branches(graph: Graph, analysis) -> int:
    """The largest K that splits every space (the narrowest split tensor's channel groups)."""
    layouts, _ = assign_layouts(graph, analysis, 1)
    sizes = [len(np.unique(analysis.classes[t])) for t, lay in layouts.items() if lay == "S"]
    return max(1, min(min(sizes, default=1), MAX_BRANCHES))


def assign_layouts(graph: Graph, analysis, k: int) -> tuple[dict[str, Layout], dict[str, Decision]]:
    layouts: dict[str, Layout] = {i: "R" for i in graph.inputs}
    decisions: dict[str, Decision] = {}

    def lay(name: str) -> Layout | None:
        return layouts.get(name) if name and name not in graph.constants else None

    for node in graph.nodes:
        b = analysis.behaviours[node.name]
        ins = [lay(i) for i in node.inputs]
        outs = [o for o in node.outputs if o]
        if "H" in ins:
            out: Layout = "H"
        elif isinstance(b, ops.Dense):
            c_out = graph.info(outs[0]).shape[b.axis]
            if node.name in analysis.terminal:
                out = "H"
                reason = "classifier: exact merge of the branches at the head"
                decisions[node.name] = Decision(node.name, node.op, "merge", reason)
            elif c_out == 1:
                out = "R"
                if ins[0] == "S":
                    decisions[node.name] = Decision(node.name, node.op, "forced-sync",
                                                    "a single output channel cannot be split")
            else:
                out = "S"
        elif isinstance(b, ops.Grouped):
            out = "S"
        elif isinstance(b, ops.Sync):
            out = "R"
            if "S" in ins:
                decisions[node.name] = Decision(node.name, node.op, "forced-sync", b.reason)
        elif isinstance(b, ops.Channelwise):
            carrying = [ins[i] for i, ax in channel_inputs(node, graph, b) if ax is not None]
            out = "S" if "S" in carrying else "R"
        else:  # Concat, ChannelSlice, Reshape
            out = "S" if "S" in ins else "R"
        if out == "S" and any(o not in analysis.classes for o in outs):
            raise LcpcError(f"internal: {node.describe()} produced a split tensor without channel classes")
        groups = min((len(np.unique(analysis.classes[o])) for o in outs), default=0) if out == "S" else 0
        if out == "S" and groups < k:
            out = "R"
            decisions[node.name] = Decision(node.name, node.op, "forced-sync",
                                            f"{groups} {NARROW} {k} branches: computed whole on every device")
        for o in outs:
            layouts[o] = out
    return layouts, decisions
