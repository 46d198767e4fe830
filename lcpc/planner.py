"""Build a plan: the planning passes, in order, each checked against the plan's invariants.

    layouts (passes.layouts) -> balance (passes.balance) -> partition (passes.partition)
    -> merge (passes.merge) -> cut (passes.cut)

Every planning pass has the signature ``run(plan, options) -> PassResult`` (the new plan
and what it changed, which is logged at debug level); after each one ``plan.check``
verifies the invariants listed in ``lcpc.plan`` and names the pass that broke one.
``with_sync`` re-runs only the cut pass with another policy (the exact ``--sync all``
plan the report compares with).
"""

from __future__ import annotations

import logging

import numpy as np

from lcpc.analysis import analyse
from lcpc.errors import LcpcError
from lcpc.frontend import Source
from lcpc.ir import Graph
from lcpc.passes import balance, cut, layouts, merge, partition
from lcpc.plan import Plan, PlanOptions, check

MAX_BRANCHES = 64
log = logging.getLogger(__name__)
PASSES = (("layouts", layouts.run), ("balance", balance.run), ("partition", partition.run), ("merge", merge.run),
          ("cut", cut.run))


def plan(graph: Graph, source: Source, k: int, sync: str = "none", partition_method: str = "energy",
         calib: np.ndarray | None = None, comm_budget: int | None = None,
         speeds: tuple[float, ...] | None = None, head_bandwidth: float | None = None, progress=None,
         select=None) -> Plan:
    """Plan ``graph`` for ``k`` branches with sync policy ``sync`` (passes.cut) and
    channel partition ``partition_method`` (passes.partition), with channel shares that
    balance the devices' work (passes.balance; ``speeds``: each device's relative speed)
    and classifier merges chosen for the head's link (passes.merge; ``head_bandwidth``);
    ``progress(done, total, agreement)`` follows ``--sync auto``'s measurements; ``select``
    (``passes.cut.Select``) makes ``--sync auto`` choose among plans scored after recovery."""
    if not 2 <= k <= MAX_BRANCHES:
        raise LcpcError(f"--branches {k}: choose K between 2 and {MAX_BRANCHES}")
    options = PlanOptions(sync, partition_method, calib, comm_budget, speeds, head_bandwidth, progress, select)
    p = Plan(graph, source, analyse(graph), k, layouts={})
    for name, run in PASSES:
        result = run(p, options)
        log.debug("pass %s: %s", name, result.changed)
        p = check(result.plan, name)
    return p


def with_sync(p: Plan, sync: str) -> Plan:
    """The same plan (layouts, partition) with the exchanges of another sync policy."""
    return check(cut.run(p, PlanOptions(sync, p.partition_method)).plan, "cut")
