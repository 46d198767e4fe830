"""Partition pass: assign every channel class of every split space to a branch, balanced.

Guarantee: for every ``S`` tensor t with C channels, each branch owns at least one
and (when classes are single channels) at most ceil(C / K) channels of t — also for
the sub-ranges a channel Split/Slice takes and the parts a Concat joins, since every
``S`` tensor is its own capacity constraint.

Methods:
- ``contiguous``: balance groups of classes that share split tensors (a space, its
  Split/Slice pieces, the spaces a Concat joins). Classes go in creation order to the
  current branch while it holds at most floor(C/K) channels of every tensor they are
  in, then to the branch whose worst tensor ends least over its share C/K. When K
  divides the channel counts this is one contiguous block per branch; otherwise the
  remainders interleave so every tensor and every piece stays within ceil(C/K).
- ``energy`` (default): start from ``contiguous`` and swap interchangeable classes
  (same tensors, same channel counts in each, so balance is unchanged) between branches
  while the *weight energy kept* by the cut grows: sum over layers between split
  tensors of ||W[o, i]||^2 over pairs (o, i) on the same branch — the weights the cut
  keeps (Kernighan-Lin style rounds of best swaps, a round kept only if the exact
  energy grows). The cut drops the rest, so keeping the heaviest connections inside
  branches is what makes the pure LCP model closest to the original.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np

from lcpc.errors import LcpcError
from lcpc.plan import Plan


METHODS = ("energy", "contiguous")
MAX_ROUNDS = 30


def run(plan: Plan, method: str = "energy") -> Plan:
    if method not in METHODS:
        raise LcpcError(f"--partition {method}: choose one of {', '.join(METHODS)}")
    constraints = split_constraints(plan)
    branch_of_class: dict[int, int] = {}
    for space, tensors in constraints.items():
        branch_of_class.update(_fill(plan, tensors))
    new = replace(plan, branch_of_class=branch_of_class, partition_method="contiguous", _cache={})
    check_balance(new)
    contiguous = energy_kept(new)
    if method == "energy":
        new = replace(new, branch_of_class=_refine(new, constraints), partition_method="energy", _cache={})
        check_balance(new)
    return replace(new, partition_energy={"kept": energy_kept(new), "kept_contiguous": contiguous})


def _layer_energies(plan: Plan) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(E[out, in] = squared weights summed over other axes, out classes, in classes) per
    dense layer between split tensors."""
    from lcpc.passes.cut import cuttable

    g, a = plan.graph, plan.analysis
    nodes = {n.name: n for n in g.nodes}
    layers = []
    for name in cuttable(plan):
        n, b = nodes[name], a.behaviours[name]
        w = g.constants[n.inputs[b.weight]].astype(np.float64) ** 2
        other = tuple(ax for ax in range(w.ndim) if ax not in (b.out_axis, b.in_axis))
        e = w.sum(axis=other) if other else w
        if b.out_axis > b.in_axis:
            e = e.T
        layers.append((e, a.classes[n.outputs[0]], a.classes[n.inputs[0]]))
    return layers


def energy_kept(plan: Plan) -> float:
    """Fraction of the squared weights of layers between split tensors that the cut keeps."""
    kept = total = 0.0
    for e, c_out, c_in in _layer_energies(plan):
        same = np.array([plan.branch_of_class[int(c)] for c in c_out])[:, None] == \
            np.array([plan.branch_of_class[int(c)] for c in c_in])[None, :]
        kept += float(e[same].sum())
        total += float(e.sum())
    return kept / total if total else 1.0


