"""Cut pass: decide, for every Dense layer between split tensors, cut or exchange.

- ``cut`` (LCP): branch k keeps only W[own_k(out), own_k(in)] — the block-diagonal
  part of the weight. No communication, ~1/K of the layer's FLOPs per device, the
  cross-branch terms sum_{j != k} W[own_k(out), own_j(in)] x_j are dropped (approximate).
- ``exchange`` (exact): the lowering either all-gathers the input (cost (K-1)|x|) or
  reduce-scatters partial outputs (cost (K-1)|y|), whichever moves fewer bytes.

Policies: ``none`` cuts every such layer (pure LCP: branches meet only at the
classifier); ``all`` exchanges at every one (channel-wise model parallelism,
exactly the original model).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lcpc import ops
from lcpc.errors import LcpcError
from lcpc.plan import Decision, Plan

POLICIES = ("none", "all")


def cuttable(plan: Plan) -> list[str]:
    """Dense layers whose input and output are both split, in graph order."""
    g, a = plan.graph, plan.analysis
    return [n.name for n in g.nodes
            if isinstance(a.behaviours[n.name], ops.Dense)
            and plan.layouts.get(n.inputs[0]) == "S" and plan.layouts.get(n.outputs[0]) == "S"]


def run(plan: Plan, policy: str = "none") -> Plan:
    if policy not in POLICIES:
        raise LcpcError(f"--sync {policy}: choose one of {', '.join(POLICIES)}")
    ops_by_name = {n.name: n.op for n in plan.graph.nodes}
    decisions = {name: d for name, d in plan.decisions.items() if d.action not in ("cut", "exchange")}
    for name in cuttable(plan):
        if policy == "none":
            decisions[name] = Decision(name, ops_by_name[name], "cut",
                                       "--sync none: cross-branch weights dropped")
        else:
            decisions[name] = Decision(name, ops_by_name[name], "exchange",
                                       "--sync all: exact exchange")
    return replace(plan, decisions=decisions, sync_policy=policy)


def weight_masks(plan: Plan) -> dict[str, np.ndarray]:
    """For every cut layer, the 0/1 mask over its weight that the cut keeps.

    ``mask[..., o, ..., i, ...] = 1`` iff output channel o and input channel i belong
    to the same branch (broadcastable against the weight). Multiplying the original
    weight by its mask gives a model that computes exactly what the cut plan computes:
    this is how recovery trains the LCP model as one graph.
    """
    g, a = plan.graph, plan.analysis
    masks = {}
    for node in g.nodes:
        d = plan.decisions.get(node.name)
        if d is None or d.action != "cut":
            continue
        b = a.behaviours[node.name]
        w = g.constants[node.inputs[b.weight]]
        out_b, in_b = plan.branches(node.outputs[0]), plan.branches(node.inputs[0])
        shape = [1] * w.ndim
        shape[b.out_axis], shape[b.in_axis] = len(out_b), len(in_b)
        same = out_b[:, None] == in_b[None, :] if b.out_axis < b.in_axis else in_b[:, None] == out_b[None, :]
        masks[node.name] = same.reshape(shape).astype(w.dtype)
    return masks
