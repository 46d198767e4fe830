"""The run order of a plan, written once for everything that follows it.

    input transfers  ->  level 0: its stages, then its transfers  ->  level 1: ...  ->  outputs

Guarantees:
- ``RunOrder(stages, transfers)`` orders any stages (with ``device`` and ``level``) and
  transfers (with ``kind``, ``level``, ``src`` and ``dst``): the manifest's typed entries
  (``lcpc.runtime.manifest``) and the lowered program's (``lcpc.lower``) alike;
- ``walk(run_level, move)`` is the one replay of that order: ``move`` every input
  transfer, then per level ``run_level`` its stages (they may run concurrently), then
  ``move`` that level's transfers. The manifest's dataflow check, the local engine, the
  in-process executor of ``lcpc.compress`` and the latency model of ``lcpc.perf.network``
  all replay a plan through it; a plan whose manifest passed validation never looks up
  a value that is not there when replayed this way;
- ``steps()`` splits each level per device into a ``Step`` (the stages the device runs at
  that level and what it sends after them, grouped by destination), so a distributed
  engine makes one call per device per level, in the same order;
- nothing here depends on how values are stored or moved, and nothing is changed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar


class _Stage(Protocol):
    @property
    def device(self) -> int: ...

    @property
    def level(self) -> int: ...


class _Transfer(Protocol):
    @property
    def kind(self) -> str: ...

    @property
    def level(self) -> int: ...

    @property
    def src(self) -> int: ...

    @property
    def dst(self) -> int: ...


S = TypeVar("S", bound=_Stage)
T = TypeVar("T", bound=_Transfer)


@dataclass(frozen=True)
class Level(Generic[S, T]):
    """One level: its stages (run concurrently), then its transfers (moved after them)."""

    level: int
    stages: tuple[S, ...]
    transfers: tuple[T, ...]


@dataclass(frozen=True)
class Step(Generic[S, T]):
    """What one device does at one level: run ``stages``, then send ``sends[dst]`` to each ``dst``."""

    level: int
    device: int
    stages: tuple[S, ...]
    sends: dict[int, tuple[T, ...]] = field(default_factory=dict)

    @property
    def destinations(self) -> list[int]:
        return sorted(self.sends)


class RunOrder(Generic[S, T]):
    """The execution order of one plan (see the module docstring)."""

    def __init__(self, stages: Iterable[S], transfers: Iterable[T]) -> None:
        transfers = list(transfers)
        self.inputs: tuple[T, ...] = tuple(t for t in transfers if t.kind == "input")
        by_stage: dict[int, list[S]] = defaultdict(list)
        by_transfer: dict[int, list[T]] = defaultdict(list)
        for s in stages:
            by_stage[s.level].append(s)
        for t in transfers:
            if t.kind != "input":
                by_transfer[t.level].append(t)
        self.levels: tuple[Level[S, T], ...] = tuple(
            Level(lv, tuple(by_stage[lv]), tuple(by_transfer[lv])) for lv in sorted(set(by_stage) | set(by_transfer)))

    def walk(self, run_level: Callable[[tuple[S, ...]], Any], move: Callable[[T], Any]) -> None:
        """Replay the order: ``move`` the input transfers, then per level ``run_level(stages)`` and
        ``move`` each of the level's transfers."""
        for t in self.inputs:
            move(t)
        for level in self.levels:
            run_level(level.stages)
            for t in level.transfers:
                move(t)

    def steps(self) -> list[list[Step[S, T]]]:
        """Per level, the steps of the devices that have work at it (stages or sends), by device."""
        out = []
        for lv in self.levels:
            work: dict[int, tuple[list[S], dict[int, list[T]]]] = {}
            for s in lv.stages:
                work.setdefault(s.device, ([], defaultdict(list)))[0].append(s)
            for t in lv.transfers:
                work.setdefault(t.src, ([], defaultdict(list)))[1][t.dst].append(t)
            out.append([Step(lv.level, d, tuple(st), {dst: tuple(ts) for dst, ts in sends.items()})
                        for d, (st, sends) in sorted(work.items())])
        return out

    def last_level(self) -> dict[int, int]:
        """Per device, the last level at which it has a step."""
        return {st.device: st.level for level in self.steps() for st in level}


BROADCASTS = ("p2p", "tree")


def broadcast_tree(receivers: Iterable[int], source: int = 0) -> list[tuple[int, int]]:
    """The model input's way from ``source`` to every receiver as (sender, receiver) pairs in the order
    they are sent: a binomial tree. Each round, every device that holds the input sends it to the
    next receiver in ``receivers``' order, so the source's uplink carries it about log2(n + 1) times
    instead of n, and n receivers have it after ceil(log2(n + 1)) rounds."""
    pending = list(receivers)
    holders = [source]
    edges: list[tuple[int, int]] = []
    while pending:
        new = []
        for h in holders:
            if not pending:
                break
            r = pending.pop(0)
            edges.append((h, r))
            new.append(r)
        holders += new
    return edges
