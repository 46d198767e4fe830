"""Prune pass: structured channel pruning inside each branch, by whole channel classes.

The channel-space analysis already knows which channels are coupled: a residual Add,
a Concat, a depthwise chain, an SE gate and the classifier's inputs all share *classes*
(``lcpc.analysis``). Removing a class removes every channel of it in every tensor, so
the graph stays valid: each producing layer loses the class's output rows (weights via
``lcpc.weights``, bias), each consuming layer its input columns, per-channel constants
their entries, a grouped conv its groups, a flatten its features; shapes shrink.

Rules:
- a class is *prunable* when every tensor holding it is split (``S``) and is neither a
  model input nor output, and nothing reads it that cannot be sliced (an exact-sync
  op, a channel Split/Slice, a ``keep`` input, a grouped conv on a replicated input);
- importance of class c: the squared weights that produce it, each layer's share
  normalised by that layer's mean (so layers weigh alike); with calibration data,
  times the mean |activation| of c at those layers' outputs (normalised likewise);
- in every (space, branch) bucket, round(ratio * prunable classes) of the least
  important go — the same number in every branch of a balanced space — but every split
  tensor keeps at least one channel per branch; when a multiple of 8 kept classes comes
  within 1/8 of the ratio, the nearest such is kept instead: on x86 convs run slower
  just off such widths (a 3x3 conv of 31 channels takes 1.7x the time of one of 32, 1
  thread: ``benchmarks/results/channel_blocks.md``);
- with calibration data, every dense layer that lost input channels is then refit by
  ridge least squares so that, fed the pruned model's own inputs, it reproduces the
  original layer's output on its kept channels (layer-wise reconstruction, He et al. 2017)
  — pruning 0.3 of the digits example keeps at least 97% test accuracy uncut this way, and
  more than without (``tests/test_prune.py``).

Guarantees:
- ``apply(plan, record)`` computes exactly what ``plan`` computes with the removed
  channels' consumer columns zeroed (the removed channels contribute nothing) — the
  pruned plan equals its unpruned-but-zeroed equivalent (tested); ``run`` without data
  returns exactly that plan;
- the result is re-analysed and its layouts re-derived: the surviving classes keep their
  branches and every layer keeps its cut/exchange decision, so ``lower`` and every
  target work on it;
- ``run`` returns the plan and a ``Pruning`` record (one (tensor, channel) per removed
  class, in the original graph's names; whether consumers were refit) that
  ``prune_graph`` replays on the original model (``stored_plan`` reads a pruned folder
  that way; ``pipeline.recover`` refits the consumers again on its data).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np

from lcpc import ops
from lcpc.analysis import analyse, channel_inputs
from lcpc.calibrate import run_graph_values
from lcpc.errors import LcpcError
from lcpc.ir import Graph, Node
from lcpc.passes.layouts import assign_layouts
from lcpc.plan import Action, Plan, check
from lcpc.weights import DenseWeight, im2col, masked_graph

ACT_SAMPLES = 32
ALIGN = 8  # channels per branch kept in multiples of this when the branch has a multiple of it
RECONSTRUCT_SAMPLES = 256


@dataclass(frozen=True)
class Pruning:
    """What ``run`` removed: per tensor of the original graph, the channels naming removed classes."""

    ratio: float
    importance: str
    removed: dict[str, list[int]] = field(default_factory=dict)
    reconstructed: bool = False  # consumers refit on calibration data (``reconstruct_consumers``)

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "importance": self.importance, "removed": self.removed,
                "reconstructed": self.reconstructed}

    @classmethod
    def from_dict(cls, d: dict) -> Pruning:
        return cls(float(d["ratio"]), str(d["importance"]), {k: [int(i) for i in v] for k, v in d["removed"].items()},
                   bool(d.get("reconstructed", False)))


def check_ratio(ratio: float) -> None:
    if not (isinstance(ratio, (int, float)) and np.isfinite(ratio) and 0 <= ratio < 1):
        raise LcpcError(f"--prune {ratio}: choose a fraction in [0, 1) (0.3 removes 30% of each branch's "
                        f"prunable channels)")


def run(plan: Plan, ratio: float, calib: np.ndarray | None = None, reconstruct: bool = True
        ) -> tuple[Plan, Pruning]:
    """Remove ``ratio`` of the prunable channel classes of every branch (see the module rules)."""
    check_ratio(ratio)
    prunable = prunable_classes(plan)
    score = importance(plan, prunable, calib)
    buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
    for c in prunable:
        buckets[(plan.analysis.space_of_class[c], plan.branch_of_class[c])].append(c)
    removed: set[int] = set()
    for bucket in buckets.values():
        removed.update(sorted(bucket, key=lambda c: (score[c], c))[:how_many(len(bucket), ratio)])
    removed = _keep_one_per_branch(plan, removed, score)
    record = Pruning(float(ratio), "weight+activation" if calib is not None else "weight", _names(plan, removed),
                     reconstructed=calib is not None and reconstruct and bool(removed))
    pruned = apply(plan, record)
    if record.reconstructed and calib is not None:
        pruned = reconstructed(plan.graph, pruned, record, calib)
    return pruned, record


def reconstructed(original: Graph, pruned: Plan, record: Pruning, data: np.ndarray) -> Plan:
    """``pruned`` (``apply(plan of original, record)``) with its consumers refit on ``data``."""
    _, keep = prune_graph(original, analyse(original), record)
    return replace(pruned, graph=reconstruct_consumers(original, pruned, data, keep))


def reconstruct_consumers(original: Graph, pruned: Plan, calib: np.ndarray, keep: dict[str, np.ndarray],
                          max_rows: int = 20000, ridge: float = 1e-3) -> Graph:
    """Refit every dense layer that lost input channels so that, fed the pruned model's own
    inputs, it reproduces the original layer's output on its kept output channels (ridge
    least squares, He et al. 2017): min ||[P 1][W; b] - Y_orig||^2 + lam ||W||^2."""
    g, a = pruned.graph, pruned.analysis
    rng = np.random.default_rng(0)
    step = g.info(g.inputs[0]).shape[0]
    calib = calib[:RECONSTRUCT_SAMPLES * step]
    for node in g.nodes:
        b = a.behaviours[node.name]
        x_name, y_name = node.inputs[0], node.outputs[0]
        if not isinstance(b, ops.Dense) or node.op not in ("Conv", "Gemm") or \
                g.info(x_name).shape == original.info(x_name).shape:
            continue
        if node.op == "Gemm" and (node.attr("alpha", 1.0) != 1.0 or node.attr("beta", 1.0) != 1.0):
            continue
        view = DenseWeight.of(node, b)
        w = g.constants[view.weight]
        if node.op == "Conv" and (w.ndim != 4 or node.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID")):
            continue
        x = run_graph_values(g, calib, [x_name])[0]
        y = run_graph_values(original, calib, [y_name])[0]
        if y.shape[1] != g.info(y_name).shape[1]:  # the layer lost output channels too
            y = y[:, keep[y_name]]
        p = im2col(x, w.shape[2:], node.attr("strides", [1, 1]), node.attr("dilations", [1, 1]),
                   node.attr("pads", [0, 0, 0, 0])) if node.op == "Conv" else x.reshape(len(x), -1)
        t = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
        rows = rng.choice(len(t), size=max_rows, replace=False) if len(t) > max_rows else slice(None)
        p, t = p[rows].astype(np.float64), t[rows].astype(np.float64)
        has_bias = view.bias is not None and g.constants[view.bias].size == t.shape[1]
        if has_bias:
            p = np.concatenate([p, np.ones((len(p), 1))], axis=1)
        reg = ridge * np.trace(p.T @ p) / max(p.shape[1], 1) * np.eye(p.shape[1])
        if has_bias:
            reg[-1, -1] = 0.0
        sol = np.linalg.solve(p.T @ p + reg, p.T @ t)
        coef = sol[:-1] if has_bias else sol
        out_idx, in_idx = np.arange(t.shape[1]), np.arange(g.info(x_name).shape[1])
        w = np.array(w, copy=True)
        view.put_matrix(w, out_idx, in_idx, coef.astype(w.dtype))
        updates = {view.weight: w}
        if has_bias and view.bias is not None:
            bias = g.constants[view.bias]
            updates[view.bias] = sol[-1].reshape(bias.shape).astype(bias.dtype)
        g = g.with_constants(updates)
    return g


def how_many(n: int, ratio: float) -> int:
    """Classes to remove from a bucket of ``n``: round(ratio * n), or, when a multiple of
    ``ALIGN`` kept comes within 1/8 of ``ratio``, the nearest such (conv kernels run fastest
    on widths that are multiples of 8)."""
    plain = int(np.floor(ratio * n + 0.5))
    if ratio > 0 and n >= 2 * ALIGN:
        keep = int(ALIGN * np.floor(n * (1 - ratio) / ALIGN + 0.5))
        if ALIGN <= keep < n and abs((n - keep) / n - ratio) <= 1 / 8:
            return n - keep
    return plain


def prunable_classes(plan: Plan) -> list[int]:
    g, a = plan.graph, plan.analysis
    blocked: set[int] = set()
    seen: set[int] = set()
    ends = set(g.inputs) | set(g.outputs)
    for t, cls in a.classes.items():
        cs = set(cls.tolist())
        seen |= cs
        if plan.layouts.get(t) != "S" or t in ends:
            blocked |= cs
            continue
        for node in g.consumers(t):
            if not _sliceable_use(node, t, g, a):
                blocked |= cs
                break
        producer = g.producer(t)
        if producer is not None and isinstance(a.behaviours[producer.name], ops.Grouped) \
                and producer.inputs[0] not in a.classes:
            blocked |= cs
    return sorted(seen - blocked)


def _sliceable_use(node: Node, t: str, g: Graph, a) -> bool:
    b = a.behaviours[node.name]
    if isinstance(b, (ops.Sync, ops.ChannelSlice)):
        return False
    if isinstance(b, ops.Dense):
        return node.inputs[0] == t and t not in node.inputs[1:]
    if isinstance(b, ops.Channelwise):
        aligned = dict(channel_inputs(node, g, b))
        return all(aligned.get(i) is not None for i, (name, role) in enumerate(zip(node.inputs, b.roles))
                   if name == t)
    return True


def importance(plan: Plan, classes: list[int], calib: np.ndarray | None) -> dict[int, float]:
    g, a = plan.graph, plan.analysis
    wanted = set(classes)
    score: dict[int, float] = defaultdict(float)
    producers = [n for n in g.nodes if isinstance(a.behaviours[n.name], (ops.Dense, ops.Grouped))
                 and n.outputs[0] in a.classes]
    for n in producers:
        cls = a.classes[n.outputs[0]]
        w = g.constants[n.inputs[1]]
        behaviour = a.behaviours[n.name]
        if isinstance(behaviour, ops.Dense):
            rows = DenseWeight.of(n, behaviour).oi(w)
        else:
            rows = w if n.op != "ConvTranspose" else np.swapaxes(w, 0, 1)
        energy = (np.asarray(rows, np.float64) ** 2).reshape(rows.shape[0], -1).sum(axis=1)
        if energy.shape[0] != len(cls):  # grouped ConvTranspose: rows are per output group slot
            continue
        energy = energy / max(energy.mean(), 1e-30)
        for c, e in zip(cls.tolist(), energy.tolist()):
            if c in wanted:
                score[c] += e
    if calib is not None:
        outs = [n.outputs[0] for n in producers]
        step = g.info(g.inputs[0]).shape[0]
        values = run_graph_values(masked_graph(plan), calib[:ACT_SAMPLES * step], outs)
        act: dict[int, float] = defaultdict(float)
        for t, v in zip(outs, values):
            axis = a.axis(t)
            mean = np.abs(np.moveaxis(v, axis, 0)).reshape(v.shape[axis], -1).mean(axis=1).astype(np.float64)
            mean = mean / max(mean.mean(), 1e-30)
            for c, m in zip(a.classes[t].tolist(), mean.tolist()):
                act[c] += m
        score = {c: score[c] * act[c] for c in score}
    return {c: float(score.get(c, 0.0)) for c in classes}


def _keep_one_per_branch(plan: Plan, removed: set[int], score: dict[int, float]) -> set[int]:
    removed = set(removed)
    for t, cls in plan.analysis.classes.items():
        if plan.layouts.get(t) != "S":
            continue
        branches = plan.branches(t)
        for b in range(plan.k):
            mine = [int(c) for c in cls[branches == b]]
            if mine and all(c in removed for c in mine):
                removed.discard(max(mine, key=lambda c: score.get(c, 0.0)))
    return removed


def _names(plan: Plan, removed: set[int]) -> dict[str, list[int]]:
    """One (tensor, channel) per removed class: the first tensor in graph order that holds it."""
    out: dict[str, list[int]] = defaultdict(list)
    left = set(removed)
    order = [o for n in plan.graph.nodes for o in n.outputs if o in plan.analysis.classes]
    for t in order:
        for i, c in enumerate(plan.analysis.classes[t].tolist()):
            if c in left:
                out[t].append(i)
                left.discard(c)
    return dict(out)


def prune_graph(graph: Graph, analysis, record: Pruning) -> tuple[Graph, dict[str, np.ndarray]]:
    """``graph`` without the classes ``record`` names, and per channel-carrying tensor the
    indices of the channels it keeps."""
    removed: set[int] = set()
    for t, idx in record.removed.items():
        if t not in analysis.classes or max(idx, default=-1) >= len(analysis.classes[t]):
            raise LcpcError(f"pruning record names channels of '{t}' that this model does not have")
        removed.update(int(analysis.classes[t][i]) for i in idx)
    keep = {t: np.nonzero(~np.isin(cls, list(removed)))[0] for t, cls in analysis.classes.items()}
    return (_slice_graph(graph, analysis, keep) if removed else graph), keep


def apply(plan: Plan, record: Pruning) -> Plan:
    """``plan`` without the classes ``record`` names, re-analysed, its layouts re-derived, the
    surviving classes on their branches and every cut/exchange decision kept."""
    if not any(record.removed.values()):
        return plan
    a = plan.analysis
    graph, keep = prune_graph(plan.graph, a, record)
    analysis = analyse(graph)
    layouts, decisions = assign_layouts(graph, analysis, plan.k)
    branch_of_class: dict[int, int] = {}
    for t, cls in analysis.classes.items():
        if layouts.get(t) != "S":
            continue
        old = a.classes[t][keep[t]]
        for new_c, old_c in zip(cls.tolist(), old.tolist()):
            b = plan.branch_of_class.get(int(old_c))
            if b is None or branch_of_class.setdefault(new_c, b) != b:
                raise LcpcError(f"internal: pruning left tensor '{t}' without a consistent branch assignment")
    for name, d in plan.decisions.items():
        if d.action in (Action.CUT, Action.EXCHANGE):
            decisions[name] = d
    pruned = Plan(graph, plan.source, analysis, plan.k, layouts, branch_of_class, decisions, plan.sync_policy,
                  plan.partition_method, dict(plan.partition_energy), plan.shares, dict(plan.merges))
    if sorted(pruned.cuttable()) != sorted(plan.cuttable()):
        raise LcpcError("internal: pruning changed which layers are cut or exchanged")
    return check(pruned, "prune")


def _slice_graph(g: Graph, a, keep: dict[str, np.ndarray]) -> Graph:
    constants = dict(g.constants)
    uses: dict[str, int] = defaultdict(int)
    for n in g.nodes:
        for name in n.inputs:
            if name in g.constants:
                uses[name] += 1
    nodes = []

    def put(node: Node, pos: int, value: np.ndarray) -> None:
        name = node.inputs[pos]
        if uses[name] > 1:  # shared constant: this use gets its own copy
            name = f"{name}:{node.name}"
            node.inputs[pos] = name
        constants[name] = np.ascontiguousarray(value)

    def full(t: str) -> bool:
        return t not in keep or len(keep[t]) == len(a.classes[t])

    for node in g.nodes:
        node = Node(node.name, node.op, list(node.inputs), list(node.outputs), dict(node.attrs), node.domain)
        b = a.behaviours[node.name]
        out = node.outputs[0]
        if isinstance(b, ops.Dense):
            view = DenseWeight.of(node, b)
            w = g.constants[view.weight]
            if not full(node.inputs[0]):
                w = view.cols(w, keep[node.inputs[0]])
            if not full(out):
                w = view.rows(w, keep[out])
                if view.bias is not None and b.bias is not None and g.constants[view.bias].size > 1:
                    bias = g.constants[view.bias]
                    put(node, b.bias, np.take(bias, keep[out], axis=bias.ndim - 1))
            put(node, b.weight, w)
        elif isinstance(b, ops.Grouped) and not full(out):
            c_out = g.info(out).shape[1]
            go = c_out // b.groups
            groups = np.unique(keep[out] // go)
            w = g.constants[node.inputs[1]]
            if node.op == "ConvTranspose":
                gi = g.info(node.inputs[0]).shape[1] // b.groups
                w = w[np.concatenate([np.arange(k * gi, (k + 1) * gi) for k in groups])]
            else:
                w = w[keep[out]]
            put(node, 1, w)
            if len(node.inputs) > 2 and node.inputs[2]:
                put(node, 2, g.constants[node.inputs[2]][keep[out]])
            node.attrs["group"] = int(len(groups))
        elif isinstance(b, ops.Channelwise) and not full(out):
            aligned = dict(channel_inputs(node, g, b))
            for i, (name, role) in enumerate(zip(node.inputs, b.roles)):
                if not name or name not in g.constants:
                    continue
                value = g.constants[name]
                if role == "vec":
                    put(node, i, value[keep[out]])
                elif role == "sizes":
                    value = value.copy()
                    value[1] = len(keep[out])
                    put(node, i, value)
                elif role == "act" and aligned.get(i) is not None:
                    put(node, i, np.take(value, keep[out], axis=aligned[i]))
        elif isinstance(b, ops.Concat) and not full(out):
            offset = 0
            for i, name in enumerate(node.inputs):
                c = g.info(name).shape[b.axis]
                if name in g.constants:
                    part = keep[out][(keep[out] >= offset) & (keep[out] < offset + c)] - offset
                    put(node, i, np.take(g.constants[name], part, axis=b.axis))
                offset += c
        elif isinstance(b, ops.Reshape) and not full(out) and node.op == "Reshape" \
                and node.inputs[1] in g.constants:
            shape = list(g.info(out).shape)
            shape[a.axis(out)] = len(keep[out])
            put(node, 1, np.array(shape, np.int64))
        nodes.append(node)
    tensors = {t: (info.with_dim(a.axis(t), len(keep[t])) if not full(t) else info)
               for t, info in g.tensors.items()}
    live = {i for n in nodes for i in n.inputs}
    constants = {k: v for k, v in constants.items() if k in live}
    return g.copy(nodes=nodes, tensors=tensors, constants=constants)
