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
- an op lcpc does not model (``Sync``) sees whole inputs: an exact all-gather in
  front of it, replicated compute behind it (``R``), and a decision with its reason.
"""

from __future__ import annotations

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
    layouts, decisions = assign_layouts(graph, analysis)
    p = Plan(graph, source, analysis, k, layouts, decisions=decisions)
    p = partition.run(p, partition_method)
    return cut.run(p, sync, calib, comm_budget)


def assign_layouts(graph: Graph, analysis) -> tuple[dict[str, Layout], dict[str, Decision]]:
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
        for o in outs:
            layouts[o] = out
    return layouts, decisions
