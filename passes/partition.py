"""Partition pass: assign every channel class of every split space to a branch, balanced.

Guarantee: for every ``S`` tensor t with C channels, each branch owns at least one
(else a clear error) and, whenever it is possible at all, at most ceil(C / K) channels
of t — also for the sub-ranges a channel Split/Slice takes and the parts a Concat
joins, since every ``S`` tensor is its own constraint.

Methods:
- ``contiguous``: balance groups of classes that share split tensors (a space, its
  Split/Slice pieces, the spaces a Concat joins). Classes go in creation order to the
  current branch while it holds at most floor(C/K) channels of every tensor they are
  in, then to the branch whose tensors end least over their shares C/K. When K divides
  the channel counts this is one contiguous block per branch. Pieces that cross each
  other (a Split across a Slice) are repaired by local search (moves and swaps that
  lower the excess over [floor, ceil]) and, failing that, balanced exactly as a small
  integer program (HiGHS via scipy) — with every branch owning >= 1 channel as a hard
  constraint and the least possible excess where grouped convs make ceil(C/K)
  unreachable (3 groups of 6 channels on 2 branches).
- ``energy`` (default): start from ``contiguous`` and swap interchangeable classes
  (same tensors, same channel counts in each, so balance is unchanged) between branches
  while the *weight energy kept* by the cut grows: sum over layers between split
  tensors of ||W[o, i]||^2 over pairs (o, i) on the same branch — the weights the cut
  keeps (Kernighan-Lin style rounds of best swaps, a round kept only if the exact
  energy grows). The cut drops the rest, so keeping the heaviest connections inside
  branches is what makes the pure LCP model closest to the original. The refinement is
  incremental: the connection of every class to every branch is kept up to date from the
  classes a round moves, and a round's change of the kept energy follows exactly from
  those connections (not re-measured), so a round costs what it changes, not the size of
  the model. A group is tried again only once a kept round changed its connections, and a
  branch pair is skipped when its two best gains sum to zero or less: both shortcuts are
  exact (the swaps are those of trying everything, ``tests/regressions/test_partition_refine.py``).
  The energies are held in float32 during the refinement (sums in float64); the kept energy
  reported is computed from the weights in float64.

Unequal shares (``Plan.shares``, chosen by ``passes.balance`` from the devices' speeds
and the head's extra work): branch b's share of every split tensor is C * w[b] instead of C / K,
and every bound above reads floor(C * w[b]) and ceil(C * w[b]); equal shares change nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace

import numpy as np

from lcpc import weights
from lcpc.analysis import UnionFind
from lcpc.errors import LcpcError
from lcpc.plan import PassResult, Plan, PlanOptions

METHODS = ("energy", "contiguous")
MAX_ROUNDS = 30


def run(plan: Plan, options: PlanOptions) -> PassResult:
    """``plan.shares``: each branch's fraction of the channels (``passes.balance``; None: 1/K)."""
    method = options.partition
    if method not in METHODS:
        raise LcpcError(f"--partition {method}: choose one of {', '.join(METHODS)}")
    weights_ = _weights(plan.k, plan.shares)
    constraints = split_constraints(plan)
    branch_of_class: dict[int, int] = {}
    surplus = np.zeros(plan.k)
    for tensors in constraints.values():
        branch_of_class.update(_fill(plan, tensors, weights_, surplus))
    new = replace(plan, branch_of_class=branch_of_class, partition_method="contiguous")
    check_balance(new)
    contiguous = energy_kept(new)
    if method == "energy":
        layers = _Layers(_layer_energies(new), sorted(new.branch_of_class))
        new = replace(new, branch_of_class=_refine(new, constraints, layers), partition_method="energy")
        del layers
        check_balance(new)
    kept = energy_kept(new)
    return PassResult(replace(new, partition_energy={"kept": kept, "kept_contiguous": contiguous}),
                      f"{len(branch_of_class)} channel classes assigned ({method}): {100 * kept:.1f}% of the weight "
                      f"energy kept ({100 * contiguous:.1f}% contiguous)")


