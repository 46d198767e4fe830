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
- ``auto`` with calibration data and a budget B (bytes per inference): backward
  elimination from the exact plan. Starting with every layer exchanged, each round
  re-measures, on the calibration data, KL(original || plan) with each remaining
  exchange removed, and removes the one that costs least KL per byte it saves; the
  rounds give a path of nested plans from ``all`` to ``none``, each measured. The chosen
  plan is the path's lowest-KL plan whose lowered plan moves at most B bytes. The path
  does not depend on B, so a larger budget never gives a worse plan on the calibration
  data; ``none`` is on the path, so the result never exceeds B and is never worse than
  ``none``. Exchanges that help little alone but much together (the case a ranking of
  single exchanges misses) are kept, since each is judged with the others in place.
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
    exchanges = policy_exchanges(plan, options.sync)
    if exchanges is None:
        exchanges = _auto(plan, plan.cuttable(), options.calib, options.comm_budget, options.progress)
    return _decide(plan, plan.cuttable(), exchanges, options.sync)


def policy_exchanges(plan: Plan, policy: str) -> dict[str, str] | None:
    """The layers ``policy`` exchanges, with their reasons; None for ``auto`` (chosen by
    measurement on the partitioned plan)."""
    layers = plan.cuttable()
    if policy == "none":
        return {}
    if policy == "all":
        return {n: "--sync all: exact exchange" for n in layers}
    if policy == "auto":
        return None
    if policy.startswith("every:"):
        step = policy.partition(":")[2]
        if not step.isdigit() or int(step) < 1:
            raise LcpcError(f"--sync {policy}: N must be a positive integer (every:2 exchanges at every 2nd "
                            f"of the {len(layers)} cut layers)")
        return {n: f"--sync {policy}" for i, n in enumerate(layers, 1) if i % int(step) == 0}
    names = [n.strip() for n in policy.split(",") if n.strip()]
    unknown = [n for n in names if n not in layers]
    if unknown:
        hint = ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "")
        raise LcpcError(f"--sync: {', '.join(unknown)} is not a layer between split tensors; choose "
                        f"among the {len(layers)} cut layers ({hint}; see `lcpc report`) or use "
                        f"{', '.join(NAMED[:4])}")
    return {n: "--sync: exchange requested" for n in names}


def _decide(plan: Plan, layers: list[str], exchanges: dict[str, str], policy: str) -> Plan:
    ops_by_name = {n.name: n.op for n in plan.graph.nodes}
    decisions = {name: d for name, d in plan.decisions.items() if d.action not in (Action.CUT, Action.EXCHANGE)}
    for name in layers:
        if name in exchanges:
            decisions[name] = Decision(name, ops_by_name[name], Action.EXCHANGE, Cause.POLICY, exchanges[name])
        else:
            decisions[name] = Decision(name, ops_by_name[name], Action.CUT, Cause.CUT, "cross-branch weights dropped")
    return replace(plan, decisions=decisions, sync_policy=policy)


def _auto(plan: Plan, layers: list[str], calib: np.ndarray | None, budget: int | None,
          progress=None) -> dict[str, str]:
    if calib is None or budget is None:
        raise LcpcError("--sync auto needs --calib X.npy (calibration inputs) and --comm-budget BYTES")
    floor = _bytes_of(plan, layers, [])
    if budget < floor:
        raise LcpcError(f"--comm-budget {budget} is below the {floor} bytes per inference that even "
                        f"--sync none moves (input broadcast and the classifier merge)")
    return choose(auto_path(plan, calib, progress), budget)


def _bytes_of(plan: Plan, layers: list[str], exchanged) -> int:
    return lower(_decide(plan, layers, dict.fromkeys(exchanged, ""), "auto")).bytes_per_inference()


def auto_path(plan: Plan, calib: np.ndarray, progress=None) -> list[dict]:
    """The backward-elimination path of ``--sync auto`` (module docstring), exact plan first:
    per step ``{"exchanges": [...], "kl": KL on calib, "agreement": top-1, "bytes": per inference,
    "cost": bytes the last removed exchange saved (estimate)}``. It does not depend on a budget."""
    layers = plan.cuttable()
    reference = run_graph(plan.graph, calib)

    def measure(exchanged: set[str]) -> dict:
        return compare(reference, run_graph(masked_graph(plan, set(layers) - exchanged), calib))

    nodes = {n.name: n for n in plan.graph.nodes}
    cost = {n: (plan.k - 1) * min(plan.graph.info(nodes[n].inputs[0]).nbytes,
                                  plan.graph.info(nodes[n].outputs[0]).nbytes) for n in layers}
    kept = list(layers)
    path = [{"exchanges": list(kept), "kl": 0.0, "agreement": 1.0, "bytes": _bytes_of(plan, layers, kept)}]
    total, done = len(layers) * (len(layers) + 1) // 2, 0
    while kept:
        trials = {}
        for name in kept:
            trials[name] = measure(set(kept) - {name})
            done += 1
            if progress is not None:
                progress(done, total, trials[name]["top1_agreement"])
        kl_now = path[-1]["kl"]
        drop = min(kept, key=lambda n: (max(trials[n]["kl_divergence"] - kl_now, 0.0) / max(cost[n], 1),
                                        trials[n]["kl_divergence"]))
        kept = [n for n in kept if n != drop]
        path.append({"exchanges": list(kept), "kl": trials[drop]["kl_divergence"],
                     "agreement": trials[drop]["top1_agreement"], "bytes": _bytes_of(plan, layers, kept),
                     "cost": cost[drop]})
    return path


def choose(path: list[dict], budget: int) -> dict[str, str]:
    """The exchanges (with their reasons) of the path's lowest-KL plan within ``budget`` bytes."""
    affordable = [p for p in path if p["bytes"] <= budget]
    best = min(affordable, key=lambda p: (p["kl"], p["bytes"]))
    base = path[-1]["kl"]
    return {n: f"--sync auto: KL {base:.4g} (none) -> {best['kl']:.4g} on calibration data at {best['bytes']} "
               f"of {budget} bytes; kept by backward elimination from the exact plan" for n in best["exchanges"]}
