"""Balance pass: choose each branch's share of the channels so devices of different
speeds finish together.

The latency of a plan is its slowest device. With devices of different speeds
(``devices.yaml``), shares in proportion to speed do not even out the finish times: a
cut layer's work grows with the share squared, exchanges and channelwise ops linearly,
replicated ops not at all, and the head also runs the classifier merge. This pass
predicts each device's work as a function of its share ``s`` and picks the shares that
equalise ``work(s) / speed``. It runs after ``layouts`` (which fixes R / S / H) and
before ``partition`` (which turns the shares into channel counts).

With equal speeds the shares stay 1/K, even though the head has the merge on top: moving
channels off the head would leave branches with channel counts that are not multiples
of the CPU kernels' blocks (onnxruntime runs a 17-channel conv almost twice as long as a
16-channel one, ``benchmarks/results/channel_blocks.md``), which costs more than the merge;
``passes.merge`` handles the head's extra work instead.

The cost of a node is ``lcpc.perf.modelled``'s model (FLOPs, weight bytes read, a per-node
overhead). A node's work on a device with share ``s`` is

- ``R`` output (replicated): all of it, on every device;
- ``H`` output (head only): all of it, on the head;
- a cut dense layer (both sides split, dropped cross-branch weights): ``s**2`` of it;
- everything else with a split output (R->S dense layers, exchanges, grouped convs,
  channelwise ops): ``s`` of it;
- the classifier merge: all of it on the head when it gathers features, else ``s`` on
  each device plus the head's sum: the way ``passes.merge`` (which runs after the
  partition) predicts for equal shares.

Which layers are cut comes from the sync policy (``passes.cut.policy_exchanges``);
``--sync auto``, which chooses after the partition, is balanced as pure LCP.

Guarantees: the returned plan differs from the input only in ``shares``: None (1/K each)
with equal speeds, else positive, summing to 1, one per branch. Each share is at least
``MIN_SHARE`` of an equal one, so a wrong cost never starves a device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lcpc.passes import merge
from lcpc.passes.cut import policy_exchanges
from lcpc.perf.modelled import NODE_OVERHEAD, absolute_speeds, node_seconds, speeds_of, sum_seconds
from lcpc.plan import HEAD, PassResult, Plan, PlanOptions

MIN_SHARE = 0.5  # no share below this fraction of 1/K


@dataclass(frozen=True)
class Work:
    """Per-device work (seconds) ``quadratic * s**2 + linear * s + everywhere (+ head on the head)``."""

    quadratic: float
    linear: float
    everywhere: float
    head: float

    def on(self, device: int, share: float) -> float:
        return (self.quadratic * share * share + self.linear * share + self.everywhere
                + (self.head if device == HEAD else 0.0))


def run(plan: Plan, options: PlanOptions) -> PassResult:
    """``options.speeds``: each device's relative compute speed (None: all equal)."""
    speeds = speeds_of(plan.k, options.speeds)
    if np.all(speeds == speeds[0]):
        return PassResult(replace(plan, shares=None), "equal devices: equal shares")
    shares = tuple(float(s) for s in balanced_shares(work(plan, options), speeds))
    return PassResult(replace(plan, shares=shares), "shares " + ", ".join(f"{s:.3f}" for s in shares))


def work(plan: Plan, options: PlanOptions) -> Work:
    """The per-device work of ``plan`` (layouts assigned) as a function of the share."""
    g, a, lay = plan.graph, plan.analysis, plan.layouts
    cuttable = set(plan.cuttable())
    exchanged = policy_exchanges(plan, options.sync) or {}
    speeds = absolute_speeds(plan.k, options.speeds)  # the merge weighs compute against its link
    gathers = {n.name for n in merge.merged_layers(plan)
               if merge.choose(plan, n, merge.equal_channels(plan, n), speeds, options.head_bandwidth)[0] == "features"}
    quadratic = linear = everywhere = head = 0.0
    for node in g.nodes:
        outs = [o for o in node.outputs if o]
        if not outs:
            continue
        cost = node_seconds(plan, node)
        out = lay.get(outs[0])
        if node.name in gathers:
            head += cost + NODE_OVERHEAD
        elif node.name in a.terminal and lay.get(node.inputs[0]) == "S":  # partial outputs, summed on the head
            linear += cost
            everywhere += NODE_OVERHEAD
            head += sum_seconds(plan, node)
        elif out == "H":
            head += cost + NODE_OVERHEAD
        elif out == "R":
            everywhere += cost + NODE_OVERHEAD
        elif node.name in cuttable and node.name not in exchanged:
            quadratic += cost
            everywhere += NODE_OVERHEAD
        else:
            linear += cost
            everywhere += NODE_OVERHEAD
    return Work(quadratic, linear, everywhere, head)


def balanced_shares(w: Work, speeds: np.ndarray) -> np.ndarray:
    """Shares (summing to 1) that equalise ``w.on(d, s_d) / speeds[d]``, each at least
    ``MIN_SHARE / K``: bisection on the common finish time."""
    k = len(speeds)
    floor = MIN_SHARE / k
    scale = max(w.quadratic, w.linear, w.everywhere, w.head)
    if (w.quadratic <= 0 and w.linear <= 0) or scale <= 0:
        return np.full(k, 1.0 / k)
    w = Work(w.quadratic / scale, w.linear / scale, w.everywhere / scale, w.head / scale)  # only ratios matter

    def shares_at(t: float) -> np.ndarray:
        """The share at which each device's work reaches ``t * speed``: the positive root of
        quadratic * s**2 + linear * s + c = 0, in the form that stays exact as quadratic -> 0."""
        c = w.everywhere + np.where(np.arange(k) == HEAD, w.head, 0.0) - t * speeds
        denominator = w.linear + np.sqrt(np.maximum(w.linear ** 2 - 4 * w.quadratic * c, 0.0))
        with np.errstate(over="ignore"):
            s = -2 * c / np.where(denominator > 0, denominator, np.inf)  # no work left to give: share 0
        return np.maximum(s, floor)

    lo, hi = 0.0, max(w.on(d, 1.0) / speeds[d] for d in range(k))
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if shares_at(mid).sum() > 1.0:
            hi = mid
        else:
            lo = mid
    s = shares_at(hi)
    return s / s.sum()
