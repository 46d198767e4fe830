"""The plan: which layout every tensor has, which branch owns every channel, and why.

A plan is a value. Passes take one and return a new one (``dataclasses.replace``);
targets read one and never change it. Its invariants, checked by :func:`check` after
every planning pass (``lcpc.planner``):
- ``layouts[t]`` is ``R`` (replicated on every device), ``S`` (split: each branch
  holds its own channels) or ``H`` (whole tensor on the head device only), for every
  model input and every node output;
- every ``S`` tensor has a class per channel (analysis); once partitioned, every class
  of such a tensor has a branch in ``0..k-1`` in ``branch_of_class`` and each branch
  owns >= 1 channel of it;
- ``decisions`` holds one entry per node that costs communication or accuracy, with a
  typed :class:`Action` (the cut, an exact exchange, the head merge, a forced sync),
  a typed :class:`Cause` and the reason the report prints; once the cut pass ran,
  every layer between split tensors (``cuttable``) is either cut or exchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

import numpy as np

from lcpc import ops
from lcpc.analysis import Analysis
from lcpc.errors import LcpcError
from lcpc.frontend import Source
from lcpc.ir import Graph

Layout = Literal["R", "S", "H"]
LAYOUTS = ("R", "S", "H")
HEAD = 0


class Action(StrEnum):
    """What the plan does at a node."""

    CUT = "cut"                  # LCP: block-diagonal weight, cross-branch terms dropped
    EXCHANGE = "exchange"        # exact S->S: all-gather the input or reduce-scatter the output
    MERGE = "merge"              # the classifier, merged exactly at the head
    FORCED_SYNC = "forced-sync"  # an exact gather the channel analysis requires


class Cause(StrEnum):
    """Why: the typed reason behind a decision (the text reason explains it to people)."""

    CUT = "cut"                  # the sync policy did not ask for an exchange here
    POLICY = "policy"            # the sync policy asked for an exchange here
    CLASSIFIER = "classifier"    # the terminal dense layer
    SINGLE_CHANNEL = "single-channel"  # one output channel cannot be split
    NARROW = "narrow"            # fewer channel groups than branches: computed whole everywhere
    MIXES = "mixes"              # an op that mixes channels in a way lcpc does not model


@dataclass(frozen=True)
class Decision:
    """What the plan does at one node, why (typed), and the reason the report prints."""

    node: str
    op: str
    action: Action
    cause: Cause
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        object.__setattr__(self, "cause", Cause(self.cause))


@dataclass(frozen=True)
class PlanOptions:
    """What the user asked the planning passes for (``lcpc convert`` options)."""

    sync: str = "none"
    partition: str = "energy"
    calib: np.ndarray | None = field(default=None, compare=False, repr=False)
    comm_budget: int | None = None
    speeds: tuple[float, ...] | None = None   # each device's speed against the reference core (devices.yaml)
    head_bandwidth: float | None = None       # bytes/s of the head's link (devices.yaml; None: the default)
    progress: Callable | None = field(default=None, compare=False, repr=False)  # (done, total, agreement)
    select: Callable | None = field(default=None, compare=False, repr=False)    # --sync auto: passes.cut.Select


@dataclass(frozen=True)
class Plan:
    graph: Graph
    source: Source
    analysis: Analysis
    k: int
    layouts: Mapping[str, Layout]
    branch_of_class: Mapping[int, int] = field(default_factory=dict)
    decisions: Mapping[str, Decision] = field(default_factory=dict)
    sync_policy: str = "none"
    partition_method: str = "contiguous"
    partition_energy: Mapping[str, float] = field(default_factory=dict)
    shares: tuple[float, ...] | None = None   # each branch's fraction of the channels (None: 1/K)
    merges: Mapping[str, str] = field(default_factory=dict)  # classifier -> features | partial
    # per S tensor, the branch of each channel: derived from the fields above, so never copied by
    # ``dataclasses.replace`` (init=False): every new plan starts with an empty one
    _cache: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def branches(self, tensor: str) -> np.ndarray:
        """Branch of each channel of an ``S`` tensor."""
        hit = self._cache.get(tensor)
        if hit is None:
            cls = self.analysis.classes[tensor]
            hit = np.array([self.branch_of_class[int(c)] for c in cls], dtype=np.int64)
            self._cache[tensor] = hit
        return hit

    def own(self, tensor: str, branch: int) -> np.ndarray:
        """Indices (ascending) of the channels of ``tensor`` that ``branch`` owns."""
        return np.nonzero(self.branches(tensor) == branch)[0]

    def cuttable(self) -> list[str]:
        """Dense layers whose input and output are both split, in graph order: each is
        either cut or exchanged."""
        return [n.name for n in self.graph.nodes if isinstance(self.analysis.behaviours[n.name], ops.Dense)
                and self.layouts.get(n.inputs[0]) == "S" and self.layouts.get(n.outputs[0]) == "S"]

    def cut_nodes(self) -> list[str]:
        return self.nodes_with(Action.CUT)

    def nodes_with(self, action: Action) -> list[str]:
        return [d.node for d in self.decisions.values() if d.action == action]


@dataclass(frozen=True)
class PassResult:
    """What a planning pass returns: the new plan, and what it changed, in words (the planner logs it)."""

    plan: Plan
    changed: str


def check(plan: Plan, after: str) -> Plan:
    """Raise an internal ``LcpcError`` naming the pass ``after`` when ``plan`` breaks an invariant."""
    def fail(what: str) -> None:
        raise LcpcError(f"internal: the plan after pass '{after}' {what}")

    g = plan.graph
    for name in list(g.inputs) + [o for n in g.nodes for o in n.outputs if o]:
        if plan.layouts.get(name) not in LAYOUTS:
            fail(f"gives tensor '{name}' no layout (or an unknown one)")
    split = [t for t, lay in plan.layouts.items() if lay == "S"]
    for t in split:
        if t not in plan.analysis.classes:
            fail(f"splits tensor '{t}', which has no channel classes")
    if plan.branch_of_class:
        for t in split:
            cls = plan.analysis.classes[t]
            if any(int(c) not in plan.branch_of_class for c in cls):
                fail(f"leaves channels of '{t}' without a branch")
            owners = plan.branches(t)
            if owners.min() < 0 or owners.max() >= plan.k or len(np.unique(owners)) != plan.k:
                fail(f"does not give each of the {plan.k} branches a channel of '{t}'")
    names = {n.name for n in g.nodes}
    for name, d in plan.decisions.items():
        if name != d.node or name not in names:
            fail(f"holds a decision for '{name}', which is not a node of the graph")
    if any(d.action in (Action.CUT, Action.EXCHANGE) for d in plan.decisions.values()):
        undecided = [n for n in plan.cuttable() if n not in plan.decisions]
        if undecided:
            fail(f"neither cuts nor exchanges layer '{undecided[0]}'")
    return plan
