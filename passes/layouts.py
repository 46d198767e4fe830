"""Layouts pass: give every tensor its layout (R, S or H) and record the forced syncs.

Rules (docs/how-it-works.md, "Layouts" and "The cut and the exchanges"):
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

Guarantees: the returned plan has a layout for every model input and node output and
a decision (typed action and cause) for every merge and forced sync; nothing else changes.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lcpc import ops
from lcpc.analysis import Analysis, channel_inputs
from lcpc.errors import LcpcError
from lcpc.ir import Graph
from lcpc.plan import LAYOUTS, Action, Cause, Decision, Layout, PassResult, Plan, PlanOptions

MAX_NARROW_FLOPS = 0.25


def run(plan: Plan, options: PlanOptions) -> PassResult:
    layouts, decisions = assign_layouts(plan.graph, plan.analysis, plan.k)
    _refuse_mostly_replicated(plan.graph, plan.analysis, decisions, plan.k)
    count = {lay: sum(1 for v in layouts.values() if v == lay) for lay in LAYOUTS}
    return PassResult(replace(plan, layouts=layouts, decisions=decisions),
                      f"{count['S']} tensors split, {count['R']} replicated, {count['H']} on the head; "
                      f"{sum(d.action == Action.FORCED_SYNC for d in decisions.values())} forced syncs")


def _refuse_mostly_replicated(graph: Graph, analysis: Analysis, decisions: dict[str, Decision], k: int) -> None:
    """Narrow spaces run whole on every device; refuse a K that leaves much compute unsplit."""
    narrow = [n for n, d in decisions.items() if d.cause == Cause.NARROW]
    total = sum(analysis.flops.values()) or 1
    share = sum(analysis.flops[n] for n in narrow) / total
    if share > MAX_NARROW_FLOPS:
        widest_ok = max_split_branches(graph, analysis)
        raise LcpcError(f"--branches {k} is larger than the channel space of {len(narrow)} layers "
                        f"({100 * share:.0f}% of the FLOPs would run unsplit on every device); use "
                        f"--branches {widest_ok} or fewer")


def max_split_branches(graph: Graph, analysis: Analysis, most: int = 64) -> int:
    """The largest K that splits every space (the narrowest split tensor's channel groups)."""
    layouts, _ = assign_layouts(graph, analysis, 1)
    sizes = [len(np.unique(analysis.classes[t])) for t, lay in layouts.items() if lay == "S"]
    return max(1, min(min(sizes, default=1), most))


def assign_layouts(graph: Graph, analysis: Analysis, k: int) -> tuple[dict[str, Layout], dict[str, Decision]]:
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
                decisions[node.name] = Decision(node.name, node.op, Action.MERGE, Cause.CLASSIFIER, reason)
            elif c_out == 1:
                out = "R"
                if ins[0] == "S":
                    decisions[node.name] = Decision(node.name, node.op, Action.FORCED_SYNC,
                                                    Cause.SINGLE_CHANNEL, "a single output channel cannot be split")
            else:
                out = "S"
        elif isinstance(b, ops.Grouped):
            out = "S"
        elif isinstance(b, ops.Sync):
            out = "R"
            if "S" in ins:
                decisions[node.name] = Decision(node.name, node.op, Action.FORCED_SYNC, Cause.MIXES, b.reason)
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
            decisions[node.name] = Decision(node.name, node.op, Action.FORCED_SYNC, Cause.NARROW,
                                            f"{groups} channel groups cannot be split over {k} branches: "
                                            f"computed whole on every device")
        for o in outs:
            layouts[o] = out
    return layouts, decisions
