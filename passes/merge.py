"""Merge pass: how each classifier (a terminal Dense layer on split features) meets at the head.

Both ways are exact:
- ``features``: every branch sends its slice of the layer's input; the head gathers them
  and runs the whole layer;
- ``partial``: every branch multiplies its own features by its columns of the weight (a
  classifier 1/K as wide) and sends that partial output; the head adds the K of them
  and the bias.

``features`` moves fewer bytes whenever the layer's input is narrower per branch than
its output (pooled features into 1000 logits from K = 4 on), but then the head reads the
whole weight matrix after everything else: on a ResNet-50, 8 MB and about 0.7 ms per
inference on one core, half a branch's compute at K = 16. ``partial`` trades those
seconds for (K-1) x |output| bytes. The pass picks the way with the earlier predicted
finish on the head: the merge's compute (``passes.balance``'s cost model, scaled by the
devices' speeds) plus the bytes the head receives over its link
(``PlanOptions.head_bandwidth``, from ``devices.yaml``; default ``lcpc.devices``'
100 Mbit/s). Both ways send one message per branch, so per-message latency cancels.
With the default link the fewest-bytes way wins on every model we ship; a fast link
(a few Gbit/s) makes ``partial`` the choice for large classifiers.

Guarantees: the returned plan differs from the input only in ``merges`` (one entry,
``features`` or ``partial``, per terminal Dense layer with a split input) and in the
reason of those layers' merge decisions, which gives both predictions.
"""

from __future__ import annotations

from dataclasses import replace

from lcpc.devices import DEFAULT_BANDWIDTH
from lcpc.passes.balance import head_sum_seconds, node_seconds, speeds_of
from lcpc.plan import HEAD, Action, Plan, PlanOptions

MODES = ("features", "partial")


def run(plan: Plan, options: PlanOptions) -> Plan:
    bandwidth = options.head_bandwidth or DEFAULT_BANDWIDTH
    speeds = speeds_of(plan.k, options.speeds)
    merges, decisions = {}, dict(plan.decisions)
    for node in merged_layers(plan):
        feature_bytes, partial_bytes = merge_bytes(plan, node)
        compute = node_seconds(plan, node)
        own = [len(plan.own(node.inputs[0], d)) / plan.graph.info(node.inputs[0]).shape[plan.analysis.axis(node.inputs[0])]
               for d in range(plan.k)]
        features = compute / speeds[HEAD] + feature_bytes / bandwidth
        partial = (max(compute * s / v for s, v in zip(own, speeds)) + head_sum_seconds(plan, node) / speeds[HEAD]
                   + partial_bytes / bandwidth)
        mode = "features" if features <= partial else "partial"
        merges[node.name] = mode
        d = decisions[node.name]
        decisions[node.name] = replace(d, reason=(
            f"classifier: exact merge at the head, {mode} ({'gathered' if mode == 'features' else 'summed'}); "
            f"predicted {1e3 * features:.3g} ms gathering {feature_bytes} B of features against "
            f"{1e3 * partial:.3g} ms summing {partial_bytes} B of partial outputs at "
            f"{8 * bandwidth / 1e6:.4g} Mbit/s"))
    return replace(plan, merges=merges, decisions=decisions)


def merged_layers(plan: Plan) -> list:
    return [n for n in plan.graph.nodes if (d := plan.decisions.get(n.name)) is not None
            and d.action == Action.MERGE and plan.layouts.get(n.inputs[0]) == "S"]


def merge_bytes(plan: Plan, node) -> tuple[int, int]:
    """Bytes the head receives per inference: (gathering features, summing partial outputs)."""
    x, y = plan.graph.info(node.inputs[0]), plan.graph.info(node.outputs[0])
    others = sum(len(plan.own(node.inputs[0], d)) for d in range(plan.k) if d != HEAD)
    return others * x.nbytes // x.shape[plan.analysis.axis(node.inputs[0])], (plan.k - 1) * y.nbytes


def fewest_bytes(plan: Plan) -> dict[str, str]:
    """The merges of a plan recorded before this pass existed (lowered by bytes alone)."""
    return {n.name: "features" if (b := merge_bytes(plan, n))[0] <= b[1] else "partial" for n in merged_layers(plan)}