def _refine(plan: Plan, constraints: dict[int, dict[str, np.ndarray]]) -> dict[int, int]:
    layers = _layer_energies(plan)
    classes = sorted(plan.branch_of_class)
    index = {c: i for i, c in enumerate(classes)}
    assign = np.array([plan.branch_of_class[c] for c in classes])
    idx_layers = [(e, np.array([index[int(c)] for c in co]), np.array([index[int(c)] for c in ci]))
                  for e, co, ci in layers]
    # classes are interchangeable when they sit in the same space with the same footprint
    footprint: dict[int, list] = defaultdict(list)
    for space, tensors in constraints.items():
        for t, cls in tensors.items():
            values, counts = np.unique(cls, return_counts=True)
            for c, m in zip(values.tolist(), counts.tolist()):
                footprint[c].append((space, t, m))
    groups: dict[tuple, list[int]] = defaultdict(list)
    for c in classes:
        groups[tuple(sorted(footprint[c]))].append(index[c])
    groups_arr = [np.array(g) for g in groups.values() if len(g) > 1]

    group_of = np.full(len(classes), -1)
    for gi, members in enumerate(groups_arr):
        group_of[members] = gi
    touching = [[li for li, (_, co, ci) in enumerate(idx_layers)
                 if (group_of[co] == gi).any() or (group_of[ci] == gi).any()] for gi in range(len(groups_arr))]

    def kept(a: np.ndarray, layer_ids) -> float:
        return sum(float(idx_layers[li][0][a[idx_layers[li][1]][:, None] == a[idx_layers[li][2]][None, :]].sum())
                   for li in layer_ids)

    def connections(a: np.ndarray, gi: int) -> np.ndarray:
        """conn[c, b]: energy between member class c of group gi and the classes branch b holds."""
        conn = np.zeros((len(classes), plan.k))
        onehot = np.eye(plan.k)[a]
        for li in touching[gi]:
            e, co, ci = idx_layers[li]
            rows, cols = group_of[co] == gi, group_of[ci] == gi
            if rows.any():
                np.add.at(conn, co[rows], e[rows] @ onehot[ci])
            if cols.any():
                np.add.at(conn, ci[cols], e[:, cols].T @ onehot[co])
        return conn

    for _ in range(MAX_ROUNDS):
        improved = False
        for gi, members in enumerate(groups_arr):
            conn = connections(assign, gi)
            trial = assign.copy()
            for p in range(plan.k):
                for q in range(p + 1, plan.k):
                    a_side, b_side = members[trial[members] == p], members[trial[members] == q]
                    ga = conn[a_side, q] - conn[a_side, p]
                    gb = conn[b_side, p] - conn[b_side, q]
                    a_side, ga = a_side[np.argsort(-ga)], np.sort(ga)[::-1]
                    b_side, gb = b_side[np.argsort(-gb)], np.sort(gb)[::-1]
                    n = min(len(a_side), len(b_side))
                    gain = ga[:n] + gb[:n]
                    run = int(np.argmin(gain > 0)) if (gain <= 0).any() else n
                    trial[a_side[:run]], trial[b_side[:run]] = q, p
            before, after = kept(assign, touching[gi]), kept(trial, touching[gi])
            if after > before * (1 + 1e-12):
                assign, improved = trial, True
        if not improved:
            break
    return {c: int(assign[i]) for i, c in enumerate(classes)}


def split_constraints(plan: Plan) -> dict[int, dict[str, np.ndarray]]:
    """Groups of classes to balance together, each with its distinct ``S`` tensors.

    Classes that share an ``S`` tensor (a space, its Split/Slice pieces, the spaces a
    Concat joins) land in one group, so every tensor they appear in is a constraint."""
    from lcpc.analysis import UnionFind

    a = plan.analysis
    tensors = {}
    for t, layout in plan.layouts.items():
        if layout == "S":
            tensors.setdefault(a.classes[t].tobytes(), (t, a.classes[t]))
    all_classes = sorted({int(c) for _, cls in tensors.values() for c in cls})
    index = {c: i for i, c in enumerate(all_classes)}
    uf = UnionFind()
    uf.add(len(all_classes))
    for _, cls in tensors.values():
        first = index[int(cls[0])]
        for c in np.unique(cls):
            uf.union(first, index[int(c)])
    groups: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    for t, cls in tensors.values():
        groups[uf.find(index[int(cls[0])])][t] = cls
    return dict(groups)


def _fill(plan: Plan, tensors: dict[str, np.ndarray]) -> dict[int, int]:
    """Classes in creation order; each goes to the current branch while that branch stays
    at or under floor(C/K) channels of every tensor the class is in, else to the branch
    whose worst tensor ends least over its share C/K (ties: lowest branch)."""
    k = plan.k
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for t, cls in tensors.items():
        values, n = np.unique(cls, return_counts=True)
        for c, m in zip(values.tolist(), n.tolist()):
            counts[c][t] = m
    share = {t: len(cls) / k for t, cls in tensors.items()}
    load = {t: np.zeros(k) for t in tensors}
    assignment: dict[int, int] = {}
    current = 0
    for c in sorted(counts):
        footprint = counts[c]
        if not all(load[t][current] + m <= math.floor(share[t]) for t, m in footprint.items()):
            over = np.max([load[t] + m - share[t] for t, m in footprint.items()], axis=0)
            current = int(np.argmin(over))
        for t, m in footprint.items():
            load[t][current] += m
        assignment[c] = current
    return assignment


def check_balance(plan: Plan) -> None:
    """Every branch owns at least one channel of every split tensor, else a clear error."""
    g = plan.graph
    for t, layout in plan.layouts.items():
        if layout != "S":
            continue
        owned = np.bincount(plan.branches(t), minlength=plan.k)
        if owned.min() == 0:
            node = g.producer(t)
            where = f"tensor '{t}'" + (f" from {node.describe()}" if node else "")
            n_cls = len(np.unique(plan.analysis.classes[t]))
            raise LcpcError(f"--branches {plan.k} is larger than the channel space of {where}: it has "
                            f"{g.info(t).shape[plan.analysis.axis(t)]} channels in {n_cls} independent groups; use "
                            f"--branches {max_branches(plan)} or fewer")


def max_branches(plan: Plan) -> int:
    """The largest K for which every split tensor keeps at least one group per branch."""
    a = plan.analysis
    sizes = [len(np.unique(a.classes[t])) for t, lay in plan.layouts.items() if lay == "S"]
    return max(1, min(sizes, default=1))
