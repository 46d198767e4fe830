"""Cost figures for the report and manifest: per-graph compute and memory, and the
traffic of the same model under other parallelisations.

Guarantees:
- ``graph_costs`` counts FLOPs with ``node_flops`` (the same model the
  planner uses), parameters and weight bytes from the graph's constants, and peak
  activation bytes as the largest sum of live tensors while nodes run in order;
- ``pipeline_bytes`` splits the original graph into K consecutive stages of about
  equal FLOPs and counts every tensor crossing a stage boundary once, plus the
  outputs sent back to the head; ``data_parallel_bytes`` is one input sent to a
  worker and its outputs returned (per image handled away from the head).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcpc.ir import Graph, Node


@dataclass(frozen=True)
class GraphCosts:
    flops: int
    params: int
    weight_bytes: int
    peak_activation_bytes: int


def graph_costs(g: Graph) -> GraphCosts:
    last_use: dict[str, int] = {}
    for step, n in enumerate(g.nodes):
        for i in n.inputs:
            if i and i not in g.constants:
                last_use[i] = step
    for o in g.outputs:
        last_use[o] = len(g.nodes)
    live = {i: g.info(i).nbytes for i in g.inputs}
    peak = sum(live.values())
    for step, n in enumerate(g.nodes):
        for o in n.outputs:
            if o:
                live[o] = g.info(o).nbytes
        peak = max(peak, sum(live.values()))
        for t in [t for t in live if last_use.get(t, -1) <= step]:
            del live[t]
    params = sum(int(v.size) for v in g.constants.values())
    weight_bytes = sum(int(v.nbytes) for v in g.constants.values())
    return GraphCosts(sum(node_flops(n, g) for n in g.nodes), params, weight_bytes, int(peak))


def pipeline_bytes(g: Graph, k: int) -> int:
    flops = np.array([node_flops(n, g) for n in g.nodes], dtype=np.float64)
    bounds = np.searchsorted(np.cumsum(flops), np.sum(flops) * np.arange(1, k) / k)
    stage_of = {}
    for step, n in enumerate(g.nodes):
        s = int(np.searchsorted(bounds, step, side="right"))
        for o in n.outputs:
            stage_of[o] = s
    for i in g.inputs:
        stage_of[i] = 0
    index = {n.name: step for step, n in enumerate(g.nodes)}
    total = 0
    for t, s in stage_of.items():
        if not t:
            continue
        users = [int(np.searchsorted(bounds, index[c.name], side="right")) for c in g.consumers(t)]
        crossings = {u for u in users if u != s}
        total += len(crossings) * g.info(t).nbytes
    last = int(np.searchsorted(bounds, len(g.nodes) - 1, side="right"))
    if last != 0:
        total += sum(g.info(o).nbytes for o in g.outputs)
    return total


def data_parallel_bytes(g: Graph) -> int:
    return sum(g.info(i).nbytes for i in g.inputs) + sum(g.info(o).nbytes for o in g.outputs)


def node_flops(node: Node, g: Graph) -> int:
    """Floating-point operations of one node (a multiply-add counts 2)."""
    out = [o for o in node.outputs if o]
    if not out:
        return 0
    out_elems = int(np.prod(g.info(out[0]).shape, dtype=np.int64))
    if node.op == "Conv" and len(node.inputs) > 1:
        w = g.info(node.inputs[1]).shape
        return 2 * out_elems * int(np.prod(w[1:], dtype=np.int64))
    if node.op == "ConvTranspose" and len(node.inputs) > 1:
        w = g.info(node.inputs[1]).shape
        in_elems = int(np.prod(g.info(node.inputs[0]).shape, dtype=np.int64))
        return 2 * in_elems * int(np.prod(w[1:], dtype=np.int64))
    if node.op in ("Gemm", "MatMul"):
        a = g.info(node.inputs[0]).shape
        k = a[0] if node.op == "Gemm" and node.attr("transA", 0) else a[-1]
        return 2 * out_elems * int(k)
    if node.op in ("MaxPool", "AveragePool", "LpPool"):
        return out_elems * int(np.prod(node.attr("kernel_shape", [1])))
    if node.op.startswith("Global") or node.op.startswith("Reduce"):
        return int(np.prod(g.info(node.inputs[0]).shape, dtype=np.int64))
    return out_elems


def node_params(node: Node, g: Graph) -> int:
    return sum(int(g.constants[i].size) for i in node.inputs if i in g.constants)
