"""Channel-space analysis and cost model of a loaded graph.

Guarantees:
- every channel of every tensor that can be split gets an *atom* id; atoms that must
  share a branch (residual Add operands, a grouped conv's group on a split input, a
  depthwise channel and its multiplier outputs) are merged into one *class* (union-find);
- classes created together (one Dense layer's outputs) and classes merged later form a
  *space*: the unit the partitioner balances over K branches;
- a Dense layer is *terminal* when no other channel-mixing layer is downstream of it
  (the classifier): the planner merges it exactly at the head;
- every node's FLOPs and parameters come from ``lcpc.perf.costs`` (``node_flops``, ``node_params``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lcpc import ops
from lcpc.ir import Graph, Node
from lcpc.perf.costs import node_flops, node_params


class UnionFind:
    """Disjoint sets over 0..n-1 that grow on demand."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class Analysis:
    """What the planner needs to know about channels and costs."""

    behaviours: dict[str, ops.Behaviour]
    classes: dict[str, np.ndarray]        # tensor -> class id per channel
    space_of_class: dict[int, int]        # class -> space
    terminal: set[str]                    # names of terminal Dense nodes
    flops: dict[str, int]
    params: dict[str, int]
    axes: dict[str, int] = field(default_factory=dict)  # split-able tensor -> its channel axis

    def axis(self, tensor: str) -> int:
        """The channel axis of a tensor (1, NCHW, unless a Transpose moved it)."""
        return self.axes.get(tensor, 1)

    def space(self, tensor: str) -> int | None:
        cls = self.classes.get(tensor)
        return None if cls is None else self.space_of_class[int(cls[0])]


def channel_inputs(node: Node, g: Graph, behaviour: ops.Channelwise) -> list[tuple[int, int | None]]:
    """(input index, its axis aligned with the output's channel axis, or None when that
    input is broadcast along the channels) for each ``act`` input."""
    out_shape = g.info(node.outputs[0]).shape
    c = out_shape[behaviour.out_axis]
    result: list[tuple[int, int | None]] = []
    for i, (name, role) in enumerate(zip(node.inputs, behaviour.roles)):
        if not name or role != "act":
            continue
        shape = g.info(name).shape
        if behaviour.broadcast:
            axis = behaviour.out_axis - (len(out_shape) - len(shape))
        else:
            axis = behaviour.in_axis
        if 0 <= axis < len(shape) and shape[axis] == c and c != 1:
            result.append((i, axis))
        else:
            result.append((i, None))
    return result


def carrier_axis(node: Node, g: Graph, ids: dict, axes: dict) -> int:
    """The channel axis of the node's first channel-carrying input, in input 0's coordinates."""
    carrier = next((i for i in node.inputs if i in ids), None)
    if carrier is None or not node.inputs or not node.inputs[0]:
        return 1
    return axes[carrier] + len(g.info(node.inputs[0]).shape) - len(g.info(carrier).shape)


def output_axis(b: ops.Behaviour) -> int:
    if isinstance(b, (ops.Channelwise, ops.Reshape)):
        return b.out_axis
    if isinstance(b, (ops.Dense, ops.Concat, ops.ChannelSlice)):
        return b.axis
    return 1


def analyse(g: Graph) -> Analysis:
    atoms, spaces = UnionFind(), UnionFind()
    ids: dict[str, np.ndarray] = {}
    axes: dict[str, int] = {}
    behaviours: dict[str, ops.Behaviour] = {}
    space_of_atom: list[int] = []

    def fresh(n: int) -> np.ndarray:
        new = atoms.add(n)
        space = int(spaces.add(1)[0])
        space_of_atom.extend([space] * n)
        return new

    def unite(a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            atoms.union(x, y)
            spaces.union(space_of_atom[x], space_of_atom[y])

    for node in g.nodes:
        b = ops.classify(node, g, carrier_axis(node, g, ids, axes))
        behaviours[node.name] = b
        outs = [o for o in node.outputs if o]
        for o in outs:
            axes[o] = output_axis(b)
        if isinstance(b, ops.Channelwise):
            carried = [(node.inputs[i], ax) for i, ax in channel_inputs(node, g, b)
                       if ax is not None and node.inputs[i] in ids]
            if carried:
                base = ids[carried[0][0]]
                for name, _ in carried[1:]:
                    unite(base, ids[name])
                for o in outs:
                    ids[o] = base
        elif isinstance(b, ops.Dense):
            ids[outs[0]] = fresh(g.info(outs[0]).shape[b.axis])
        elif isinstance(b, ops.Grouped):
            c_out = g.info(outs[0]).shape[1]
            c_in = g.info(node.inputs[0]).shape[1]
            out = fresh(c_out)
            src = ids.get(node.inputs[0])
            if src is not None:  # a split input: each group's inputs and outputs share a branch
                gi, go = c_in // b.groups, c_out // b.groups
                for grp in range(b.groups):
                    members = np.concatenate([out[grp * go:(grp + 1) * go], src[grp * gi:(grp + 1) * gi]])
                    unite(np.repeat(members[:1], len(members) - 1), members[1:])
            ids[outs[0]] = out
        elif isinstance(b, ops.Concat):
            if any(i in ids for i in node.inputs):
                ids[outs[0]] = np.concatenate([
                    ids[i] if i in ids else fresh(g.info(i).shape[b.axis]) for i in node.inputs])
        elif isinstance(b, ops.ChannelSlice):
            if node.inputs[0] in ids:
                for o, (start, stop) in zip(outs, b.ranges):
                    ids[o] = ids[node.inputs[0]][start:stop]
        elif isinstance(b, ops.Reshape):
            if node.inputs[0] in ids:
                src_shape = g.info(node.inputs[0]).shape
                per_channel = int(np.prod(src_shape)) // (src_shape[0] * src_shape[b.in_axis])
                ids[outs[0]] = np.repeat(ids[node.inputs[0]], per_channel)

    roots = np.array([atoms.find(a) for a in range(len(atoms.parent))], dtype=np.int64)
    classes = {t: roots[a] for t, a in ids.items()}
    space_of_class = {int(r): spaces.find(space_of_atom[int(r)]) for r in set(roots.tolist())}
    return Analysis(behaviours, classes, space_of_class, _terminal(g, behaviours),
                    {n.name: node_flops(n, g) for n in g.nodes},
                    {n.name: node_params(n, g) for n in g.nodes}, {t: axes[t] for t in ids})


def _terminal(g: Graph, behaviours: dict[str, ops.Behaviour]) -> set[str]:
    """Dense nodes with no Dense/Grouped node downstream."""
    mixing = {n.name for n in g.nodes if isinstance(behaviours[n.name], (ops.Dense, ops.Grouped))}
    feeds_mixing: dict[str, bool] = {}
    for node in reversed(g.nodes):
        feeds_mixing[node.name] = any(
            c.name in mixing or feeds_mixing.get(c.name, False)
            for o in node.outputs if o for c in g.consumers(o))
    return {n for n in mixing if isinstance(behaviours[n], ops.Dense) and not feeds_mixing[n]}