def _layer_energies(plan: Plan):
    """(E[out, in] = squared weights summed over other axes (float64), out classes, in classes)
    per dense layer between split tensors, one layer at a time (so that only one is held)."""
    g, a = plan.graph, plan.analysis
    for name in plan.cuttable():
        n = g.node(name)
        view = weights.of_plan(plan, n)
        yield _energy(view, g.constants[view.weight]), a.classes[n.outputs[0]], a.classes[n.inputs[0]]


def _energy(view: weights.DenseWeight, w: np.ndarray, block: int = 1 << 18) -> np.ndarray:
    """``view.energy(w)`` (float64), squared a block of about ``block`` weights at a time: the float64
    buffers are those of one block of output channels, not of the whole layer."""
    oi = view.oi(w)
    e = np.empty(oi.shape[:2])
    step = max(1, block // max(1, math.prod(oi.shape[1:])))
    for lo in range(0, len(e), step):
        sq = np.asarray(oi[lo:lo + step], dtype=np.float64) ** 2
        e[lo:lo + step] = sq.reshape(sq.shape[0], sq.shape[1], -1).sum(axis=2)
    return e


def energy_kept(plan: Plan, layers=None) -> float:
    """Fraction of the squared weights of layers between split tensors that the cut keeps
    (``layers``: what ``_layer_energies(plan)`` yields, when already at hand; float64 throughout)."""
    kept = total = 0.0
    for e, c_out, c_in in _layer_energies(plan) if layers is None else layers:
        same = np.array([plan.branch_of_class[int(c)] for c in c_out])[:, None] == \
            np.array([plan.branch_of_class[int(c)] for c in c_in])[None, :]
        kept += float(e[same].sum())
        total += float(e.sum())
    return kept / total if total else 1.0


class _Layers:
    """The dense layers' energies in class-index space, as ``_refine`` needs them.

    ``e[l]`` holds E[out, in] with rows and columns merged per class (a class of several
    channels sums its rows or columns), so ``rows[l]`` and ``cols[l]`` list distinct
    class indices (positions in ``classes``). The energies are summed in float64 and stored
    in float32 (half the memory of the weights' squares, which the refinement only compares
    and sums, always in float64); the kept energy reported is computed from the weights."""

    def __init__(self, layers, classes: list[int]) -> None:
        self.classes = classes
        index = {c: i for i, c in enumerate(classes)}
        self.e, self.rows, self.cols = [], [], []
        for e, co, ci in layers:
            rows, cols = np.array([index[int(c)] for c in co]), np.array([index[int(c)] for c in ci])
            e, rows = _merge_rows(e, rows)
            e_t, cols = _merge_rows(e.T, cols)
            self.e.append(np.ascontiguousarray(e_t.T, dtype=np.float32))
            self.rows.append(rows)
            self.cols.append(cols)

    def kept(self, assign: np.ndarray) -> float:
        return sum(float(e[assign[r][:, None] == assign[c][None, :]].sum(dtype=np.float64))
                   for e, r, c in zip(self.e, self.rows, self.cols))

    def within(self, li: int, old: np.ndarray, new: np.ndarray, changed: np.ndarray) -> float:
        """The part of the kept-energy change from entries of layer ``li`` whose row and column
        both changed branch, beyond what the connections of each end alone account for:
        sum of E[i, j] ([n_i = n_j] - [n_i = o_j] - [o_i = n_j] + [o_i = o_j])."""
        e, rows, cols = self.e[li], self.rows[li], self.cols[li]
        r, c = np.nonzero(changed[rows])[0], np.nonzero(changed[cols])[0]
        if not len(r) or not len(c):
            return 0.0
        n_i, o_i = new[rows[r]][:, None], old[rows[r]][:, None]
        n_j, o_j = new[cols[c]][None, :], old[cols[c]][None, :]
        weight = (n_i == n_j).astype(float) - (n_i == o_j) - (o_i == n_j) + (o_i == o_j)
        return float((e[np.ix_(r, c)] * weight).sum())

    def update(self, conn: np.ndarray, layer_ids, old: np.ndarray, new: np.ndarray, changed: np.ndarray) -> None:
        """conn[c, b] += what the classes in ``changed`` moving from ``old`` to ``new`` do to it
        (conn is linear in the one-hot assignment, so only their rows and columns count;
        ``old`` -1: on no branch yet)."""
        k = conn.shape[1]
        for li in layer_ids:
            e, rows, cols = self.e[li], self.rows[li], self.cols[li]
            r, c = np.nonzero(changed[rows])[0], np.nonzero(changed[cols])[0]
            if len(r):
                conn[cols] += _moved_sums(e, r, old[rows[r]], new[rows[r]], k, axis=0).T
            if len(c):
                conn[rows] += _moved_sums(e, c, old[cols[c]], new[cols[c]], k, axis=1).T


def _moved_sums(e: np.ndarray, idx: np.ndarray, old: np.ndarray, new: np.ndarray, k: int, axis: int) -> np.ndarray:
    """(k, n): per branch b, the slices ``idx`` of ``e`` along ``axis`` moving onto b minus those
    leaving it (``old`` -1: leaving no branch), summed in float64; n is ``e``'s other dimension."""
    out = np.zeros((k + 1, e.shape[1 - axis]))  # row k (-1) collects "no branch" and is dropped
    for side, sign in ((new, 1.0), (old, -1.0)):
        order = np.argsort(side, kind="stable")
        b = side[order]
        starts = np.flatnonzero(np.r_[True, b[1:] != b[:-1]])
        part = np.take(e, idx[order], axis=axis)
        for lo, hi in zip(starts, np.r_[starts[1:], len(b)]):  # one contiguous run per branch
            run = part[lo:hi] if axis == 0 else part[:, lo:hi]
            out[b[lo]] += sign * run.sum(axis=axis, dtype=np.float64)
    return out[:k]


def _merge_rows(e: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``e`` summed per distinct value of ``idx`` (a no-op when they are distinct)."""
    uniq, inverse = np.unique(idx, return_inverse=True)
    if len(uniq) == len(idx):
        return e, idx
    merged = np.zeros((len(uniq), e.shape[1]))
    np.add.at(merged, inverse, e)
    return merged, uniq


def _swap_groups(classes: list[int], constraints: dict[int, dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Indices (into ``classes``) of interchangeable classes: same space, same footprint (the
    same channel count in the same tensors), so swapping two leaves the balance unchanged."""
    index = {c: i for i, c in enumerate(classes)}
    footprint: dict[int, list] = defaultdict(list)
    for space, tensors in constraints.items():
        for t, cls in tensors.items():
            values, counts = np.unique(cls, return_counts=True)
            for c, m in zip(values.tolist(), counts.tolist()):
                footprint[c].append((space, t, m))
    groups: dict[tuple, list[int]] = defaultdict(list)
    for c in classes:
        groups[tuple(sorted(footprint[c]))].append(index[c])
    return [np.array(g) for g in groups.values() if len(g) > 1]


def _touching(groups: list[np.ndarray], layers: _Layers, n: int) -> list[list[int]]:
    """Per group, the layers whose rows or columns hold one of its members."""
    group_of = np.full(n, -1)
    for gi, members in enumerate(groups):
        group_of[members] = gi
    touching: list[list[int]] = [[] for _ in groups]
    for li, (rows, cols) in enumerate(zip(layers.rows, layers.cols)):
        for gi in np.unique(np.concatenate([group_of[rows], group_of[cols]])):
            if gi >= 0:
                touching[gi].append(li)
    return touching


def _refine(plan: Plan, constraints: dict[int, dict[str, np.ndarray]], layers: _Layers) -> dict[int, int]:
    """Rounds of best swaps per group, a group's round kept only if the exact kept energy grows.

    A group is tried again only once its connections changed (a round of its own or of a group
    sharing a layer with it was kept): an untouched group would make the same swaps and be
    refused again, so skipping it gives the same result as trying every group every round."""
    classes = layers.classes
    assign = np.array([plan.branch_of_class[c] for c in classes])
    groups = _swap_groups(classes, constraints)
    touching = _touching(groups, layers, len(classes))
    readers: dict[int, list[int]] = defaultdict(list)  # per layer, the groups touching it
    for gi, ids in enumerate(touching):
        for li in ids:
            readers[li].append(gi)
    # conn[c, b]: energy between class c and the classes branch b holds, kept up to date
    conn = np.zeros((len(classes), plan.k))
    layers.update(conn, range(len(layers.e)), np.full_like(assign, -1), assign, np.ones(len(classes), bool))
    kept = layers.kept(assign)
    stale = np.ones(len(groups), bool)  # groups whose connections changed since their last try
    for _ in range(MAX_ROUNDS):
        improved = False
        for gi, members in enumerate(groups):
            if not stale[gi]:
                continue
            stale[gi] = False
            trial = _swap_round(conn, assign, members, plan.k)
            changed = trial != assign
            if not changed.any():
                continue
            # exact change of the kept energy: each moved class's connections to its new branch
            # minus its old one, corrected where both ends of a weight moved (same-group layers)
            moved = np.nonzero(changed)[0]
            delta = float(conn[moved, trial[moved]].sum() - conn[moved, assign[moved]].sum())
            delta += sum(layers.within(li, assign, trial, changed) for li in touching[gi])
            if delta > kept * 1e-12:  # the round keeps more: take it
                kept += delta
                layers.update(conn, touching[gi], assign, trial, changed)
                assign, improved = trial, True
                stale[gi] = True
                for li in touching[gi]:
                    stale[readers[li]] = True
        if not improved:
            break
    return {c: int(assign[i]) for i, c in enumerate(classes)}


def _swap_round(conn: np.ndarray, assign: np.ndarray, members: np.ndarray, k: int) -> np.ndarray:
    """One group's round: for every branch pair (p, q) in order, swap the members with the
    largest gains while a swap's two gains sum above zero. A pair is skipped when its best
    two gains already sum to zero or less (its first swap would not be made): ``best[p][q]``,
    the largest gain of moving a member from p to q, is kept up to date as members move."""
    trial = assign.copy()
    best = _best_gains(conn, trial, members, k)
    for p in range(k):
        for q in range(p + 1, k):
            if best[p][q] + best[q][p] > 0 and _swap_pair(conn, trial, members, p, q):
                best = _best_gains(conn, trial, members, k)
    return trial


def _best_gains(conn: np.ndarray, trial: np.ndarray, members: np.ndarray, k: int) -> list[list[float]]:
    """best[p][q]: the largest conn[c, q] - conn[c, p] over members c on branch p (-inf: none)."""
    on = trial[members]
    order = np.argsort(on, kind="stable")
    on, c = on[order], conn[members[order]]
    gain = c - c[np.arange(len(members)), on][:, None]
    starts = np.flatnonzero(np.r_[True, on[1:] != on[:-1]])
    best = np.full((k, k), -np.inf)
    best[on[starts]] = np.maximum.reduceat(gain, starts, axis=0)
    return best.tolist()


def _swap_pair(conn: np.ndarray, trial: np.ndarray, members: np.ndarray, p: int, q: int) -> bool:
    """Swap members between branches p and q, best gains first, while the pair's gain is positive."""
    a_side, b_side = members[trial[members] == p], members[trial[members] == q]
    n = min(len(a_side), len(b_side))
    if not n:
        return False
    ga = conn[a_side, q] - conn[a_side, p]
    gb = conn[b_side, p] - conn[b_side, q]
    oa, ob = np.argsort(-ga), np.argsort(-gb)
    gain = ga[oa[:n]] + gb[ob[:n]]
    run = int(np.argmin(gain > 0)) if (gain <= 0).any() else n
    trial[a_side[oa[:run]]], trial[b_side[ob[:run]]] = q, p
    return run > 0


def split_constraints(plan: Plan) -> dict[int, dict[str, np.ndarray]]:
    """Groups of classes to balance together, each with its distinct ``S`` tensors.

    Classes that share an ``S`` tensor (a space, its Split/Slice pieces, the spaces a
    Concat joins) land in one group, so every tensor they appear in is a constraint."""

    a = plan.analysis
    tensors: dict[bytes, tuple[str, np.ndarray]] = {}  # one per distinct class vector
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


# --- heterogeneous shares (issue 9): branch b's target is C * w[b] instead of C / K ---------------
def _weights(k: int, shares: tuple[float, ...] | None) -> np.ndarray:
    if shares is None:
        return np.full(k, 1.0 / k)
    w = np.asarray(shares, dtype=np.float64)
    if len(w) != k or not np.all(w > 0):
        raise LcpcError(f"channel shares {list(shares)}: need {k} positive numbers, one per branch")
    return w / w.sum()


def _bounds(size: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per branch, floor and ceil of its share of ``size`` channels (floor(C/K), ceil(C/K) when equal)."""
    target = np.round(size * w, 9)
    return np.floor(target).astype(int), np.ceil(target).astype(int)
# --------------------------------------------------------------------------------------------------


def _fill(plan: Plan, tensors: dict[str, np.ndarray], w: np.ndarray, surplus: np.ndarray) -> dict[int, int]:
    """Classes in creation order; each stays on the current branch while that branch holds
    at most floor(C/K) channels of every tensor the class is in, else goes to the branch
    whose tensors end least over their shares C/K (compared worst first, then the next
    worst, ...; ties: the branch with the least ``surplus``, the channels over floor(C/K)
    it took in earlier groups, then the lowest branch, so remainders rotate across groups
    instead of always landing on the same branch). Adds this group's surplus to ``surplus``."""
    k = plan.k
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    for t, cls in tensors.items():
        values, n = np.unique(cls, return_counts=True)
        for c, m in zip(values.tolist(), n.tolist()):
            counts[c][t] = m
    share = {t: np.round(len(cls) * w, 9) for t, cls in tensors.items()}
    load = {t: np.zeros(k) for t in tensors}
    assignment: dict[int, int] = {}
    current = 0
    for c in sorted(counts):
        footprint = counts[c]
        if not all(load[t][current] + m <= math.floor(share[t][current]) for t, m in footprint.items()):
            over = np.array([(load[t] + m - share[t]) / share[t] for t, m in footprint.items()])
            worst_first = -np.sort(-over, axis=0)  # per branch, its tensors' overloads, descending
            current = min(range(k), key=lambda b: (*np.round(worst_first[:, b], 9), surplus[b]))
        for t, m in footprint.items():
            load[t][current] += m
        assignment[c] = current
    _repair(assignment, counts, load, {t: len(cls) for t, cls in tensors.items()}, k, w)
    for t in tensors:
        surplus += np.maximum(0.0, load[t] - np.floor(share[t]))
    return assignment


def _repair(assignment: dict[int, int], counts: dict[int, dict[str, int]], load: dict[str, np.ndarray],
            size: dict[str, int], k: int, w: np.ndarray, max_steps: int = 10000) -> None:
    """Local search for pieces that cross each other (a Split across a Slice): move or swap
    classes while that lowers the total excess over [floor(C/K), ceil(C/K)] of all tensors
    (over each branch's share, with heterogeneous shares)."""
    lo = {t: _bounds(size[t], w)[0] for t in size}
    hi = {t: _bounds(size[t], w)[1] for t in size}

    def excess(t: str, b: int, delta: int = 0) -> float:
        v = load[t][b] + delta
        empty = 1000.0 if v < 1 <= size[t] // k else 0.0  # a branch without channels cannot run at all
        return max(0.0, v - hi[t][b]) + max(0.0, lo[t][b] - v) + empty

    def gain_of_move(c: int, p: int, q: int) -> float:
        return sum(excess(t, p) + excess(t, q) - excess(t, p, -m) - excess(t, q, m)
                   for t, m in counts[c].items())

    def move(c: int, q: int) -> None:
        for t, m in counts[c].items():
            load[t][assignment[c]] -= m
            load[t][q] += m
        assignment[c] = q

    def improve(t: str, p: int) -> bool:
        over = load[t][p] > hi[t][p]
        members = [c for c in counts if t in counts[c] and (assignment[c] == p) == over]
        best: tuple[float, tuple[int, int] | None] = (1e-9, None)
        for c in members:
            src = assignment[c]
            for q in ([q for q in range(k) if q != src] if over else [p]):
                g = gain_of_move(c, src, q)
                if g > best[0]:
                    best = (g, (c, q))
        if best[1] is not None:
            move(*best[1])
            return True
        for c in members:  # no single move helps: swap with a class on another branch
            src = assignment[c]
            for d in counts:
                q = assignment[d]
                if q == src:
                    continue
                touched = set(counts[c]) | set(counts[d])
                before = sum(excess(u, b) for u in touched for b in (src, q))
                move(c, q)
                move(d, src)
                if sum(excess(u, b) for u in touched for b in (src, q)) < before - 1e-9:
                    return True
                move(d, q)
                move(c, src)
        return False

    for _ in range(max_steps):
        bad = [(t, b) for t in load for b in range(k) if excess(t, b)]
        if not bad:
            return
        if not any(improve(t, b) for t, b in bad):
            break
    solved = _balance_exactly(counts, size, k, w)
    if solved is not None:
        assignment.update(solved)


def _balance_exactly(counts: dict[int, dict[str, int]], size: dict[str, int], k: int, w: np.ndarray,
                     seconds: float = 20.0) -> dict[int, int] | None:
    """Balanced assignment as an integer program (HiGHS through scipy): every tensor within
    [floor(C/K), ceil(C/K)] per branch, or as close as possible (least total slack), every
    branch with at least one channel of every tensor. None if no solution in time."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    classes, tensors = sorted(counts), sorted(size)
    n, nt = len(classes), len(tensors)
    nx, ns = n * k, 2 * nt * k                      # x[c, b], then slack over/under per (t, b)
    rows = lil_matrix((n + 2 * nt * k, nx + ns))
    lower: list[float] = []
    upper: list[float] = []
    for i in range(n):
        rows[i, i * k:(i + 1) * k] = 1
        lower.append(1)
        upper.append(1)
    t_index = {t: j for j, t in enumerate(tensors)}
    for i, c in enumerate(classes):
        for t, m in counts[c].items():
            for b in range(k):
                rows[n + t_index[t] * k + b, i * k + b] = m
    for j, t in enumerate(tensors):
        for b in range(k):
            r = n + j * k + b
            rows[r, nx + 2 * (j * k + b)] = -1      # over
            rows[r, nx + 2 * (j * k + b) + 1] = 1   # under
            lo, hi = _bounds(size[t], w)
            lower.append(int(lo[b]))
            upper.append(int(hi[b]))
    for j, t in enumerate(tensors):  # hard: a branch without channels of a split tensor cannot run
        for b in range(k):
            r = n + nt * k + j * k + b
            for i, c in enumerate(classes):
                if t in counts[c]:
                    rows[r, i * k + b] = counts[c][t]
            lower.append(1 if size[t] >= k else 0)
            upper.append(np.inf)
    cost = np.concatenate([np.zeros(nx), np.ones(ns)])
    result = milp(cost, constraints=LinearConstraint(rows.tocsr(), lower, upper),
                  integrality=np.concatenate([np.ones(nx), np.zeros(ns)]),
                  bounds=Bounds(0, np.concatenate([np.ones(nx), np.full(ns, np.inf)])),
                  options={"time_limit": seconds})
    if result.x is None:
        return None
    x = result.x[:nx].reshape(n, k)
    return {c: int(np.argmax(x[i])) for i, c in enumerate(classes)}


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
