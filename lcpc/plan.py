"""The plan: which layout every tensor has, which branch owns every channel, and why.

A plan is a value. Passes take one and return a new one (``dataclasses.replace``);
targets read one and never change it. Its invariants:
- ``layouts[t]`` is ``R`` (replicated on every device), ``S`` (split: each branch
  holds its own channels) or ``H`` (whole tensor on the head device only);
- every ``S`` tensor has a class per channel (analysis) and every class of such a
  tensor has a branch in ``branch_of_class``; each branch owns >= 1 channel of it;
- ``decisions`` holds one entry per node that costs communication or accuracy (the
  cut, an exact exchange, the head merge, a forced sync), each with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping

import numpy as np

from lcpc import ops
from lcpc.analysis import Analysis
from lcpc.frontend import Source
from lcpc.ir import Graph

Layout = Literal["R", "S", "H"]
HEAD = 0
ACTIONS = ("cut", "exchange", "merge", "forced-sync")


@dataclass(frozen=True)
class Decision:
    """What the plan does at one node, and the reason the report prints."""

    node: str
    op: str
    action: str
    reason: str

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"decision for node '{self.node}': unknown action '{self.action}'")


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
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

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
        return [d.node for d in self.decisions.values() if d.action == "cut"]
