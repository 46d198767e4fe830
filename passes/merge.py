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
inference on one core, half a branch's compute at K = 16 (``benchmarks/results/narrow.md``,
"head merge ms"). ``partial`` trades those
seconds for (K-1) x |output| bytes. The pass picks the way with the earlier predicted
finish on the head: the merge's compute (``lcpc.perf.modelled``'s model, divided by the
devices' speeds as devices.yaml gives them, so boards a tenth as fast as the reference core
take ten times as long beside the same link) plus the bytes the head receives over its link
(``PlanOptions.head_bandwidth``, from ``devices.yaml``; default ``lcpc.perf.network``'
100 Mbit/s). Both ways send one message per branch, so per-message latency cancels.
So the choice depends on K and the link: ``benchmarks/results/narrow.md`` lists it per
model at 100 Mbit/s and 10 Gbit/s (ResNet-50 gathers features from K = 8 on at 100 Mbit/s
and sums partial outputs at every K at 10 Gbit/s).

Guarantees: the returned plan differs from the input only in ``merges`` (one entry,
``features`` or ``partial``, per terminal Dense layer with a split input) and in the
reason of those layers' merge decisions, which gives both predictions.
"""

from __future__ import annotations

from dataclasses import replace

from lcpc.perf.modelled import absolute_speeds, node_seconds, sum_seconds
from lcpc.perf.network import DEFAULT_BANDWIDTH
from lcpc.plan import HEAD, Action, PassResult, Plan, PlanOptions


def run(plan: Plan, options: PlanOptions) -> PassResult:
    speeds = absolute_speeds(plan.k, options.speeds)
    merges, decisions = {}, dict(plan.decisions)
    for node in merged_layers(plan):
        channels = [len(plan.own(node.inputs[0], d)) for d in range(plan.k)]
        mode, features, partial = choose(plan, node, channels, speeds, options.head_bandwidth)
        feature_bytes, partial_bytes = merge_bytes(plan, node, channels)
        merges[node.name] = mode
        decisions[node.name] = replace(decisions[node.name], reason=(
            f"classifier: exact merge at the head, {mode} ({'gathered' if mode == 'features' else 'summed'}); "
            f"predicted {1e3 * features:.3g} ms gathering {feature_bytes} B of features against "
            f"{1e3 * partial:.3g} ms summing {partial_bytes} B of partial outputs at "
            f"{8 * (options.head_bandwidth or DEFAULT_BANDWIDTH) / 1e6:.4g} Mbit/s"))
    return PassResult(replace(plan, merges=merges, decisions=decisions),
                      ", ".join(f"{n}: {m}" for n, m in merges.items()) or "no classifier to merge")


def merged_layers(plan: Plan) -> list:
    return [n for n in plan.graph.nodes if (d := plan.decisions.get(n.name)) is not None
            and d.action == Action.MERGE and plan.layouts.get(n.inputs[0]) == "S"]


def equal_channels(plan: Plan, node) -> list[float]:
    """Each device's channels of the merge's input at equal shares (before a partition)."""
    return [plan.graph.info(node.inputs[0]).shape[plan.analysis.axis(node.inputs[0])] / plan.k] * plan.k


def merge_bytes(plan: Plan, node, channels) -> tuple[int, int]:
    """Bytes the head receives per inference, (gathering features, summing partial outputs),
    when device d holds ``channels[d]`` of the merge's input channels."""
    x, y = plan.graph.info(node.inputs[0]), plan.graph.info(node.outputs[0])
    per_channel = x.nbytes / x.shape[plan.analysis.axis(node.inputs[0])]
    others = sum(c for d, c in enumerate(channels) if d != HEAD)
    return round(others * per_channel), (plan.k - 1) * y.nbytes


def choose(plan: Plan, node, channels, speeds, bandwidth: float | None) -> tuple[str, float, float]:
    """``(mode, predicted seconds gathering features, predicted seconds summing partial
    outputs)`` on a head link of ``bandwidth`` bytes/s (None: the default)."""
    bandwidth = bandwidth or DEFAULT_BANDWIDTH
    feature_bytes, partial_bytes = merge_bytes(plan, node, channels)
    compute, total = node_seconds(plan, node), sum(channels)
    features = compute / speeds[HEAD] + feature_bytes / bandwidth
    partial = (max(compute * c / total / v for c, v in zip(channels, speeds)) + sum_seconds(plan, node) / speeds[HEAD]
               + partial_bytes / bandwidth)
    return ("features" if features <= partial else "partial"), features, partial


def fewest_bytes(plan: Plan) -> dict[str, str]:
    """The merges of a plan recorded before this pass existed (lowered by bytes alone)."""
    merges = {}
    for n in merged_layers(plan):
        feature_bytes, partial_bytes = merge_bytes(plan, n, [len(plan.own(n.inputs[0], d)) for d in range(plan.k)])
        merges[n.name] = "features" if feature_bytes <= partial_bytes else "partial"
    return merges
