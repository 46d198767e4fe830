"""Partition pass: assign every channel class of every split space to a branch, balanced.

Guarantee: for every ``S`` tensor t with C channels, each branch owns at least one
and (when classes are single channels) at most ceil(C / K) channels of t — also for
the sub-ranges a channel Split/Slice takes and the parts a Concat joins, since every
``S`` tensor is its own capacity constraint.

Method (``contiguous``): walk each space's classes in creation order and fill one
branch at a time up to its capacity in every tensor the class appears in, moving to
the next branch when a capacity would be exceeded. Without splits this gives each
branch one contiguous block of channels; with splits it interleaves as needed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np

from lcpc.errors import LcpcError
from lcpc.plan import Plan


def run(plan: Plan) -> Plan:
    constraints = split_constraints(plan)
    branch_of_class: dict[int, int] = {}
    for space, tensors in constraints.items():
        branch_of_class.update(_fill(plan, tensors))
    new = replace(plan, branch_of_class=branch_of_class, partition_method="contiguous", _cache={})
    check_balance(new)
    return new


def split_constraints(plan: Plan) -> dict[int, dict[str, np.ndarray]]:
    """Per space, one class array per distinct ``S`` tensor (duplicates dropped)."""
    by_space: dict[int, dict[str, np.ndarray]] = defaultdict(dict)
    seen: set[tuple[int, bytes]] = set()
    a = plan.analysis
    for t, layout in plan.layouts.items():
        if layout != "S":
            continue
        cls = a.classes[t]
        for space in sorted({a.space_of_class[int(c)] for c in np.unique(cls)}):
            part = cls[np.array([a.space_of_class[int(c)] == space for c in cls])]
            key = (space, part.tobytes())
            if key not in seen:
                seen.add(key)
                by_space[space][t] = part
    return by_space


def _fill(plan: Plan, tensors: dict[str, np.ndarray]) -> dict[int, int]:
    k = plan.k
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for t, cls in tensors.items():
        values, n = np.unique(cls, return_counts=True)
        for c, m in zip(values.tolist(), n.tolist()):
            counts[c][t] = m
    cap = {t: math.ceil(len(cls) / k) for t, cls in tensors.items()}
    load = {t: [0] * k for t in tensors}
    assignment: dict[int, int] = {}
    current = 0
    for c in sorted(counts):
        def fits(b: int) -> bool:
            return all(load[t][b] + m <= cap[t] for t, m in counts[c].items())
        choice = next((b for b in [(current + i) % k for i in range(k)] if fits(b)), None)
        if choice is None:  # classes larger than a share: least-loaded branch
            choice = min(range(k), key=lambda b: max(load[t][b] / cap[t] for t in counts[c]))
        for t, m in counts[c].items():
            load[t][choice] += m
        assignment[c] = choice
        current = choice
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
                            f"{g.info(t).shape[1]} channels in {n_cls} independent groups; use "
                            f"--branches {max_branches(plan)} or fewer")


def max_branches(plan: Plan) -> int:
    """The largest K for which every split tensor keeps at least one group per branch."""
    a = plan.analysis
    sizes = [len(np.unique(a.classes[t])) for t, lay in plan.layouts.items() if lay == "S"]
    return max(1, min(sizes, default=1))
