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
- ``auto`` with a selector as well (``PlanOptions.select``, ``passes.cut.Select``; ``lcpc
  convert --sync auto --recover TRAIN`` passes ``pipeline.RecoveredScores``): KL before
  recovery says little about a plan after it (on the digits example the plans under
  30 KB agree 9.56% with the original before the refit, 98.67-99.11% after:
  ``benchmarks/results/pareto_refit.md``). The selector
  recovers candidate plans and scores them on data they were not trained on. The
  candidates are the path's plans at up to ``CANDIDATES`` byte sizes spread evenly in
  log bytes (``spread``: the same set for every budget). Scanning the affordable ones
  from the fewest bytes up, a costlier plan replaces the kept one only when its
  held-out KL is lower by more than two standard errors, sample by sample (``pick``):
  on digits, after distillation, the plans between pure LCP and exact differ by a few
  test images, differences a held-out split cannot rank (``benchmarks/results/pareto.md``
  keeps pure LCP for every budget below exact), and spending bytes on them made a larger budget
  look worse as often as better. The exact plan (no cut) needs no test: when
  affordable, it is chosen. A larger budget only scans further, so its plan never
  scores worse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from lcpc.calibrate import run_graph
from lcpc.errors import LcpcError
from lcpc.fidelity import compare, lower_by_two_se
from lcpc.lower import lower
from lcpc.plan import Action, Cause, Decision, PassResult, Plan, PlanOptions
from lcpc.weights import masked_graph

NAMED = ("none", "all", "auto", "every:N", "NODE,NODE,...")
CANDIDATES = 6    # plans of the path a selector scores after recovery (pure LCP and exact among them)
# (candidate plans, their bytes per inference) -> per plan {"agreement", "kl"} after recovery
Select = Callable[[list[Plan], list[int]], list[dict]]


def run(plan: Plan, options: PlanOptions) -> PassResult:
    layers = plan.cuttable()
    exchanges = policy_exchanges(plan, options.sync)
    if exchanges is None:
        exchanges = _auto(plan, layers, options.calib, options.comm_budget, options.progress, options.select)
    return PassResult(_decide(plan, layers, exchanges, options.sync),
                      f"--sync {options.sync}: {len(layers) - len(exchanges)} layers cut, {len(exchanges)} exchanged")


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
          progress=None, select: Select | None = None) -> dict[str, str]:
    if calib is None or budget is None:
        raise LcpcError("--sync auto needs --calib X.npy (calibration inputs) and --comm-budget BYTES")
    floor = _bytes_of(plan, layers, [])
    if budget < floor:
        raise LcpcError(f"--comm-budget {budget} is below the {floor} bytes per inference that even "
                        f"--sync none moves (input broadcast and the classifier merge)")
    path = auto_path(plan, calib, progress)
    return choose(path, budget) if select is None else choose_scored(plan, path, budget, select)


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

    g = plan.graph
    cost = {n: (plan.k - 1) * min(g.info(g.node(n).inputs[0]).nbytes, g.info(g.node(n).outputs[0]).nbytes)
            for n in layers}
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


def spread(path: list[dict], n: int = CANDIDATES) -> list[dict]:
    """``n`` plans of ``path`` (all, if it has fewer sizes) at distinct byte sizes spread
    evenly in log bytes from pure LCP to exact (both included), fewest bytes first; for one
    size, its lowest-KL plan."""
    by_size: dict[int, dict] = {}
    for p in path:
        if p["bytes"] not in by_size or p["kl"] < by_size[p["bytes"]]["kl"]:
            by_size[p["bytes"]] = p
    sizes = sorted(by_size)
    if len(sizes) <= n:
        return [by_size[b] for b in sizes]
    logs, picks = np.log(sizes), list[int]()
    for j, target in enumerate(np.linspace(logs[0], logs[-1], n)):  # nearest size not taken, room left for the rest
        first = picks[-1] + 1 if picks else 0
        picks.append(min(range(first, len(sizes) - (n - j) + 1), key=lambda i: abs(logs[i] - target)))
    return [by_size[sizes[i]] for i in picks]


def choose_scored(plan: Plan, path: list[dict], budget: int, select: Select) -> dict[str, str]:
    """The exchanges of the affordable candidate (``spread``) that ``pick`` picks; the reason
    lists every candidate's score."""
    layers = plan.cuttable()
    candidates = [p for p in spread(path) if p["bytes"] <= budget]
    scores = select([_decide(plan, layers, dict.fromkeys(c["exchanges"], ""), "auto") for c in candidates],
                    [c["bytes"] for c in candidates])
    best = pick(scores)
    seen = "; ".join(f"{c['bytes']} B: {100 * s['agreement']:.2f}%" for c, s in zip(candidates, scores))
    return {n: f"--sync auto: held-out agreement after recovery {100 * scores[best]['agreement']:.2f}% "
               f"(KL {scores[best]['kl']:.4g}); no costlier one of the {len(candidates)} candidate plans within "
               f"{budget} bytes beats it by two standard errors ({seen})" for n in candidates[best]["exchanges"]}


def pick(scores: list[dict]) -> int:
    """Which of ``scores`` (candidates, fewest bytes first) to keep: scanning in that order, a
    costlier candidate replaces the kept one only when it is ``better``. Bytes are spent only
    for a gain the held-out data can see, and with more candidates (a larger budget) the
    scan only goes on: the kept score never gets worse."""
    kept = 0
    for i in range(1, len(scores)):
        if better(scores[i], scores[kept]):
            kept = i
    return kept


def better(a: dict, b: dict) -> bool:
    """Whether score ``a`` beats ``b``: an exact plan (``exact``: no cut, it is the original)
    beats any other; with per-sample held-out KL (``kl_samples``, the same samples), a paired
    test (mean KL lower by more than two standard errors); without, higher agreement, then
    lower KL."""
    if a.get("exact") or b.get("exact"):  # the exact plan is the original, certainly: no test needed
        return bool(a.get("exact")) and not b.get("exact")
    if "kl_samples" not in a or "kl_samples" not in b:
        return (a["agreement"], -a["kl"]) > (b["agreement"], -b["kl"])
    if np.size(a["kl_samples"]) < 2:
        return float(np.mean(b["kl_samples"])) > float(np.mean(a["kl_samples"]))
    return lower_by_two_se(a["kl_samples"], b["kl_samples"])
