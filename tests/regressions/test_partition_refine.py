"""The swap refinement's shortcuts change nothing: ``partition._refine`` makes exactly the swaps of
the plain loop it replaced, which tries every group in every round and every branch pair in it.

``_refine`` tries a group again only once its connections changed and skips a branch pair
whose best two gains sum to zero or less; both shortcuts are meant to be exact, so the
assignment must be identical on every zoo model at every K it can be split into (up to 16)."""

from __future__ import annotations

import numpy as np
import pytest

from examples.zoo import ZOO
from lcpc import frontend, planner
from lcpc.passes import partition


def _plain_refine(plan, constraints, layers) -> dict[int, int]:
    """The refinement loop before the shortcuts (main at c4a761c), on the same helpers."""
    classes = layers.classes
    assign = np.array([plan.branch_of_class[c] for c in classes])
    groups = partition._swap_groups(classes, constraints)
    touching = partition._touching(groups, layers, len(classes))
    conn = np.zeros((len(classes), plan.k))
    layers.update(conn, range(len(layers.e)), np.full_like(assign, -1), assign, np.ones(len(classes), bool))
    kept = layers.kept(assign)
    for _ in range(partition.MAX_ROUNDS):
        improved = False
        for gi, members in enumerate(groups):
            trial = assign.copy()
            for p in range(plan.k):
                for q in range(p + 1, plan.k):
                    partition._swap_pair(conn, trial, members, p, q)
            changed = trial != assign
            if not changed.any():
                continue
            moved = np.nonzero(changed)[0]
            delta = float(conn[moved, trial[moved]].sum() - conn[moved, assign[moved]].sum())
            delta += sum(layers.within(li, assign, trial, changed) for li in touching[gi])
            if delta > kept * 1e-12:
                kept += delta
                layers.update(conn, touching[gi], assign, trial, changed)
                assign, improved = trial, True
        if not improved:
            break
    return {c: int(assign[i]) for i, c in enumerate(classes)}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_refine_makes_the_plain_loops_swaps(name):
    graph, source = frontend.load(ZOO[name]().SerializeToString())
    base = planner.plan(graph, source, 2, "none", "contiguous")
    for k in (2, 3, 4, 8, 16):
        if k > partition.max_branches(base):
            break
        plan = planner.plan(graph, source, k, "none", "contiguous")
        constraints = partition.split_constraints(plan)
        fast = partition._refine(plan, constraints, partition._Layers(partition._layer_energies(plan),
                                                                      sorted(plan.branch_of_class)))
        plain = _plain_refine(plan, constraints, partition._Layers(partition._layer_energies(plan),
                                                                   sorted(plan.branch_of_class)))
        assert fast == plain, (name, k)
        assert fast != plan.branch_of_class, (name, k)  # the refinement did swap something
