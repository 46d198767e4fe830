"""Cut pass: decide, for every Dense layer between split tensors, cut or exchange.

- ``cut`` (LCP): branch k keeps only W[own_k(out), own_k(in)] — the block-diagonal
  part of the weight. No communication, ~1/K of the layer's FLOPs per device, the
  cross-branch terms sum_{j != k} W[own_k(out), own_j(in)] x_j are dropped (approximate).
- ``exchange`` (exact): the lowering either all-gathers the input (cost (K-1)|x|) or
  reduce-scatters partial outputs (cost (K-1)|y|), whichever moves fewer bytes.

Policies:
- ``none``: cut every such layer (pure LCP: branches meet only at the classifier);
- ``all``: exchange at every one (channel-wise model parallelism: the original model);
- ``every:N``: exchange at every N-th such layer in graph order (layers N, 2N, ...);
- ``NODE,NODE,...``: exchange exactly at the named nodes (unknown names are refused);
- ``auto`` with calibration data and a budget B (bytes per inference): measure, on the
  calibration data, how much each exchange alone lowers KL(original || plan), rank the
  layers by that gain per byte, and keep the prefix of the ranking with the lowest
  measured KL whose lowered plan moves at most B bytes. The empty prefix is ``none``,
  so the result never exceeds B and is never worse than ``none`` on the calibration data.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lcpc.calibrate import run_graph
from lcpc.errors import LcpcError
from lcpc.fidelity import compare
from lcpc.lower import lower
from lcpc.plan import Action, Cause, Decision, Plan, PlanOptions
from lcpc.weights import masked_graph

NAMED = ("none", "all", "auto", "every:N", "NODE,NODE,...")


def run(plan: Plan, options: PlanOptions) -> Plan:
    policy = options.sync
    layers = plan.cuttable()
    reasons: dict[str, str]
    if policy == "none":
        reasons = {}
    elif policy == "all":
        reasons = {n: "--sync all: exact exchange" for n in layers}
    elif policy.startswith("every:"):
        step = policy.partition(":")[2]
        if not step.isdigit() or int(step) < 1:
            raise LcpcError(f"--sync {policy}: N must be a positive integer (every:2 exchanges at every 2nd "
                            f"of the {len(layers)} cut layers)")
        reasons = {n: f"--sync {policy}" for i, n in enumerate(layers, 1) if i % int(step) == 0}
    elif policy == "auto":
        reasons = _auto(plan, layers, options.calib, options.comm_budget)
    else:
        names = [n.strip() for n in policy.split(",") if n.strip()]
        unknown = [n for n in names if n not in layers]
        if unknown:
            hint = ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "")
            raise LcpcError(f"--sync: {', '.join(unknown)} is not a layer between split tensors; choose "
                            f"among the {len(layers)} cut layers ({hint}; see `lcpc report`) or use "
                            f"{', '.join(NAMED[:4])}")
        reasons = {n: "--sync: exchange requested" for n in names}
    return _decide(plan, layers, reasons, policy)


def _decide(plan: Plan, layers: list[str], exchanges: dict[str, str], policy: str) -> Plan:
    ops_by_name = {n.name: n.op for n in plan.graph.nodes}
    decisions = {name: d for name, d in plan.decisions.items() if d.action not in (Action.CUT, Action.EXCHANGE)}
    for name in layers:
        if name in exchanges:
            decisions[name] = Decision(name, ops_by_name[name], Action.EXCHANGE, Cause.POLICY, exchanges[name])
        else:
            decisions[name] = Decision(name, ops_by_name[name], Action.CUT, Cause.CUT, "cross-branch weights dropped")
    return replace(plan, decisions=decisions, sync_policy=policy)


def _auto(plan: Plan, layers: list[str], calib: np.ndarray | None, budget: int | None) -> dict[str, str]:
    if calib is None or budget is None:
        raise LcpcError("--sync auto needs --calib X.npy (calibration inputs) and --comm-budget BYTES")
    floor = lower(_decide(plan, layers, {}, "none")).bytes_per_inference()
    if budget < floor:
        raise LcpcError(f"--comm-budget {budget} is below the {floor} bytes per inference that even "
                        f"--sync none moves (input broadcast and the classifier merge)")
    reference = run_graph(plan.graph, calib)

    def kl(exchanged: set[str]) -> float:
        out = run_graph(masked_graph(plan, set(layers) - exchanged), calib)
        return compare(reference, out)["kl_divergence"]

    nodes = {n.name: n for n in plan.graph.nodes}
    base = kl(set())
    gains = {}
    for name in layers:
        n = nodes[name]
        cost = (plan.k - 1) * min(plan.graph.info(n.inputs[0]).nbytes, plan.graph.info(n.outputs[0]).nbytes)
        gains[name] = ((base - kl({name})) / max(cost, 1), cost)
    ranked = [n for n in sorted(layers, key=lambda n: -gains[n][0]) if gains[n][0] > 0]
    best, best_kl = [], base
    chosen: list[str] = []
    for name in ranked:
        chosen = chosen + [name]
        if lower(_decide(plan, layers, dict.fromkeys(chosen, ""), "auto")).bytes_per_inference() > budget:
            chosen = chosen[:-1]
            continue
        value = kl(set(chosen))
        if value < best_kl:
            best, best_kl = list(chosen), value
    return {n: f"--sync auto: KL {base:.4g} -> {best_kl:.4g} on calibration data; this exchange alone "
               f"gains {gains[n][0] * gains[n][1]:.3g} KL for {gains[n][1]} bytes" for n in best}
